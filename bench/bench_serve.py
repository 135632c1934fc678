"""Serving throughput and latency against any OpenAI-compatible server (ours, vLLM, ...).

    python bench/bench_serve.py --url http://127.0.0.1:8100 [--concurrency 1 8 32] [--max-tokens 128]
    python bench/bench_serve.py --url http://127.0.0.1:8000 --images 5       # our server only

Text mode: for each concurrency level C, C streaming requests start together, each with the same
fixed prompt (``--prompt``, about 16 tokens with the benchmark models' tokenizers), ``max_tokens`` N
and ``"min_tokens": N, "ignore_eos": true`` (so every request generates exactly N tokens; vLLM and our
server accept both), plus ``stream_options.include_usage`` for the exact token count. Per request it
measures the time to first token (TTFT: the first chunk with non-empty text) and the completion tokens
(the usage chunk, else the number of content chunks). The level's throughput is all completion tokens
divided by the level's wall time (first request sent to last stream closed); with ``--repeat R`` the
level runs R times and the median run is reported (TTFT pooled over all runs). One short warm-up
request (``--warmup``) runs before the first level.

Images mode (``--images N``): N sequential ``POST /v1/images/generations`` with
``{"prompt", "n": 1, "response_format": "b64_json"}``; reports seconds per image.

``--json-out FILE`` appends one JSON line per level (label, url, level, tok/s, TTFT mean/p50, ...).
The client runs on the same cores as a local server and takes some CPU of its own (one JSON parse
per streamed chunk); it is the same for every server measured. It uses ``aiohttp`` (as vLLM's own
serving benchmark does): about a third of the CPU per streamed token that ``httpx`` took, CPU the
server under test gets back (bench/RESULTS.md). Only ``aiohttp`` is needed (no vllm).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

DEFAULT_PROMPT = "Tell me a story about a small lizard"


@dataclass
class Result:
    ttft: float | None = None
    """Seconds from sending the request to the first chunk with text."""
    total: float = 0.0
    """Seconds from sending the request to the end of its stream."""
    tokens: int = 0
    chunks: int = 0
    prompt_tokens: int | None = None
    error: str | None = None


def base_url(url: str) -> str:
    """``http://host:port`` or ``.../v1`` -> the ``.../v1`` root."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def request_body(args: argparse.Namespace, max_tokens: int) -> dict:
    body = {"model": args.model, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": args.temperature,
            "top_p": args.top_p, "repetition_penalty": args.repetition_penalty}
    if not args.no_ignore_eos:
        body |= {"min_tokens": max_tokens, "ignore_eos": True}
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": args.prompt}]
    else:
        body["prompt"] = args.prompt
    return body


async def stream_one(session: aiohttp.ClientSession, url: str, body: dict, endpoint: str) -> Result:
    r = Result()
    t0 = time.perf_counter()
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                r.error = f"HTTP {resp.status}: {(await resp.read()).decode(errors='replace')[:300]}"
                return r
            usage = None
            async for line in resp.content:  # one SSE line at a time
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content") if endpoint == "chat" \
                        else choice.get("text")
                    if text:
                        if r.ttft is None:
                            r.ttft = time.perf_counter() - t0
                        r.chunks += 1
            r.total = time.perf_counter() - t0
            if usage and usage.get("completion_tokens") is not None:
                r.tokens = int(usage["completion_tokens"])
                r.prompt_tokens = usage.get("prompt_tokens")
            else:
                r.tokens = r.chunks
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
        r.error = f"{type(e).__name__}: {e}"
    return r


async def run_level(client: aiohttp.ClientSession, url: str, args: argparse.Namespace, level: int
                    ) -> tuple[float, list[Result]]:
    body = request_body(args, args.max_tokens)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(stream_one(client, url, body, args.endpoint) for _ in range(level)))
    return time.perf_counter() - t0, list(results)


def _session(args: argparse.Namespace) -> aiohttp.ClientSession:
    # a fresh connection per request (no keep-alive), as every concurrent stream opens its own
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                 timeout=aiohttp.ClientTimeout(total=args.timeout, sock_connect=30.0))


