"""``chameleon tokenizer train-image``: :func:`train_image_tokenizer` on the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from chameleon_lm.tokenizers.vqgan import ENCODERS, VQGANConfig
from chameleon_lm.training.vqgan.config import VQTrainConfig
from chameleon_lm.training.vqgan.loop import train_image_tokenizer
from chameleon_lm.utils.config import read_config_file


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train-image`` (``chameleon tokenizer train-image``) on argparse subparsers."""
    defaults = VQTrainConfig()
    parser = subparsers.add_parser(
        "train-image", help="train the VQGAN image tokenizer",
        description="Train a VQGAN image tokenizer on images streamed from a data source (tar "
                    "shards, a folder of images, parquet or JSONL) and save it (vqgan.json + "
                    "vqgan.safetensors) with its training log, metrics and checkpoints.")
    parser.add_argument("--data", required=True,
                        help="the source: a folder of images, a .tar shard, a brace pattern like "
                             "DIR/pairs/train-{000000..000003}.tar, parquet or JSONL files")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--config", type=Path,
                        help="a .toml/.yaml/.json VQTrainConfig; the flags below override it")
    parser.add_argument("--eval-data", help="images to evaluate on, like --data (default: the "
                                            "first images of --data, held out)")
    parser.add_argument("--preset", choices=VQGANConfig.preset_names(), default=None,
                        help=f"VQGAN architecture preset (default {defaults.vq_preset} with the "
                             f"recommended overrides {defaults.vq_overrides})")
    parser.add_argument("--encoder", choices=ENCODERS, default=None,
                        help="taming (official) or patch (each code sees only its own patch: easier "
                             "codes for a small model; native layout only)")
    parser.add_argument("--steps", type=int, help=f"default {defaults.steps}")
    parser.add_argument("--batch-size", type=int, help=f"default {defaults.batch_size}")
    parser.add_argument("--lr", type=float, help=f"default {defaults.lr}")
    parser.add_argument("--disc-start", type=int,
                        help="steps before the PatchGAN discriminator starts (default "
                             f"{defaults.disc_start}: no discriminator)")
    parser.add_argument("--max-images", type=int,
                        help="train on at most this many images (the first ones of --data)")
    parser.add_argument("--shuffle-buffer", type=int,
                        help=f"images held in the shuffle buffer of the stream (default {defaults.shuffle_buffer})")
    parser.add_argument("--num-workers", type=int,
                        help="threads that decode images (default 0: the main thread)")
    parser.add_argument("--ckpt-every", type=int,
                        help="save a checkpoint every N steps (default 0: only at the end)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in --out")
    parser.add_argument("--seed", type=int, help=f"default {defaults.seed}")
    parser.add_argument("--lpips", default=None,
                        help="local LPIPS weights file (perceptual loss; skipped without one)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_cli)
    return parser


def run_cli(args: argparse.Namespace) -> int:
    """Train with the options of :func:`add_cli` and print the final metrics."""
    if args.max_images is not None and args.max_images <= 0:
        raise ValueError(f"--max-images must be positive, got {args.max_images}")
    config = VQTrainConfig.from_dict(read_config_file(args.config)) if args.config else VQTrainConfig()
    changes: dict[str, Any] = {k: v for k, v in dict(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        lpips_path=args.lpips, disc_start=args.disc_start, max_images=args.max_images,
        shuffle_buffer=args.shuffle_buffer, num_workers=args.num_workers,
        ckpt_every=args.ckpt_every).items() if v is not None}
    if args.preset is not None:  # the default overrides are for the default preset only
        changes.update(vq_preset=args.preset, vq_overrides={})
    if args.encoder is not None:
        changes["vq_overrides"] = {**changes.get("vq_overrides", config.vq_overrides),
                                   "encoder": args.encoder}
    config = config.replace(**changes)
    _, metrics = train_image_tokenizer(args.data, config, out_dir=args.out,
                                       eval_images=args.eval_data, progress=not args.no_progress,
                                       resume=args.resume)
    print(json.dumps(metrics))
    return 0
