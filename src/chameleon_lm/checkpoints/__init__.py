"""Checkpoint layouts: chameleon-lm's own folder, Hugging Face's and Meta's release, detected on load.

All three load into one convention (Meta parameter names, rotate-half RoPE rows, per-head QK-norm rows)
by exact permutations; nothing is unpickled beyond tensors, and weights are memory-mapped.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from chameleon_lm.checkpoints.native import LoadedModel, is_native_model_dir, load_native_model, save_model
from chameleon_lm.tokenizers.image import is_hf_folder

LAYOUTS = ("native", "hf", "meta")


def detect_layout(path: str | os.PathLike) -> tuple[str, Path]:
    """``(layout, folder)``: ``meta`` (the folder is ``models/<size>/``), ``hf`` or ``native``."""
    from chameleon_lm.checkpoints.meta import is_meta_model_dir, meta_model_dirs

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model folder")
    if is_meta_model_dir(path):
        return "meta", path
    models = meta_model_dirs(path)
    if len(models) > 1:
        raise ValueError(f"{path}: holds several Meta models ({', '.join(p.name for p in models)}); "
                         f"pass one of them, e.g. {models[0]}")
    if models:
        return "meta", models[0]
    if is_hf_folder(path):
        return "hf", path
    if is_native_model_dir(path):
        return "native", path
    if (path / "config.adapter.json").is_file():  # written by the trainer for LoRA / head-only runs
        raise ValueError(f"{path}: a training checkpoint of a run with adapters (LoRA or image-head), not a "
                         "model; write the merged model with `chameleon train CONFIG steps=<its step> "
                         "export_dir=DIR --resume` (the run's CONFIG and out_dir)")
    raise ValueError(
        f"{path}: not a recognised model folder; expected chameleon-lm's (config.json + "
        f"model.safetensors), Hugging Face's (config.json with model_type 'chameleon' + safetensors) or "
        f"Meta's (params.json + consolidated*.pth, or a data/ root with models/<size>/)"
    )


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    vqgan: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a model with its tokenizers from any of the three layouts (see :func:`detect_layout`).

    Args:
        path: chameleon-lm's model folder; Hugging Face's folder; Meta's ``data/`` root (with one model
            under ``models/``) or one ``data/models/<size>/`` folder.
        dtype: Cast the weights (default: as stored, e.g. bf16 for the official weights).
        device: Where to put the model and the VQGAN (default CPU).
        vqgan: Meta's ``vqgan.ckpt`` (or the folder holding it), to add the VQ decoder to a checkpoint
            that has none (Hugging Face's); without it such a model cannot decode images.
    """
    layout, folder = detect_layout(path)
    if layout == "meta":
        from chameleon_lm.checkpoints.meta import load_meta_model

        if vqgan is not None:
            raise ValueError(f"{path}: Meta's layout has its own VQGAN; vqgan= is for HF checkpoints")
        return load_meta_model(folder, dtype=dtype, device=device)
    if layout == "hf":
        from chameleon_lm.checkpoints.hf import load_hf_model

        return load_hf_model(folder, dtype=dtype, device=device, vqgan=vqgan)
    return load_native_model(folder, dtype=dtype, device=device, vqgan=vqgan)


def save_as(layout: str, directory: str | os.PathLike, loaded: LoadedModel, **options) -> Path:
    """Write ``loaded`` in ``layout`` (``native``, ``hf`` or ``meta``); returns the model folder."""
    args = (directory, loaded.model, loaded.text_tokenizer, loaded.image_tokenizer)
    if layout == "native":
        return save_model(*args, **options)
    if layout == "hf":
        from chameleon_lm.checkpoints.hf import save_hf_model

        return save_hf_model(*args, **options)
    if layout == "meta":
        from chameleon_lm.checkpoints.meta import save_meta_model

        return save_meta_model(*args, **options)
    raise ValueError(f"unknown layout {layout!r} (one of {', '.join(LAYOUTS)})")


__all__ = ["LAYOUTS", "LoadedModel", "detect_layout", "load_model", "save_as", "save_model"]
