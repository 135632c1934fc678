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
- ``sft``: a conversation (a ``messages`` sample, whose segments carry roles) in the multi-turn layout
  ``<s> u1 <reserved08706> a1 </s> u2 <reserved08706> a2 </s> …`` with the loss on every assistant turn
  and its ``</s>`` (``DocumentCodec.encode_conversation``). ``augment`` adds light image augmentation.

Every sample gets the same document on every run: caption dropout and augmentation are drawn from
generators seeded by the run's seed and the sample's key.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from PIL import Image

from chameleon_lm.documents import Document, DocumentCodec, EncodedDocument
from chameleon_lm.tokenizers.vocab import TEXT
from chameleon_lm.utils.config import Config

RECIPES = ("caption-image", "image-caption", "interleaved", "text", "chat", "sft")


class RecipeError(ValueError):
    """A sample this recipe cannot use; ``reason`` is the short name it is counted under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class RecipeConfig(Config):
    """How samples become documents."""

    name: str = "caption-image"
    """One of ``caption-image``, ``image-caption``, ``interleaved``, ``text``, ``chat``, ``sft``."""
    caption_dropout: float = 0.0
    """``caption-image``: share of samples trained on the image alone (for classifier-free guidance;
    Meta's released models were trained with guidance, e.g. 0.1)."""
    loss: str = "auto"
    """Which tokens are targets: ``all``, ``text`` (from the first text token on: the caption of an
    image-caption pair) or ``auto`` (``text`` for ``image-caption``, the chat layout's own mask for
    ``chat`` and ``sft``, ``all`` otherwise)."""
    eos: bool = True
    """End every document with ``</s>``."""
    chat_answer: str = "last"
    """``chat``: the answer is the ``last`` segment, the last ``image`` or the last ``text``."""
    augment: float = 0.0
    """``sft``: light augmentation of pixel images, a random crop keeping ``1 - augment`` to all of each
    side (a scale and position jitter; the aspect ratio kept); 0 turns it off. Never a horizontal
    flip: texts say left and right."""

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
        if not 0.0 <= self.augment < 0.5:
            raise ValueError(f"augment must be in [0, 0.5), got {self.augment}")
        if self.augment and self.name != "sft":
            raise ValueError("augment applies to the sft recipe only")

    def to_dict(self) -> dict:
        # augment only when set: indexes and resume records of other recipes stay as they were
        d = super().to_dict()
        if not self.augment:
            del d["augment"]
        return d

    @property
    def needs_images(self) -> bool:
        return self.name != "text"

    @property
    def wants_pixels(self) -> bool:
        """The recipe takes images as pixels: it chooses their resize mode (and may augment them)."""
        return self.name in ("chat", "sft")


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
    if name == "sft":
        raise ValueError("the sft recipe makes turns: use build_conversation")
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


def build_conversation(config: RecipeConfig, segments: list, roles: list[str] | None, key: str,
                       seed: int) -> list[tuple[str, Document]]:
    """The ``(role, document)`` turns of a conversation sample (``sft``).

    A turn is a run of segments of one role; trailing user turns are dropped (they have no answer to
    learn). With ``augment``, pixel images are jittered by a generator seeded by ``seed`` and ``key``.

    Raises:
        RecipeError: ``not_a_conversation`` (no roles: not a ``messages`` sample) or ``no_answer``.
    """
    if roles is None or len(roles) != len(segments):
        raise RecipeError("not_a_conversation", "sft needs a messages source (segments with roles)")
    rng = random.Random(f"{seed}/{key}/augment")
    turns: list[tuple[str, list]] = []
    for role, seg in zip(roles, segments):
        if config.augment and isinstance(seg, Image.Image):
            seg = _jitter(seg, rng, config.augment)
        if not turns or turns[-1][0] != role:
            turns.append((role, []))
        if not isinstance(seg, str) or seg:
            turns[-1][1].append(seg)
    while turns and turns[-1][0] != "assistant":
        turns.pop()
    if not turns:
        raise RecipeError("no_answer", "the conversation has no assistant turn")
    return [(role, Document.of(*segs)) for role, segs in turns]


def _jitter(image: Image.Image, rng: random.Random, amount: float) -> Image.Image:
    """A random crop of ``1 - amount`` to all of each side, anywhere in the image."""
    scale = 1.0 - rng.uniform(0.0, amount)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    x, y = rng.randint(0, image.width - w), rng.randint(0, image.height - h)
    return image.crop((x, y, x + w, y + h))


def encode_sample(codec: DocumentCodec, config: RecipeConfig, segments: list, key: str,
                  seed: int, roles: list[str] | None = None) -> EncodedDocument:
    """Tokenize a sample's segments (texts and image codes, or PIL images) with a recipe.

    Args:
        roles: The role of each segment (``messages`` samples); the ``sft`` recipe needs them.

    Raises:
        RecipeError: The sample does not fit the recipe, or its text encodes to special tokens.
    """
    if config.name == "sft":
        turns = build_conversation(config, segments, roles, key, seed)
        try:
            return codec.encode_conversation(turns)
        except ValueError as e:
            raise RecipeError("bad_text", str(e)) from e
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
