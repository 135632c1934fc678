"""WebDataset tar shards in img2dataset's layout: per key an image (``jpg``/``jpeg``/``png``/``webp``)
with a ``txt`` caption and/or a ``json`` sidecar. One unit per shard.

Shards are streamed once, front to back (``fsspec`` for URLs), and grouped into samples by
``webdataset.tariterators.group_by_keys``. A shard that is cut off or corrupt gives the samples before
the damage and then one ``Skipped("truncated_shard")``.
"""

from __future__ import annotations

import json
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chameleon_lm.data.sources import paths
from chameleon_lm.data.sources.base import (
    IMAGE_EXTENSIONS, ImageRef, Sample, SkipSample, Skipped, SourceConfig, UnitSource, decode_text,
    png_bytes, scalar_meta,
)

if TYPE_CHECKING:
    from PIL import Image

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_META_FILE = re.compile(r"__[^/]*__($|/)")  # webdataset's per-shard metadata entries


class ShardError(ValueError):
    """A tar shard that is cut off or corrupt."""


class _EndAwareInfo(tarfile.TarInfo):
    """Marks its archive when the end-of-archive block is read: tarfile ends a shard cut off at a
    member boundary as quietly as a complete one."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.reached_end = True  # type: ignore[attr-defined]
            raise


def _tar_files(url: str) -> Iterator[dict[str, Any]]:
    """``{"fname", "data", "__url__"}`` of every file of a shard, in order (webdataset's record form).

    Raises:
        ShardError: The shard is cut off or corrupt (after yielding the files before the damage).
        FileNotFoundError: The shard does not exist.
    """
    with paths.open_binary(url) as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r|*", tarinfo=_EndAwareInfo)
            for info in tar:
                if info.isreg() and not _META_FILE.match(info.name):
                    yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
                tar.members = []  # a stream of millions of members: keep none
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise ShardError(f"{url}: {type(e).__name__}: {e}") from e
        if not getattr(tar, "reached_end", False):
            raise ShardError(f"{url}: ends without the end-of-archive block (cut off)")


def _groups(url: str) -> Iterator[dict[str, Any]]:
    """The samples of a shard as webdataset dicts: ``__key__``, ``__url__`` and extension -> bytes."""
    from webdataset.tariterators import group_by_keys  # deferred: webdataset imports torch

    return group_by_keys(_tar_files(url))


class WebDatasetSource(UnitSource):
    """Image-caption pairs from tar shards; units are the shard paths/URLs."""

    format = "webdataset"

    def __init__(self, config: SourceConfig):
        if config.kind not in ("auto", "pairs"):
            raise ValueError(f"{config.path}: tar shards hold pairs, not kind {config.kind!r}")
        super().__init__(config, "pairs")

    def _list_units(self) -> list[str]:
        return paths.find_files(self.config.path, SHARD_SUFFIXES, "tar shards")

    def _read(self, unit: str) -> Iterator[Sample | Skipped]:
        groups = _groups(unit)
        count = 0
        while True:
            try:
                group = next(groups, None)
            except ValueError as e:  # ShardError, or group_by_keys' duplicate file name
                yield Skipped(unit, "truncated_shard", f"{e} (the shard's samples after the first "
                                                        f"{count} are lost)")
                return
            if group is None:
                return
            count += 1
            yield self._sample(unit, group)

    def _sample(self, unit: str, group: dict[str, Any]) -> Sample | Skipped:
        key = f"{unit}/{group['__key__']}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in group), None)
        image = None if ext is None else ImageRef(data=group[ext])
        try:
            return Sample(key, *parse_pair(image, group, key, self.config.caption_field))
        except SkipSample as e:
            return Skipped(key, e.reason, e.detail)


def parse_pair(image: ImageRef | None, files: dict[str, bytes], key: str, caption_field: str
               ) -> tuple[list[str | ImageRef], dict[str, Any]]:
    """Segments and metadata of one img2dataset sample (a tar sample or a files-folder stem).

    The caption is the ``txt`` file, else the sidecar JSON's ``caption_field``; a sample without a
    (non-blank) caption gives just the image.

    Args:
        image: The sample's image, ``None`` if it has none.
        files: The sample's other files by extension (``txt``, ``json``; others are ignored).
        key: The sample's key, for messages.
        caption_field: The sidecar field read when there is no ``txt``.

    Raises:
        SkipSample: ``no_image``, ``undecodable_text`` or ``bad_record`` (unreadable JSON sidecar).
    """
    if image is None:
        raise SkipSample("no_image", f"{key}: no image file ({', '.join(IMAGE_EXTENSIONS)})")
    record: dict[str, Any] = {}
    if "json" in files:
        try:
            record = json.loads(files["json"])
        except ValueError as e:
            raise SkipSample("bad_record", f"{key}.json: not valid JSON ({e})") from None
        if not isinstance(record, dict):
            raise SkipSample("bad_record", f"{key}.json: not a JSON object")
    text = decode_text(files.get("txt"), f"{key}.txt")
    if text is None:
        text = decode_text(record.get(caption_field), f"{key}.json field {caption_field!r}")
    segments: list[str | ImageRef] = [image]
    if text is not None and text.strip():
        segments.append(text)
    return segments, scalar_meta(record)


def write_webdataset(directory: str | Path,
                     samples: Iterable[tuple[Image.Image, str, dict[str, Any]]], *,
                     prefix: str = "", shard_size: int = 1000) -> list[str]:
    """Write (image, caption, metadata) samples as tar shards in img2dataset's layout.

    Sample ``i`` is stored under the key ``f"{i:09d}"`` as ``KEY.png`` (fixed PNG options), ``KEY.txt``
    and ``KEY.json`` (the metadata plus ``key``, ``caption``, ``width`` and ``height``, keys sorted).
    Tar metadata is fixed (no user, group or time), so equal samples give byte-identical shards.

    Args:
        directory: Destination folder; created if missing.
        samples: RGB images with their caption and JSON-serialisable metadata.
        prefix: Shard names are ``PREFIX-NNNNNN.tar`` (``NNNNNN.tar`` without a prefix).
        shard_size: Samples per shard.

    Returns:
        The shard file names, in order.
    """
    import webdataset as wds  # deferred: importing webdataset pulls in torch (seconds)

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    writer = None
    for index, (image, text, meta) in enumerate(samples):
        if index % shard_size == 0:
            if writer is not None:
                writer.close()
            number = f"{index // shard_size:06d}"
            names.append(f"{prefix}-{number}.tar" if prefix else f"{number}.tar")
            writer = wds.TarWriter(str(directory / names[-1]), user="", group="", mtime=0,
                                   encoder=False)
        key = f"{index:09d}"
        record = {**meta, "key": key, "caption": text, "width": image.width,
                  "height": image.height}
        writer.write({"__key__": key, "png": png_bytes(image), "txt": text.encode(),
                      "json": json.dumps(record, sort_keys=True).encode()})
    if writer is not None:
        writer.close()
    return names


def read_pairs(urls: str | Sequence[str | Path]
               ) -> Iterator[tuple[Image.Image, str, dict[str, Any]]]:
    """Iterate (image, caption, JSON sidecar) samples of tar shards, in order; errors raise.

    Args:
        urls: A shard path or URL, a brace pattern or glob (``"pairs/train-{000000..000019}.tar"``),
            or a list of shard paths.

    Yields:
        The RGB image, its caption (``txt``, else the sidecar's ``caption``) and the whole sidecar.

    Raises:
        ShardError: A shard is cut off or corrupt.
        ValueError: A sample has no image.
    """
    from chameleon_lm.tokenizers.images import open_image

    shards = paths.expand(urls) if isinstance(urls, str) else [str(u) for u in urls]
    for shard in shards:
        for group in _groups(shard):
            ext = next((e for e in IMAGE_EXTENSIONS if e in group), None)
            if ext is None:
                raise ValueError(f"{shard}: sample {group['__key__']} has no image")
            meta = json.loads(group["json"]) if "json" in group else {}
            text = group["txt"].decode("utf-8") if "txt" in group else meta.get("caption", "")
            yield open_image(group[ext]).convert("RGB"), text, meta
