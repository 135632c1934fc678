"""Meta's release layout (``facebookresearch/chameleon``): load it, merge model-parallel shards, write it.

Layout::

    data/models/<size>/params.json               architecture: top-level keys + a nested "model" dict
    data/models/<size>/consolidate_params.json   merged over params.json (Meta's loader requires it)
    data/models/<size>/consolidated.pth          or consolidated.00.pth … consolidated.NN.pth (shards)
    data/tokenizer/text_tokenizer.json, vqgan.yaml, vqgan.ckpt

Meta's weights differ from ours in two exact, invertible ways (no arithmetic touches a value):

- RoPE: Meta rotates interleaved pairs (2i, 2i+1), we rotate halves (i, i + hd/2). Within each head our
  row j < hd/2 is Meta's row 2j and our row j ≥ hd/2 is Meta's row 2(j − hd/2) + 1, for ``wq``, ``wk``
  and the QK-norm vectors alike (a LayerNorm commutes with a permutation of its features).
- QK-norm: Meta holds one LayerNorm ``[hd]`` per model-parallel shard, shared by that shard's heads;
  we hold one row per head.

Shards split ``wq``/``wk``/``wv``/``w1``/``w3``/``output`` along dim 0, ``wo``/``w2``/``tok_embeddings``
along dim 1, and replicate the RMSNorm weights.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import torch

from chameleon_lm.checkpoints.native import LoadedModel, assemble, bundle
from chameleon_lm.model import Chameleon, ChameleonConfig
from chameleon_lm.model.config import ffn_hidden_dim
from chameleon_lm.tokenizers.image import ImageTokenizer, load_image_tokenizer, taming_yaml
from chameleon_lm.tokenizers.text import TextTokenizer, load_text_tokenizer
from chameleon_lm.utils.weights import load_torch_file, read_json

PARAMS, CONSOLIDATE_PARAMS = "params.json", "consolidate_params.json"
ROPE_FREQS = "rope.freqs"
"""An unused buffer that Meta's loader requires as the one unexpected key of every checkpoint."""
_SHARD = re.compile(r"consolidated\.(\d+)\.pth")
# How a model-parallel shard holds each tensor: the axis it is split along, None = replicated,
# "group" = one QK-norm vector per shard.
_SPLIT = {
    "tok_embeddings.weight": 1,
    "output.weight": 0,
    "norm.weight": None,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
    "attention.q_normalization.weight": "group",
    "attention.q_normalization.bias": "group",
    "attention.k_normalization.weight": "group",
    "attention.k_normalization.bias": "group",
}


def _split(key: str) -> int | str | None:
    return _SPLIT[re.sub(r"^layers\.\d+\.", "", key)]


def _heads(key: str, config: ChameleonConfig) -> int:
    """Heads whose rows ``key`` holds (for the RoPE permutation and the QK-norm groups)."""
    return config.kv_heads if ".wk." in key or "k_normalization" in key else config.n_heads


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of ``n_heads`` heads (dim 0) from Meta's interleaved RoPE order to rotate-half order."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`interleaved_to_half`."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------------------------ reading


def is_meta_model_dir(directory: Path) -> bool:
    return (directory / PARAMS).is_file()


def meta_model_dirs(root: Path) -> list[Path]:
    """The ``models/<size>/`` folders of a Meta ``data/`` root."""
    return sorted(p.parent for p in root.glob(f"models/*/{PARAMS}"))


def read_params(model_dir: Path) -> dict:
    """``params.json`` merged as Meta's loader does: top level, ``"model"``, ``consolidate_params.json``."""
    params = read_json(model_dir / PARAMS)
    if not isinstance(params, dict) or not isinstance(params.get("model", {}), dict):
        raise ValueError(f"{model_dir / PARAMS}: expected an object with an optional 'model' object")
    extra = model_dir / CONSOLIDATE_PARAMS
    return {**params, **params.get("model", {}), **(read_json(extra) if extra.is_file() else {})}


