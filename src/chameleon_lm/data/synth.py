"""The shapes world: a built-in mixed-modal dataset generated in code, deterministic by seed.

Every image shows one coloured shape on a plain background. Its label is exact: colour, shape, size,
position and background colour, plus a small ``pose`` (sub-pixel offset, scale and rotation jitter)
that makes two images with the same attributes still different pictures. From these labels the
module writes image captions, interleaved picture stories and text-only documents, all in the
on-disk formats the real data uses (WebDataset pairs, OBELICS-style JSONL, ``{"text": ...}`` JSONL).

A seed-determined set of (colour, shape) pairs is held out: it never appears in the ``train`` split,
in pictures or in words, so ``test_unseen`` measures compositional generalisation while
``test_seen`` measures plain held-out accuracy.

Palette choices (RGB, all shape colours saturated, all backgrounds muted mid-tones):

* Shape colours are red, yellow, green, cyan, blue, purple, white and black. Cyan replaces orange,
  which sits only ~98 RGB units from yellow and ~113 from red and would blur through a small VQ
  codebook; the closest shape-colour pair is now cyan/blue at ~125.
* Backgrounds are grey, sand, olive, rose and slate: mid-tone because white and black are shape
  colours (a light background would wash out a white shape). Every background is at least ~98 RGB
  units from every shape colour, and no background name is a shape-colour word, so a caption's
  colour word is unambiguous.
* Shapes are circle, square, triangle, diamond (a rhombus taller than wide, so it differs from a
  slightly rotated square), cross and ring: all keep distinct silhouettes at 9 px across (a small
  shape at 32 px). Stars and hearts do not.

Images are drawn at 4x and box-downsampled, so edges are anti-aliased without ringing: every pixel
is a blend of the shape colour and the background colour, and interior pixels are exact.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

# png_bytes and read_pairs are imported from here too: they moved to the sources package
from chameleon_lm.data.sources.base import png_bytes  # noqa: F401
from chameleon_lm.data.sources.jsonl import read_obelics_jsonl, write_obelics_jsonl
from chameleon_lm.data.sources.webdataset import read_pairs, write_webdataset  # noqa: F401

RGB = tuple[int, int, int]
Label = dict[str, Any]
"""``{"colour", "shape", "size", "position", "background", "pose"}``; ``pose`` holds the jitter
``{"dx", "dy", "scale", "rotation"}`` (offsets in image sides, rotation in degrees)."""

COLOURS: dict[str, RGB] = {
    "red": (215, 25, 25),
    "yellow": (250, 225, 25),
    "green": (35, 165, 55),
    "cyan": (0, 200, 215),
    "blue": (30, 80, 235),
    "purple": (150, 40, 185),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring")
SIZES: dict[str, float] = {"small": 0.28, "medium": 0.42, "large": 0.56}
"""Nominal shape diameter as a fraction of the image side (areas grow 1 : 2.25 : 4)."""
POSITIONS: tuple[str, ...] = ("centre", "left", "right", "top", "bottom")
BACKGROUNDS: dict[str, RGB] = {
    "grey": (128, 128, 128),
    "sand": (190, 170, 120),
    "olive": (125, 130, 70),
    "rose": (190, 120, 130),
    "slate": (85, 105, 130),
}
SPLITS: tuple[str, ...] = ("train", "test_seen", "test_unseen")

SUPERSAMPLE = 4
MARGIN = 0.04
"""Gap between a shape pushed to one side and the image edge, as a fraction of the side."""
MAX_OFFSET = 0.025
MAX_SCALE_JITTER = 0.06
MAX_ROTATION = 10.0
MIN_HELDOUT = 4
NO_POSE: dict[str, float] = {"dx": 0.0, "dy": 0.0, "scale": 1.0, "rotation": 0.0}

_POSITION_PHRASES = {
    "centre": ("in the centre", "to the centre"),
    "left": ("on the left", "to the left"),
    "right": ("on the right", "to the right"),
    "top": ("at the top", "to the top"),
    "bottom": ("at the bottom", "to the bottom"),
}
_CAPTION_TEMPLATES = (
    "{a_obj}",
    "{a_sized}",
    "{a_sized} on {a_bg} background.",
    "There is {a_sized} {pos}.",
    "a picture of {a_obj}",
    "{a_obj} {pos} on {a_bg} background.",
    "An image of {a_sized} {pos}.",
    "a photo of {a_obj} on {a_bg} background",
    "{a_sized} {pos}.",
    "This is {a_obj}.",
    "The picture shows {a_sized} on {a_bg} background.",
    "{a_sized} {pos}, {bg} background",
)
_CANONICAL_TEMPLATE = "{a_sized} {pos} on {a_bg} background."
_STORY_OPENINGS = (
    "Here is {a_sized} {pos}.",
    "Look at this {obj}.",
    "This is {a_sized} on {a_bg} background.",
    "We start with {a_obj} {pos}.",
    "First there is {a_sized}.",
)
_STORY_CHANGES = {
    "colour": ("{conn} it turns {colour}.", "{conn} it changes colour to {colour}.",
               "{conn} the {shape} becomes {colour}."),
    "shape": ("{conn} it becomes {a_shape}.", "{conn} it changes into {a_shape}.",
              "{conn} it turns into {a_obj}."),
    "grow": ("{conn} it grows {size}.", "{conn} it gets bigger and becomes {size}."),
    "shrink": ("{conn} it shrinks to {size}.", "{conn} it gets smaller and becomes {size}."),
    "position": ("{conn} it moves {to_pos}.", "{conn} it slides {to_pos}."),
    "background": ("{conn} the background turns {bg}.", "{conn} the background changes to {bg}."),
}
_SHAPE_FACTS = {
    "circle": ("A circle is round and has no corners.",
               "A circle looks the same however you turn it."),
    "square": ("A square has four equal sides and four corners.",
               "A square is as wide as it is tall."),
    "triangle": ("A triangle has three sides and three corners.",
                 "A triangle points up like a little roof."),
    "diamond": ("A diamond has four corners and is taller than it is wide.",
                "A diamond stands on one of its corners."),
    "cross": ("A cross is made of two bars that meet in the middle.",
              "A cross looks like a plus sign."),
    "ring": ("A ring is a circle with a hole in the middle.",
             "You can see the background through the middle of a ring."),
}
_CORNERS = {"circle": 0, "square": 4, "triangle": 3, "diamond": 4, "cross": 12, "ring": 0}
_RELATIONS = (
    ("above", "below"), ("below", "above"), ("to the left of", "to the right of"),
    ("to the right of", "to the left of"), ("bigger than", "smaller than"),
    ("smaller than", "bigger than"),
)
_NUMBERS = ("two", "three", "four", "five")
_WORLD_FACTS = (
    "Every picture shows one shape on a plain background.",
    "A shape can be small, medium or large.",
    "A shape can sit in the centre, on the left, on the right, at the top or at the bottom.",
    f"Shapes come in {len(COLOURS)} colours: {', '.join(list(COLOURS)[:-1])} and "
    f"{list(COLOURS)[-1]}.",
    f"The backgrounds are {', '.join(list(BACKGROUNDS)[:-1])} and {list(BACKGROUNDS)[-1]}.",
)

_WORD = re.compile(r"[a-z]+")
_SHAPE_WORDS = {s: s for s in SHAPES} | {s + ("es" if s.endswith("s") else "s"): s for s in SHAPES}
_POSITION_WORDS = {"centre": "centre", "center": "centre", "middle": "centre", "left": "left",
                   "right": "right", "top": "top", "bottom": "bottom"}
_BACKGROUND_WORDS = {b: b for b in BACKGROUNDS} | {"gray": "grey"}


# ------------------------------------------------------------------------------------------- text


def _a(phrase: str) -> str:
    """``phrase`` with its indefinite article ("a red circle", "an olive background")."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _fill(template: str, **fields: str) -> str:
    """Format ``template``; a result that ends with a full stop is a sentence and gets a capital."""
    text = template.format(**fields)
    return text[0].upper() + text[1:] if text.endswith(".") else text


