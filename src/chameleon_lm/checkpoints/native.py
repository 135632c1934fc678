"""chameleon-lm's own model folder: everything needed to run a model, in safetensors + JSON.

Layout::

    DIR/config.json          ChameleonConfig
    DIR/model.safetensors    the decoder's state dict (Meta parameter names, rotate-half RoPE rows)
    DIR/tokenizer.json       the text tokenizer
    DIR/vqgan.json           the image tokenizer's VQGANConfig        (optional: text-only models)
    DIR/vqgan.safetensors    the image tokenizer's weights            (optional)

No pickle anywhere; weights are memory-mapped on load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from chameleon_lm.documents import DocumentCodec
from chameleon_lm.model import Chameleon, ChameleonConfig
from chameleon_lm.tokenizers.image import ImageTokenizer, load_image_tokenizer
from chameleon_lm.tokenizers.text import TextTokenizer, load_text_tokenizer

CONFIG, WEIGHTS = "config.json", "model.safetensors"


@dataclass
class LoadedModel:
    """A model with its tokenizers. ``codec`` turns documents into ids and back."""

    model: Chameleon
    text_tokenizer: TextTokenizer
    image_tokenizer: ImageTokenizer | None
    codec: DocumentCodec

    @property
    def config(self) -> ChameleonConfig:
        return self.model.config


def save_model(
    directory: str | os.PathLike,
    model: Chameleon,
    text_tokenizer: TextTokenizer | None,
    image_tokenizer: ImageTokenizer | None = None,
) -> Path:
    """Write a model folder in chameleon-lm's layout (see the module docstring).

    Without a text tokenizer the folder holds the weights only (``load_model`` then refuses it).
    """
    if text_tokenizer is not None and len(text_tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(text_tokenizer)} ids but the model only "
                         f"{model.config.vocab_size}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory / CONFIG)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, directory / WEIGHTS, metadata={"format": "chameleon-lm"})
    if text_tokenizer is not None:
        text_tokenizer.save(directory / "tokenizer.json")
    if image_tokenizer is not None:
        image_tokenizer.save(directory)
    return directory


def is_native_model_dir(directory: Path) -> bool:
    return (directory / CONFIG).is_file() and (directory / WEIGHTS).is_file()


def load_native_model(
    directory: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> LoadedModel:
    """Load a folder written by :func:`save_model`."""
    directory = Path(directory)
    for name in (CONFIG, WEIGHTS, "tokenizer.json"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name}: missing (expected a chameleon-lm model folder)")
    config = ChameleonConfig.load(directory / CONFIG)
    try:
        state = load_file(directory / WEIGHTS)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{directory / WEIGHTS}: not a readable safetensors file ({e})") from e
    with torch.device("meta"):
        model = Chameleon(config)
    _check_shapes(model, state, directory / WEIGHTS)
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype).eval()
    text_tok = load_text_tokenizer(directory / "tokenizer.json")
    if len(text_tok) > config.vocab_size:
        raise ValueError(f"{directory}: the tokenizer has {len(text_tok)} ids, the model {config.vocab_size}")
    image_tok = None
    if (directory / "vqgan.json").is_file():
        image_tok = load_image_tokenizer(directory, device=device)
    return LoadedModel(model, text_tok, image_tok, DocumentCodec(text_tok, image_tok))


def _check_shapes(model: Chameleon, state: dict[str, torch.Tensor], source: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{source}: does not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")
