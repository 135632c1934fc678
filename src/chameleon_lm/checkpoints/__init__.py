"""Checkpoint layouts: chameleon-lm's own folder (and the Hugging Face key mapping)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from chameleon_lm.checkpoints.native import LoadedModel, is_native_model_dir, load_native_model, save_model


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> LoadedModel:
    """Load a model with its tokenizers from a folder, detecting the layout.

    Supported now: chameleon-lm's own layout (``config.json`` + ``model.safetensors``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model folder")
    if is_native_model_dir(path):
        return load_native_model(path, dtype=dtype, device=device)
    raise ValueError(f"{path}: not a recognised model folder (expected config.json + model.safetensors)")


__all__ = ["LoadedModel", "load_model", "save_model"]
