"""``chameleon eval reconstruction``: how faithfully the image tokenizer reproduces images.

Each image goes through the tokenizer's own preprocessing (resize, then centre crop or pad to its
resolution), is encoded and decoded, and the reconstruction is compared with the *preprocessed*
image, so the scores measure the VQ and not the resize. PSNR, SSIM and L1 are taken on the decoder
output clamped to [-1, 1], before the 8-bit rounding of :meth:`ImageTokenizer.decode`: the numbers
VQGAN training reports, whose ``evaluate_reconstruction`` runs the same code
(:func:`score_reconstruction`). Codebook usage and perplexity count all codes of all images.

rFID is the Fréchet distance between the Inception features of the preprocessed originals and of
the 8-bit reconstructions ``decode`` returns. It needs torch-fidelity and a local weights file (see
:func:`chameleon_lm.tokenizers.metrics.inception_extractor`); without one the key is absent and
``rfid_skipped`` says why. As every FID, it grows as the set shrinks (under 2048 images the
covariances are singular): compare rFIDs over the same number of images only.
"""

from __future__ import annotations

import argparse
import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from chameleon_lm.data.sources import Sample, Source, load_image, open_source
from chameleon_lm.eval.metrics import write_json
from chameleon_lm.eval.tasks import positive_int
from chameleon_lm.tokenizers.image import ImageTokenizer
from chameleon_lm.tokenizers.images import ImageSource
from chameleon_lm.tokenizers.metrics import (
    INCEPTION_WEIGHTS_NAME,
    ReconstructionScores,
    eval_mode,
    extract_inception_features,
    feature_statistics,
    frechet_distance,
    inception_extractor,
    reconstruct,
)

DEFAULT_BATCH_SIZE = 32


def _to_uint8(pixels: torch.Tensor, exact: bool) -> torch.Tensor:
    """8-bit images ``[B, 3, R, R]`` of pixels in [-1, 1]: rounded when ``exact`` (recovering the
    bytes ``to_tensor`` mapped to ``v / 255 * 2 - 1``), else truncated as ``to_pil`` does."""
    unit = (pixels.float().clamp(-1.0, 1.0) + 1.0) / 2.0 * 255
    return (unit.round() if exact else unit).to(torch.uint8)


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def reconstruction(
    image_tokenizer: ImageTokenizer,
    images: Iterable[ImageSource],
    inception_weights: str | os.PathLike | torch.nn.Module | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, Any]:
    """Reconstruction quality of an image tokenizer on images (see the module docstring).

    Args:
        image_tokenizer: The tokenizer; it must decode. Its VQGAN (and the Inception) run on its
            device.
        images: PIL images (or anything its ``preprocess`` reads), a list or any iterable, read
            once in batches.
        inception_weights: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (or
            the extractor :func:`inception_extractor` loaded from it), for rFID; without it rFID
            is skipped.
        batch_size: Images per batch.

    Returns:
        ``n_images``, ``psnr``, ``ssim``, ``l1``, ``codebook_usage``, ``codebook_perplexity``, and
        ``rfid`` (or ``rfid_skipped``, the reason it is absent).
    """
    if not image_tokenizer.can_decode:
        raise ValueError("the image tokenizer has no decoder: reconstruction needs one")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    extractor = inception_weights
    if inception_weights is not None and not isinstance(inception_weights, torch.nn.Module):
        # loaded first, so missing weights fail before the reconstruction work
        extractor = inception_extractor(inception_weights, image_tokenizer.device)
    vqgan = image_tokenizer.vqgan
    scores = ReconstructionScores(image_tokenizer.codebook_size)
    real, fake = [], []
    with eval_mode(vqgan):
        for batch in _batches(images, batch_size):
            pixels = image_tokenizer.preprocess(batch)
            recon, codes = reconstruct(vqgan, pixels)
            scores.add(pixels, recon, codes)
            if extractor is not None:
                real.append(extract_inception_features(extractor, _to_uint8(pixels, exact=True)))
                fake.append(extract_inception_features(extractor, _to_uint8(recon, exact=False)))
    if scores.n_images == 0:
        raise ValueError("no images given")
    out: dict[str, Any] = {"n_images": scores.n_images, **scores.result()}
    if extractor is None:
        out["rfid_skipped"] = (f"no Inception weights given (they are never downloaded; pass "
                               f"torch-fidelity's {INCEPTION_WEIGHTS_NAME})")
    elif scores.n_images < 2:
        out["rfid_skipped"] = "rFID needs at least 2 images (a covariance of their features)"
    else:
        out["rfid"] = frechet_distance(*feature_statistics(np.concatenate(real)),
                                       *feature_statistics(np.concatenate(fake)))
    return out


# ------------------------------------------------------------------------------------- local runs


