"""The Chameleon decoder: LLaMA-2 with QK-norm and (for 34B) norm re-ordering.

One transformer over one vocabulary of text and image tokens. The model is single-device and returns raw
logits over the whole vocabulary: no modality masking happens here (that is the generation engine's job).

Conventions:
- Parameter names are Meta's (``tok_embeddings``, ``layers.{i}.attention.wq``, ``feed_forward.w1``, …).
- Rotary embeddings use the rotate-half layout, so ``wq``/``wk`` rows are in the Hugging Face order. Meta's
  interleaved checkpoints are permuted once at load time (an exact permutation), not at run time.
- QK-norm parameters are stored per head, ``[n_heads, head_dim]``: one row per head covers the 7B case
  (all rows equal) and the 30B case (4 model-parallel groups) alike.
- Packed rows (several documents in one row) pass ``doc_ids``: a token attends only to earlier tokens of
  its own document, through FlexAttention on CUDA and a boolean SDPA mask elsewhere (``document_mask``).

Shape legend: B batch, T new tokens, S keys (cache length), D model dim, H query heads, K key/value
heads, E head dim, V vocabulary.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chameleon_lm.model.config import ChameleonConfig
from chameleon_lm.model.decode_attention import cpu_kernel, decode_attention
from chameleon_lm.model.decode_attention import loaded as cpu_kernels_loaded
from chameleon_lm.model.head import OutputHead

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # a torch without FlexAttention: packed rows use SDPA masks everywhere
    BlockMask = create_block_mask = flex_attention = None


class RMSNorm(nn.Module):
    """``x · rsqrt(mean(x²) + eps) · weight``, computed in fp32 (weight multiply included) as Meta does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class HeadLayerNorm(nn.Module):
    """QK-norm: a LayerNorm over ``head_dim`` of each head, with its own weight and bias per head."""

    def __init__(self, n_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads, head_dim))

    def forward(self, x_BTHE: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x_BTHE.float(), (x_BTHE.shape[-1],), eps=self.eps)
        return (y * self.weight.float() + self.bias.float()).to(x_BTHE.dtype)


def rope_cos_sin(
    positions_BT: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[B, 1, T, E]`` (fp32) for the rotate-half layout."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=positions_BT.device).float() / head_dim)
    )
    freqs = positions_BT[..., None].float() * inv_freq  # [B, T, E/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, E]
    return emb.cos(), emb.sin()


def apply_rope(x_BHTE: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x = x_BHTE.float()
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x_BHTE.dtype)


def sdpa_document_mask(doc_ids_BT: torch.Tensor) -> torch.Tensor:
    """Boolean mask ``[B, 1, T, T]``: query t sees key s <= t of the same document id."""
    T = doc_ids_BT.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids_BT.device).tril()
    same_doc = doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :]
    return (same_doc & causal)[:, None]


def flex_document_mask(doc_ids_BT: torch.Tensor) -> BlockMask:
    """The mask of ``sdpa_document_mask`` as a FlexAttention ``BlockMask`` (blocks in which no query
    sees a key are skipped, not computed)."""

    def same_doc_causal(b, h, q, kv):
        return (doc_ids_BT[b, q] == doc_ids_BT[b, kv]) & (kv <= q)

    B, T = doc_ids_BT.shape
    return create_block_mask(same_doc_causal, B, None, T, T, device=doc_ids_BT.device)


def document_mask(doc_ids_BT: torch.Tensor) -> torch.Tensor | BlockMask:
    """The block-diagonal causal mask of packed rows, in the form the device runs fastest."""
    if flex_attention is not None and doc_ids_BT.is_cuda:
        return flex_document_mask(doc_ids_BT)
    return sdpa_document_mask(doc_ids_BT)


_compiled_flex_attention = None


