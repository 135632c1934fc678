"""JSONL: text corpora (``{"text": ...}``), OBELICS-style interleaved documents, image-caption pairs and
conversations (``{"messages": [...]}``, see ``base.MessagesFormat``).

An interleaved document has aligned ``texts`` and ``images`` lists with one non-null entry per
position; images are paths relative to the JSONL file's folder, or http(s) URLs (refused unless
``allow_remote``). Units are runs of ``rows_per_unit`` lines named ``"FILE@FIRST_LINE"`` (0-based); the
byte offset of every unit is found in one pass over the file, so a unit is read by seeking to it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chameleon_lm.data.sources import paths
from chameleon_lm.data.sources.base import (
    MessagesFormat, Sample, SkipSample, Skipped, SourceConfig, UnitSource, is_messages, png_bytes,
    scalar_meta,
)
from chameleon_lm.data.sources.records import RecordFormat

if TYPE_CHECKING:
    from PIL import Image

JSONL_SUFFIXES = (".jsonl",)
_PEEK_LINES = 100


class JsonlSource(UnitSource):
    """Samples from JSONL files; the kind is chosen from the first record unless given."""

    format = "jsonl"

    def __init__(self, config: SourceConfig):
        self._files = paths.find_files(config.path, JSONL_SUFFIXES, "JSONL files")
        self._offsets: dict[str, list[int]] = {}
        first = self._first_record()
        where = first[0] if first else self._files[0]
        names = list(first[1]) if first else []
        if is_messages(config, names, lambda name: isinstance(first[1][name], list)):
            self.records = MessagesFormat(config)
        else:
            self.records = RecordFormat(config, first[1] if first else None,
                                        lambda name: isinstance(first[1][name], (str, dict)), where)
        super().__init__(config, self.records.kind)

    def _first_record(self) -> tuple[str, dict[str, Any]] | None:
        """The first JSON object in the first lines of the files, with its file."""
        for path in self._files:
            with paths.open_binary(path) as f:
                for _, line in zip(range(_PEEK_LINES), f):
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(record, dict):
                        return path, record
        return None

    def _unit_offsets(self, path: str) -> list[int]:
        """The byte offset of every unit of a file (lines 0, rows, 2 rows, ...); one pass, cached."""
        if path not in self._offsets:
            rows = self.config.rows_per_unit
            offsets, position = [], 0
            with paths.open_binary(path) as f:
                for number, line in enumerate(f):
                    if number % rows == 0:
                        offsets.append(position)
                    position += len(line)
            self._offsets[path] = offsets
        return self._offsets[path]

    def _list_units(self) -> list[str]:
        rows = self.config.rows_per_unit
        return [f"{path}@{i * rows}" for path in self._files
                for i in range(len(self._unit_offsets(path)))]

    def _locate(self, unit: str) -> tuple[str, int, int]:
        """``(file, first line, byte offset)`` of a unit name."""
        path, sep, first = unit.rpartition("@")
        rows = self.config.rows_per_unit
        if sep and path in self._files and first.isdigit() and int(first) % rows == 0:
            offsets = self._unit_offsets(path)
            if int(first) // rows < len(offsets):
                return path, int(first), offsets[int(first) // rows]
        raise KeyError(f"{unit!r} is not a unit of {self.config.path}")

    def _check_unit(self, unit: str) -> None:
        self._locate(unit)  # scans only the unit's own file

    def _read(self, unit: str) -> Iterator[Sample | Skipped]:
        path, first, offset = self._locate(unit)
        folder = paths.dirname(path)
        with paths.open_binary(path) as f:
            f.seek(offset)
            for number in range(first, first + self.config.rows_per_unit):
                line = f.readline()
                if not line:
                    return
                if line.strip():
                    yield self._sample(f"{unit}/{number}", line, folder)

    def _sample(self, key: str, line: bytes, folder: str) -> Sample | Skipped:
        try:
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SkipSample("undecodable_text", f"{key}: not valid UTF-8 ({e})") from None
            try:
                record = json.loads(text)
            except ValueError as e:
                raise SkipSample("bad_record", f"{key}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise SkipSample("bad_record", f"{key}: not a JSON object")
            parsed = self.records.parse(record, key, folder)
        except SkipSample as e:
            return Skipped(key, e.reason, e.detail)
        segments, roles = parsed if self.kind == "messages" else (parsed, None)
        return Sample(key, segments, scalar_meta(record, exclude=self.records.used), roles)


def write_obelics_jsonl(path: str | Path,
                        documents: Iterable[tuple[Sequence[str | Image.Image], dict[str, Any]]], *,
                        image_dir: str | None = None) -> tuple[int, int]:
    """Write OBELICS-style JSONL with its images as PNG files; equal documents give equal bytes.

    Each line is ``{"texts": [...], "images": [...], **extra}`` (keys sorted): aligned lists with one
    non-null entry per position, images as PNG paths relative to the JSONL's folder.

    Args:
        path: The JSONL file; its folder must exist.
        documents: Each document's segments (texts and PIL images, in order) and the extra fields of
            its line (e.g. ``{"labels": [...]}``).
        image_dir: The images' folder relative to the JSONL's folder; default ``images/<file stem>``.
            Image at position ``k`` of document ``d`` is ``f"{d:06d}_{k}.png"``.

    Returns:
        ``(documents, images)`` written.
    """
    path = Path(path)
    image_dir = f"images/{path.stem}" if image_dir is None else image_dir
    (path.parent / image_dir).mkdir(parents=True, exist_ok=True)
    n_docs = n_images = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for doc_index, (segments, extra) in enumerate(documents):
            texts: list[str | None] = []
            images: list[str | None] = []
            for position, segment in enumerate(segments):
                if isinstance(segment, str):
                    texts.append(segment)
                    images.append(None)
                else:
                    relative = f"{image_dir}/{doc_index:06d}_{position}.png"
                    (path.parent / relative).write_bytes(png_bytes(segment))
                    texts.append(None)
                    images.append(relative)
                    n_images += 1
            f.write(json.dumps({"texts": texts, "images": images, **extra}, sort_keys=True) + "\n")
            n_docs += 1
    return n_docs, n_images


def read_obelics_jsonl(path: str | Path) -> Iterator[tuple[list[str | Image.Image], dict[str, Any]]]:
    """Iterate the documents of a local OBELICS-style JSONL file, images loaded; errors raise.

    Args:
        path: The JSONL file; relative image paths are relative to its folder.

    Yields:
        Each document's segments (texts and RGB PIL images, in order) and its whole line as a dict.

    Raises:
        ValueError: A line is not a JSON object with aligned ``texts`` and ``images`` lists.
        ImageError: An image is not readable.
    """
    from chameleon_lm.tokenizers.images import open_image

    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs = list(zip(row["texts"], row["images"], strict=True))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{number}: not an OBELICS-style line ({e})") from e
            segments: list[str | Image.Image] = []
            for text, image in pairs:
                if image is None:
                    segments.append(text)
                else:
                    segments.append(open_image(path.parent / image).convert("RGB"))
            yield segments, row
