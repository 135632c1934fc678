"""A judge for shapes-world images: reads colour and shape by exact analysis of the pixels.

The background colour is the median of the border; each pixel's *coverage* is its distance from the
background relative to the shape colour's (anti-aliased edges give fractions). The colour is the
palette colour nearest to the median of the covered pixels; the shape is the one whose rendered
templates (every size and position, a few rotations and scales) have the smallest squared distance to
the coverage map shifted by up to two pixels (of 32) each way. No training, deterministic, and exact on
real renders; its accuracy on real and VQ-reconstructed test images is reported next to every score it
gives.

The pose tolerance is for generated images: a model that draws the right shape a pixel or two away
from the caption's nominal place, or 20 % larger or smaller, still drew that shape. With templates at
the exact nominal poses only, such images were matched to whichever other shape overlapped them best
(a ring read as a diamond, a small square as a triangle): on one quickstart model 10 of its 20 "wrong
shapes" were right shapes, moved or smaller (checked by eye).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from chameleon_lm.data.synth import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesWorld,
    parse_caption,
    render,
)

_TEMPLATE_BG = "grey"
_ROTATIONS = (-6.0, 0.0, 6.0)
_SCALES = (0.8, 0.9, 1.0, 1.1, 1.2)
_SHIFTS = (-2, -1, 0, 1, 2)
"""Shifts of the coverage map, in 1/32 of the image side (pixels at 32 px)."""


class ShapesJudge:
    """Reads (colour, shape) of images of a world; ``ShapesJudge(32)`` is the default 32-px world.

    Templates sit at the world's nominal poses (its ``snap`` grid), so pass the world the images
    come from when it snaps positions.
    """

    def __init__(self, world: ShapesWorld | int):
        world = ShapesWorld(image_size=world) if isinstance(world, int) else world
        self.image_size = image_size = world.image_size
        bg = np.array(BACKGROUNDS[_TEMPLATE_BG], dtype=np.float32)
        span = np.abs(np.array(COLOURS["white"], dtype=np.float32) - bg).sum()
        maps, self.template_shapes = [], []
        for shape in SHAPES:
            for size in SIZES:
                for position in POSITIONS:
                    for rotation in _ROTATIONS:
                        for scale in _SCALES:
                            label = {"colour": "white", "shape": shape, "size": size,
                                     "position": position, "background": _TEMPLATE_BG,
                                     "pose": dict(world.nominal_pose(size, position),
                                                  rotation=rotation, scale=scale)}
                            a = np.asarray(render(label, image_size), dtype=np.float32)
                            maps.append((np.abs(a - bg).sum(-1) / span).reshape(-1))
                            self.template_shapes.append(shape)
        self.templates = np.stack(maps)  # [n_templates, H*W] coverage in [0, 1]
        self.template_norms = (self.templates**2).sum(1)
        self.palette = np.array(list(COLOURS.values()), dtype=np.float32)

    def read(self, image: Image.Image) -> tuple[str, str]:
        """(colour, shape) of one image."""
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.Resampling.LANCZOS)
        a = np.asarray(image.convert("RGB"), dtype=np.float32)
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
        bg = np.median(border, axis=0)
        dist = np.abs(a - bg).sum(-1)
        covered = dist > 0.5 * dist.max()
        fg = np.median(a[covered], axis=0) if covered.any() else bg
        colour = list(COLOURS)[int(np.abs(self.palette - fg).sum(-1).argmin())]
        coverage = np.clip(dist / max(float(np.abs(fg - bg).sum()), 1.0), 0, 1)
        shifted = self._shifted(coverage)  # [S, H*W]
        ssd = (self.template_norms[None] - 2 * shifted @ self.templates.T
               + (shifted**2).sum(1, keepdims=True))  # [S, templates]
        return colour, self.template_shapes[int(ssd.argmin()) % len(self.template_shapes)]

    def _shifted(self, coverage_HW: np.ndarray) -> np.ndarray:
        """The coverage map moved by every (dy, dx) of ``_SHIFTS`` (scaled to the image), zero-filled."""
        n, unit = self.image_size, max(1, round(self.image_size / 32))
        out = np.zeros((len(_SHIFTS) ** 2, n, n), dtype=np.float32)
        for i, (dy, dx) in enumerate((dy * unit, dx * unit) for dy in _SHIFTS for dx in _SHIFTS):
            out[i, max(dy, 0) : n + min(dy, 0), max(dx, 0) : n + min(dx, 0)] = \
                coverage_HW[max(-dy, 0) : n + min(-dy, 0), max(-dx, 0) : n + min(-dx, 0)]
        return out.reshape(len(out), -1)

    def predict(self, images: list[Image.Image]) -> list[tuple[str, str]]:
        return [self.read(img) for img in images]



def accuracy(predicted: list[tuple[str, str]], labels: list[dict]) -> dict[str, float]:
    """Fractions with colour right, shape right, and both right."""
    n = max(len(labels), 1)
    colour = sum(p[0] == lab["colour"] for p, lab in zip(predicted, labels)) / n
    shape = sum(p[1] == lab["shape"] for p, lab in zip(predicted, labels)) / n
    both = sum(tuple(p) == (lab["colour"], lab["shape"]) for p, lab in zip(predicted, labels)) / n
    return {"colour": colour, "shape": shape, "both": both}


def world_from_manifest(path: str | os.PathLike) -> ShapesWorld:
    """The world a ``chameleon data synth`` folder (or its manifest.json) was drawn from."""
    path = Path(path)
    path = path / "manifest.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no shapes-world manifest (written by `chameleon data synth`)")
    m = json.loads(path.read_text())
    if m.get("dataset") != "shapes-world":
        raise ValueError(f"{path}: not a shapes-world manifest")
    return ShapesWorld(seed=m["seed"], image_size=m["image_size"], holdout_fraction=m["holdout_fraction"],
                       sizes=tuple(m["vocab"]["sizes"]), backgrounds=tuple(m["vocab"]["backgrounds"]),
                       jitter=m["jitter"], snap=m["snap"])


class ShapesPairJudge:
    """The shapes judge as a :class:`chameleon_lm.eval.pairs.PairJudge`: colour and shape."""

    attributes = ("colour", "shape")

    def __init__(self, world: ShapesWorld | int):
        self.judge = ShapesJudge(world)

    @classmethod
    def from_manifest(cls, path: str | os.PathLike) -> ShapesPairJudge:
        """The judge of the world a ``chameleon data synth`` folder (or its manifest.json) holds."""
        return cls(world_from_manifest(path))

    def reference(self, caption: str, meta: dict) -> tuple:
        if "colour" in meta and "shape" in meta:
            return meta["colour"], meta["shape"]
        parsed = parse_caption(caption)
        if parsed is None:
            raise ValueError(f"caption {caption!r} names no colour and shape, and the pair has no label")
        return parsed["colour"], parsed["shape"]

    def read_images(self, images: list[Image.Image]) -> list[tuple]:
        return self.judge.predict(images)

    def read_captions(self, captions: list[str]) -> list[tuple | None]:
        parsed = [parse_caption(c) for c in captions]
        return [(p["colour"], p["shape"]) if p else None for p in parsed]