def _flex_attention(q, k, v, block_mask: BlockMask, enable_gqa: bool) -> torch.Tensor:
    """FlexAttention: on CUDA the fused kernel, compiled once on first use."""
    global _compiled_flex_attention
    if not q.is_cuda or torch.compiler.is_compiling():
        # CPU: the unfused eager reference (forward only); in a compiled block dynamo fuses it there.
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention)
    return _compiled_flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding, with a length per row.

    Row b holds ``lengths[b]`` tokens: its new tokens go to the slots after them, their positions
    continue from there, and keys past its length (never written, or left by an earlier occupant of
    the row) are masked. Rows of different lengths therefore decode in one batch exactly as if each ran
    alone, without padding. :meth:`rows` gives a view of some rows (sharing storage) to run alone, e.g.
    the prefill of one new request while the others wait; :meth:`grow` and :meth:`move` let a serving
    engine resize the cache and keep its live rows together.
    """

    def __init__(
        self,
        config: ChameleonConfig,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        shape = (config.n_layers, batch_size, config.kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.host_lengths = np.zeros(batch_size, dtype=np.int64)
        """Tokens held by each row (host copy: shapes and masks never wait for the device)."""

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def length(self) -> int:
        """The longest row's length."""
        return int(self.host_lengths.max(initial=0))

    def rows(self, rows: slice) -> KVCache:
        """A view of ``rows`` (a slice): writes through it land in this cache, lengths included."""
        view = KVCache.__new__(KVCache)
        view.k, view.v, view.host_lengths = self.k[:, rows], self.v[:, rows], self.host_lengths[rows]
        return view

    def packed(self, rows: list[int], lengths: list[int]) -> PackedRows:
        """A view that takes several new sequences packed in one input row and writes each one's keys
        and values to its own (empty) row of this cache: one prefill call, no padding."""
        return PackedRows(self, rows, lengths)

    def grow(self, max_len: int, zeroed: bool = True) -> None:
        """Make room for ``max_len`` tokens per row (a copy; views taken before are stale).

        ``zeroed=False`` leaves the new slots unwritten, so that the memory of rows that never get
        there is never touched (the OS maps it on first write): only for readers that never look past
        a row's length (the CPU decode kernel; masked attention would meet NaN garbage)."""
        if max_len <= self.max_len:
            return
        n = self.length
        for name in ("k", "v"):
            old = getattr(self, name)
            make = old.new_zeros if zeroed else old.new_empty
            new = make(*old.shape[:3], max_len, old.shape[4])
            new[:, :, :, :n] = old[:, :, :, :n]
            setattr(self, name, new)

    def move(self, src: int, dst: int) -> None:
        """Copy row ``src`` (its tokens and length) onto row ``dst``."""
        n = int(self.host_lengths[src])
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.host_lengths[dst] = n

    def positions_and_mask(
        self, T: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions ``[B, T]`` of T new tokens per row, and the boolean mask ``[B, 1, T, S]`` over the
        keys they will see (None when plain causal attention or no mask at all is exact)."""
        start = torch.from_numpy(self.host_lengths).to(device)  # [B]
        positions = start[:, None] + torch.arange(T, device=device)  # [B, T]
        lengths = set(self.host_lengths.tolist())
        if lengths <= {0} or (T == 1 and len(lengths) == 1):
            return positions, None  # causal over the new tokens only, or one query seeing every key
        k_pos = torch.arange(self.length + T, device=device)  # [S]
        return positions, (k_pos[None, None, :] <= positions[:, :, None])[:, None]

    def check(self, B: int, T: int) -> None:
        if self.batch_size != B:
            raise ValueError(f"cache holds {self.batch_size} rows, input has {B}")
        if self.length + T > self.max_len:
            raise ValueError(f"cache overflow: {self.length} + {T} tokens > max_len {self.max_len}")

    def update(
        self, layer: int, k_BKTE: torch.Tensor, v_BKTE: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values of ``layer`` after each row's tokens; all keys so far ``[B, K, S, E]``
        (S = the longest row after the write)."""
        T, starts = k_BKTE.shape[2], self.host_lengths.tolist()
        k_BKTE, v_BKTE = k_BKTE.to(self.k.dtype), v_BKTE.to(self.v.dtype)
        if len(set(starts)) <= 1:
            s = starts[0] if starts else 0
            self.k[layer, :, :, s : s + T] = k_BKTE
            self.v[layer, :, :, s : s + T] = v_BKTE
        elif T == 1:
            rows = torch.arange(len(starts), device=self.k.device)
            at = torch.from_numpy(self.host_lengths).to(self.k.device)
            self.k[layer, rows, :, at] = k_BKTE[:, :, 0]
            self.v[layer, rows, :, at] = v_BKTE[:, :, 0]
        else:
            for b, s in enumerate(starts):
                self.k[layer, b, :, s : s + T] = k_BKTE[b]
                self.v[layer, b, :, s : s + T] = v_BKTE[b]
        end = max(starts, default=0) + T
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, T: int) -> None:
        """Count T more tokens on every row (after every layer has written them)."""
        self.host_lengths += T

    def append(self, k_LBKE: torch.Tensor, v_LBKE: torch.Tensor) -> None:
        """Write one new token's keys and values of every layer after each row's tokens (the keys a
        :class:`DecodeStep` collected), and count it."""
        B = k_LBKE.shape[1]
        at = torch.from_numpy(self.host_lengths[:B]).to(self.k.device)
        if self.k.device.type == "cpu" and cpu_kernels_loaded():  # one copy loop, not two indexed writes
            torch.ops.chameleon_lm.kv_append(self.k, self.v, k_LBKE, v_LBKE, at)
        else:
            rows = torch.arange(B, device=self.k.device)
            # advanced indices on dims 1 and 3 put the row dimension first: [B, L, K, E]
            self.k[:, rows, :, at] = k_LBKE.transpose(0, 1).to(self.k.dtype)
            self.v[:, rows, :, at] = v_LBKE.transpose(0, 1).to(self.v.dtype)
        self.host_lengths[:B] += 1


