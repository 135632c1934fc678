"""The training and evaluation images of VQGAN training.

Pixels held in memory (:class:`_TensorBatches`), or a data source streamed epoch after epoch
(:class:`_StreamBatches`): decoded and preprocessed on the fly, shuffled through a seeded buffer,
bad images skipped and counted. Both have a state that checkpoints save, so a resumed run draws
exactly the batches of the uninterrupted run.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Union

import torch

from chameleon_lm.data.sources import (
    ImageRef,
    Sample,
    Source,
    SourceConfig,
    iter_images,
    load_image,
    open_source,
)
from chameleon_lm.tokenizers.images import ImageError, ImageSource, preprocess
from chameleon_lm.training.vqgan.config import VQTrainConfig

MAX_SKIP_NOTES = 5
"""Bad images named in the log; later ones are only counted."""
Images = Union[torch.Tensor, Iterable[ImageSource], str, os.PathLike, SourceConfig, Source]
"""What :func:`train_image_tokenizer` trains and evaluates on: pixels, images, or a data source."""


def images_to_pixels(
    images: torch.Tensor | Iterable[ImageSource], resolution: int, num_workers: int = 0
) -> torch.Tensor:
    """Pixels ``[M, 3, R, R]`` (float32, [-1, 1]) of a tensor of pixels or an iterable of images.

    Images (PIL images, paths, bytes) are preprocessed once with ``preprocess(img, R, "crop")``.

    Raises:
        ValueError: A tensor of the wrong shape, or no images.
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, resolution, resolution):
            raise ValueError(
                f"pixels must have shape [M, 3, {resolution}, {resolution}], "
                f"got {list(images.shape)}"
            )
        pixels = images.float()
    else:
        def prep(img: ImageSource) -> torch.Tensor:
            return preprocess(img, resolution, "crop")

        if num_workers > 0:
            with ThreadPoolExecutor(num_workers) as pool:
                tensors = list(pool.map(prep, images))
        else:
            tensors = [prep(img) for img in images]
        if not tensors:
            raise ValueError("no images given")
        pixels = torch.stack(tensors)
    if pixels.shape[0] == 0:
        raise ValueError("no images given")
    return pixels


def _is_stream(images: Images) -> bool:
    """Whether :func:`train_image_tokenizer` streams ``images``: a source spec, config or source."""
    return isinstance(images, (str, os.PathLike, SourceConfig)) or (
        hasattr(images, "units") and hasattr(images, "read"))


def _open(images: str | os.PathLike | SourceConfig | Source) -> Source:
    if isinstance(images, os.PathLike):
        images = os.fspath(images)
    return open_source(images) if isinstance(images, (str, SourceConfig)) else images


def _unit_images(source: Source, unit: str) -> Iterator[tuple[str, ImageRef]]:
    """``(key, image)`` of every image segment of one unit, in order (skipped samples left out)."""
    for item in source.read(unit):
        if isinstance(item, Sample):
            refs = [s for s in item.segments if isinstance(s, ImageRef)]
            for i, ref in enumerate(refs):
                yield (item.key if len(refs) == 1 else f"{item.key}#{i}"), ref


def _decode(ref: ImageRef, resolution: int, allow_remote: bool) -> torch.Tensor | ImageError:
    """Pixels ``[3, R, R]`` of one image (``"crop"``), or the error that makes it unusable."""
    try:
        return preprocess(load_image(ref, allow_remote=allow_remote), resolution, "crop")
    except ImageError as e:
        return e