async def text_bench(args: argparse.Namespace) -> list[dict]:
    api = base_url(args.url)
    url = f"{api}/{'chat/completions' if args.endpoint == 'chat' else 'completions'}"
    rows = []
    async with _session(args) as client:
        if args.model is None:
            async with client.get(f"{api}/models", raise_for_status=True) as resp:
                args.model = (await resp.json())["data"][0]["id"]
        for _ in range(args.warmup):
            w = await stream_one(client, url, request_body(args, 8), args.endpoint)
            if w.error:
                raise SystemExit(f"warm-up request failed: {w.error}")
        print(f"# {args.label or ''} {url} model={args.model} endpoint={args.endpoint} "
              f"max_tokens={args.max_tokens} repeat={args.repeat}", flush=True)
        print("| concurrency | tok/s | TTFT mean s | TTFT p50 s | TTFT max s | per-request tok/s "
              "| tokens | wall s | errors |", flush=True)
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
        for level in args.concurrency:
            runs = [await run_level(client, url, args, level) for _ in range(args.repeat)]
            rates = [sum(r.tokens for r in res) / wall for wall, res in runs]
            mid = sorted(range(len(runs)), key=lambda i: rates[i])[len(runs) // 2]
            wall, res = runs[mid]
            every = [r for _, rr in runs for r in rr]
            ok = [r for r in every if r.error is None]
            errors = [r.error for r in every if r.error is not None]
            ttfts = [r.ttft for r in ok if r.ttft is not None]
            per_req = [(r.tokens - 1) / (r.total - r.ttft) for r in ok
                       if r.ttft is not None and r.tokens > 1 and r.total > r.ttft]
            short = sum(1 for r in ok if r.tokens != args.max_tokens)
            row = {
                "label": args.label, "url": args.url, "model": args.model, "endpoint": args.endpoint,
                "level": level, "max_tokens": args.max_tokens, "repeat": args.repeat,
                "tok_s": rates[mid], "tok_s_runs": rates,
                "ttft_mean_s": statistics.fmean(ttfts) if ttfts else None,
                "ttft_p50_s": percentile(ttfts, 0.5), "ttft_max_s": max(ttfts) if ttfts else None,
                "decode_tok_s_per_request_mean": statistics.fmean(per_req) if per_req else None,
                "completion_tokens": sum(r.tokens for r in res), "wall_s": wall,
                "prompt_tokens": next((r.prompt_tokens for r in ok if r.prompt_tokens is not None), None),
                "requests_short": short, "errors": len(errors), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            rows.append(row)

            def f(x, spec=".3f"):
                return "-" if x is None else format(x, spec)

            print(f"| {level} | {row['tok_s']:,.1f} | {f(row['ttft_mean_s'])} | {f(row['ttft_p50_s'])} | "
                  f"{f(row['ttft_max_s'])} | {f(row['decode_tok_s_per_request_mean'], ',.1f')} | "
                  f"{row['completion_tokens']} | {wall:.2f} | {len(errors)} |", flush=True)
            if errors:
                print(f"  first error: {errors[0]}", file=sys.stderr, flush=True)
            if short:
                print(f"  {short} request(s) did not return exactly {args.max_tokens} tokens "
                      "(min_tokens/ignore_eos not honoured?)", file=sys.stderr, flush=True)
    return rows


async def image_bench(args: argparse.Namespace) -> list[dict]:
    api = base_url(args.url)
    url = f"{api}/images/generations"
    times, errors = [], []
    async with _session(args) as client:
        for i in range(args.images):
            body = {"prompt": args.image_prompt, "n": 1, "response_format": "b64_json"}
            if args.model is not None:
                body["model"] = args.model
            t0 = time.perf_counter()
            try:
                async with client.post(url, json=body, raise_for_status=True) as resp:
                    payload = await resp.json()
                dt = time.perf_counter() - t0
                data = base64.b64decode(payload["data"][0]["b64_json"])
                if not data:
                    raise ValueError("empty image")
            except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, IndexError, ValueError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                print(f"image {i}: {errors[-1]}", file=sys.stderr, flush=True)
                continue
            times.append(dt)
            print(f"image {i}: {dt:.2f} s ({len(data):,} bytes)", flush=True)
    row = {"label": args.label, "url": args.url, "model": args.model, "level": "images",
           "images": len(times), "s_per_image_mean": statistics.fmean(times) if times else None,
           "s_per_image_p50": percentile(times, 0.5), "s_per_image_runs": times, "errors": len(errors),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if times:
        print(f"{len(times)} images: {row['s_per_image_mean']:.2f} s/image mean, "
              f"{row['s_per_image_p50']:.2f} s p50; {len(errors)} errors", flush=True)
    else:
        print(f"no image generated ({len(errors)} errors)", flush=True)
    return [row]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="server root or its /v1 root")
    ap.add_argument("--model", help="model name to send (default: the first of /v1/models)")
    ap.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=1, help="runs per level (the median run is reported)")
    ap.add_argument("--warmup", type=int, default=1, help="short requests before the first level")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--repetition-penalty", type=float, default=1.0,
                    help="sent explicitly: vLLM's default is 1.0, ours Meta's 1.2")
    ap.add_argument("--no-ignore-eos", action="store_true",
                    help="do not send min_tokens/ignore_eos (for servers that reject them)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per request")
    ap.add_argument("--label", default="")
    ap.add_argument("--json-out", type=Path, help="append one JSON line per level")
    ap.add_argument("--images", type=int, metavar="N", help="image mode: N sequential generations")
    ap.add_argument("--image-prompt", default="A red circle on a grey background.")
    args = ap.parse_args(argv)
    if any(c < 1 for c in args.concurrency) or args.max_tokens < 1 or args.repeat < 1:
        ap.error("--concurrency, --max-tokens and --repeat must be positive")
    rows = asyncio.run(image_bench(args) if args.images else text_bench(args))
    if args.json_out:
        with args.json_out.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
