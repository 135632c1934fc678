"""``chameleon convert SRC DST --to {native,hf,meta}``: any layout in, any layout out.

The weights pass through our convention unchanged (exact permutations only), so round trips are
bit-exact; ``--dtype`` is the one option that changes values.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from chameleon_lm.checkpoints import LAYOUTS, load_model, save_as

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def convert(src: str | Path, dst: str | Path, to: str, *, vqgan: str | Path | None = None,
            dtype: torch.dtype | None = None, **options) -> Path:
    """Load ``src`` (any layout) and write it to the empty or new folder ``dst`` in layout ``to``."""
    dst = Path(dst)
    if to not in LAYOUTS:
        raise ValueError(f"unknown layout {to!r} (one of {', '.join(LAYOUTS)})")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst}: exists and is not an empty folder")
    return save_as(to, dst, load_model(src, dtype=dtype, vqgan=vqgan), **options)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``convert``."""
    p = subparsers.add_parser(
        "convert", help="convert a checkpoint between chameleon-lm's, Hugging Face's and Meta's layouts",
        description="Reads any layout (detected); writes --to into DST, which must be new or empty.",
    )
    p.add_argument("src", type=Path, metavar="SRC", help="a model folder (or Meta's data/ root)")
    p.add_argument("dst", type=Path, metavar="DST")
    p.add_argument("--to", required=True, choices=LAYOUTS)
    p.add_argument("--vqgan", type=Path, metavar="CKPT",
                   help="Meta's vqgan.ckpt: the VQ decoder for a Hugging Face SRC (HF has none)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep)")
    p.add_argument("--shards", type=int, metavar="N",
                   help="--to meta: model-parallel shards (default: the fewest that hold the QK-norm)")
    p.add_argument("--max-shard-gb", type=float, default=5.0,
                   help="--to hf: safetensors shard size (default 5)")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    options = {}
    if args.to == "meta" and args.shards:
        options["model_parallel_size"] = args.shards
    if args.to == "hf":
        options["max_shard_bytes"] = int(args.max_shard_gb * 2**30)
    out = convert(args.src, args.dst, args.to, vqgan=args.vqgan,
                  dtype=DTYPES[args.dtype] if args.dtype else None, **options)
    print(f"wrote {out}")
    return 0
