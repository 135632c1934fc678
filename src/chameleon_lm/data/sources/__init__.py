"""Data sources: every on-disk dataset format as named units of :class:`Sample` (or :class:`Skipped`).

One module per format: ``webdataset`` (tar shards), ``files`` (img2dataset "files" folders and plain
image folders), ``parquet`` and ``jsonl``. :func:`open_source` picks the format from the path::

    source = open_source("data/pairs/train-{000000..000009}.tar")
    for unit in source.units():          # one tar shard each: the unit of parallel work
        for item in source.read(unit):   # Sample(key, [ImageRef, caption], meta) or Skipped(...)
            ...
"""

from __future__ import annotations

import os
from typing import Any

from chameleon_lm.data.sources import paths
from chameleon_lm.data.sources.base import (
    FORMATS, IMAGE_EXTENSIONS, KINDS, ImageRef, Sample, Skipped, Source, SourceConfig, iter_images,
    iter_texts, load_image, png_bytes,
)
from chameleon_lm.data.sources.files import FilesSource
from chameleon_lm.data.sources.jsonl import (
    JSONL_SUFFIXES, JsonlSource, read_obelics_jsonl, write_obelics_jsonl,
)
from chameleon_lm.data.sources.parquet import PARQUET_SUFFIXES, ParquetSource
from chameleon_lm.data.sources.webdataset import (
    SHARD_SUFFIXES, ShardError, WebDatasetSource, read_pairs, write_webdataset,
)

SOURCES = {"webdataset": WebDatasetSource, "files": FilesSource, "parquet": ParquetSource,
           "jsonl": JsonlSource}
_SUFFIXES = (("webdataset", SHARD_SUFFIXES), ("parquet", PARQUET_SUFFIXES), ("jsonl", JSONL_SUFFIXES))


def _formats_of(names: list[str]) -> set[str]:
    """The formats whose files appear among ``names`` (images count as ``files``)."""
    found = set()
    for name in (n.lower() for n in names):
        found |= {fmt for fmt, suffixes in _SUFFIXES if name.endswith(suffixes)}
        if name.rpartition(".")[2] in IMAGE_EXTENSIONS:
            found.add("files")
    return found


def detect_format(path: str) -> str:
    """The format of a path: by its extension, or for a folder by what it holds.

    A folder holding tar shards is ``webdataset``; image files ``files``; JSONL files ``jsonl``. Else
    its first sub-folder decides: images make it an img2dataset "files" output (whose ``.parquet``
    files beside the sub-folders are only metadata), parquet files next; a sub-folder of tar, parquet
    or JSONL files gives that format (e.g. a Hugging Face ``data/`` folder).

    Raises:
        ValueError: Nothing tells the format, or a folder mixes parquet and JSONL (named in the message).
        FileNotFoundError: The path names nothing.
    """
    name = path.lower().rstrip("/")
    for fmt, suffixes in _SUFFIXES:
        if name.endswith(suffixes):
            return fmt
    first = paths.expand(path)[0]
    if not paths.is_dir(first):
        raise ValueError(f"{path}: unknown format (expected .tar, .parquet, .jsonl or a folder); "
                         f"set format to one of {', '.join(FORMATS)}")
    dirs, files = paths.listdir(first)
    here = _formats_of(files)
    below = _formats_of(paths.listdir(paths.join(first, dirs[0]))[1]) if dirs else set()
    if "webdataset" in here:
        return "webdataset"
    if "files" in here:
        return "files"
    if {"parquet", "jsonl"} <= here:
        raise ValueError(f"{first}: holds both parquet and JSONL files; point at one or set format")
    if "jsonl" in here:
        return "jsonl"
    if "files" in below:
        return "files"
    if "parquet" in here:
        return "parquet"
    for fmt in ("webdataset", "parquet", "jsonl"):
        if fmt in below:
            return fmt
    raise ValueError(f"{first}: no tar shards, images, parquet or JSONL files in it or in its first "
                     f"sub-folder; set format to one of {', '.join(FORMATS)}")


def open_source(spec: str | os.PathLike | SourceConfig, **overrides: Any) -> Source:
    """Open a dataset as a :class:`Source`.

    Args:
        spec: A path, pattern or URL (see :attr:`SourceConfig.path`), or a config.
        **overrides: :class:`SourceConfig` fields to set, e.g. ``text_field="content"``.

    Returns:
        The source, its kind resolved.

    Raises:
        ValueError: An unknown format or kind, or one that cannot be told (the message names the path).
        FileNotFoundError: The path names nothing.
    """
    if isinstance(spec, SourceConfig):
        config = spec.replace(**overrides) if overrides else spec
    elif isinstance(spec, (str, os.PathLike)):
        config = SourceConfig(path=os.fspath(spec), **overrides)
    else:
        raise TypeError(f"open_source takes a path or a SourceConfig, got {type(spec).__name__}")
    fmt = config.format if config.format != "auto" else detect_format(config.path)
    return SOURCES[fmt](config)


__all__ = [
    "FORMATS", "KINDS", "IMAGE_EXTENSIONS", "ImageRef", "Sample", "Skipped", "Source", "SourceConfig",
    "WebDatasetSource", "FilesSource", "ParquetSource", "JsonlSource", "ShardError", "open_source",
    "detect_format", "iter_texts", "iter_images", "load_image", "png_bytes", "write_webdataset",
    "read_pairs", "write_obelics_jsonl", "read_obelics_jsonl",
]
