"""Decoding's fp32 matmuls: our panel kernel vs oneDNN's packed inner product vs MKL (``F.linear``).

    python bench/bench_linear.py [--preset small] [--rows 1 8 32 96 512]

The weights of a whole model, in the order a decoding step multiplies them (per layer: q/k/v stacked,
the output projection, gate/up stacked, the down projection; then the text rows of the head), each
matmul timed on its own but run back to back as in a step, so that a weight comes from memory, not
from the cache its own previous call left warm. The three kinds take turns (``timed_interleaved``):
for each row count, milliseconds per pass over the model's layers and over the head, and the ratios.
Appends the table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
import torch.nn.functional as F
from common import append_results, timed_interleaved

from chameleon_lm import ChameleonConfig
from chameleon_lm.generation.packed import BATCH_HINT
from chameleon_lm.model.decode_attention import cpu_kernel

TEXT_HEAD_ROWS = 56_316  # the text rows of the 65,536-row head (the engine's text steps)


def shapes(config: ChameleonConfig) -> list[tuple[int, int]]:
    qkv = (config.n_heads + 2 * config.kv_heads) * config.head_dim
    layer = [(qkv, config.dim), (config.dim, config.n_heads * config.head_dim),
             (2 * config.ffn_dim, config.dim), (config.dim, config.ffn_dim)]
    return layer * config.n_layers + [(TEXT_HEAD_ROWS, config.dim)]


def one_pass(ws: list[torch.Tensor], packed: list[torch.Tensor], fn, xs: dict[int, torch.Tensor],
             out: list[list[float]]) -> None:
    """One pass over the model's matmuls, each timed on its own; appends the seconds to ``out``."""
    ts = []
    for w, p in zip(ws, packed):
        t0 = time.perf_counter()
        fn(xs[w.shape[1]], p, w.shape[0])
        ts.append(time.perf_counter() - t0)
    out.append(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 96, 512])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    if not cpu_kernel() or torch.ops.chameleon_lm.panel_width() == 0:
        raise SystemExit("the panel kernel is not built here (no C++ compiler, or no AVX2)")
    config = ChameleonConfig.preset(args.preset)
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, k, generator=g) * 0.02 for n, k in shapes(config)]
    kinds = {
        "panels": ([torch.ops.chameleon_lm.pack_panels(w) for w in ws],
                   lambda x, p, n: torch.ops.chameleon_lm.panel_linear(x, p, n)),
        "oneDNN": ([torch.ops.mkldnn._reorder_linear_weight(w, BATCH_HINT) for w in ws],
                   lambda x, p, n: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")),
        "MKL": (ws, lambda x, w, n: F.linear(x, w)),
    }
    lines = [("| rows | layers: panels / oneDNN / MKL (ms) | head: panels / oneDNN / MKL (ms) | "
              "panels vs oneDNN (layers, head) | panels vs MKL (layers, head) |"), "| --- | --- | --- | --- | --- |"]
    for rows in args.rows:
        xs = {k: torch.randn(rows, k, generator=g) for k in {w.shape[1] for w in ws}}
        passes: dict[str, list[list[float]]] = {k: [] for k in kinds}
        warmup = 2
        timed_interleaved({k: functools.partial(one_pass, ws, *kinds[k], xs, passes[k]) for k in kinds},
                          warmup=warmup, repeat=args.repeat)
        layers = {k: [sum(ts[:-1]) for ts in v[warmup:]] for k, v in passes.items()}
        head = {k: [ts[-1] for ts in v[warmup:]] for k, v in passes.items()}
        med = {k: (sorted(layers[k])[len(layers[k]) // 2] * 1e3, sorted(head[k])[len(head[k]) // 2] * 1e3)
               for k in kinds}
        p, o, m = med["panels"], med["oneDNN"], med["MKL"]
        lines.append(f"| {rows} | {p[0]:.2f} / {o[0]:.2f} / {m[0]:.2f} | {p[1]:.2f} / {o[1]:.2f} / {m[1]:.2f} | "
                     f"{o[0] / p[0]:.2f}×, {o[1] / p[1]:.2f}× | {m[0] / p[0]:.2f}×, {m[1] / p[1]:.2f}× |")
        print(lines[-1], flush=True)
    body = (f"`{args.preset}` preset's fp32 weights ({len(ws) - 1} layer matmuls, then the "
            f"{TEXT_HEAD_ROWS:,}-row text head), run back to back as in a decoding step; median of "
            f"{args.repeat} passes, the three kinds taking turns. Ratio > 1: the panel kernel is faster.\n\n"
            + "\n".join(lines))
    print(body)
    append_results("Decoding matmuls (fp32): panel kernel vs oneDNN vs MKL", body)


if __name__ == "__main__":
    main()