class DecodeStep:
    """One decoding step (one new token per row) that reads the cache and never writes it, so that the
    whole step can run as one compiled graph (a graph that writes into the cache buffer gets compiled
    into a copy of all of it).

    Row b has ``lengths[b]`` >= 1 cached tokens (a tensor: no host values inside the graph) and rows
    ``[0, B)`` of ``cache`` are used. Each layer attends over the row's cached keys and its own new key
    in one softmax; the new keys and values are collected (:meth:`new_keys`) for
    :meth:`KVCache.append` to write after the step.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, longest: int):
        # k, v: a KVCache's [L, B, K, S_max, E] buffers; longest: max(lengths), a host int
        self.k, self.v, self.lengths, self.longest = k, v, lengths, longest
        self.batch_size = lengths.shape[0]
        self.collected: list[tuple[torch.Tensor, torch.Tensor]] = []

    def check(self, B: int, T: int) -> None:
        if T != 1 or B != self.batch_size:
            raise ValueError(f"a decode step takes [{self.batch_size}, 1] ids, got [{B}, {T}]")

    def positions_and_mask(self, T: int, device: torch.device) -> tuple[torch.Tensor, None]:
        return self.lengths[:, None], None

    def attend(self, layer: int, q_BHTE: torch.Tensor, k_BKTE: torch.Tensor, v_BKTE: torch.Tensor
               ) -> torch.Tensor:
        """Attention ``[B, H, 1, E]`` of each row's query over its cached keys and its new key."""
        B, H, _, E = q_BHTE.shape
        K = k_BKTE.shape[1]
        k_new, v_new = k_BKTE[:, :, 0], v_BKTE[:, :, 0]
        self.collected.append((k_new, v_new))
        q = q_BHTE.reshape(B, K, H // K, E)  # query heads grouped by their KV head
        out = decode_attention(q, self.k[layer, :B, :, : self.longest], self.v[layer, :B, :, : self.longest],
                               k_new, v_new, self.lengths)
        return out.reshape(B, H, 1, E)

    def new_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's new keys and values of every layer, ``[L, B, K, E]`` each."""
        return (torch.stack([k for k, _ in self.collected]), torch.stack([v for _, v in self.collected]))

    def advance(self, T: int) -> None:
        pass  # the lengths move in KVCache.append, after the step


class PackedRows:
    """Input ``[1, sum(lengths)]``: sequence i is prefilled into cache row ``rows[i]`` (see
    :meth:`KVCache.packed`). Attention stays within each sequence and positions restart at 0.

    Each layer attends per sequence, sequences of one length batched together: no mask over the whole
    packed row (O(T²) for many short prompts), and a sequence's result does not depend on its place.
    """

    def __init__(self, cache: KVCache, rows: list[int], lengths: list[int]):
        if any(cache.host_lengths[r] for r in rows):
            raise ValueError("packed prefill needs empty cache rows")
        self.cache, self.rows, self.lengths = cache, rows, lengths
        self.starts = np.cumsum([0, *lengths[:-1]]).tolist()
        self.batch_size = 1
        by_length: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            by_length.setdefault(n, []).append(i)
        self.groups = list(by_length.items())  # (length, sequences of that length)
        self._index: dict[int, torch.Tensor] = {}  # length -> the packed positions of its tokens

    def check(self, B: int, T: int) -> None:
        if B != 1 or T != sum(self.lengths):
            raise ValueError(f"packed rows take [1, {sum(self.lengths)}] ids, got [{B}, {T}]")
        if max(self.lengths) > self.cache.max_len:
            raise ValueError(f"cache overflow: {max(self.lengths)} tokens > max_len {self.cache.max_len}")

    def positions_and_mask(self, T: int, device: torch.device) -> tuple[torch.Tensor, None]:
        return torch.cat([torch.arange(n, device=device) for n in self.lengths])[None], None

    def attend(self, layer: int, q_BHTE: torch.Tensor, k_BKTE: torch.Tensor, v_BKTE: torch.Tensor
               ) -> torch.Tensor:
        """Write each sequence's keys and values to its cache row; causal attention ``[1, H, T, E]``
        within each sequence."""
        for row, s, n in zip(self.rows, self.starts, self.lengths):
            self.cache.k[layer, row, :, :n] = k_BKTE[0, :, s : s + n]
            self.cache.v[layer, row, :, :n] = v_BKTE[0, :, s : s + n]
        # On CPU the prompt attends in fp32, whatever the cache holds (as the decode kernel computes).
        dtype = torch.float32 if k_BKTE.device.type == "cpu" else self.cache.k.dtype
        q, k, v = (t[0].to(dtype) for t in (q_BHTE, k_BKTE, v_BKTE))  # [H|K, T, E]
        gqa = k.shape[0] != q.shape[0]
        if len(self.groups) == 1:  # one length: a strided view is the batch, no copies
            n, seqs = self.groups[0]
            q, k, v = (t.unflatten(1, (len(seqs), n)).transpose(0, 1) for t in (q, k, v))  # [N, H, n, E]
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            return out.transpose(0, 1).flatten(1, 2)[None]
        out = q.new_empty(q.shape)
        for n, seqs in self.groups:
            if n not in self._index:
                self._index[n] = torch.tensor([self.starts[i] + t for i in seqs for t in range(n)],
                                              device=q.device)
            at = self._index[n]
            qg, kg, vg = (t.index_select(1, at).unflatten(1, (len(seqs), n)).transpose(0, 1)
                          for t in (q, k, v))  # [N, H, n, E]
            og = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=gqa)
            out.index_copy_(1, at, og.transpose(0, 1).flatten(1, 2))
        return out[None]

    def advance(self, T: int) -> None:
        for row, n in zip(self.rows, self.lengths):
            self.cache.host_lengths[row] = n


