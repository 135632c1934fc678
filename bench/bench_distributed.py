"""Training throughput and MFU through the real launcher: 1 process vs N FSDP2 processes, same cores.

    python bench/bench_distributed.py                       # CPU: 1 process x 2 threads vs 2 x 1
    python bench/bench_distributed.py --preset small        # a bigger shape
    python bench/bench_distributed.py --device cuda --nproc 1 --preset 1b --precision bf16 \
        --batch 8 --micro 8 --seq 4096                      # one GPU (bf16 MFU)

Each side is ``torchrun -m chameleon_lm train configs/tiny-cpu.toml`` on the built-in data with the
given shape; the figures are medians over the steps after the first ``--skip`` (compilation, warm-up)
of the run's own ``metrics.jsonl``: global tokens/s, tokens/s per device, and MFU (model FLOPs per token
× tokens/s ÷ the device's peak; on CPU the best fp32 matmul rate this script measures at each side's
thread count, passed to both sides as ``peak_tflops``). The baseline is the 1-process run of the
same run of this script; sides take turns.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import append_results

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # model_overrides on top of the config's "tiny"
    "tiny-cpu": {},
    "small": {"dim": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": 8, "ffn_dim": 1376, "max_seq_len": 1024},
    "1b": {"dim": 2048, "n_layers": 16, "n_heads": 16, "n_kv_heads": 16, "ffn_dim": 5504, "max_seq_len": 4096},
}


def run(nproc: int, threads: int, args, out: Path) -> dict:
    overrides = [f"model_overrides.{k}={v}" for k, v in SHAPES[args.preset].items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "chameleon_lm", "train", str(ROOT / "configs" / "tiny-cpu.toml"), f"out_dir={out}",
           f"steps={args.steps}", "ckpt_every=0", "val_every=0", "val_batches=1", f"log_every={args.steps}",
           f"device={args.device}", f"precision={args.precision}", f"batch_size={args.batch}",
           f"micro_batch_size={args.micro}", f"seq_len={args.seq}", f"compile={str(args.compile).lower()}",
           f"activation_checkpointing={str(args.ac).lower()}", *overrides, "--no-progress"]
    if args.peak.get(threads):  # one figure for every side: a per-process measurement is noisy here
        cmd.insert(-1, f"peak_tflops={args.peak[threads] / 1e12}")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-4000:])
    recs = [json.loads(line) for line in (out / "metrics.jsonl").open()][args.skip:]
    med = lambda key: statistics.median(r[key] for r in recs)  # noqa: E731
    return {"tokens_per_s": med("tokens_per_s"), "per_device": med("tokens_per_s_per_device"),
            "mfu": med("mfu"), "loss": recs[-1]["loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(SHAPES), default="tiny-cpu")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2, help="each side runs this many times, taking turns")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--ac", action="store_true")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    args.peak = {}
    if args.device == "cpu":  # the matmul peak of each side's thread count, best of many
        import torch

        from chameleon_lm.training.monitor import measured_matmul_flops

        for n in args.nproc:
            threads = max(cores // n, 1)
            torch.set_num_threads(threads)
            args.peak[threads] = max(measured_matmul_flops(torch.device("cpu"), torch.float32)
                                     for _ in range(10))
        torch.set_num_threads(cores)
    results: dict[int, list[dict]] = {n: [] for n in args.nproc}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for n in args.nproc:
                threads = max(cores // n, 1) if args.device == "cpu" else 1
                results[n].append(run(n, threads, args, Path(tmp) / f"{n}-{r}"))
                print(n, results[n][-1], flush=True)
    best = {n: max(rs, key=lambda x: x["tokens_per_s"]) for n, rs in results.items()}
    base = best[min(args.nproc)]["tokens_per_s"]
    def row(n: int, b: dict) -> str:
        every = ", ".join(f"{x['tokens_per_s']:,.0f}" for x in results[n])
        threads = max(cores // n, 1) if args.device == "cpu" else "-"
        return (f"| {n} | {threads} | {b['tokens_per_s']:,.0f} | {b['per_device']:,.0f} | {b['mfu']:.1%} | "
                f"**{b['tokens_per_s'] / base:.2f}×** | {every} |")

    rows = "\n".join(row(n, b) for n, b in best.items())
    shape = SHAPES[args.preset] or "configs/tiny-cpu.toml's (dim 128, 4 layers)"
    append_results(
        f"Training throughput and MFU, {args.device}, {', '.join(map(str, args.nproc))} processes, "
        f"`{args.preset}` shape",
        f"| processes | threads each | tokens/s (all) | tokens/s per device | MFU | vs {min(args.nproc)} process | "
        f"every round (tokens/s) |\n| --- | --- | --- | --- | --- | --- | --- |\n{rows}\n\n"
        f"Model {shape}; {args.precision}; batch {args.batch} rows × {args.seq} (micro-batch {args.micro} per "
        f"rank); {args.steps} steps, the first {args.skip} dropped, medians; best of {args.rounds} rounds "
        f"(sides taking turns). Several processes: FSDP2 on gloo (CPU) / NCCL; one process: no sharding. "
        f"MFU uses ChameleonConfig.flops_per_token and, on CPU, the best fp32 2048-matmul rate of 10 "
        f"measured by this script at each side's thread count: "
        f"{', '.join(f'{t} thread(s) {p / 1e9:.0f} GFLOP/s' for t, p in args.peak.items())}.")


if __name__ == "__main__":
    main()
