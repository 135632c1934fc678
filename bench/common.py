"""Shared helpers of the hand-run benchmarks: timing, machine facts, and RESULTS.md."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    alloc = "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "glibc malloc"
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {gpu}; "
            f"allocator {alloc}; CPU capability {torch.backends.cpu.get_cpu_capability()}")


def versions() -> str:
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, cwd=Path(__file__).parent).stdout.strip()
    return (f"python {platform.python_version()}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, chameleon-lm commit {commit}{'+dirty' if dirty else ''}")


def timed(fn, warmup: int = 1, repeat: int = 3) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def timed_interleaved(fns: dict[str, object], warmup: int = 1, repeat: int = 5) -> dict[str, float]:
    """Median seconds of each ``fn()``, the functions taking turns (a, b, c, a, b, c, …).

    On a shared (virtual) machine the speed drifts by ±10 % over minutes; taking turns lets every side
    see the same drift, so the ratios hold even where the absolute times move.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name].append(timed(fn, warmup=0, repeat=1))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def matmul_peak(dtype: torch.dtype, n: int = 2048) -> float:
    """Measured FLOP/s of an n×n matmul in ``dtype``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, warmup=2, repeat=5)


def copy_bandwidth(mb: int = 512) -> float:
    """Measured bytes/s of a large tensor copy (read + write counted once each)."""
    src = torch.empty(mb * 2**20 // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), warmup=2, repeat=5)


def append_results(title: str, body: str) -> None:
    header = "" if RESULTS.exists() else (
        "# Benchmark results\n\nWritten by the scripts in `bench/` (run by hand; see each script's "
        "docstring). Ratios are against the named baseline measured in the same run.\n")
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with open(RESULTS, "a") as f:
        f.write(f"{header}\n## {title} ({stamp})\n\n- machine: {machine()}\n- versions: {versions()}\n\n"
                f"{body.strip()}\n")
