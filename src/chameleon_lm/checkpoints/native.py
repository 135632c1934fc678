"""chameleon-lm's own model folder: everything needed to run a model, in safetensors + JSON.

Layout::

    DIR/config.json          ChameleonConfig
    DIR/model.safetensors    the decoder's state dict (Meta parameter names, rotate-half RoPE rows)
    DIR/tokenizer.json       the text tokenizer
    DIR/vqgan.json           the image tokenizer's VQGANConfig        (optional: text-only models)
    DIR/vqgan.safetensors    the image tokenizer's weights            (optional)

No pickle anywhere; weights are memory-mapped on load. A training checkpoint holds the weights as a
``torch.distributed.checkpoint`` (``DIR/.metadata`` + ``*.distcp``, key ``model.<name>``) instead of
``model.safetensors``; it loads the same way, in one process, whatever the world size that saved it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from chameleon_lm.documents import DocumentCodec
from chameleon_lm.model import Chameleon, ChameleonConfig
from chameleon_lm.tokenizers.image import ImageTokenizer, load_image_tokenizer
from chameleon_lm.tokenizers.text import TextTokenizer, load_text_tokenizer
from chameleon_lm.utils.weights import load_safetensors, read_json

CONFIG, WEIGHTS, DCP_METADATA = "config.json", "model.safetensors", ".metadata"


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
    *,
    weights: bool = True,
) -> Path:
    """Write a model folder in chameleon-lm's layout (see the module docstring).

    Without a text tokenizer the folder holds the weights only (``load_model`` then refuses it);
    ``weights=False`` writes everything but the weights (a training checkpoint saves them with DCP).
    """
    if text_tokenizer is not None and len(text_tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(text_tokenizer)} ids but the model only "
                         f"{model.config.vocab_size}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory / CONFIG)
    if weights:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, directory / WEIGHTS, metadata={"format": "chameleon-lm"})
    if text_tokenizer is not None:
        text_tokenizer.save(directory / "tokenizer.json")
    if image_tokenizer is not None:
        image_tokenizer.save(directory)
    return directory


def is_native_model_dir(directory: Path) -> bool:
    """``config.json`` + weights (``model.safetensors`` or a DCP checkpoint), and the config is ours
    (HF's names a ``model_type``)."""
    if not ((directory / CONFIG).is_file() and ((directory / WEIGHTS).is_file()
                                                or (directory / DCP_METADATA).is_file())):
        return False
    data = read_json(directory / CONFIG)
    return isinstance(data, dict) and "model_type" not in data


def load_native_model(
    directory: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    vqgan: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a folder written by :func:`save_model` (``vqgan``: see :func:`load_image_tokenizer`'s
    ``decoder``, for a folder converted from Hugging Face without a VQ decoder)."""
    directory = Path(directory)
    dcp = not (directory / WEIGHTS).is_file() and (directory / DCP_METADATA).is_file()
    for name in (CONFIG, DCP_METADATA if dcp else WEIGHTS, "tokenizer.json"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name}: missing (expected a chameleon-lm model folder)")
    try:
        config = ChameleonConfig.load(directory / CONFIG)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{directory / CONFIG}: not a valid model config ({e})") from e
    if dcp:
        model = load_dcp_weights(config, directory).to(device=device, dtype=dtype).eval()
    else:
        model = assemble(config, load_safetensors(directory / WEIGHTS), directory / WEIGHTS, dtype, device)
    image_tok = None
    if (directory / "vqgan.json").is_file() or vqgan is not None:
        image_tok = load_image_tokenizer(directory, device=device, decoder=vqgan)
    return bundle(model, load_text_tokenizer(directory / "tokenizer.json"), image_tok, directory)


def load_dcp_weights(config: ChameleonConfig, directory: Path) -> Chameleon:
    """A model with the ``model.*`` tensors of the DCP checkpoint in ``directory``, read by this process
    alone (any saving world size; the planner reshards)."""
    import torch.distributed.checkpoint as dcp

    with torch.device("meta"):
        model = Chameleon(config)
    model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process")
            dcp.load(state, checkpoint_id=directory, no_dist=True)
    except Exception as e:  # DCP wraps a missing/mismatched key in its own CheckpointException
        raise ValueError(f"{directory}: the checkpoint's weights do not fit {directory / CONFIG}: {e}") from e
    model.load_state_dict(state["model"])
    return model


def assemble(
    config: ChameleonConfig,
    state: dict[str, torch.Tensor],
    source: Path | dict[str, Path],
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Chameleon:
    """A model holding exactly the tensors of ``state`` (no copy: built on the meta device and assigned),
    then moved to ``dtype``/``device``. ``source`` names the file (or each key's file) in errors."""
    with torch.device("meta"):
        model = Chameleon(config)
    expected = model.state_dict()
    files = source if isinstance(source, dict) else {}
    default = Path(os.path.commonpath(list(files.values()))) if files else source

    def where(key: str) -> Path:
        return files.get(key, default)

    wrong = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if wrong:
        k = wrong[0]
        raise ValueError(f"{where(k)}: {k} has shape {tuple(state[k].shape)} but the config needs "
                         f"{tuple(expected[k].shape)}" + (f" ({len(wrong) - 1} more)" if wrong[1:] else ""))
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where(unexpected[0]) if unexpected else default}: does not match its config: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def bundle(
    model: Chameleon, text_tok: TextTokenizer, image_tok: ImageTokenizer | None, source: Path
) -> LoadedModel:
    if len(text_tok) > model.config.vocab_size:
        raise ValueError(f"{source}: the tokenizer has {len(text_tok)} ids, the model "
                         f"{model.config.vocab_size}")
    return LoadedModel(model, text_tok, image_tok, DocumentCodec(text_tok, image_tok))
