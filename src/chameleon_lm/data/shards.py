"""Token shards: tokenized documents on disk, memory-mapped for training.

A token dataset is a folder written by ``chameleon data tokenize``, one shard per unit of its source::

    index.json             format, vocabulary size, shards, summary, and how the data was made
    NNNNNN.ids.npy         uint16 | uint32 [tokens]   token ids (uint16 when the vocabulary fits)
    NNNNNN.flags.npy       uint8 [tokens]             modality (bits 0-1) | is a loss target (bit 2)
    NNNNNN.offsets.npy     int64 [documents + 1]      document i is tokens [offsets[i], offsets[i+1])
    NNNNNN.docs.jsonl      one line per document: {"key", "hash", "meta"}
    NNNNNN.skipped.jsonl   one line per sample left out: {"key", "reason", "detail"}
    NNNNNN.json            the shard's summary, written last: a shard is complete iff it exists

Every file of a shard is written under a temporary name and renamed into place, the summary last, so a
killed run leaves no shard that looks complete, and a re-run rewrites exactly the missing ones. The
files hold nothing that depends on time or on the machine, so the same input gives the same bytes.
Documents dropped as exact duplicates of earlier ones are listed in ``index.json`` and skipped by
:class:`TokenDataset`; the shards themselves are never rewritten.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chameleon_lm.documents import EncodedDocument
from chameleon_lm.tokenizers.vocab import IMAGE, SPECIAL, TEXT

FORMAT = "chameleon-lm-tokens"
VERSION = 1
INDEX = "index.json"
LOSS_BIT = 4  # flags bit 2; bits 0-1 hold the modality
MODALITY_NAMES = {TEXT: "text", IMAGE: "image", SPECIAL: "special"}


def shard_name(index: int) -> str:
    return f"{index:06d}"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows).encode()


def id_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Collects the documents of one shard and writes its files on :meth:`close`.

    Args:
        directory: The dataset folder.
        index: The shard's number (its files are ``NNNNNN.*``).
        unit: The source unit the shard holds (recorded, and checked when a run resumes).
        vocab_size: Size of the vocabulary (chooses the id dtype; ids beyond it are refused).
    """

    def __init__(self, directory: str | os.PathLike, index: int, unit: str, vocab_size: int):
        self.directory, self.index, self.unit = Path(directory), index, unit
        self.vocab_size, self.dtype = vocab_size, id_dtype(vocab_size)
        self._ids: list[np.ndarray] = []
        self._flags: list[np.ndarray] = []
        self._lengths: list[int] = []
        self._docs: list[dict] = []
        self._skipped: list[dict] = []
        self._modality_tokens: Counter = Counter()
        self._images = 0

    def add(self, doc: EncodedDocument, key: str, content_hash: str = "",
            meta: dict[str, Any] | None = None, images: int = 0) -> None:
        """Append one document (its key, content hash, metadata and number of images)."""
        ids = doc.ids.numpy() if isinstance(doc.ids, torch.Tensor) else np.asarray(doc.ids)
        if ids.ndim != 1 or len(ids) == 0:
            raise ValueError(f"{key}: a document must be a non-empty flat id sequence")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"{key}: ids outside the vocabulary of {self.vocab_size}")
        modality = np.asarray(doc.modality, dtype=np.uint8)
        flags = modality | (np.asarray(doc.loss_mask, dtype=np.uint8) * LOSS_BIT)
        self._ids.append(ids.astype(self.dtype))
        self._flags.append(flags.astype(np.uint8))
        self._lengths.append(len(ids))
        self._docs.append({"key": key, "hash": content_hash, "meta": meta or {}})
        values, counts = np.unique(modality, return_counts=True)
        self._modality_tokens.update({MODALITY_NAMES[int(v)]: int(c) for v, c in zip(values, counts)})
        self._images += images

    def skip(self, key: str, reason: str, detail: str = "") -> None:
        """Record a sample that was left out, and why."""
        self._skipped.append({"key": key, "reason": reason, "detail": detail})

    def close(self) -> dict[str, Any]:
        """Write the shard's files (summary last) and return its summary."""
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = self.directory / shard_name(self.index)
        ids = np.concatenate(self._ids) if self._ids else np.zeros(0, self.dtype)
        flags = np.concatenate(self._flags) if self._flags else np.zeros(0, np.uint8)
        offsets = np.concatenate([[0], np.cumsum(self._lengths, dtype=np.int64)]).astype(np.int64)
        _atomic_save_npy(Path(f"{stem}.ids.npy"), ids)
        _atomic_save_npy(Path(f"{stem}.flags.npy"), flags)
        _atomic_save_npy(Path(f"{stem}.offsets.npy"), offsets)
        _atomic_write_bytes(Path(f"{stem}.docs.jsonl"), _jsonl(self._docs))
        _atomic_write_bytes(Path(f"{stem}.skipped.jsonl"), _jsonl(self._skipped))
        summary = {
            "shard": shard_name(self.index), "unit": self.unit, "documents": len(self._lengths),
            "tokens": int(offsets[-1]), "images": self._images,
            "tokens_by_modality": {m: self._modality_tokens.get(m, 0) for m in MODALITY_NAMES.values()},
            "skipped": dict(sorted(Counter(s["reason"] for s in self._skipped).items())),
        }
        _atomic_write_bytes(Path(f"{stem}.json"), (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
        return summary


def completed_shard(directory: str | os.PathLike, index: int, unit: str) -> dict[str, Any] | None:
    """The summary of shard ``index`` if it was completed for ``unit``; None if it must be (re)written."""
    path = Path(directory) / f"{shard_name(index)}.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if summary.get("unit") != unit:
        raise ValueError(f"{path}: holds unit {summary.get('unit')!r}, not {unit!r}; the source's "
                         "units changed since this folder was written (tokenize into a new folder)")
    return summary


def read_docs_jsonl(directory: str | os.PathLike, index: int) -> list[dict]:
    with open(Path(directory) / f"{shard_name(index)}.docs.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_index(directory: str | os.PathLike, shards: list[dict[str, Any]], *, vocab_size: int,
                info: dict[str, Any], duplicates: list[int] | None = None) -> dict[str, Any]:
    """Write ``index.json`` from the shard summaries (in shard order) and return it.

    Args:
        directory: The dataset folder.
        shards: Every shard's summary, shard 0 first.
        vocab_size: The vocabulary the ids belong to.
        info: How the data was made (source, recipe, tokenizers, filters), recorded as is.
        duplicates: Global indices of documents dropped as duplicates of earlier ones.
    """
    duplicates = sorted(duplicates or [])
    total: Counter = Counter()
    skipped: Counter = Counter()
    by_modality: Counter = Counter()
    for s in shards:
        total.update(documents=s["documents"], tokens=s["tokens"], images=s["images"])
        skipped.update(s["skipped"])
        by_modality.update(s["tokens_by_modality"])
    index = {
        "format": FORMAT, "version": VERSION, "vocab_size": vocab_size,
        "id_dtype": id_dtype(vocab_size).name,
        "shards": [{"name": s["shard"], "unit": s["unit"], "documents": s["documents"],
                    "tokens": s["tokens"]} for s in shards],
        "duplicates": duplicates,
        "summary": {
            "documents": total["documents"] - len(duplicates), "documents_written": total["documents"],
            "duplicates_removed": len(duplicates), "tokens_written": total["tokens"],
            "tokens_by_modality": {m: by_modality.get(m, 0) for m in MODALITY_NAMES.values()},
            "images": total["images"], "skipped": dict(sorted(skipped.items())),
        },
        "info": info,
    }
    _atomic_write_bytes(Path(directory) / INDEX, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    return index


@dataclass
class _Shard:
    ids: np.ndarray
    flags: np.ndarray
    offsets: np.ndarray


class TokenDataset:
    """A token dataset folder, memory-mapped: ``len(ds)`` documents, ``ds[i]`` an ``EncodedDocument``.

    Documents are numbered across shards in shard order, duplicates left out: index ``i`` is the i-th
    kept document. Nothing is read until it is needed, and ids stay on disk (``mmap``).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index_path = self.path / INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.path}: not a token dataset (no {INDEX}; write one with "
                                    "`chameleon data tokenize`)")
        try:
            self.index = json.loads(index_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{index_path}: not valid JSON ({e})") from e
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{index_path}: not a {FORMAT} index")
        if self.index.get("version") != VERSION:
            raise ValueError(f"{index_path}: format version {self.index.get('version')}, "
                             f"this code reads {VERSION}")
        self.vocab_size: int = self.index["vocab_size"]
        counts = np.array([s["documents"] for s in self.index["shards"]], dtype=np.int64)
        self._shard_starts = np.concatenate([[0], np.cumsum(counts)])
        keep = np.ones(int(self._shard_starts[-1]), dtype=bool)
        keep[np.asarray(self.index["duplicates"], dtype=np.int64)] = False
        self._kept = np.flatnonzero(keep)  # kept index -> global document index
        self._shards: dict[int, _Shard] = {}

    def __len__(self) -> int:
        return len(self._kept)

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.path)!r}, {len(self)} documents)"

    @property
    def summary(self) -> dict[str, Any]:
        return self.index["summary"]

    def _shard(self, s: int) -> _Shard:
        if s not in self._shards:
            stem = self.path / shard_name(s)
            self._shards[s] = _Shard(*(np.load(f"{stem}.{part}.npy", mmap_mode="r", allow_pickle=False)
                                       for part in ("ids", "flags", "offsets")))
        return self._shards[s]

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} of {len(self)}")
        g = int(self._kept[i])
        s = int(np.searchsorted(self._shard_starts, g, side="right")) - 1
        return s, g - int(self._shard_starts[s])

    def __getitem__(self, i: int) -> EncodedDocument:
        s, j = self._locate(i)
        shard = self._shard(s)
        start, end = int(shard.offsets[j]), int(shard.offsets[j + 1])
        flags = torch.from_numpy(np.array(shard.flags[start:end]))
        return EncodedDocument(
            torch.from_numpy(shard.ids[start:end].astype(np.int64)),
            (flags & (LOSS_BIT - 1)).to(torch.int8),
            (flags & LOSS_BIT).bool(),
        )

    @cached_property
    def lengths(self) -> np.ndarray:
        """Tokens of every kept document ``[len(self)]`` int64 (read from the offsets only)."""
        per_shard = [np.diff(self._shard(s).offsets) for s in range(len(self.index["shards"]))]
        every = np.concatenate(per_shard) if per_shard else np.zeros(0, np.int64)
        return every[self._kept].astype(np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def documents_info(self) -> list[dict]:
        """``{"key", "hash", "meta"}`` of every kept document, in order (reads the docs.jsonl files)."""
        every = [d for s in range(len(self.index["shards"])) for d in read_docs_jsonl(self.path, s)]
        return [every[g] for g in self._kept]

    def meta_values(self, field: str) -> list[Any]:
        """The metadata field ``field`` of every kept document (None where a document lacks it)."""
        return [d["meta"].get(field) for d in self.documents_info()]
