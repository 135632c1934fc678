"""chameleon-lm: train, run, serve and evaluate Chameleon-style early-fusion mixed-modal models.

The public API is re-exported here and imported lazily, so ``import chameleon_lm`` stays cheap and a
stage never pulls in the stages after it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "ChameleonConfig": "chameleon_lm.model",
    "Chameleon": "chameleon_lm.model",
    "KVCache": "chameleon_lm.model",
    "VQGANConfig": "chameleon_lm.tokenizers.vqgan",
    "VQGAN": "chameleon_lm.tokenizers.vqgan",
    "ImageTokenizer": "chameleon_lm.tokenizers.image",
    "load_image_tokenizer": "chameleon_lm.tokenizers.image",
    "TextTokenizer": "chameleon_lm.tokenizers.text",
    "load_text_tokenizer": "chameleon_lm.tokenizers.text",
    "train_text_tokenizer": "chameleon_lm.tokenizers.text",
    "Vocab": "chameleon_lm.tokenizers.vocab",
    "Document": "chameleon_lm.documents",
    "DocumentCodec": "chameleon_lm.documents",
    "EncodedDocument": "chameleon_lm.documents",
    "TextPart": "chameleon_lm.documents",
    "ImagePart": "chameleon_lm.documents",
    "DecodeError": "chameleon_lm.documents",
    "load_model": "chameleon_lm.checkpoints",
    "save_model": "chameleon_lm.checkpoints",
    "LoadedModel": "chameleon_lm.checkpoints",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:
    from chameleon_lm.checkpoints import LoadedModel, load_model, save_model
    from chameleon_lm.documents import (
        DecodeError, Document, DocumentCodec, EncodedDocument, ImagePart, TextPart,
    )
    from chameleon_lm.model import Chameleon, ChameleonConfig, KVCache
    from chameleon_lm.tokenizers.image import ImageTokenizer, load_image_tokenizer
    from chameleon_lm.tokenizers.text import TextTokenizer, load_text_tokenizer, train_text_tokenizer
    from chameleon_lm.tokenizers.vocab import Vocab
    from chameleon_lm.tokenizers.vqgan import VQGAN, VQGANConfig


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'chameleon_lm' has no attribute {name!r}")
