"""Agreement, statistics and benchmark scores."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

from chameleon_lm.utils.weights import read_json


def load_results(path: str | os.PathLike, key: str, value: str) -> dict[Hashable, str]:
    """A results file ``[{key: id, value: text}, ...]`` (COCO captions, VQA answers): one per id."""
    data = read_json(path)
    if not isinstance(data, list):  # a bad file is a ValueError: the CLI reports it as bad input
        raise ValueError(f"{path}: not a results file (expected a list of {{{key}, {value}}})")  # noqa: TRY004
    out: dict[Hashable, str] = {}
    for k, r in enumerate(data):
        if not isinstance(r, dict) or key not in r or not isinstance(r.get(value), str):
            raise ValueError(f"{path}: item {k} needs '{key}' and a string '{value}'")
        if r[key] in out:
            raise ValueError(f"{path}: item {k}: a second {value} for {key} {r[key]!r}")
        out[r[key]] = r[value]
    if not out:
        raise ValueError(f"{path}: no results")
    return out


def write_results(path: str | os.PathLike, rows: Mapping[Hashable, str], key: str, value: str) -> Path:
    """Write ``[{key: id, value: text}, ...]`` (the format :func:`load_results` and the official
    tools read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    items = [{key: i, value: v} for i, v in rows.items()]
    path.write_text(json.dumps(items, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def json_safe(x: Any) -> Any:
    """NaN and infinities as None, through dicts, lists and tuples: strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """``data`` as indented strict JSON (see :func:`json_safe`), its folder created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(data), indent=2) + "\n")
    return path