class Attention(nn.Module):
    fusable = (("wqkv", ("wq", "wk", "wv")),)  # projections of one input that may run as one matmul

    def __init__(self, config: ChameleonConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.q_normalization = HeadLayerNorm(self.n_heads, self.head_dim, config.qk_norm_eps)
        self.k_normalization = HeadLayerNorm(self.n_kv_heads, self.head_dim, config.qk_norm_eps)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | BlockMask | None,
        cache: KVCache | DecodeStep | PackedRows | None,
        layer: int,
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        if "wqkv" in self._modules and self.wqkv.fuses(self):  # one matmul (generation/packed.py)
            q, k, v = self.wqkv(x_BTD)
        else:
            q, k, v = self.wq(x_BTD), self.wk(x_BTD), self.wv(x_BTD)
        q = self.q_normalization(q.view(B, T, self.n_heads, self.head_dim))
        k = self.k_normalization(k.view(B, T, self.n_kv_heads, self.head_dim))
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H|K, T, E]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(cache, (DecodeStep, PackedRows)):
            return self.wo(cache.attend(layer, q, k, v).transpose(1, 2).reshape(B, T, -1).to(x_BTD.dtype))
        if cache is not None:
            k, v = cache.update(layer, k, v)  # [B, K, S, E]
            q = q.to(k.dtype)  # the cache may be fp32 under a bf16 model (see Chameleon.new_cache)
        gqa = self.n_kv_heads != self.n_heads
        if BlockMask is not None and isinstance(mask, BlockMask):
            out = _flex_attention(q, k, v, mask, gqa)  # [B, H, T, E]
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                enable_gqa=gqa,
            )  # [B, H, T, E]
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim).to(x_BTD.dtype))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) · w3 x)``."""

    fusable = (("w13", ("w1", "w3")),)

    def __init__(self, config: ChameleonConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = "w13" in self._modules and self.w13.fuses(self)
        gate, up = self.w13(x) if fused else (self.w1(x), self.w3(x))
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, config: ChameleonConfig, layer: int):
        super().__init__()
        self.layer, self.swin_norm, self.dropout = layer, config.swin_norm, config.dropout
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        drop = lambda t: F.dropout(t, self.dropout, self.training)  # noqa: E731
        if self.swin_norm:  # 34B: norm on each sub-layer's output, inside the residual
            h = x + drop(self.attention_norm(self.attention(x, cos, sin, mask, cache, self.layer)))
            return h + drop(self.ffn_norm(self.feed_forward(h)))
        h = x + drop(self.attention(self.attention_norm(x), cos, sin, mask, cache, self.layer))
        return h + drop(self.feed_forward(self.ffn_norm(h)))


class Chameleon(nn.Module):
    """The Chameleon decoder. ``forward(input_ids[B, T]) -> logits[B, T, V]`` (fp32, unmasked)."""

    def __init__(self, config: ChameleonConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = OutputHead(config.dim, config.vocab_size)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, init_std) for embeddings and projections; residual outputs scaled by 1/sqrt(2·layers)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layers))
            elif p.ndim == 2 and "normalization" not in name:
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)

    def new_cache(self, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache on the model's device, in the model's dtype (the keys and values are
        computed in it); on CPU in fp32 unless the model is bf16 and the decode kernel is there (the
        fused SDPA kernels attend over bf16 keys 2-4x slower than over fp32 ones)."""
        w = self.output.weight
        if dtype is None:
            cpu_bf16 = w.dtype == torch.bfloat16 and cpu_kernel()
            dtype = torch.float32 if w.device.type == "cpu" and not cpu_bf16 else w.dtype
        return KVCache(self.config, batch_size, max_len or self.config.max_seq_len, device=w.device,
                       dtype=dtype)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | DecodeStep | PackedRows | None = None,
        *,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states ``[B, T, D]`` (the training loss applies the head in chunks).

        Args:
            input_ids: ``[B, T]`` token ids.
            cache: KV cache for incremental decoding, extended in place by these tokens; a
                :class:`DecodeStep` (one token per row, the cache left unchanged); or
                :class:`PackedRows` (new sequences packed in one row, each into its own cache row).
            positions: ``[B, T]`` integer RoPE positions; default: 0, 1, … after each row's cached tokens.
            doc_ids: ``[B, T]`` integer document of each token of packed rows: a token attends only to
                earlier tokens with the same id (pad slots: -1, attending among themselves). Default:
                one causal sequence per row. Not allowed with a cache.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        for name, t in (("positions", positions), ("doc_ids", doc_ids)):
            if t is not None and (t.shape != (B, T) or t.is_floating_point()
                                  or t.device != input_ids.device):
                raise ValueError(f"{name} must be integers of shape {(B, T)} on input_ids' device, "
                                 f"got {t.dtype} of shape {tuple(t.shape)} on {t.device}")
        if doc_ids is not None and cache is not None:
            raise ValueError("doc_ids (packed rows) cannot be used with a KV cache")
        if cache is None:
            default_positions = torch.arange(T, device=input_ids.device).expand(B, T)
            mask = None  # plain causal (SDPA is_causal)
        else:
            cache.check(B, T)
            default_positions, mask = cache.positions_and_mask(T, input_ids.device)
        if positions is None:
            positions = default_positions
        if doc_ids is not None:
            mask = document_mask(doc_ids)  # built once, shared by every layer
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        h = self.tok_embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(h)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        *,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        **loss_options,
    ):
        """Logits ``[B, T, V]`` (fp32); the arguments are those of ``hidden_states``.

        With ``targets`` ``[B, T]``, the head's fused chunked loss instead (``OutputHead.forward``, which
        takes ``loss_options``): training goes through ``forward`` so that wrappers such as FSDP2 see
        one call of the whole model.
        """
        h = self.hidden_states(input_ids, cache, positions=positions, doc_ids=doc_ids)
        if targets is not None:
            return self.output(h, targets, **loss_options)
        return self.output(h).float()