def iter_images(source: Source, limit: int | None = None) -> Iterator[Image.Image]:
    """Every image of a data source (:func:`chameleon_lm.data.sources.open_source`), in order and
    decoded, at most ``limit``; texts and skipped samples are passed over."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    n = 0
    for item in source:
        if not isinstance(item, Sample):
            continue
        for segment in item.segments:
            if isinstance(segment, str):
                continue
            yield load_image(segment)
            n += 1
            if n == limit:
                return


def load_tokenizer(
    path: str | os.PathLike,
    kind: Literal["auto", "model", "tokenizer"] = "auto",
    device: str | torch.device = "cpu",
) -> ImageTokenizer:
    """The image tokenizer of a model folder (``kind="model"``, any layout ``load_model`` reads) or
    an image-tokenizer folder (``"tokenizer"``); ``"auto"``: a model if the folder is one."""
    # here, not at the top: VQGAN training imports this module and needs no model code
    from chameleon_lm.checkpoints import detect_layout, load_model
    from chameleon_lm.tokenizers.image import load_image_tokenizer

    if kind not in ("auto", "model", "tokenizer"):
        raise ValueError(f"kind must be 'auto', 'model' or 'tokenizer', got {kind!r}")
    if kind == "auto":
        try:
            detect_layout(path)
            kind = "model"
        except (ValueError, FileNotFoundError):  # load_image_tokenizer says what is wrong
            kind = "tokenizer"
    if kind == "tokenizer":
        return load_image_tokenizer(path, device=device)
    tokenizer = load_model(path, device=device).image_tokenizer
    if tokenizer is None:
        raise ValueError(f"{path}: the model folder has no image tokenizer")
    return tokenizer


def run_reconstruction(
    tokenizer_or_model_dir: str | os.PathLike,
    data: str,
    limit: int | None = None,
    inception_weights: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    *,
    kind: Literal["auto", "model", "tokenizer"] = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "cpu",
) -> dict[str, Any]:
    """Score the image tokenizer of a folder (see :func:`load_tokenizer`) on the first ``limit``
    images of ``data`` (any spec ``open_source`` reads); write ``out/metrics.json`` when given.

    Returns:
        The metrics of :func:`reconstruction`, with ``task`` and ``settings``.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    # loaded before the tokenizer, so a bad weights file fails before a model is read
    extractor = (inception_extractor(inception_weights, device)
                 if inception_weights is not None else None)
    tokenizer = load_tokenizer(tokenizer_or_model_dir, kind, device)
    images = iter_images(open_source(data), limit)
    first = next(images, None)
    if first is None:
        raise ValueError(f"{data}: holds no images")
    metrics = reconstruction(tokenizer, itertools.chain([first], images), extractor, batch_size)
    result = {"task": "reconstruction", **metrics, "settings": {
        "path": str(tokenizer_or_model_dir), "kind": kind, "data": data, "limit": limit,
        "inception_weights": None if inception_weights is None else str(inception_weights),
        "resolution": tokenizer.resolution, "mode": tokenizer.mode,
        "codebook_size": tokenizer.codebook_size, "batch_size": batch_size}}
    if out is not None:
        write_json(Path(out) / "metrics.json", result)
    return result


def _cli(args: argparse.Namespace) -> int:
    path, kind = (args.model, "model") if args.model else (args.tokenizer, "tokenizer")
    m = run_reconstruction(path, args.data, args.limit, args.inception_weights, args.out,
                           kind=kind, batch_size=args.batch_size, device=args.device)
    rfid = f"rFID {m['rfid']:.2f}" if "rfid" in m else "rFID skipped"
    print(f"{m['n_images']} images: PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f}, L1 "
          f"{m['l1']:.4f}, codebook usage {m['codebook_usage']:.3f}, perplexity "
          f"{m['codebook_perplexity']:.1f}, {rfid}"
          + (f"; wrote {Path(args.out) / 'metrics.json'}" if args.out else ""))
    return 0


def add_cli(ev: argparse._SubParsersAction) -> None:
    """Register ``reconstruction`` on the ``chameleon eval`` subcommands."""
    p = ev.add_parser(
        "reconstruction", help="image-tokenizer reconstruction: PSNR, SSIM, codebook usage, rFID",
        description="Encode and decode images with the image tokenizer and compare the results "
                    "with its preprocessed inputs. rFID needs torch-fidelity and local Inception "
                    "weights (never downloaded).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model folder (any layout load_model reads)")
    src.add_argument("--tokenizer", help="image-tokenizer folder (chameleon-lm's, Meta's or HF's)")
    p.add_argument("--data", required=True,
                   help="images: any source spec (WebDataset tars, image folder, JSONL, parquet)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N images")
    p.add_argument("--inception-weights", default=None,
                   help=f"torch-fidelity's {INCEPTION_WEIGHTS_NAME}, for rFID")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="folder for metrics.json")
    p.set_defaults(func=_cli)