def _phrases(label: Label) -> dict[str, str]:
    """The noun phrases templates are filled with, for one label."""
    obj = f"{label['colour']} {label['shape']}"
    pos, to_pos = _POSITION_PHRASES[label["position"]]
    return {
        "colour": label["colour"], "shape": label["shape"], "size": label["size"],
        "bg": label["background"], "obj": obj, "a_obj": _a(obj),
        "a_sized": _a(f"{label['size']} {obj}"), "a_shape": _a(label["shape"]),
        "a_bg": _a(label["background"]), "pos": pos, "to_pos": to_pos,
    }


def caption(label: Label, rng: random.Random | None = None) -> str:
    """A caption for ``label``: a random template when ``rng`` is given, else the canonical one.

    The colour word always comes right before the shape word ("... red circle ..."), so
    :func:`parse_caption` recovers both.

    Args:
        label: An image label (see :data:`Label`).
        rng: Source of the template choice; ``None`` for the canonical, most complete caption
            ("A large red circle on the left on a grey background.").

    Returns:
        The caption text.
    """
    template = _CANONICAL_TEMPLATE if rng is None else rng.choice(_CAPTION_TEMPLATES)
    return _fill(template, **_phrases(label))


def story_opening(label: Label, rng: random.Random) -> str:
    """The first sentence of a picture story about ``label`` (a random opening template)."""
    return _fill(rng.choice(_STORY_OPENINGS), **_phrases(label))


