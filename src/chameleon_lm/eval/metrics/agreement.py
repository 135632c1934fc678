"""Inter-annotator agreement and bootstrap intervals for the human evaluation.

The protocol follows the Chameleon paper. In the *absolute* task each answer is labelled
``fulfills`` / ``partially`` / ``does_not`` (fulfil the task); in the *relative* task two answers
are shown in random order and the annotator picks ``first`` / ``tie`` / ``second``, which
:func:`unblind` turns into ``win`` / ``tie`` / ``loss`` for model A. Several annotators judge each
item; their agreement is Krippendorff's alpha (:func:`krippendorff_alpha`, :func:`bootstrap_alpha`)
and the rates (:func:`fulfilment_rates`, :func:`win_rate`) come with percentile-bootstrap intervals
that resample items, not judgments, when given the item of each judgment.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal

import numpy as np

Level = Literal["nominal", "ordinal", "interval", "ratio"]
LEVELS: tuple[str, ...] = ("nominal", "ordinal", "interval", "ratio")
FULFILMENT: tuple[str, ...] = ("fulfills", "partially", "does_not")
RELATIVE: tuple[str, ...] = ("win", "tie", "loss")
CHOICES: tuple[str, ...] = ("first", "tie", "second")

_WIN_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}
_CHUNK = 1 << 20  # resampled indices held at once by the mean bootstrap (8 MiB of int64)


# --- Krippendorff's alpha ---------------------------------------------------------------------------


def _is_missing(x: Any) -> bool:
    if x is None:
        return True
    return isinstance(x, (float, np.floating)) and bool(np.isnan(x))


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (str, bytes))


def _prepare(data: Any, level: str, values: Sequence[Any] | None) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``data``; return the value counts ``[units, categories]`` and the categories."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; expected one of {LEVELS}")
    # numpy turns np.nan into the string "nan" in a string array, which holds no other missing mark
    string_array = isinstance(data, np.ndarray) and data.dtype.kind in "US"
    try:
        arr = np.asarray(data, dtype=object)
    except ValueError as err:
        raise ValueError("data must be a rectangular [annotators, units] matrix") from err
    if arr.ndim != 2:
        raise ValueError(
            f"data must be a 2-D [annotators, units] matrix (rows of equal length); "
            f"got shape {arr.shape}")
    n_annotators, n_units = arr.shape
    if n_annotators < 2:
        raise ValueError(
            f"need at least 2 annotators (rows), got {n_annotators}; data is [annotators, units]")
    if n_units == 0:
        raise ValueError("data has no units (columns)")

    rows, cols, present = [], [], []
    for (a, u), x in np.ndenumerate(arr):
        if _is_missing(x) or (string_array and x in ("nan", b"nan")):
            continue
        rows.append(a)
        cols.append(u)
        present.append(x)

    if values is None:
        try:
            domain = sorted(set(present))
        except TypeError as err:
            raise ValueError(
                "cannot order the values (mixed types?); pass values=[...] to give the categories"
            ) from err
    else:
        domain = list(values)
        if len(set(domain)) != len(domain):
            raise ValueError(f"values has duplicates: {domain}")
        unknown = set(present) - set(domain)
        if unknown:
            shown = sorted(map(repr, unknown))[:5]
            raise ValueError(f"data has values not in `values`: {', '.join(shown)}")

    if level in ("interval", "ratio"):
        bad = [v for v in domain if not _is_number(v) or not np.isfinite(v)]
        if bad:
            raise ValueError(
                f"{level} level needs finite numbers; got {bad[0]!r} (use nominal or ordinal with "
                f"values=[...] for categories)")
        if level == "ratio" and any(v < 0 for v in domain):
            raise ValueError("ratio level needs non-negative values (it assumes an absolute zero)")

    index = {v: i for i, v in enumerate(domain)}
    counts = np.zeros((n_units, len(domain)))
    np.add.at(counts, (np.asarray(cols, dtype=np.int64),
                       np.asarray([index[x] for x in present], dtype=np.int64)), 1.0)
    numeric = np.asarray(domain, dtype=float) if level in ("interval", "ratio") else np.empty(0)
    return counts, numeric


def _delta2(level: str, n_c: np.ndarray, numeric: np.ndarray) -> np.ndarray:
    """Squared distances delta^2 between categories, ``[categories, categories]``."""
    if level == "nominal":
        return 1.0 - np.eye(len(n_c))
    if level == "ordinal":
        # delta^2_ck = (sum_{g=c..k} n_g - (n_c + n_k) / 2)^2, categories in rank order
        idx = np.arange(len(n_c))
        lo, hi = np.minimum.outer(idx, idx), np.maximum.outer(idx, idx)
        cum = np.cumsum(n_c)
        between = cum[hi] - cum[lo] + n_c[lo]
        return (between - (n_c[:, None] + n_c[None, :]) / 2.0) ** 2
    diff = numeric[:, None] - numeric[None, :]
    if level == "interval":
        return diff**2
    total = numeric[:, None] + numeric[None, :]
    return np.divide(diff, total, out=np.zeros_like(diff), where=total != 0) ** 2


def _alpha_from_counts(counts: np.ndarray, level: str, numeric: np.ndarray) -> float:
    """Alpha from value counts ``[units, categories]`` via the coincidence matrix."""
    m = counts.sum(axis=1)
    keep = m >= 2
    if not keep.any():
        return float("nan")
    counts, m = counts[keep], m[keep]
    weighted = counts / (m - 1)[:, None]
    # o_ck = sum_u n_uc (n_uk - [c == k]) / (m_u - 1): pairs of values from different annotators
    o = weighted.T @ counts
    o[np.diag_indices_from(o)] -= weighted.sum(axis=0)
    n_c = o.sum(axis=1)
    n = n_c.sum()
    delta = _delta2(level, n_c, numeric)
    expected = n_c @ delta @ n_c  # n (n - 1) D_e
    if expected == 0:
        return float("nan")
    return float(1.0 - (n - 1) * (o * delta).sum() / expected)


def krippendorff_alpha(data: Any, level: Level = "nominal",
                       values: Sequence[Any] | None = None) -> float:
    """Krippendorff's alpha of a reliability matrix ``[annotators, units]``.

    Missing entries are ``None`` or ``nan``; units with fewer than two values are dropped.
    Computed from the coincidence matrix (Krippendorff 2011, "Computing Krippendorff's
    Alpha-Reliability"): alpha = 1 - D_o / D_e with the level's delta^2 (ordinal: the rank-based
    distance on the category marginals). ``values`` lists the categories, in rank order for
    ordinal (default: the sorted unique values); categories that never occur change nothing.

    Returns ``nan`` when alpha is undefined: no unit has two values, or every pairable value is
    the same (D_e = 0). Raises ``ValueError`` for data that is not 2-D, an unknown level, fewer
    than 2 annotators, values outside ``values``, or non-numbers at the interval/ratio level.
    """
    counts, numeric = _prepare(data, level, values)
    return _alpha_from_counts(counts, level, numeric)


# --- bootstrap --------------------------------------------------------------------------------------


def _check_boot(n_boot: int, ci: float) -> None:
    if not isinstance(n_boot, (int, np.integer)) or isinstance(n_boot, bool) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci!r}")


def _percentile(samples: np.ndarray, ci: float) -> tuple[float, float]:
    if samples.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - ci) / 2.0
    low, high = np.quantile(samples, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_alpha(data: Any, level: Level = "nominal", values: Sequence[Any] | None = None,
                    n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> dict[str, Any]:
    """Krippendorff's alpha with a percentile-bootstrap interval over units.

    Resamples units (columns) with replacement, ``n_boot`` times from
    ``np.random.default_rng(seed)``, and takes the ``ci`` percentile interval of the resampled
    alphas, skipping resamples where alpha is ``nan``. This is the plain unit-resampling bootstrap,
    not Hayes & Krippendorff's (2007) bootstrap of the coincidences: resampling items is what also
    gives the intervals of :func:`fulfilment_rates` and :func:`win_rate`, so all are comparable.
    Units with fewer than two values are dropped before resampling, so every resample has as many
    informative units as the data.

    Returns ``alpha`` (on all the data), ``low``, ``high``, ``n_boot``, ``seed`` and ``n_valid``
    (resamples with a defined alpha).
    """
    _check_boot(n_boot, ci)
    counts, numeric = _prepare(data, level, values)
    counts = counts[counts.sum(axis=1) >= 2]
    point = _alpha_from_counts(counts, level, numeric)
    samples = np.full(n_boot, np.nan)
    if counts.shape[0] > 0:
        rng = np.random.default_rng(seed)
        n_units = counts.shape[0]
        for b in range(n_boot):
            samples[b] = _alpha_from_counts(counts[rng.integers(0, n_units, n_units)], level,
                                            numeric)
    samples = samples[~np.isnan(samples)]
    low, high = _percentile(samples, ci)
    return {"alpha": point, "low": low, "high": high, "n_boot": n_boot, "seed": seed,
            "n_valid": int(samples.size)}


def _group_index(groups: Sequence[Hashable], n: int) -> np.ndarray:
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} values; need one per value")
    ids: dict[Hashable, int] = {}
    return np.asarray([ids.setdefault(g, len(ids)) for g in groups], dtype=np.int64)


def bootstrap_mean(values: Sequence[float] | np.ndarray, n_boot: int = 1000, seed: int = 0,
                   ci: float = 0.95, groups: Sequence[Hashable] | None = None) -> dict[str, Any]:
    """Mean of ``values`` with a percentile-bootstrap interval.

    Without ``groups`` the values are resampled. With ``groups`` (one id per value, e.g. the
    prompt) whole groups are resampled and each resample's mean is over all values of the drawn
    groups: judgments of one item are correlated, so treating them as independent would give too
    narrow an interval. Returns ``mean``, ``low``, ``high``, ``n``, ``n_boot`` and ``seed``.
    """
    _check_boot(n_boot, ci)
    try:
        x = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError("values must be numbers") from err
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("values must be finite (no nan or inf)")
    if groups is None:
        sums, sizes = x, np.ones_like(x)
    else:
        gid = _group_index(groups, x.size)
        sums = np.bincount(gid, weights=x)
        sizes = np.bincount(gid).astype(float)
    rng = np.random.default_rng(seed)
    k = sums.size
    samples = np.empty(n_boot)
    chunk = max(1, _CHUNK // k)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, k, size=(b, k))
        samples[start:start + b] = sums[idx].sum(axis=1) / sizes[idx].sum(axis=1)
    low, high = _percentile(samples, ci)
    return {"mean": float(x.mean()), "low": low, "high": high, "n": int(x.size),
            "n_boot": n_boot, "seed": seed}


# --- rates ------------------------------------------------------------------------------------------


def _check_labels(labels: Sequence[str], allowed: tuple[str, ...], what: str) -> list[str]:
    labels = list(labels)
    if not labels:
        raise ValueError(f"no {what} given")
    bad = sorted({repr(v) for v in labels if v not in allowed})
    if bad:
        raise ValueError(f"unknown {what} {', '.join(bad[:5])}; expected one of {allowed}")
    return labels


def fulfilment_rates(labels: Sequence[str], groups: Sequence[Hashable] | None = None,
                     n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> dict[str, Any]:
    """Share of each fulfilment label with a bootstrap interval (resampling ``groups`` if given).

    ``labels`` are in :data:`FULFILMENT`. Returns ``n`` and, per label, a dict with ``count``,
    ``share``, ``low`` and ``high``. The same seed makes every label use the same resamples.
    """
    labels = _check_labels(labels, FULFILMENT, "fulfilment labels")
    out: dict[str, Any] = {"n": len(labels)}
    for label in FULFILMENT:
        hits = [1.0 if v == label else 0.0 for v in labels]
        res = bootstrap_mean(hits, n_boot=n_boot, seed=seed, ci=ci, groups=groups)
        out[label] = {"count": int(sum(hits)), "share": res["mean"], "low": res["low"],
                      "high": res["high"]}
    return out


def win_rate(outcomes: Sequence[str], groups: Sequence[Hashable] | None = None,
             n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> dict[str, Any]:
    """Win rate of model A, (wins + ties / 2) / n, with a bootstrap interval.

    ``outcomes`` are in :data:`RELATIVE`, from A's point of view (see :func:`unblind`); ``groups``
    makes the bootstrap resample items. Returns ``n``, per outcome a dict with ``count`` and
    ``share``, and ``win_rate``, ``low``, ``high``.
    """
    outcomes = _check_labels(outcomes, RELATIVE, "outcomes")
    n = len(outcomes)
    out: dict[str, Any] = {"n": n}
    for outcome in RELATIVE:
        count = sum(1 for v in outcomes if v == outcome)
        out[outcome] = {"count": count, "share": count / n}
    res = bootstrap_mean([_WIN_SCORE[v] for v in outcomes], n_boot=n_boot, seed=seed, ci=ci,
                         groups=groups)
    out.update(win_rate=res["mean"], low=res["low"], high=res["high"])
    return out


def unblind(choice: str, first_is_a: bool) -> str:
    """Map a blinded choice in :data:`CHOICES` to ``win`` / ``tie`` / ``loss`` for model A."""
    if choice not in CHOICES:
        raise ValueError(f"unknown choice {choice!r}; expected one of {CHOICES}")
    # a string such as "false" from a form or JSON would otherwise count as True
    if not isinstance(first_is_a, (bool, np.bool_)):
        raise TypeError(f"first_is_a must be a bool, got {type(first_is_a).__name__}")
    if choice == "tie":
        return "tie"
    return "win" if (choice == "first") == bool(first_is_a) else "loss"


# --- building the matrix ----------------------------------------------------------------------------

Key = str | Callable[[dict[str, Any]], Any]


def _getter(key: Key) -> Callable[[dict[str, Any]], Any]:
    if callable(key):
        return key
    return lambda record: record[key]


def reliability_matrix(records: Sequence[dict[str, Any]], unit_key: Key = "item",
                       annotator_key: Key = "annotator", value_key: Key = "value",
                       ) -> tuple[list[list[Any]], list[Any], list[Any]]:
    """Build the ``[annotators, units]`` matrix (``None`` where missing) from judgment records.

    Each key is a field name or a function of the record (e.g. for a unit made of several
    fields). Units and annotators are in order of first appearance. Returns ``(matrix, units,
    annotators)``. Raises ``ValueError`` when a record lacks a key or an annotator judged a unit
    twice (keep one judgment per annotator and unit before calling).
    """
    get_unit, get_annotator, get_value = map(_getter, (unit_key, annotator_key, value_key))
    units: dict[Any, int] = {}
    annotators: dict[Any, int] = {}
    cells: dict[tuple[int, int], Any] = {}
    for i, record in enumerate(records):
        try:
            unit, annotator, value = get_unit(record), get_annotator(record), get_value(record)
        except KeyError as err:
            raise ValueError(f"record {i} has no field {err.args[0]!r}: {record!r}") from err
        u = units.setdefault(unit, len(units))
        a = annotators.setdefault(annotator, len(annotators))
        if (a, u) in cells:
            raise ValueError(f"annotator {annotator!r} judged unit {unit!r} more than once")
        cells[a, u] = value
    matrix: list[list[Any]] = [[None] * len(units) for _ in annotators]
    for (a, u), value in cells.items():
        matrix[a][u] = value
    return matrix, list(units), list(annotators)
