"""Where a source's files are: brace patterns, globs, folders and fsspec URLs.

Local paths stay as given (a relative path stays relative); fsspec URLs come back in the one form
``fs.unstrip_protocol`` writes (``memory://d/a.tar`` -> ``memory:///d/a.tar``), so a pattern always
names its files the same way.
"""

from __future__ import annotations

import glob
import os
import posixpath
from typing import Any

from braceexpand import braceexpand


def is_url(path: str) -> bool:
    return "://" in path


def _fs(url: str) -> tuple[Any, str]:
    from fsspec.core import url_to_fs  # deferred: only URLs need fsspec

    return url_to_fs(url)


def _has_magic(path: str) -> bool:
    return any(c in path for c in "*?[")


def expand(pattern: str) -> list[str]:
    """The files or folders a pattern names: brace alternatives in order, glob matches sorted.

    Raises:
        FileNotFoundError: An alternative names nothing that exists (the message names it).
    """
    found: list[str] = []
    for path in braceexpand(pattern):
        where = "" if path == pattern else f" (from {pattern})"
        # a name with glob characters that exists as it is, is taken as it is
        if is_url(path):
            fs, stripped = _fs(path)
            matches = [fs.unstrip_protocol(stripped)] if fs.exists(stripped) else []
            if not matches and _has_magic(stripped):
                matches = [fs.unstrip_protocol(p) for p in sorted(fs.glob(stripped))]
        else:
            matches = [path] if os.path.exists(path) else []
            if not matches and _has_magic(path):
                matches = sorted(glob.glob(path, recursive=True))
        if not matches:
            raise FileNotFoundError(f"{path}: no such file or folder{where}")
        found += matches
    return list(dict.fromkeys(found))


def is_dir(path: str) -> bool:
    if is_url(path):
        fs, stripped = _fs(path)
        return fs.isdir(stripped)
    return os.path.isdir(path)


def listdir(folder: str) -> tuple[list[str], list[str]]:
    """The sorted names of the sub-folders and of the files directly in ``folder``."""
    if is_url(folder):
        fs, stripped = _fs(folder)
        entries = fs.ls(stripped, detail=True)
        dirs = [posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory"]
        files = [posixpath.basename(e["name"]) for e in entries if e["type"] == "file"]
    else:
        with os.scandir(folder) as scan:
            entries = list(scan)
        dirs = [e.name for e in entries if e.is_dir()]
        files = [e.name for e in entries if e.is_file()]
    return sorted(dirs), sorted(files)


def walk(folder: str) -> list[tuple[str, list[str]]]:
    """``(folder, sorted file names)`` of ``folder`` and every folder below it, sorted by folder."""
    if is_url(folder):
        fs, stripped = _fs(folder)
        found = [(fs.unstrip_protocol(d), sorted(files)) for d, _, files in fs.walk(stripped)]
    else:
        found = [(d, sorted(files)) for d, _, files in os.walk(folder)]
    return sorted(found)


def files_under(folder: str, suffixes: tuple[str, ...]) -> list[str]:
    """Every file below ``folder`` whose lower-cased name ends with one of ``suffixes``, sorted."""
    return [join(d, name) for d, names in walk(folder) for name in names
            if name.lower().endswith(suffixes)]


def find_files(pattern: str, suffixes: tuple[str, ...], what: str) -> list[str]:
    """The files a path pattern names, folders searched for ``suffixes``; in order, each once.

    Raises:
        FileNotFoundError: A folder of the pattern holds no such file (``what`` names them).
    """
    files: list[str] = []
    for path in expand(pattern):
        found = files_under(path, suffixes) if is_dir(path) else [path]
        if not found:
            raise FileNotFoundError(f"{path}: no {what} ({', '.join(suffixes)}) in it")
        files += found
    return list(dict.fromkeys(files))


def join(folder: str, name: str) -> str:
    return posixpath.join(folder, name) if is_url(folder) else os.path.join(folder, name)


def dirname(path: str) -> str:
    return posixpath.dirname(path) if is_url(path) else os.path.dirname(path)


def open_binary(path: str) -> Any:
    """A context manager giving the file opened for binary reading (local or fsspec)."""
    if is_url(path):
        import fsspec

        return fsspec.open(path, "rb")
    return open(path, "rb")