def parse_caption(text: str) -> dict[str, str] | None:
    """Extract the attributes a caption states, for scoring generated captions.

    Case and punctuation are ignored. The shape is the first shape word (plurals accepted); the
    colour is the nearest colour word before it, else the first one after it.

    Args:
        text: A caption, e.g. "There is a small blue triangle at the top."

    Returns:
        ``{"colour", "shape"}`` plus ``"size"``, ``"position"`` and ``"background"`` for those the
        text mentions, or ``None`` when it names no shape or no colour.
    """
    words = _WORD.findall(text.lower())
    at = next((i for i, w in enumerate(words) if w in _SHAPE_WORDS), None)
    if at is None:
        return None
    before = [w for w in words[:at] if w in COLOURS]
    after = [w for w in words[at + 1:] if w in COLOURS]
    if not before and not after:
        return None
    found = {"colour": before[-1] if before else after[0], "shape": _SHAPE_WORDS[words[at]]}
    for key, vocab in (("size", {s: s for s in SIZES}), ("position", _POSITION_WORDS),
                       ("background", _BACKGROUND_WORDS)):
        value = next((vocab[w] for w in words if w in vocab), None)
        if value is not None:
            found[key] = value
    return found


# ---------------------------------------------------------------------------------------- drawing


def _polygon(shape: str) -> list[tuple[float, float]]:
    """Outline of a polygonal shape for a unit radius, centred on the origin (y points down)."""
    if shape == "square":
        a = 0.82
        return [(-a, -a), (a, -a), (a, a), (-a, a)]
    if shape == "triangle":
        r = 1.15  # circumradius; shifted down by r/4 so the bounding box is centred
        return [(0.0, -0.75 * r), (0.866 * r, 0.75 * r), (-0.866 * r, 0.75 * r)]
    if shape == "diamond":
        return [(0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)]
    if shape == "cross":
        t, n = 0.32, 0.95
        return [(-t, -n), (t, -n), (t, -t), (n, -t), (n, t), (t, t), (t, n), (-t, n), (-t, t),
                (-n, t), (-n, -t), (-t, -t)]
    raise ValueError(f"{shape!r} is not a polygon shape")


def _centre(size: str, position: str) -> tuple[float, float]:
    """Nominal centre of a shape, as fractions of the image side."""
    reach = 0.5 - MARGIN - SIZES[size] / 2 * (1 + MAX_SCALE_JITTER) - MAX_OFFSET
    dx, dy = {"centre": (0, 0), "left": (-1, 0), "right": (1, 0), "top": (0, -1),
              "bottom": (0, 1)}[position]
    return 0.5 + dx * reach, 0.5 + dy * reach


def render(label: Label, image_size: int = 32) -> Image.Image:
    """Draw the image of a label.

    Args:
        label: An image label; a missing ``pose`` means no jitter.
        image_size: Side of the square image in pixels.

    Returns:
        An RGB image of ``image_size`` x ``image_size`` pixels.
    """
    side = image_size * SUPERSAMPLE
    background = BACKGROUNDS[label["background"]]
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)
    pose = label.get("pose", NO_POSE)
    cx, cy = _centre(label["size"], label["position"])
    cx, cy = (cx + pose["dx"]) * side, (cy + pose["dy"]) * side
    radius = SIZES[label["size"]] / 2 * pose["scale"] * side
    fill = COLOURS[label["colour"]]
    shape = label["shape"]
    if shape in ("circle", "ring"):
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        if shape == "ring":
            inner = radius * 0.5
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=background)
    else:
        turn = math.radians(pose["rotation"])
        cos, sin = math.cos(turn), math.sin(turn)
        draw.polygon([(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos))
                      for x, y in _polygon(shape)], fill=fill)
    return image.reduce(SUPERSAMPLE)


# ------------------------------------------------------------------------------------------ world


