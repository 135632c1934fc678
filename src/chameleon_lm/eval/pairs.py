"""Text→image and image→text on held-out image–caption pairs, scored by a pluggable judge.

For every pair the model draws an image from the caption and writes a caption for the image; a judge
reads the attributes (for the shapes world: colour and shape) that each generated image shows and
each generated caption states, and compares them with the pair's reference attributes. The judge is
also run on the real images and on their VQ reconstructions, so its own error and the image
tokenizer's are reported next to the model's.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image

from chameleon_lm.data.sources import Sample, Source, load_image
from chameleon_lm.documents import Document, DocumentCodec
from chameleon_lm.generation.engine import generate_images, generate_text
from chameleon_lm.generation.sampling import GenerationConfig
from chameleon_lm.model import Chameleon


class PairJudge(Protocol):
    """Reads attributes off images and captions. Attribute tuples follow ``attributes``."""

    attributes: tuple[str, ...]

    def reference(self, caption: str, meta: dict[str, Any]) -> tuple:
        """The true attributes of a pair (from its metadata or its caption)."""

    def read_images(self, images: list[Image.Image]) -> list[tuple]:
        """The attributes each image shows."""

    def read_captions(self, captions: list[str]) -> list[tuple]:
        """The attributes each caption states (None where it states none)."""


@dataclass
class Pair:
    image: Image.Image
    caption: str
    meta: dict[str, Any]


def load_pairs(source: Source, limit: int | None = None) -> list[Pair]:
    """The first ``limit`` usable (image, caption) pairs of a source, images decoded."""
    out = []
    for item in source:
        if not isinstance(item, Sample):
            continue
        images = [s for s in item.segments if not isinstance(s, str)]
        texts = [s for s in item.segments if isinstance(s, str) and s.strip()]
        if images and texts:
            out.append(Pair(load_image(images[0]).convert("RGB"), texts[0], item.meta))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{source.config.path}: no image-caption pairs")
    return out


def score(predicted: list[tuple], references: list[tuple], attributes: tuple[str, ...]) -> dict[str, float]:
    """Share of items with each attribute right, and with all of them right (``all``)."""
    n = max(len(references), 1)
    out = {a: sum(p is not None and p[i] == r[i] for p, r in zip(predicted, references)) / n
           for i, a in enumerate(attributes)}
    out["all"] = sum(p is not None and tuple(p) == tuple(r) for p, r in zip(predicted, references)) / n
    return out


@torch.no_grad()
def evaluate_pairs(model: Chameleon, codec: DocumentCodec, pairs: list[Pair], judge: PairJudge,
                   generation: GenerationConfig, batch_size: int = 100, keep: int = 12
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate both ways for every pair and judge the results.

    Args:
        model: The model (put in eval mode).
        codec: Its tokenizers; the image tokenizer must decode.
        pairs: Held-out pairs.
        judge: Reads attributes (see :class:`PairJudge`).
        generation: Sampling settings (its ``text`` part for captions, ``image`` part for images).
        batch_size: Prompts generated together.
        keep: How many (prompt, generated image, real image, generated caption) samples to return.

    Returns:
        Metrics (``text_to_image``, ``image_to_text``, ``judge_real``, ``judge_vq_reconstruction``:
        each a dict of per-attribute and ``all`` accuracy) and the kept samples.
    """
    if codec.image is None or not codec.image.can_decode:
        raise ValueError("evaluating pairs needs an image tokenizer that decodes")
    model.eval()
    refs = [judge.reference(p.caption, p.meta) for p in pairs]
    codes = torch.cat([codec.image.encode([p.image for p in pairs[s : s + batch_size]]).cpu()
                       for s in range(0, len(pairs), batch_size)])
    recon = list(itertools.chain.from_iterable(
        codec.image.decode(codes[s : s + batch_size]) for s in range(0, len(pairs), batch_size)))
    vocab = codec.text.vocab
    images: list[Image.Image] = []
    for s in range(0, len(pairs), batch_size):
        prompts = [[vocab.bos_id] + codec.text.encode(p.caption) for p in pairs[s : s + batch_size]]
        images += codec.image.decode(generate_images(model, vocab, prompts, generation, codec.image.num_tokens))
    prompts = [codec.encode(Document.of(c)).ids.tolist() for c in codes]
    captions = []
    for s in range(0, len(prompts), batch_size):
        rows = generate_text(model, vocab, prompts[s : s + batch_size], generation)
        captions += [codec.text.decode([t for t in row if t != vocab.eos_id]) for row in rows]
    attrs = judge.attributes
    metrics = {
        "n_pairs": len(pairs),
        "text_to_image": score(judge.read_images(images), refs, attrs),
        "image_to_text": score(judge.read_captions(captions), refs, attrs),
        "judge_real": score(judge.read_images([p.image for p in pairs]), refs, attrs),
        "judge_vq_reconstruction": score(judge.read_images(recon), refs, attrs),
    }
    samples = [{"caption": pairs[i].caption, "generated_image": images[i], "real_image": pairs[i].image,
                "generated_caption": captions[i], "reference": dict(zip(attrs, refs[i]))}
               for i in range(min(keep, len(pairs)))]
    return metrics, samples
