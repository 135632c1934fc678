"""Training throughput, packed rows vs padded rows, on the quickstart's mixture and model.

    python bench/bench_packing.py RUN_DIR [--steps 40]

RUN_DIR is a finished ``chameleon quickstart --out RUN_DIR`` (its token datasets and train.json).
Both sides train the quickstart model from the same initial weights with the quickstart's settings;
only the loader differs: ``packed`` fills rows of ``seq_len`` with consecutive documents (document
masks), ``padded`` puts one document per row, right-padded to the batch's longest row, with as many
rows as the packed batch holds documents on average, so both see about the same documents per step.
The sides take turns step by step; figures are medians. Reports real (non-pad) tokens per second,
the padding share and the training targets per second. Appends to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from common import append_results

from chameleon_lm.training.cli import load_train_config
from chameleon_lm.training.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path, help="a quickstart output folder")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per side (after 3 warm-up steps)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    if not (args.run / "train.json").is_file():
        sys.exit(f"{args.run}: no train.json (run `chameleon quickstart --out {args.run}` first)")
    packed_cfg = load_train_config(str(args.run / "train.json"), [f"out_dir={args.run / 'bench'}"])
    probe = Trainer.from_config(packed_cfg)
    docs_per_row = []
    for step in range(50):  # documents started per packed batch, to size the padded batch alike
        b = probe.loader.next_batch(step)
        docs_per_row.append(int((b.positions == 0).sum()))
    rows = round(statistics.mean(docs_per_row))
    padded_cfg = packed_cfg.replace(packing="padded", batch_size=rows)
    sides = {}
    for name, cfg in (("packed", packed_cfg), ("padded", padded_cfg)):
        torch.manual_seed(0)
        sides[name] = Trainer.from_config(cfg)
    stats: dict[str, dict[str, list[float]]] = {n: {"tok": [], "pad": [], "tgt": []} for n in sides}
    for i in range(args.steps + 3):
        for name, tr in sides.items():
            t0 = time.perf_counter()
            m = tr.train_step()
            dt = time.perf_counter() - t0
            if i >= 3:
                stats[name]["tok"].append(m["tokens_per_s"])
                stats[name]["pad"].append(m["padding"])
                stats[name]["tgt"].append(m["tokens"] / dt)
    med = {n: {k: statistics.median(v) for k, v in s.items()} for n, s in stats.items()}
    table = ["| loader | rows × tokens | real tokens/s | padding | targets/s | vs padded (real tokens/s) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, tr in sides.items():
        shape = f"{tr.config.batch_size} × {'≤' if name == 'padded' else ''}{tr.config.seq_len}"
        table.append(f"| {name} | {shape} | {med[name]['tok']:,.0f} | {med[name]['pad']:.1%} | "
                     f"{med[name]['tgt']:,.0f} | **{med[name]['tok'] / med['padded']['tok']:.2f}×** |")
    body = "\n".join(table) + (
        f"\n\nQuickstart model and mixture ({args.run / 'train.json'}); {args.steps} timed steps per side, "
        f"taking turns, medians. Packed rows hold {statistics.mean(docs_per_row):.1f} documents on average "
        f"(document starts per batch), so the padded side has {rows} rows of one document each. Real "
        "tokens exclude pad slots; targets exclude tokens without loss (image→caption images).\n")
    print(body)
    if not args.no_write:
        append_results("Training throughput, packed vs padded rows, quickstart mixture", body)


if __name__ == "__main__":
    main()
