"""Reading weight files without executing code and without copying them into memory.

- safetensors files are memory-mapped: a tensor's pages are read from disk when it is first used.
- PyTorch ``.pth``/``.ckpt`` files are unpickled with ``weights_only=True`` (tensors and plain containers
  only, never code) and memory-mapped when they are in the zip format of torch ≥ 1.6.

Every failure is a ValueError or FileNotFoundError that names the file.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"


def load_torch_file(path: str | os.PathLike) -> Any:
    """The object in a PyTorch checkpoint, loaded with ``weights_only=True`` on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise ValueError(
            f"{path}: cannot load as a weights-only PyTorch checkpoint ({type(e).__name__}: {e})"
        ) from e


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file, memory-mapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def load_safetensors_folder(
    directory: str | os.PathLike, prefix: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """The tensors whose names start with ``prefix`` in ``model.safetensors`` or in the shards listed by
    ``model.safetensors.index.json`` (Hugging Face's layout), and the file each one came from."""
    directory = Path(directory)
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = sorted({f for k, f in weight_map.items() if k.startswith(prefix)})
    elif (directory / SAFETENSORS).is_file():
        weight_map, files = None, [SAFETENSORS]
    else:
        raise FileNotFoundError(f"{directory}: no {SAFETENSORS} and no {SAFETENSORS_INDEX}")
    state: dict[str, torch.Tensor] = {}
    sources: dict[str, Path] = {}
    for name in files:
        path = directory / name
        for key, tensor in load_safetensors(path).items():
            if not key.startswith(prefix):
                continue
            if weight_map is not None and weight_map.get(key) != name:
                raise ValueError(f"{path}: holds {key!r}, which {index} places in {weight_map.get(key)}")
            state[key], sources[key] = tensor, path
    if weight_map is not None:
        missing = sorted(k for k in weight_map if k.startswith(prefix) and k not in state)
        if missing:
            raise ValueError(f"{directory / weight_map[missing[0]]}: lacks {missing[:5]} "
                             f"(listed in {index})")
    return state, sources