class _Decoder:
    """Decodes images in order, on ``workers`` threads (0: the calling thread); skips bad ones."""

    def __init__(self, resolution: int, workers: int, log: Callable[[str], None]) -> None:
        self.resolution, self.log = resolution, log
        self.pool = ThreadPoolExecutor(workers) if workers > 0 else None
        self.skipped = 0

    def __call__(self, items: list[tuple[str, ImageRef]],
                 allow_remote: bool = False) -> list[torch.Tensor]:
        """The pixels of the usable images of ``(key, image)`` items, in order."""
        def one(ref: ImageRef) -> torch.Tensor | ImageError:
            return _decode(ref, self.resolution, allow_remote)

        refs = [ref for _, ref in items]
        results = list(self.pool.map(one, refs) if self.pool else map(one, refs))
        good = []
        for (key, _), result in zip(items, results):
            if isinstance(result, ImageError):
                self.skipped += 1
                if self.skipped <= MAX_SKIP_NOTES:
                    more = " (further bad images are only counted)" if (
                        self.skipped == MAX_SKIP_NOTES) else ""
                    self.log(f"skipped bad image {key}: {result}{more}")
            else:
                good.append(result)
        return good

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _shuffle_buffer(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """WebDataset-style shuffling: each item swaps with a random one of ``size`` held back."""
    if size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


@dataclass
class _StreamPlan:
    """How a source splits into evaluation images and training images (see :func:`_plan_stream`)."""

    spans: list[tuple[str, int, int | None]]
    """``(unit, first, end)``: the training images of a unit are its images ``first`` to ``end``
    (``None``: its last one)."""
    eval_items: list[tuple[str, ImageRef]]
    """The evaluation images (held out, or with under 10 images, the first training images)."""
    train_images: int | None
    """Training images per epoch, when the look-ahead saw all of them."""


def _plan_stream(source: Source, config: VQTrainConfig, hold_out: bool) -> _StreamPlan:
    """Split a source into held-out and training images, reading ahead only a bounded number.

    The first ``min(eval_size, M // 10)`` images (source order) are held out when ``hold_out``, and
    only the first ``max_images`` are used. Deciding both needs at most ``max(10 * eval_size,
    max_images) + 1`` images read ahead, still encoded.

    Raises:
        ValueError: The source has no images.
    """
    units = source.units()
    cap = config.max_images or None
    ahead = max(10 * config.eval_size if hold_out else 0, cap or 0)
    counts: list[int] = []  # images of the units read ahead (the last may be read in part)
    first: list[tuple[str, ImageRef]] = []
    seen, complete = 0, True
    if ahead:
        for unit in units:
            counts.append(0)
            for item in _unit_images(source, unit):
                if seen > ahead:
                    break
                if len(first) < config.eval_size:
                    first.append(item)
                counts[-1] += 1
                seen += 1
            if seen > ahead:
                complete = False
                break
    total = seen if ahead and complete else None
    known = [x for x in (cap, total) if x is not None]
    limit = min(known) if known else None  # images used in all, when bounded
    n_eval = min(config.eval_size, (limit if limit is not None else ahead) // 10) if hold_out else 0
    if limit == 0 or (ahead and not seen):
        raise ValueError(f"{source.config.path}: the source has no images")

    spans: list[tuple[str, int, int | None]] = []
    start = 0
    for i, unit in enumerate(units):
        if i < len(counts):
            lo, hi = max(n_eval - start, 0), None if limit is None else limit - start
            if lo < counts[i] and (hi is None or lo < hi):
                spans.append((unit, lo, hi))
            start += counts[i]
        elif limit is None:
            spans.append((unit, 0, None))
    eval_items = first[:n_eval] if n_eval else first[: min(config.eval_size, limit or seen)]
    return _StreamPlan(spans, eval_items, None if limit is None else limit - n_eval)


class _StreamBatches:
    """Endless shuffled batches of a source's images, decoded on the fly and resumable exactly.

    Epoch ``e`` visits the units of the plan in an order drawn from ``(seed, e)`` and passes their
    images, still encoded, through a shuffle buffer drawn from the same generator, so the stream is
    a function of the seed and its position is ``(epoch, images drawn in the epoch)``. Resuming
    replays the epoch's draws up to that position: it re-reads those images but decodes none.
    """

    def __init__(self, source: Source, spans: list[tuple[str, int, int | None]], batch_size: int,
                 shuffle_buffer: int, seed: int, decoder: _Decoder) -> None:
        self.source, self.spans, self.decoder = source, spans, decoder
        self.batch_size, self.buffer, self.seed = batch_size, shuffle_buffer, seed
        self.epoch = self.drawn = self.good = 0
        self.epoch_size: int | None = None  # images per epoch, bad ones included, once known
        self._items: Iterator[tuple[str, ImageRef]] | None = None
        units = "\n".join(f"{u}:{lo}:{hi}" for u, lo, hi in self.spans)
        self.fingerprint = hashlib.sha256(units.encode()).hexdigest()[:16]

    def _epoch_items(self, epoch: int) -> Iterator[tuple[str, ImageRef]]:
        rng = random.Random(f"{self.seed}/{epoch}")
        spans = list(self.spans)
        rng.shuffle(spans)

        def items() -> Iterator[tuple[str, ImageRef]]:
            for unit, lo, hi in spans:
                for i, item in enumerate(_unit_images(self.source, unit)):
                    if hi is not None and i >= hi:
                        break
                    if i >= lo:
                        yield item

        return _shuffle_buffer(items(), self.buffer, rng)

    def _draw(self) -> tuple[str, ImageRef]:
        if self._items is None:
            self._items = self._epoch_items(self.epoch)
            # Resuming costs re-reading (never decoding) the images this epoch had drawn.
            for n in range(self.drawn):
                if next(self._items, None) is None:
                    raise ValueError(f"{self.source.config.path}: holds fewer images than when "
                                     f"the checkpoint was saved (epoch {self.epoch}: {n} of "
                                     f"{self.drawn})")
        item = next(self._items, None)
        if item is None:
            if self.drawn == 0:
                raise ValueError(f"{self.source.config.path}: no training images")
            self.epoch_size = self.epoch_size or self.drawn
            self.epoch, self.drawn = self.epoch + 1, 0
            self._items = self._epoch_items(self.epoch)
            item = next(self._items)
        self.drawn += 1
        return item

    def take(self, n: int) -> list[torch.Tensor]:
        """The next ``n`` good images, ``[3, R, R]`` each."""
        images: list[torch.Tensor] = []
        while len(images) < n:
            good = self.decoder([self._draw() for _ in range(n - len(images))],
                                self.source.config.allow_remote)
            self.good += len(good)
            images += good
            if self.good == 0 and self.epoch > 0:
                raise ValueError(f"{self.source.config.path}: none of its images is usable "
                                 f"({self.decoder.skipped} bad)")
        return images

    def next(self) -> torch.Tensor:
        """The next batch ``[batch_size, 3, R, R]``."""
        return torch.stack(self.take(self.batch_size))

    def init_pixels(self, n: int) -> torch.Tensor:
        """``n`` images for the codebook's data init: the first of a fresh copy of this stream."""
        fresh = _StreamBatches(self.source, self.spans, self.batch_size, self.buffer, self.seed,
                               self.decoder)
        return torch.stack(fresh.take(n))

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "stream", "data": self.fingerprint, "epoch": self.epoch,
                "drawn": self.drawn, "good": self.good, "epoch_size": self.epoch_size,
                "skipped": self.decoder.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_data_state(state, "stream", self.fingerprint)
        self.epoch, self.drawn, self.good = state["epoch"], state["drawn"], state["good"]
        self.epoch_size, self.decoder.skipped = state["epoch_size"], state["skipped"]
        self._items = None


class _TensorBatches:
    """Endless random mini-batches of a tensor: a fresh permutation per epoch, seeded."""

    def __init__(self, pixels: torch.Tensor, batch_size: int, generator: torch.Generator) -> None:
        self.pixels, self.batch_size, self.generator = pixels, batch_size, generator
        self.order = torch.empty(0, dtype=torch.long)
        self.fingerprint = f"{pixels.shape[0]} images"

    def next(self) -> torch.Tensor:
        if self.order.numel() < self.batch_size:
            fresh = torch.randperm(self.pixels.shape[0], generator=self.generator)
            self.order = torch.cat([self.order, fresh])
        index, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return self.pixels[index]

    def init_pixels(self, n: int) -> torch.Tensor:
        return self.pixels  # init_codebook draws its images from all of them

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "tensor", "data": self.fingerprint, "order": self.order.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_data_state(state, "tensor", self.fingerprint)
        self.order = torch.tensor(state["order"], dtype=torch.long)


def _check_data_state(state: dict[str, Any], kind: str, fingerprint: str) -> None:
    if state.get("kind") != kind or state.get("data") != fingerprint:
        raise ValueError(f"the checkpoint was trained on other data ({state.get('kind')} "
                         f"{state.get('data')}, now {kind} {fingerprint}); resume with the same "
                         "images, or train afresh in another out_dir")


def _eval_pixels(images: Images, resolution: int, config: VQTrainConfig, decoder: _Decoder
                 ) -> torch.Tensor:
    """Evaluation pixels of ``eval_images``: a source's first ``eval_size`` usable images."""
    if not _is_stream(images):
        return images_to_pixels(images, resolution, config.num_workers)
    if config.eval_size == 0:
        raise ValueError("eval_size is 0: no images of the eval_images source to evaluate on")
    source = _open(images)
    pixels: list[torch.Tensor] = []
    items = iter_images(source)
    while len(pixels) < config.eval_size:
        chunk = [item for _, item in zip(range(config.eval_size - len(pixels)), items)]
        if not chunk:
            break
        pixels += decoder(chunk, source.config.allow_remote)
    if not pixels:
        raise ValueError(f"{source.config.path}: no usable evaluation images")
    return torch.stack(pixels)


def _training_data(
    images: Images, eval_images: Images | None, config: VQTrainConfig, generator: torch.Generator,
    decoder: _Decoder,
) -> tuple[_TensorBatches | _StreamBatches, torch.Tensor, int | None, str]:
    """The batches, the evaluation pixels, the training images per epoch (if known) and a phrase
    naming the data."""
    resolution = decoder.resolution
    if not _is_stream(images):
        if config.max_images:
            raise ValueError("max_images applies to a streamed source; slice the images instead")
        pixels = images_to_pixels(images, resolution, config.num_workers)
        if eval_images is not None:
            eval_pixels = _eval_pixels(eval_images, resolution, config, decoder)
        else:
            n_train = pixels.shape[0] - min(config.eval_size, pixels.shape[0] // 10)
            pixels, eval_pixels = pixels[:n_train], pixels[n_train:]
            if eval_pixels.shape[0] == 0:  # under 10 images: evaluate on the training images
                eval_pixels = pixels
        batches = _TensorBatches(pixels, config.batch_size, generator)
        return batches, eval_pixels, pixels.shape[0], f"{pixels.shape[0]} images"
    source = _open(images)
    if eval_images is None and config.eval_size == 0:
        raise ValueError("eval_size is 0: pass eval_images to evaluate a streamed source")
    plan = _plan_stream(source, config, hold_out=eval_images is None)
    stream = _StreamBatches(source, plan.spans, config.batch_size, config.shuffle_buffer,
                            config.seed, decoder)
    if eval_images is not None:
        eval_pixels = _eval_pixels(eval_images, resolution, config, decoder)
    else:
        good = decoder(plan.eval_items, source.config.allow_remote)
        if not good:
            raise ValueError(f"{source.config.path}: none of its first {len(plan.eval_items)} "
                             "images (held out for evaluation) is usable")
        eval_pixels = torch.stack(good)
    size = "" if plan.train_images is None else f", {plan.train_images} images"
    return stream, eval_pixels, plan.train_images, (
        f"a stream of {source.config.path} ({len(plan.spans)} units{size}, "
        f"{eval_pixels.shape[0]} evaluation images)")
