"""Prompt sets for evaluation: JSONL, one prompt per line, text and image parts.

A line::

    {"id": "draw-0", "category": "draw", "output": "image",
     "parts": [{"type": "text", "text": "A red circle on the left."},
               {"type": "image", "path": "images/x.png"}],
     "reference": {"colour": "red", "shape": "circle"}, "meta": {}}

- ``output`` is the expected answer modality (``text``, ``image`` or ``mixed``); it picks the
  generation mode of a local model and is reported per modality.
- an image part has one of ``path`` (relative to the JSONL's folder), ``url`` (kept, never fetched)
  or ``data`` (a ``data:image/...;base64,`` URL).
- ``reference`` holds what an automatic judge needs (optional); ``meta`` anything else.

Meta's human-evaluation file (``id``, ``prompt`` with ``<img>`` markers, ``task_type``,
``image_urls``) imports with :func:`import_meta` and exports with :func:`export_meta`.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from chameleon_lm.data.sources.base import SkipSample, data_url_bytes

OUTPUTS = ("text", "image", "mixed")
IMAGE_KEYS = ("path", "url", "data", "sha")
"""Where an image part's pixels are (``sha``: a blob of a results store, see ``eval/store.py``)."""
_SAFE_ID = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class Prompt:
    id: str
    parts: list[dict[str, Any]]
    category: str = "general"
    output: str = "mixed"
    reference: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"prompt id must be a non-empty string, got {self.id!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"prompt {self.id}: output must be one of {OUTPUTS}, got {self.output!r}")
        if not isinstance(self.parts, list) or not self.parts:
            raise ValueError(f"prompt {self.id}: parts must be a non-empty list")
        for part in self.parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"prompt {self.id}: a text part needs a string 'text'")
            elif kind == "image":
                if sum(k in part for k in IMAGE_KEYS) != 1:
                    raise ValueError(f"prompt {self.id}: an image part needs exactly one of {IMAGE_KEYS}")
            else:
                raise ValueError(f"prompt {self.id}: unknown part {part!r} (type text or image)")

    @property
    def modality(self) -> str:
        """The prompt's own modality: ``mixed`` when it has an image, else ``text``."""
        return "mixed" if any(p["type"] == "image" for p in self.parts) else "text"

    @property
    def text(self) -> str:
        return " ".join(p["text"] for p in self.parts if p["type"] == "text")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "category": self.category, "output": self.output, "parts": self.parts,
                "reference": self.reference, "meta": self.meta}


def load_image_part(part: dict[str, Any], base: Path | None) -> Image.Image:
    """The PIL image of an image part (``path`` relative to ``base``, or a data URL)."""
    if "data" in part:
        try:
            return Image.open(io.BytesIO(data_url_bytes(part["data"], "an image part"))).convert("RGB")
        except SkipSample as e:
            raise ValueError(e.detail) from None
    if "sha" in part:
        raise ValueError("an image part with a 'sha' lives in a results store: read it with "
                         "ResultStore.image")
    if "url" in part:
        raise ValueError(f"image {part['url']!r} is a URL: download it and give a local path "
                         "(evaluation never fetches from the network)")
    path = Path(part["path"])
    path = path if path.is_absolute() or base is None else base / path
    if not path.is_file():
        raise FileNotFoundError(f"prompt image {path} not found")
    with Image.open(path) as im:
        return im.convert("RGB")


@dataclass
class PromptSet:
    prompts: list[Prompt]
    base: Path | None = None
    """Folder image ``path`` parts are relative to (the JSONL's)."""

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for p in self.prompts:
            if p.id in seen:
                raise ValueError(f"duplicate prompt id {p.id!r}")
            seen.add(p.id)

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        return iter(self.prompts)

    def images(self, prompt: Prompt) -> list[Image.Image]:
        return [load_image_part(p, self.base) for p in prompt.parts if p["type"] == "image"]

    @classmethod
    def load(cls, path: str | os.PathLike) -> PromptSet:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prompt set {path} not found")
        fields = Prompt.__dataclass_fields__
        prompts = list(_rows(path, "a prompt", lambda row: Prompt(**{k: row[k] for k in row
                                                                     if k in fields})))
        if not prompts:
            raise ValueError(f"{path}: no prompts")
        return cls(prompts, path.parent)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSONL; ``path`` image parts must resolve from the new file's folder."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in self.prompts))
        return path

    def summary(self) -> dict[str, Any]:
        count = lambda key: {v: sum(getattr(p, key) == v for p in self) for v in sorted(
            {getattr(p, key) for p in self})}
        return {"prompts": len(self), "category": count("category"), "output": count("output"),
                "modality": count("modality")}