def config_from_params(p: dict, source: Path, vocab_size: int | None = None) -> ChameleonConfig:
    """Our config from merged Meta params (``vocab_size``: used when the params lack one)."""
    if not p.get("qk_normalization", True):
        raise ValueError(f"{source}: qk_normalization is false; Chameleon models always have QK-norm")
    try:
        dim = p["dim"]
        return ChameleonConfig(
            dim=dim, n_layers=p["n_layers"], n_heads=p["n_heads"], n_kv_heads=p.get("n_kv_heads"),
            ffn_dim=ffn_hidden_dim(dim, p.get("multiple_of", 256), p.get("ffn_dim_multiplier")),
            vocab_size=p["vocab_size"] if (p.get("vocab_size") or 0) > 0 else vocab_size,
            norm_eps=p.get("norm_eps", 1e-5), rope_theta=p.get("rope_theta", 10000.0),
            swin_norm=p.get("swin_norm", False), max_seq_len=p.get("max_seq_len", 4096),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source}: not a usable Chameleon params.json ({type(e).__name__}: {e})") from e


def _indivisible(config: ChameleonConfig, mp: int) -> str | None:
    """Why ``mp`` model-parallel shards cannot split this model (None if they can)."""
    for name, size in (("n_heads", config.n_heads), ("n_kv_heads", config.kv_heads), ("dim", config.dim),
                       ("ffn_dim", config.ffn_dim), ("vocab_size", config.vocab_size)):
        if size % mp:
            return f"{name} {size} is not divisible by {mp} model-parallel shards"
    return None


def shard_paths(model_dir: Path, declared: int | None) -> list[Path]:
    """``consolidated.pth``, or every ``consolidated.NN.pth`` (all of 00 … N−1 must be there)."""
    single = model_dir / "consolidated.pth"
    if single.is_file() and declared in (None, 1):
        return [single]
    found = {int(m.group(1)) for f in model_dir.iterdir() if (m := _SHARD.fullmatch(f.name))}
    if not found and declared is None:
        raise FileNotFoundError(f"{model_dir}: no consolidated.pth or consolidated.00.pth")
    count = declared or max(found) + 1
    paths = [model_dir / f"consolidated.{i:02d}.pth" for i in range(count)]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing ({count} model-parallel shards expected)")
    if found - set(range(count)):
        raise ValueError(f"{model_dir}: has shards beyond the {count} of model_parallel_size")
    return paths


