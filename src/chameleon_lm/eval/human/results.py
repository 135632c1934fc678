"""Human-evaluation results from a store's judgments: the paper's tables, with intervals and agreement.

- absolute: per run, the shares of fulfils / partially / does not fulfil, overall, per task category
  and per expected output modality, with bootstrap intervals clustered by prompt (the judgments of one
  prompt are not independent);
- relative: per compared pair A:B, wins / ties / losses of A after un-blinding and the win rate
  (wins + ties / 2), with the same breakdowns and intervals;
- agreement: Krippendorff's alpha over annotators (units: one judged answer or pair) with a bootstrap
  interval; fulfilment as an ordinal scale (and nominal, the paper does not say which), relative
  choices as ordinal win > tie > loss.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from chameleon_lm.eval.metrics.agreement import (
    FULFILMENT,
    RELATIVE,
    bootstrap_alpha,
    fulfilment_rates,
    reliability_matrix,
    unblind,
    win_rate,
)
from chameleon_lm.eval.store import ResultStore


def _breakdown(rows: list[dict], prompts: dict, score, key: str) -> dict[str, Any]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[getattr(prompts[r["prompt"]], key)].append(r)
    return {name: score(g) for name, g in sorted(groups.items())}


def _agreement(rows: list[dict], value: str, levels: dict[str, tuple], n_boot: int, seed: int) -> dict:
    matrix, units, annotators = reliability_matrix(
        rows, unit_key=lambda r: (r["prompt"], r["sample"], r["run_a"], r["run_b"]),
        annotator_key="annotator", value_key=value)
    out: dict[str, Any] = {"units": len(units), "annotators": len(annotators)}
    for level, values in levels.items():
        out[level] = bootstrap_alpha(matrix, level=level, values=values, n_boot=n_boot, seed=seed)
    return out


def human_results(store: ResultStore, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The absolute and relative results of every judgment in ``store`` (see the module docstring)."""
    prompts = {p.id: p for p in store.prompts()}
    out: dict[str, Any] = {"absolute": {}, "relative": {}}
    absolute = store.judgments("absolute")
    if absolute:
        def rates(rows: list[dict]) -> dict:
            return fulfilment_rates([r["value"] for r in rows], groups=[r["prompt"] for r in rows],
                                    n_boot=n_boot, seed=seed)

        for run in sorted({r["run_a"] for r in absolute}):
            rows = [r for r in absolute if r["run_a"] == run]
            out["absolute"][run] = {"all": rates(rows), "category": _breakdown(rows, prompts, rates, "category"),
                                    "output": _breakdown(rows, prompts, rates, "output"),
                                    "prompts": len({r["prompt"] for r in rows})}
        out["absolute_agreement"] = _agreement(absolute, "value", {"ordinal": FULFILMENT,
                                                                  "nominal": FULFILMENT}, n_boot, seed)
    relative = store.judgments("relative")
    if relative:
        for r in relative:
            r["outcome"] = unblind(r["value"], r["first"] == r["run_a"])

        def wins(rows: list[dict]) -> dict:
            return win_rate([r["outcome"] for r in rows], groups=[r["prompt"] for r in rows],
                            n_boot=n_boot, seed=seed)

        for pair in sorted({(r["run_a"], r["run_b"]) for r in relative}):
            rows = [r for r in relative if (r["run_a"], r["run_b"]) == pair]
            out["relative"][f"{pair[0]}:{pair[1]}"] = {
                "all": wins(rows), "category": _breakdown(rows, prompts, wins, "category"),
                "output": _breakdown(rows, prompts, wins, "output"),
                "prompts": len({r["prompt"] for r in rows})}
        out["relative_agreement"] = _agreement(relative, "outcome", {"ordinal": RELATIVE[::-1]},
                                               n_boot, seed)
    return out


def plot_human_results(results: dict[str, Any], folder) -> list[str]:
    """Bar charts (PNG and SVG) of the fulfilment shares and the win rates; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = []
    if results.get("absolute"):
        runs = list(results["absolute"])
        fig, ax = plt.subplots(figsize=(6, 0.6 * len(runs) + 1.4))
        left = [0.0] * len(runs)
        for label, colour in zip(FULFILMENT, ("#2e7d32", "#f9a825", "#c62828")):
            shares = [results["absolute"][r]["all"][label]["share"] for r in runs]
            ax.barh(runs, shares, left=left, color=colour, label=label.replace("_", " "))
            left = [a + b for a, b in zip(left, shares)]
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of judgments")
        ax.set_title("Task fulfilment (absolute evaluation)")
        ax.legend(loc="lower right", fontsize=8)
        written += _save(fig, folder, "fulfilment")
    if results.get("relative"):
        pairs = list(results["relative"])
        fig, ax = plt.subplots(figsize=(6, 0.6 * len(pairs) + 1.4))
        rates = [results["relative"][p]["all"]["win_rate"] for p in pairs]
        errors = [[r - results["relative"][p]["all"]["low"] for p, r in zip(pairs, rates)],
                  [results["relative"][p]["all"]["high"] - r for p, r in zip(pairs, rates)]]
        ax.barh([p.replace(":", " vs ") for p in pairs], rates, xerr=errors, color="#1565c0", capsize=4)
        ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_xlabel("win rate of the first system (wins + ties / 2), 95 % CI")
        ax.set_title("Relative evaluation")
        written += _save(fig, folder, "win_rate")
    return written


def _save(fig, folder, name: str) -> list[str]:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    names = [f"{name}.png", f"{name}.svg"]
    for n in names:
        fig.savefig(folder / n, dpi=120)
    plt.close(fig)
    return names
