"""img2dataset "files" folders (``out/00000/000000012.jpg``, ``.txt``, ``.json``) and image folders.

One unit per folder that directly holds image files (the folder itself when it is flat). The files of
one sample share their name up to the last dot. Local images are handed on by path, unread; a sample
without a caption gives just its image.
"""

from __future__ import annotations

from collections.abc import Iterator

from chameleon_lm.data.sources import paths
from chameleon_lm.data.sources.base import (
    IMAGE_EXTENSIONS, ImageRef, Sample, SkipSample, Skipped, SourceConfig, UnitSource,
)
from chameleon_lm.data.sources.webdataset import parse_pair

_SAMPLE_EXTENSIONS = set(IMAGE_EXTENSIONS) | {"txt", "json"}


def _extension(name: str) -> str:
    return name.rpartition(".")[2].lower() if "." in name else ""


def _read_bytes(path: str) -> bytes:
    with paths.open_binary(path) as f:
        return f.read()


class FilesSource(UnitSource):
    """Image-caption pairs (or bare images) from folders; units are the folders holding images."""

    format = "files"

    def __init__(self, config: SourceConfig):
        if config.kind not in ("auto", "pairs"):
            raise ValueError(f"{config.path}: a files folder holds pairs, not kind {config.kind!r}")
        super().__init__(config, "pairs")

    def _list_units(self) -> list[str]:
        units: list[str] = []
        for root in paths.expand(self.config.path):
            if not paths.is_dir(root):
                raise ValueError(f"{root}: not a folder (the files format reads folders of images)")
            found = [folder for folder, names in paths.walk(root)
                     if any(_extension(n) in IMAGE_EXTENSIONS for n in names)]
            if not found:
                raise FileNotFoundError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) "
                                        "in it or below")
            units += found
        return list(dict.fromkeys(units))

    def _read(self, unit: str) -> Iterator[Sample | Skipped]:
        stems: dict[str, dict[str, str]] = {}
        for name in paths.listdir(unit)[1]:
            ext = _extension(name)
            stem = name[: -len(ext) - 1] if ext else ""
            if stem and ext in _SAMPLE_EXTENSIONS:
                stems.setdefault(stem, {})[ext] = name
        for stem in sorted(stems):
            yield self._sample(unit, stem, stems[stem])

    def _sample(self, unit: str, stem: str, names: dict[str, str]) -> Sample | Skipped:
        key = f"{unit}/{stem}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in names), None)
        image = None
        if ext is not None:
            path = paths.join(unit, names[ext])
            # a remote file has no local path to hand on: read it now
            image = ImageRef(data=_read_bytes(path)) if paths.is_url(path) else ImageRef(path=path)
        files = {e: _read_bytes(paths.join(unit, names[e])) for e in ("txt", "json") if e in names}
        try:
            return Sample(key, *parse_pair(image, files, key, self.config.caption_field))
        except SkipSample as e:
            return Skipped(key, e.reason, e.detail)
