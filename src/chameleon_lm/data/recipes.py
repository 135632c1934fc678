"""Recipes: the named ways a source sample becomes a training document.

A sample is an ordered list of text and image segments (``chameleon_lm.data.sources``). A recipe
arranges them into a :class:`~chameleon_lm.documents.Document` and says which tokens carry the loss:

- ``caption-image``: caption, then image (text-to-image). ``caption_dropout`` of the samples keep the
  image alone, so the model also learns the unconditional image distribution that classifier-free
  guidance subtracts.
- ``image-caption``: image, then caption (captioning); the loss covers the caption only by default,
  so these images do not teach an image prior with no text before it.
- ``interleaved``: the segments in their stored order (OBELICS-style documents, picture stories).
- ``text``: the text segments alone, joined by blank lines.
- ``chat``: the SFT layout ``<s> prompt <reserved08706> answer </s>`` with the loss on the answer:
  the answer is the sample's last segment (``chat_answer="last"``), its last image or its last text,
  the prompt everything before it.

Every sample gets the same document on every run: caption dropout is drawn from a generator seeded by
the run's seed and the sample's key.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from chameleon_lm.documents import Document, DocumentCodec, EncodedDocument
from chameleon_lm.tokenizers.vocab import TEXT
from chameleon_lm.utils.config import Config

RECIPES = ("caption-image", "image-caption", "interleaved", "text", "chat")


class RecipeError(ValueError):
    """A sample this recipe cannot use; ``reason`` is the short name it is counted under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class RecipeConfig(Config):
    """How samples become documents."""

    name: str = "caption-image"
    """One of ``caption-image``, ``image-caption``, ``interleaved``, ``text``, ``chat``."""
    caption_dropout: float = 0.0
    """``caption-image``: share of samples trained on the image alone (for classifier-free guidance;
    Meta's released models were trained with guidance, e.g. 0.1)."""
    loss: str = "auto"
    """Which tokens are targets: ``all``, ``text`` (from the first text token on: the caption of an
    image-caption pair) or ``auto`` (``text`` for ``image-caption``, the chat layout's own mask for
    ``chat``, ``all`` otherwise)."""
    eos: bool = True
    """End every document with ``</s>``."""
    chat_answer: str = "last"
    """``chat``: the answer is the ``last`` segment, the last ``image`` or the last ``text``."""

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise ValueError(f"unknown recipe {self.name!r}; known: {', '.join(RECIPES)}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.caption_dropout and self.name != "caption-image":
            raise ValueError("caption_dropout applies to the caption-image recipe only")
        if self.loss not in ("auto", "all", "text"):
            raise ValueError(f"loss must be auto, all or text, got {self.loss!r}")
        if self.chat_answer not in ("last", "image", "text"):
            raise ValueError(f"chat_answer must be last, image or text, got {self.chat_answer!r}")

    @property
    def needs_images(self) -> bool:
        return self.name != "text"


def _pair(segments: list) -> tuple[str, torch.Tensor]:
    texts = [s for s in segments if isinstance(s, str) and s.strip()]
    images = [s for s in segments if not isinstance(s, str)]
    if not images:
        raise RecipeError("no_image", "the sample has no image")
    if not texts:
        raise RecipeError("empty_text", "the sample has no (non-empty) caption")
    return texts[0].strip(), images[0]


def build_document(config: RecipeConfig, segments: list, key: str, seed: int
                   ) -> tuple[Document, Document | None]:
    """The document (and, for ``chat``, the answer) a sample's segments make.

    Args:
        config: The recipe.
        segments: The sample's segments in order: ``str`` texts and image code tensors ``[N]``.
        key: The sample's key (seeds its caption dropout).
        seed: The run's seed.

    Returns:
        ``(document, None)``, or ``(prompt, answer)`` for ``chat``.

    Raises:
        RecipeError: The sample lacks what the recipe needs (an image, a caption, any text).
    """
    name = config.name
    if name in ("caption-image", "image-caption"):
        caption, image = _pair(segments)
        if name == "image-caption":
            return Document.of(image, caption), None
        if config.caption_dropout and random.Random(f"{seed}/{key}").random() < config.caption_dropout:
            return Document.of(image), None
        return Document.of(caption, image), None
    if name == "text":
        texts = [s.strip() for s in segments if isinstance(s, str) and s.strip()]
        if not texts:
            raise RecipeError("empty_text", "the sample has no text")
        return Document.of("\n\n".join(texts)), None
    kept = [s for s in segments if not isinstance(s, str) or s.strip()]
    if not kept:
        raise RecipeError("empty_text", "the sample is empty")
    if name == "interleaved":
        return Document.of(*kept), None
    # chat
    want = {"last": None, "image": False, "text": True}[config.chat_answer]
    at = next((i for i in range(len(kept) - 1, -1, -1)
               if want is None or isinstance(kept[i], str) == want), None)
    if at is None:
        raise RecipeError("no_answer", f"the sample has no {config.chat_answer} segment to answer with")
    prompt = kept[:at] + kept[at + 1:]
    if not prompt:
        raise RecipeError("no_prompt", "the sample has nothing left for the prompt")
    return Document.of(*prompt), Document.of(kept[at])


def encode_sample(codec: DocumentCodec, config: RecipeConfig, segments: list, key: str,
                  seed: int) -> EncodedDocument:
    """Tokenize a sample's segments (texts and image codes) with a recipe.

    Raises:
        RecipeError: The sample does not fit the recipe, or its text encodes to special tokens.
    """
    doc, answer = build_document(config, segments, key, seed)
    try:
        if answer is not None:
            return codec.encode_chat(doc, answer)
        enc = codec.encode(doc, eos=config.eos)
    except ValueError as e:
        raise RecipeError("bad_text", str(e)) from e
    loss = config.loss if config.loss != "auto" else ("text" if config.name == "image-caption" else "all")
    if loss == "text":
        text_at = (enc.modality == TEXT).nonzero()
        if len(text_at) == 0:
            raise RecipeError("empty_text", "the document has no text token to train on")
        mask = enc.loss_mask.clone()
        mask[: int(text_at[0, 0])] = False
        enc = EncodedDocument(enc.ids, enc.modality, mask)
    return enc