def merge_shards(
    shards: list[dict[str, torch.Tensor]],
    paths: list[Path],
    config: ChameleonConfig,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """One state dict in our convention from Meta's model-parallel shards, consumed key by key: each
    merged tensor goes to ``dtype``/``device`` at once, so a 30B model never sits twice in memory.
    With one shard on the CPU nothing is copied but the permuted ``wq``/``wk``."""
    mp = len(shards)
    with torch.device("meta"):
        expected = Chameleon(config).state_dict()
    for shard, path in zip(shards, paths):
        extra = sorted(set(shard) - set(expected) - {ROPE_FREQS})
        if extra:
            raise ValueError(f"{path}: unexpected keys {extra[:5]}")
    out = {}
    for key, full in expected.items():
        split = _split(key)
        local = list(full.shape)
        if isinstance(split, int):
            local[split] //= mp
        elif split == "group":
            local = local[1:]
        pieces = []
        for shard, path in zip(shards, paths):
            if key not in shard:
                raise ValueError(f"{path}: missing {key}")
            if list(shard[key].shape) != local:
                raise ValueError(f"{path}: {key} has shape {tuple(shard[key].shape)}, expected "
                                 f"{tuple(local)} (for {mp} shard(s) of the config in {PARAMS})")
            pieces.append(shard.pop(key))
        if split == "group":
            rows = torch.stack([interleaved_to_half(v, 1) for v in pieces])  # [mp, hd]
            out[key] = rows.repeat_interleave(_heads(key, config) // mp, 0)
        elif split is None:
            out[key] = pieces[0]
            if any(not torch.equal(p, pieces[0]) for p in pieces[1:]):
                # Meta's model-parallel inference lets each shard normalise with its own copy; one
                # model cannot, so do as Hugging Face's converter does.
                warnings.warn(f"{paths[0].parent}: the shards hold different copies of {key}; using "
                              f"their mean (as Hugging Face's converter does), which is not bit-exact")
                out[key] = torch.stack(pieces).mean(0)
        else:
            t = pieces[0] if mp == 1 else torch.cat(pieces, split)
            if key.endswith(("wq.weight", "wk.weight")):
                t = interleaved_to_half(t, _heads(key, config))
            out[key] = t
        out[key] = out[key].to(device=device, dtype=dtype)
    return out


def load_meta_model(
    model_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> LoadedModel:
    """Load ``data/models/<size>/`` with the tokenizers of ``data/tokenizer/`` (two levels up)."""
    model_dir = Path(model_dir)
    params = read_params(model_dir)
    paths = shard_paths(model_dir, params.get("model_parallel_size"))
    shards = []
    for path in paths:
        shard = load_torch_file(path)
        if not isinstance(shard, dict) or not isinstance(shard.get("tok_embeddings.weight"), torch.Tensor):
            raise ValueError(f"{path}: expected a state dict with tok_embeddings.weight")
        shards.append(shard)
    config = config_from_params(params, model_dir / PARAMS, shards[0]["tok_embeddings.weight"].shape[0])
    if problem := _indivisible(config, len(paths)):
        raise ValueError(f"{model_dir / PARAMS}: {problem}")
    model = assemble(config, merge_shards(shards, paths, config, dtype, device), paths[0], dtype, device)
    tokenizer_dir = model_dir.parent.parent / "tokenizer"
    text_tok = load_text_tokenizer(model_dir)
    image_tok = None
    if (tokenizer_dir / "vqgan.yaml").exists() or (tokenizer_dir / "vqgan.ckpt").exists():
        image_tok = load_image_tokenizer(tokenizer_dir, device=device)
    return bundle(model, text_tok, image_tok, model_dir)


# ------------------------------------------------------------------------------------------ writing


def _ffn_params(dim: int, ffn_dim: int) -> dict[str, float | int]:
    """``multiple_of`` (and ``ffn_dim_multiplier`` if needed) that give ``ffn_dim`` by Meta's rule."""
    for multiple_of in (256, ffn_dim):
        if ffn_hidden_dim(dim, multiple_of) == ffn_dim:
            return {"multiple_of": multiple_of}
    ratio = ffn_dim / int(8 * dim / 3)
    for mult in (ratio, math.nextafter(ratio, math.inf)):
        if ffn_hidden_dim(dim, 1, mult) == ffn_dim:
            return {"multiple_of": 1, "ffn_dim_multiplier": mult}
    raise ValueError(f"ffn_dim {ffn_dim} cannot be written as Meta's FFN rule for dim {dim}")


def meta_params(config: ChameleonConfig, model_parallel_size: int) -> dict:
    """``params.json``. Architecture keys go in ``"model"`` (where both Meta's loader and HF's converter
    read them); ``n_kv_heads``/``ffn_dim_multiplier`` are left out when unused, as HF's converter needs."""
    model = {
        "dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
        **({"n_kv_heads": config.n_kv_heads} if config.kv_heads != config.n_heads else {}),
        "vocab_size": config.vocab_size, **_ffn_params(config.dim, config.ffn_dim),
        "norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "qk_normalization": True, "swin_norm": config.swin_norm,
    }
    if config.qk_norm_eps != 1e-5:
        raise ValueError(f"Meta's QK LayerNorm has eps 1e-5; this model has {config.qk_norm_eps}")
    return {"model_parallel_size": model_parallel_size, "max_seq_len": config.max_seq_len, "model": model}


def _groups_fit(state: dict[str, torch.Tensor], config: ChameleonConfig, mp: int) -> bool:
    """Whether every QK-norm row is shared by the heads of its shard when split ``mp`` ways."""
    for key, t in state.items():
        if _split(key) == "group":
            rows = t.reshape(mp, _heads(key, config) // mp, -1)
            if not torch.equal(rows, rows[:, :1].expand_as(rows)):
                return False
    return True


def parallel_size(state: dict[str, torch.Tensor], config: ChameleonConfig) -> int:
    """The fewest shards whose shared QK-norm vectors can hold this model's per-head rows."""
    for mp in range(1, config.kv_heads + 1):
        if not _indivisible(config, mp) and _groups_fit(state, config, mp):
            return mp
    raise ValueError("the QK-norm rows differ between the heads of every possible model-parallel "
                     "shard; Meta's layout shares one QK LayerNorm per shard and cannot hold them")


def split_shards(
    state: dict[str, torch.Tensor], config: ChameleonConfig, mp: int
) -> list[dict[str, torch.Tensor]]:
    """Meta's ``mp`` shards of one of our state dicts (the inverse of :func:`merge_shards`)."""
    if problem := _indivisible(config, mp):
        raise ValueError(f"cannot write Meta's layout: {problem}")
    if not _groups_fit(state, config, mp):
        raise ValueError(f"the QK-norm rows differ within a shard's heads: {mp} shard(s) cannot hold "
                         f"them (try {parallel_size(state, config)})")
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(mp)]
    for key, t in state.items():
        split = _split(key)
        if split == "group":
            pieces = [half_to_interleaved(row[0], 1) for row in t.reshape(mp, -1, t.shape[-1])]
        elif split is None:
            pieces = [t] * mp
        else:
            if key.endswith(("wq.weight", "wk.weight")):
                t = half_to_interleaved(t, _heads(key, config))
            pieces = list(t.chunk(mp, split))
        for shard, piece in zip(shards, pieces):
            # torch.save writes a view's whole storage: give every tensor its own.
            own = piece.is_contiguous() and piece.untyped_storage().nbytes() == piece.nbytes
            shard[key] = piece if own else piece.clone()
    hd = config.head_dim
    freqs = 1.0 / config.rope_theta ** (torch.arange(0, hd, 2).float() / hd)
    for shard in shards:
        shard[ROPE_FREQS] = freqs.to(state["output.weight"].dtype)
    return shards


def save_meta_model(
    directory: str | os.PathLike,
    model: Chameleon,
    text_tokenizer: TextTokenizer,
    image_tokenizer: ImageTokenizer | None = None,
    model_parallel_size: int | None = None,
    name: str | None = None,
) -> Path:
    """Write Meta's layout under ``directory`` (a ``data/`` root); returns the ``models/<name>`` folder.

    ``model_parallel_size`` defaults to the fewest shards that hold the QK-norm rows (1 for a 7B-style
    model); ``name`` to ``30b`` for norm re-ordering models and ``7b`` otherwise. The checkpoint meets
    Meta's loader: separate ``wq``/``wk``/``wv``/``w1``/``w3``, one ``rope.freqs`` key, tensors in the
    model's dtype.
    """
    if image_tokenizer is not None and not image_tokenizer.can_decode:
        raise ValueError("the image tokenizer has no decoder, and Meta's loader would silently keep a "
                         "random one: give the decoder (vqgan=Meta's vqgan.ckpt) or drop the tokenizer")
    vq_yaml = taming_yaml(image_tokenizer.config) if image_tokenizer is not None else None  # checks first
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    mp = model_parallel_size or parallel_size(state, model.config)
    shards = split_shards(state, model.config, mp)
    root = Path(directory)
    model_dir = root / "models" / (name or ("30b" if model.config.swin_norm else "7b"))
    tok_dir = root / "tokenizer"
    model_dir.mkdir(parents=True, exist_ok=True)
    tok_dir.mkdir(parents=True, exist_ok=True)
    _write_json(model_dir / PARAMS, meta_params(model.config, mp))
    _write_json(model_dir / CONSOLIDATE_PARAMS, {"model_parallel_size": mp})
    for i, shard in enumerate(shards):
        torch.save(shard, model_dir / ("consolidated.pth" if mp == 1 else f"consolidated.{i:02d}.pth"))
    text_tokenizer.save(tok_dir / "text_tokenizer.json")
    if image_tokenizer is not None:
        (tok_dir / "vqgan.yaml").write_text(vq_yaml)
        vq_state = {k: v.detach().cpu().contiguous() for k, v in image_tokenizer.vqgan.state_dict().items()}
        torch.save({"state_dict": vq_state}, tok_dir / "vqgan.ckpt")
    return model_dir


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
