"""The decoding loops: batched text, batched images with three-way guidance, and a streaming mixed decoder.

Modality control follows Meta's decoders (spec §5.2–5.3):

- text steps allow only text tokens and ``</s>`` (plus ``<racm3:break>`` in interleaved mode, while a
  whole image block still fits before the length limit);
- an image block is ``<racm3:break>``, exactly N sampled codes, then ``<eoss>`` (forced, no model call);
- image codes come from classifier-free guidance over three rows decoded in one batch: the full
  context, the context filtered to {image tokens, ``<s>``, BOI, EOI}, and ``[<s>, BOI]``.

One KV cache serves the whole run. When an image block opens, the full row's cache is copied (not
recomputed) next to the two freshly prefilled guidance rows; after the block the full row goes on alone.
Image steps apply only the image rows of the output head: Meta masks every other logit to −inf after
guidance, and guidance is elementwise, so the codes are the same.

Shape legend: B batch (prompts), D model dim, V vocabulary, K codebook size, N codes per image.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from chameleon_lm.documents import Document, DocumentCodec, ImagePart
from chameleon_lm.generation.packed import _Packs, packed_linears
from chameleon_lm.generation.sampling import GenerationConfig, cfg_mix, sample, text_scores, warp
from chameleon_lm.model import Chameleon, KVCache
from chameleon_lm.tokenizers.text import TextTokenizer
from chameleon_lm.tokenizers.vocab import IMAGE, TEXT, Vocab

# --------------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class TextDelta:
    """New text, always a stable suffix (never half of a UTF-8 character)."""

    text: str


@dataclass(frozen=True)
class ImageProgress:
    done: int
    total: int


@dataclass(frozen=True)
class ImageComplete:
    codes: torch.Tensor
    """``[N]`` long codes (CPU)."""
    image: Image.Image | None
    """The decoded pixels, or None when the codec has no image tokenizer."""


@dataclass(frozen=True)
class Done:
    ids: list[int]
    """Every new token (``</s>`` included when sampled). A prompt's trailing ``<racm3:break>`` in image or
    interleaved mode counts as new, so ``ids`` is always a well-formed document on its own."""
    document: Document
    """``codec.decode(ids)``, with the images of the :class:`ImageComplete` events."""


Event = TextDelta | ImageProgress | ImageComplete | Done


# ----------------------------------------------------------------------------------------- public API


@torch.inference_mode()
def generate_text(
    model: Chameleon, vocab: Vocab, prompts: list[list[int]], config: GenerationConfig
) -> list[list[int]]:
    """Continue B prompts with text in one batch (left-padded), until every row has sampled ``</s>``.

    Rows that finished keep being fed (as in Meta's decoder) but their output stops at ``</s>``.

    Returns:
        Each row's new ids, up to and including its first ``</s>`` (absent if the row hit the limit).
    """
    with _inference(model, config) as packs:
        dec = _Decoder(model, vocab, config, packs)
        P = max((len(p) for p in prompts), default=0)
        steps = min(config.max_new_tokens, dec.max_seq_len - P)
        if steps < 1:
            raise ValueError(f"the longest prompt ({P} tokens) leaves no room before max_seq_len "
                             f"{dec.max_seq_len}")
        cache, h = dec.prefill(prompts, max_len=P + steps - 1)
        ids = torch.full((len(prompts), P + steps), vocab.pad_id, dtype=torch.long, device=dec.device)
        ids[:, :P] = _left_pad(prompts, vocab.pad_id, dec.device)[0]
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=dec.device)
        for t in range(steps):
            tok = dec.sample_text(h, ids[:, : P + t], dec.text_allowed)  # [B]
            ids[:, P + t] = tok
            finished |= tok == vocab.eos_id
            if t == steps - 1 or bool(finished.all()):
                break
            h = dec.feed(cache, tok[:, None])
        rows = ids[:, P : P + t + 1].tolist()
    return [row[: row.index(vocab.eos_id) + 1] if vocab.eos_id in row else row for row in rows]


@torch.inference_mode()
def generate_images(
    model: Chameleon, vocab: Vocab, prompts: list[list[int]], config: GenerationConfig,
    image_seq_len: int,
) -> torch.Tensor:
    """One image per prompt, all in one batch of 3B guided rows.

    A prompt that does not end with ``<racm3:break>`` gets it appended.

    Returns:
        ``[B, N]`` long codes, on the model's device.
    """
    with _inference(model, config) as packs:
        dec = _Decoder(model, vocab, config, packs)
        contexts = [_open_image(p, vocab) for p in prompts]
        longest = max((len(c) for c in contexts), default=0)
        if longest + image_seq_len + 1 > dec.max_seq_len:
            raise ValueError(f"a prompt of {longest} tokens leaves no room for {image_seq_len} codes and "
                             f"<eoss> before max_seq_len {dec.max_seq_len}")
        cache, h = dec.prefill(contexts, max_len=longest)
        guided, h3 = dec.guided_rows(cache, h, contexts, extra=image_seq_len - 1)
        del cache
        codes = torch.empty(len(prompts), image_seq_len, dtype=torch.long, device=dec.device)
        for step, tok in enumerate(dec.image_block(guided, h3, image_seq_len)):
            codes[:, step] = tok
    return codes - vocab.image_start


def stream(
    model: Chameleon, codec: DocumentCodec, prompt: Document | list[int] | torch.Tensor,
    config: GenerationConfig,
) -> Iterator[Event]:
    """Generate from one prompt in ``config.mode``, yielding events as tokens arrive; ends with Done.

    A :class:`Document` prompt is encoded with ``<s>``; ids are used as given. ``image`` mode makes one
    image (``<racm3:break>`` appended when missing); ``text`` mode writes text until ``</s>`` or the
    limit; ``interleaved`` mode writes text and opens an image block whenever it samples (or the prompt
    ends with) ``<racm3:break>``.
    """
    if isinstance(prompt, Document):
        prompt = codec.encode(prompt, bos=True).ids
    ids = [int(i) for i in torch.as_tensor(prompt, dtype=torch.long).flatten()]
    return _stream(model, codec, ids, config)


# ----------------------------------------------------------------------------------------- internals


@contextmanager
def _inference(model: Chameleon, config: GenerationConfig) -> Iterator[_Packs | None]:
    """Eval mode (then the model's previous mode) and, on CPU in fp32, prepacked linear weights."""
    was_training = model.training
    model.eval()
    try:
        with packed_linears(model, config.cpu_packed_weights) as packs:
            yield packs
    finally:
        model.train(was_training)


def _open_image(prompt: list[int], vocab: Vocab) -> list[int]:
    return prompt if prompt[-1:] == [vocab.boi_id] else prompt + [vocab.boi_id]


def _left_pad(
    rows: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids [B, T]`` right-aligned with ``pad_id`` in front, and the pad count of each row ``[B]``."""
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (T - len(r)) + list(r) for r in rows], dtype=torch.long, device=device)
    return ids, torch.tensor([T - len(r) for r in rows], dtype=torch.long, device=device)


class _Decoder:
    """The model steps and samplers shared by all loops, with the run's masks and random generator."""

    def __init__(self, model: Chameleon, vocab: Vocab, config: GenerationConfig,
                 packs: _Packs | None = None):
        V = model.config.vocab_size
        if V < vocab.size:
            raise ValueError(f"the model has {V} logits but the tokenizer {vocab.size} ids")
        self.model, self.vocab, self.config = model, vocab, config
        self.device = model.output.weight.device
        self.max_seq_len = config.max_seq_len or model.config.max_seq_len
        classes = torch.full((V,), -1, dtype=torch.int8)
        classes[: vocab.size] = vocab.classes
        self.text_allowed = (classes == TEXT).to(self.device)  # [V]
        self.text_allowed[vocab.eos_id] = True
        self.text_or_image_allowed = self.text_allowed.clone()
        self.text_or_image_allowed[vocab.boi_id] = True
        keep = classes == IMAGE
        keep[[vocab.bos_id, vocab.boi_id, vocab.eoi_id]] = True
        self.image_context: list[bool] = keep.tolist()  # what the image-conditioned row keeps
        image_head = model.output.weight[vocab.image_start : vocab.image_end]  # [K, D]
        self.image_logits = (packs.rows(model.output, vocab.image_start, vocab.image_end) if packs
                             else lambda h: F.linear(h, image_head))
        self.generator = torch.Generator(device=self.device)
        if config.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(config.seed)

    def prefill(self, rows: list[list[int]], max_len: int) -> tuple[KVCache, torch.Tensor]:
        """A cache of the left-padded ``rows`` (capacity ``max_len``) and the last hidden ``[B, D]``."""
        if not rows:
            raise ValueError("no prompts")
        if any(not r for r in rows):
            raise ValueError("empty prompt")
        if any(min(r) < 0 or max(r) >= self.vocab.size for r in rows):
            raise ValueError(f"prompt ids must be in [0, {self.vocab.size})")
        ids, pad = _left_pad(rows, self.vocab.pad_id, self.device)
        ragged = len({len(r) for r in rows}) > 1
        cache = self.model.new_cache(len(rows), max_len, pad=pad if ragged else None)
        return cache, self.feed(cache, ids)

    def feed(self, cache: KVCache, ids_BT: torch.Tensor) -> torch.Tensor:
        """Run new tokens through the model; the hidden state of the last one ``[B, D]``."""
        return self.model.hidden_states(ids_BT, cache)[:, -1]

    def sample_text(
        self, h_BD: torch.Tensor, ids_BS: torch.Tensor, allowed_V: torch.Tensor
    ) -> torch.Tensor:
        """Next text ids ``[B]`` given the sequences so far (for the repetition penalty)."""
        cfg = self.config.text
        scores = text_scores(self.model.output(h_BD).float(), ids_BS, allowed_V, cfg)
        return sample(scores, self.generator, cfg.greedy)

    def guided_rows(
        self, cache: KVCache, h_BD: torch.Tensor, contexts: list[list[int]], extra: int
    ) -> tuple[KVCache, torch.Tensor]:
        """The 3B-row cache ``[full; image-conditioned; unconditioned]`` and its last hidden ``[3B, D]``.

        ``contexts`` are the B full rows (each ending with BOI) held by ``cache``, with last hidden
        states ``h_BD``. Their keys and values are copied, not recomputed: only the 2B guidance rows
        are prefilled. The new cache has room for ``extra`` more tokens; ``cache`` is left as it is.
        """
        image_rows = [[t for t in c if self.image_context[t]] for c in contexts]
        uncond_rows = [[self.vocab.bos_id, self.vocab.boi_id]] * len(contexts)
        guidance = image_rows + uncond_rows
        g_cache, g_h = self.prefill(guidance, max_len=max(map(len, guidance)))
        length = max(cache.length, g_cache.length)
        return KVCache.stack([cache, g_cache], max_len=length + extra), torch.cat([h_BD, g_h])

    def image_block(self, guided: KVCache, h3: torch.Tensor, n: int) -> Iterator[torch.Tensor]:
        """Yield the ids ``[B]`` of the n codes of an image block, one per step.

        ``guided`` and ``h3 [3B, D]`` come from :meth:`guided_rows` (built with ``extra ≥ n − 1``);
        every code but the last is fed to all three rows.
        """
        cfg, B = self.config.image, h3.shape[0] // 3
        for step in range(n):
            if step:
                h3 = self.feed(guided, tok.repeat(3)[:, None])
            logits = self.image_logits(h3).float()  # [3B, K]
            full, image, uncond = logits.split(B)
            mix = cfg_mix(full, image, uncond, cfg.cfg_text, cfg.cfg_image)  # [B, K]
            scores = mix if cfg.greedy else warp(mix, cfg.temperature, cfg.top_k, cfg.top_p)
            tok = self.vocab.image_start + sample(scores, self.generator, cfg.greedy)
            yield tok


class _Detokenizer:
    """Incremental text: emits the decoded text of pending ids once it does not end mid-character.

    Byte-level BPE decodes by concatenation, so text that ends on a whole character never changes
    when more ids arrive; a trailing U+FFFD (an incomplete UTF-8 sequence) is held back.
    """

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def push(self, token: int) -> str:
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):
            return ""
        self.pending.clear()
        return text

    def flush(self) -> str:
        """Whatever is held back (the text run has ended)."""
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending.clear()
        return text


@torch.inference_mode()
def _stream(
    model: Chameleon, codec: DocumentCodec, ids: list[int], config: GenerationConfig
) -> Iterator[Event]:
    vocab, n, mode = codec.vocab, codec.image_seq_len, config.mode
    with _inference(model, config) as packs:
        dec = _Decoder(model, vocab, config, packs)
        if mode == "image":
            ids = _open_image(ids, vocab)
        opened = mode != "text" and ids[-1:] == [vocab.boi_id]
        start = len(ids) - opened  # new ids begin here (an open BOI counts as new)
        budget = n + 2 if mode == "image" else config.max_new_tokens
        limit = min(dec.max_seq_len, start + budget)
        if len(ids) >= limit or (opened and len(ids) + n + 1 > limit):
            raise ValueError(f"a prompt of {start} tokens leaves no room to generate "
                             f"(limit {limit}, {n + 2} tokens per image block)")
        cache, h = dec.prefill([ids], max_len=limit)
        seq_ids = torch.full((1, limit), vocab.pad_id, dtype=torch.long, device=dec.device)
        seq_ids[0, : len(ids)] = torch.tensor(ids)
        seq = list(ids)
        text = _Detokenizer(codec.text)
        images: list[Image.Image | None] = []

        while len(seq) < limit:
            if mode != "text" and seq[-1] == vocab.boi_id:
                if tail := text.flush():
                    yield TextDelta(tail)
                guided, h3 = dec.guided_rows(cache, h, [seq], extra=n - 1)
                shift = guided.length - cache.length  # the full row's slots moved right by this
                codes = torch.empty(n, dtype=torch.long, device=dec.device)
                for step, tok in enumerate(dec.image_block(guided, h3, n)):
                    codes[step] = tok[0]
                    if (step + 1) % config.progress_every == 0 or step + 1 == n:
                        yield ImageProgress(step + 1, n)
                code_ids = codes.tolist()
                seq_ids[0, len(seq) : len(seq) + n] = codes
                seq += code_ids + [vocab.eoi_id]
                seq_ids[0, len(seq) - 1] = vocab.eoi_id
                image_codes = codes.cpu() - vocab.image_start
                can_decode = codec.image is not None and getattr(codec.image, "can_decode", True)
                image = codec.image.decode(image_codes[None])[0] if can_decode else None
                images.append(image)
                yield ImageComplete(image_codes, image)
                if mode == "image" or len(seq) >= limit:
                    break
                cache = guided.select(slice(0, 1), max_len=cache.max_len + shift)
                del guided
                h = dec.feed(cache, torch.tensor([[code_ids[-1], vocab.eoi_id]], device=dec.device))
                continue

            fits_image = mode == "interleaved" and limit - len(seq) >= n + 2
            allowed = dec.text_or_image_allowed if fits_image else dec.text_allowed
            tok = dec.sample_text(h, seq_ids[:, : len(seq)], allowed)  # [1]
            seq_ids[0, len(seq)] = tok[0]
            seq.append(int(tok))
            if seq[-1] == vocab.eos_id:
                break
            if seq[-1] != vocab.boi_id and (delta := text.push(seq[-1])):
                yield TextDelta(delta)
            if len(seq) < limit:
                h = dec.feed(cache, tok[:, None])

        if tail := text.flush():
            yield TextDelta(tail)
        new = seq[start:]
        document = codec.decode(new, decode_images=False)
        for part, image in zip(document.images, images):
            part.image = image
        yield Done(new, document)