def import_meta(path: str | os.PathLike, images: str | os.PathLike | None = None,
                output: str = "mixed") -> PromptSet:
    """Meta's ``prompts_for_human_evaluations.jsonl`` as a prompt set.

    Each ``<img>`` marker becomes an image part: a local file when ``images`` holds one named after the
    URL's last path segment (download the images there first), else the URL (kept, not fetched). Every
    prompt expects a mixed-modal answer (the file's premise) unless ``output`` says otherwise.
    """
    path = Path(path)
    folder = Path(images) if images is not None else None
    prompts = list(_rows(path, "a Meta prompt line", lambda row: _meta_prompt(row, folder, output)))
    return PromptSet(prompts, path.parent)


def _meta_prompt(row: dict[str, Any], folder: Path | None, output: str) -> Prompt:
    texts, urls = row["prompt"].split("<img>"), list(row.get("image_urls") or [])
    if len(texts) - 1 != len(urls):
        raise ValueError(f"{len(texts) - 1} <img> markers but {len(urls)} image_urls")
    parts: list[dict[str, Any]] = []
    for i, text in enumerate(texts):
        if text.strip():
            parts.append({"type": "text", "text": text.strip()})
        if i < len(urls):
            local = folder / urls[i].rstrip("/").rsplit("/", 1)[-1] if folder else None
            if local is None and "://" not in urls[i] and Path(urls[i]).is_file():
                local = Path(urls[i])  # an export of a local set names its files
            parts.append({"type": "image", "path": str(local.resolve())} if local and local.is_file()
                         else {"type": "image", "url": urls[i]})
    return Prompt(id=str(row["id"]), parts=parts, category=row.get("task_type", "general"),
                  output=output)


def _rows(path: Path, what: str, parse) -> Iterator:
    """``parse`` of each non-empty JSONL line; a bad line is a ValueError naming it."""
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield parse(json.loads(line))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{path}:{n}: not {what} ({e})") from None


def export_meta(prompts: PromptSet, path: str | os.PathLike) -> Path:
    """Write Meta's format: text parts joined by spaces, ``<img>`` per image, local paths as URLs."""
    lines = []
    for p in prompts:
        text, urls = [], []
        for part in p.parts:
            if part["type"] == "text":
                text.append(part["text"])
            else:
                text.append("<img>")
                urls.append(part.get("url") or part.get("data") or str(
                    (prompts.base / part["path"]) if prompts.base and not Path(part["path"]).is_absolute()
                    else part["path"]))
        lines.append(json.dumps({"id": p.id, "prompt": " ".join(text).replace(" <img> ", "<img>"),
                                 "task_type": p.category, "image_urls": urls}))
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def shapes_prompt_set(out: str | os.PathLike, world=None, per_category: int = 4,
                      seed: int = 0) -> PromptSet:
    """The built-in set of the shapes world, written to ``out/prompts.jsonl`` (+ ``out/images/``).

    Three categories in the quickstart model's own formats: ``draw`` (a caption; an image expected),
    ``describe`` (an image; a caption expected) and ``story`` (a story's opening; text and pictures).
    ``reference`` holds the label's colour and shape for the shapes judge. Half of each category's
    prompts use held-out (unseen) colour-shape pairs.
    """
    from chameleon_lm.data.synth import ShapesWorld, caption, story_opening

    world = world or ShapesWorld(seed=0)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"shapes-prompts/{seed}")
    prompts = []
    for i in range(per_category):
        split = "test_seen" if i % 2 == 0 else "test_unseen"
        for category in ("draw", "describe", "story"):
            label = world.sample_label(rng, split)
            ref = {"colour": label["colour"], "shape": label["shape"], "split": split.removeprefix("test_")}
            pid = f"{category}-{i}"
            if category == "draw":
                parts = [{"type": "text", "text": caption(label, rng)}]
                output = "image"
            elif category == "describe":
                name = f"images/{_SAFE_ID.sub('_', pid)}.png"
                world.render(label).save(out / name)
                parts, output = [{"type": "image", "path": name}], "text"
            else:
                parts, output = [{"type": "text", "text": story_opening(label, rng)}], "mixed"
            prompts.append(Prompt(id=pid, parts=parts, category=category, output=output, reference=ref))
    prompt_set = PromptSet(prompts, out)
    prompt_set.save(out / "prompts.jsonl")
    return prompt_set