@dataclass(frozen=True)
class InterleavedDocument:
    """A picture story: text and images in reading order, with the label of every image.

    Attributes:
        segments: Texts (``str``) and images (``PIL.Image.Image``) in order.
        labels: Aligned with ``segments``: the image's label, ``None`` at text positions.
    """

    segments: list[str | Image.Image]
    labels: list[Label | None]


def _heldout_pairs(seed: int, fraction: float) -> tuple[tuple[str, str], ...]:
    """Seed-determined held-out (colour, shape) pairs, spread so each colour and shape keeps others.

    Colours and shapes are shuffled and paired along wrapped diagonals: each colour loses at most
    one shape per ``len(COLOURS)`` pairs and no shape loses all its colours while fraction <= 0.5.
    """
    if not 0.0 < fraction <= 0.5:
        raise ValueError(f"holdout_fraction must be in (0, 0.5], got {fraction}")
    n_colours, n_shapes = len(COLOURS), len(SHAPES)
    count = max(MIN_HELDOUT, round(fraction * n_colours * n_shapes))
    rng = random.Random(f"shapes-world/{seed}/heldout")
    colours, shapes = list(COLOURS), list(SHAPES)
    rng.shuffle(colours)
    rng.shuffle(shapes)
    pairs = {(colours[i % n_colours], shapes[(i % n_colours + i // n_colours) % n_shapes])
             for i in range(count)}
    colour_order, shape_order = list(COLOURS), list(SHAPES)
    return tuple(sorted(pairs, key=lambda p: (colour_order.index(p[0]), shape_order.index(p[1]))))


@dataclass(frozen=True)
class ShapesWorld:
    """The shapes world for one seed: held-out pairs, label sampling, rendering and text.

    Every sampler takes its own ``seed`` (a stream within this world), so the same arguments always
    give the same samples, and different splits or kinds of data never share a random stream.

    Attributes:
        seed: World seed; decides the held-out pairs and, with each sampler's seed, all samples.
        image_size: Side of the square images in pixels (32 or 64 are the intended sizes).
        holdout_fraction: Fraction of (colour, shape) pairs held out (at least ``MIN_HELDOUT``).
        sizes: The shape sizes images may show (a subset of ``SIZES``; all by default).
        backgrounds: The background colours images may show (a subset of ``BACKGROUNDS``).
        jitter: Scale of the pose jitter (offset, size and rotation ranges); 0 draws nominal poses.
        snap: When positive, shapes off the centre sit a whole number of ``snap`` pixels from it
            (as far out as fits), so moving a shape between positions moves it by whole tokenizer
            patches when ``snap`` is the patch side. The shift is stored in ``pose`` (``dx``/``dy``),
            so a label still renders alone.
        heldout_pairs: The held-out (colour, shape) pairs, in vocabulary order.
    """

    seed: int = 0
    image_size: int = 32
    holdout_fraction: float = 0.125
    sizes: tuple[str, ...] = tuple(SIZES)
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    jitter: float = 1.0
    snap: int = 0
    heldout_pairs: tuple[tuple[str, str], ...] = field(init=False)
    _allowed: dict[str, tuple[tuple[str, str], ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {self.image_size}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")
        if not 0 <= self.snap <= self.image_size // 4:
            raise ValueError(f"snap must be in [0, image_size / 4], got {self.snap}")
        for name, vocab in (("sizes", SIZES), ("backgrounds", BACKGROUNDS)):
            chosen = getattr(self, name)
            if not chosen or any(v not in vocab for v in chosen):
                raise ValueError(f"{name} must be a non-empty subset of {list(vocab)}, got {list(chosen)}")
            object.__setattr__(self, name, tuple(v for v in vocab if v in chosen))  # vocabulary order
        heldout = _heldout_pairs(self.seed, self.holdout_fraction)
        seen = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in heldout)
        object.__setattr__(self, "heldout_pairs", heldout)
        object.__setattr__(self, "_allowed",
                           {"train": seen, "test_seen": seen, "test_unseen": heldout})

    def allowed_pairs(self, split: str) -> tuple[tuple[str, str], ...]:
        """The (colour, shape) pairs images and texts of ``split`` may show."""
        if split not in self._allowed:
            raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        return self._allowed[split]

    def _rng(self, kind: str, split: str, seed: int) -> random.Random:
        return random.Random(f"shapes-world/{self.seed}/{kind}/{split}/{seed}")

    def sample_label(self, rng: random.Random, split: str = "train") -> Label:
        """A random label whose (colour, shape) pair is allowed in ``split``.

        Args:
            rng: Source of randomness.
            split: ``train``, ``test_seen`` or ``test_unseen``.

        Returns:
            The label, with a jitter ``pose`` rounded so it survives a JSON round trip exactly.
        """
        colour, shape = rng.choice(self.allowed_pairs(split))
        size, position = rng.choice(self.sizes), rng.choice(POSITIONS)
        background = rng.choice(self.backgrounds)
        j = self.jitter
        base = self.nominal_pose(size, position)
        dx = base["dx"] + rng.uniform(-MAX_OFFSET * j, MAX_OFFSET * j)
        dy = base["dy"] + rng.uniform(-MAX_OFFSET * j, MAX_OFFSET * j)
        scale = 1 + rng.uniform(-MAX_SCALE_JITTER * j, MAX_SCALE_JITTER * j)
        rotation = rng.uniform(-MAX_ROTATION * j, MAX_ROTATION * j)
        return {
            "colour": colour,
            "shape": shape,
            "size": size,
            "position": position,
            "background": background,
            "pose": {"dx": round(dx, 4), "dy": round(dy, 4), "scale": round(scale, 4),
                     "rotation": round(rotation, 2)},
        }

    def nominal_pose(self, size: str, position: str) -> dict[str, float]:
        """The pose without jitter: ``NO_POSE`` plus this world's ``snap`` shift of the centre."""
        if not self.snap or position == "centre":
            return dict(NO_POSE)
        # the farthest whole number of snap pixels from the centre that keeps the shape inside the
        # image at this world's largest jitter
        j = self.jitter
        reach = 0.5 - SIZES[size] / 2 * (1 + MAX_SCALE_JITTER * j) - MAX_OFFSET * j
        step = self.snap / self.image_size
        snapped = math.floor(reach / step + 1e-9) * step
        cx, cy = _centre(size, position)
        shift_x = math.copysign(snapped, cx - 0.5) - (cx - 0.5) if cx != 0.5 else 0.0
        shift_y = math.copysign(snapped, cy - 0.5) - (cy - 0.5) if cy != 0.5 else 0.0
        return dict(NO_POSE, dx=shift_x, dy=shift_y)

    def render(self, label: Label) -> Image.Image:
        """The image of ``label`` at this world's size (see :func:`render`)."""
        return render(label, self.image_size)

    caption = staticmethod(caption)
    parse_caption = staticmethod(parse_caption)

    def iter_pairs(self, split: str, n: int, seed: int = 0
                   ) -> Iterator[tuple[Image.Image, str, Label]]:
        """Lazily generate ``n`` (image, caption, label) samples of ``split``."""
        rng = self._rng("pairs", split, seed)
        for _ in range(n):
            label = self.sample_label(rng, split)
            yield self.render(label), caption(label, rng), label

    def pairs(self, split: str, n: int, seed: int = 0) -> list[tuple[Image.Image, str, Label]]:
        """``n`` (image, caption, label) samples of ``split``; same arguments, same samples.

        Args:
            split: ``train``, ``test_seen`` or ``test_unseen``.
            n: Number of samples.
            seed: Stream seed within this world.

        Returns:
            The samples, in order.
        """
        return list(self.iter_pairs(split, n, seed))

    def _story(self, rng: random.Random, split: str) -> InterleavedDocument:
        label = self.sample_label(rng, split)
        segments: list[str | Image.Image] = [story_opening(label, rng)]
        labels: list[Label | None] = [None]
        segments.append(self.render(label))
        labels.append(label)
        n_changes = rng.randint(1, 3)
        allowed = set(self.allowed_pairs(split))
        sizes = list(self.sizes)
        for step in range(n_changes):
            options = {
                "colour": [c for c in COLOURS
                           if c != label["colour"] and (c, label["shape"]) in allowed],
                "shape": [s for s in SHAPES
                          if s != label["shape"] and (label["colour"], s) in allowed],
                "size": [s for s in self.sizes if s != label["size"]],
                "position": [p for p in POSITIONS if p != label["position"]],
                "background": [b for b in self.backgrounds if b != label["background"]],
            }
            attribute = rng.choice([a for a, values in options.items() if values])
            old = label[attribute]
            label = {**label, attribute: rng.choice(options[attribute])}
            kind = attribute
            if attribute == "size":
                kind = "grow" if sizes.index(label["size"]) > sizes.index(old) else "shrink"
            if step == n_changes - 1 and n_changes > 1:
                conn = "finally,"
            else:
                conn = rng.choice(("then", "next,", "after that,") if step else ("now", "then"))
            segments.append(_fill(rng.choice(_STORY_CHANGES[kind]), conn=conn, **_phrases(label)))
            labels.append(None)
            segments.append(self.render(label))
            labels.append(label)
        return InterleavedDocument(segments, labels)

    def iter_interleaved(self, split: str, n: int, seed: int = 0
                         ) -> Iterator[InterleavedDocument]:
        """Lazily generate ``n`` picture stories of ``split`` (see :meth:`interleaved`)."""
        rng = self._rng("interleaved", split, seed)
        for _ in range(n):
            yield self._story(rng, split)

    def interleaved(self, split: str, n: int, seed: int = 0) -> list[InterleavedDocument]:
        """``n`` picture stories: a shape, then 1-3 changes of one attribute each.

        A story alternates text and image ("Here is a red circle." [img] "Now it turns blue."
        [img] ...); each image shows exactly what the text so far says, with the same pose, and
        every image's (colour, shape) pair is allowed in ``split``.

        Args:
            split: ``train``, ``test_seen`` or ``test_unseen``.
            n: Number of documents.
            seed: Stream seed within this world.

        Returns:
            The documents, in order.
        """
        return list(self.iter_interleaved(split, n, seed))

    def _sentence(self, rng: random.Random) -> str:
        """One random sentence of a text document; coloured objects are training pairs only."""
        allowed = self.allowed_pairs("train")
        kind = rng.randrange(7)
        if kind == 0:
            return rng.choice(_WORLD_FACTS)
        if kind == 1:
            return rng.choice(_SHAPE_FACTS[rng.choice(SHAPES)])
        if kind == 2:
            label = self.sample_label(rng, "train")
            template = rng.choice(("The {obj} is {size}.", "I see {a_sized} {pos}.",
                                   "{a_obj} sits on {a_bg} background.", "The {obj} is {pos}."))
            return _fill(template, **_phrases(label))
        if kind == 3:
            first, second = rng.sample(allowed, 2)
            a, b = " ".join(first), " ".join(second)
            relation, inverse = rng.choice(_RELATIONS)
            if rng.random() < 0.5:
                return f"The {a} is {relation} the {b}."
            return f"The {a} is {relation} the {b}, so the {b} is {inverse} the {a}."
        if kind == 4:
            (colour, shape), (other_colour, other_shape) = rng.sample(allowed, 2)
            return (f"There are {rng.choice(_NUMBERS)} {colour} {_plural(shape)} and one "
                    f"{other_colour} {other_shape}.")
        if kind == 5:
            shape = rng.choice([s for s in SHAPES if _CORNERS[s]])
            count = rng.randrange(len(_NUMBERS)) + 2
            return (f"{_NUMBERS[count - 2].capitalize()} {_plural(shape)} have "
                    f"{count * _CORNERS[shape]} corners in total.")
        colour, shape = rng.choice(allowed)
        if rng.random() < 0.5:
            others = [s for c, s in allowed if c == colour and s != shape]
            other = rng.choice(others)
            return f"The {colour} {shape} and the {colour} {other} have the same colour."
        others = [c for c, s in allowed if s == shape and c != colour]
        return f"The {colour} {shape} and the {rng.choice(others)} {shape} have the same shape."

    def text_documents(self, n: int, seed: int = 0) -> list[str]:
        """``n`` text-only documents of 3-6 sentences about the world.

        They mix facts about shapes ("A ring is a circle with a hole in the middle."),
        descriptions, spatial and size relations, counting and comparisons. Every coloured object
        they mention is a training pair, never a held-out one.

        Args:
            n: Number of documents.
            seed: Stream seed within this world.

        Returns:
            The documents, in order.
        """
        rng = self._rng("text", "train", seed)
        return [" ".join(self._sentence(rng) for _ in range(rng.randint(3, 6))) for _ in range(n)]


# ----------------------------------------------------------------------------------------- on disk

_OWNED = ("manifest.json", "text", "pairs", "interleaved")
_FORMATS = {
    "pairs": "WebDataset tar shards in the img2dataset layout: KEY.png (RGB image), KEY.txt "
             "(caption), KEY.json (label: colour, shape, size, position, background, pose; plus "
             "key, caption, width, height).",
    "interleaved": "OBELICS-style JSONL, one document a line: 'texts' and 'images' are aligned "
                   "lists with exactly one non-null entry per position; images are PNG paths "
                   "relative to the JSONL's folder; 'labels' holds each image's label (null at "
                   "text positions).",
    "text": "JSONL, one {\"text\": ...} document a line.",
}


def write_dataset(
    out_dir: str | Path,
    *,
    seed: int = 0,
    image_size: int = 32,
    holdout_fraction: float = 0.125,
    sizes: tuple[str, ...] | None = None,
    backgrounds: tuple[str, ...] | None = None,
    jitter: float = 1.0,
    snap: int = 0,
    n_train_pairs: int = 20000,
    n_test_pairs: int = 400,
    n_interleaved: int = 2000,
    n_interleaved_test: int = 100,
    n_text: int = 2000,
    shard_size: int = 1000,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the shapes-world dataset to ``out_dir``; same arguments give byte-identical files.

    Layout::

        manifest.json
        text/train.jsonl
        pairs/{train,test_seen,test_unseen}-NNNNNN.tar
        interleaved/{train,test_seen,test_unseen}.jsonl
        interleaved/images/{split}/DOC_POS.png

    Args:
        out_dir: Destination folder; created if missing.
        seed: World seed (held-out pairs and all samples).
        image_size: Image side in pixels.
        holdout_fraction: Fraction of (colour, shape) pairs held out of training.
        sizes: Shape sizes to draw (a subset of ``SIZES``); ``None``: all of them.
        backgrounds: Backgrounds to draw (a subset of ``BACKGROUNDS``); ``None``: all of them.
        jitter: Scale of the pose jitter (see :class:`ShapesWorld`).
        snap: Position grid in pixels (see :class:`ShapesWorld`); 0: the nominal positions.
        n_train_pairs: Image-caption pairs in ``train``.
        n_test_pairs: Image-caption pairs in each of ``test_seen`` and ``test_unseen``.
        n_interleaved: Picture stories in ``train``.
        n_interleaved_test: Picture stories in each test split.
        n_text: Text-only documents (training only).
        shard_size: Samples per tar shard.
        overwrite: Replace this dataset's files (``manifest.json``, ``text/``, ``pairs/``,
            ``interleaved/``) in a non-empty ``out_dir``; other files there are left alone.

    Returns:
        The manifest, also written to ``manifest.json``.

    Raises:
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is false.
        ValueError: A count or size is out of range.
    """
    counts = {"n_train_pairs": n_train_pairs, "n_test_pairs": n_test_pairs,
              "n_interleaved": n_interleaved, "n_interleaved_test": n_interleaved_test,
              "n_text": n_text}
    for name, value in counts.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    world = ShapesWorld(seed=seed, image_size=image_size, holdout_fraction=holdout_fraction,
                        jitter=jitter, snap=snap, **({} if sizes is None else {"sizes": tuple(sizes)}),
                        **({} if backgrounds is None else {"backgrounds": tuple(backgrounds)}))
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite or not out.is_dir():
            raise FileExistsError(f"{out} exists and is not an empty folder; "
                                  "pass overwrite=True (--overwrite) to replace the dataset in it")
        for name in _OWNED:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    for sub in ("text", "pairs", "interleaved"):
        (out / sub).mkdir(parents=True)

    pair_counts = {"train": n_train_pairs, "test_seen": n_test_pairs, "test_unseen": n_test_pairs}
    shards = {split: [f"pairs/{name}" for name in write_webdataset(
                  out / "pairs", world.iter_pairs(split, n), prefix=split, shard_size=shard_size)]
              for split, n in pair_counts.items()}
    story_counts = {"train": n_interleaved, "test_seen": n_interleaved_test,
                    "test_unseen": n_interleaved_test}
    stories = {split: write_obelics_jsonl(out / "interleaved" / f"{split}.jsonl",
                                          ((doc.segments, {"labels": doc.labels})
                                           for doc in world.iter_interleaved(split, n)))
               for split, n in story_counts.items()}
    with open(out / "text" / "train.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for text in world.text_documents(n_text):
            f.write(json.dumps({"text": text}) + "\n")

    manifest: dict[str, Any] = {
        "dataset": "shapes-world",
        "format_version": 1,
        "seed": seed,
        "image_size": image_size,
        "holdout_fraction": holdout_fraction,
        "jitter": jitter,
        "snap": snap,
        "shard_size": shard_size,
        "vocab": {
            "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
            "shapes": list(SHAPES),
            "sizes": list(world.sizes),
            "positions": list(POSITIONS),
            "backgrounds": {name: list(BACKGROUNDS[name]) for name in world.backgrounds},
        },
        "heldout_pairs": [list(pair) for pair in world.heldout_pairs],
        "counts": {
            "pairs": pair_counts,
            "interleaved_documents": {split: docs for split, (docs, _) in stories.items()},
            "interleaved_images": {split: images for split, (_, images) in stories.items()},
            "text_documents": n_text,
        },
        "files": {
            "pairs": shards,
            "interleaved": {split: f"interleaved/{split}.jsonl" for split in SPLITS},
            "interleaved_images": {split: f"interleaved/images/{split}/" for split in SPLITS},
            "text": {"train": "text/train.jsonl"},
        },
        "formats": _FORMATS,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


# ----------------------------------------------------------------------------------------- readers


def read_interleaved(jsonl_path: str | Path) -> Iterator[InterleavedDocument]:
    """Iterate the picture stories of an interleaved JSONL file, loading images relative to its folder.

    Args:
        jsonl_path: Path of e.g. ``interleaved/train.jsonl``.

    Yields:
        Each document with its images loaded as RGB ``PIL`` images and its labels.
    """
    for segments, row in read_obelics_jsonl(jsonl_path):
        yield InterleavedDocument(segments, row["labels"])


# --------------------------------------------------------------------------------------------- CLI


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``synth`` (``chameleon data synth --out DIR``) on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "synth", help="write the built-in shapes-world dataset",
        description="Write the shapes world (image-caption shards, interleaved stories, text "
                    "documents, manifest) to a folder; the same options give identical files.")
    parser.add_argument("--out", required=True, type=Path, help="destination folder")
    parser.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    parser.add_argument("--image-size", type=int, default=32, help="image side in px (default 32)")
    parser.add_argument("--holdout-fraction", type=float, default=0.125,
                        help="fraction of (colour, shape) pairs held out (default 0.125)")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=None,
                        help="shape sizes to draw (default: all)")
    parser.add_argument("--backgrounds", nargs="+", choices=list(BACKGROUNDS), default=None,
                        help="backgrounds to draw (default: all)")
    parser.add_argument("--jitter", type=float, default=1.0,
                        help="scale of the pose jitter, 0..1 (default 1)")
    parser.add_argument("--snap", type=int, default=0,
                        help="put off-centre shapes a whole number of SNAP px from the centre, e.g. "
                             "the image tokenizer's patch side (default 0: nominal positions)")
    parser.add_argument("--train-pairs", type=int, default=20000, help="train image-caption pairs")
    parser.add_argument("--test-pairs", type=int, default=400,
                        help="pairs in each of test_seen and test_unseen")
    parser.add_argument("--interleaved", type=int, default=2000, help="train picture stories")
    parser.add_argument("--interleaved-test", type=int, default=100,
                        help="picture stories in each test split")
    parser.add_argument("--text-docs", type=int, default=2000, help="text-only documents")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a dataset already in --out")
    parser.set_defaults(func=run_cli)
    return parser


def run_cli(args: argparse.Namespace) -> int:
    """Write the dataset ``add_cli``'s options describe and print a summary."""
    manifest = write_dataset(
        args.out, seed=args.seed, image_size=args.image_size,
        holdout_fraction=args.holdout_fraction, sizes=args.sizes, backgrounds=args.backgrounds,
        jitter=args.jitter, snap=args.snap, n_train_pairs=args.train_pairs,
        n_test_pairs=args.test_pairs, n_interleaved=args.interleaved,
        n_interleaved_test=args.interleaved_test, n_text=args.text_docs,
        shard_size=args.shard_size, overwrite=args.overwrite)
    counts = manifest["counts"]
    pairs = counts["pairs"]
    docs = counts["interleaved_documents"]
    heldout = ", ".join(f"{c} {s}" for c, s in manifest["heldout_pairs"])
    print(f"Wrote the shapes world (seed {manifest['seed']}, {manifest['image_size']} px) to "
          f"{args.out}: {pairs['train']} train / {pairs['test_seen']} test_seen / "
          f"{pairs['test_unseen']} test_unseen image-caption pairs in "
          f"{sum(len(s) for s in manifest['files']['pairs'].values())} shards under pairs/; "
          f"{docs['train']} / {docs['test_seen']} / {docs['test_unseen']} picture stories "
          f"({sum(counts['interleaved_images'].values())} images) in interleaved/*.jsonl; "
          f"{counts['text_documents']} text documents in text/train.jsonl; details in "
          f"manifest.json. Held out of training: {heldout}.")
    return 0
