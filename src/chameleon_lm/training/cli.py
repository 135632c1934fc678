"""``chameleon train`` and ``chameleon tokenizer train-text``."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from chameleon_lm.data.sources import iter_texts, open_source
from chameleon_lm.tokenizers.text import train_text_tokenizer
from chameleon_lm.training import builtin
from chameleon_lm.training.checkpoint import read_state
from chameleon_lm.training.parallel import shutdown
from chameleon_lm.training.trainer import Trainer, TrainConfig, latest_checkpoint
from chameleon_lm.utils.config import apply_overrides, read_config_file


def load_train_config(spec: str, overrides: list[str]) -> TrainConfig:
    """A config from a file or a preset name, with overrides applied."""
    path = Path(spec)
    if path.suffix in (".toml", ".yaml", ".yml", ".json"):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such config file")
        base = read_config_file(path)
    else:
        base = TrainConfig.preset(spec).to_dict()
    return TrainConfig.from_dict(builtin.resolve(apply_overrides(base, overrides)))


def run_train(args: argparse.Namespace) -> int:
    """One process, or one rank of a torchrun job (every rank runs this)."""
    config = load_train_config(args.config, args.overrides)
    trainer = Trainer.from_config(config)
    say = print if trainer.dist.is_main else (lambda *a, **k: None)
    try:
        if args.resume:
            ckpt = latest_checkpoint(config.out_dir)
            if ckpt is None:
                raise FileNotFoundError(f"{config.out_dir}: no checkpoint to resume from")
            trainer.load_checkpoint(ckpt)
            say(f"resumed from {ckpt} at step {trainer.step}")
        stream = trainer.loader.stream
        sources = ", ".join(f"{name} ({len(ds):,} documents, {ds.num_tokens:,} tokens)"
                            for name, ds in zip(stream.names, stream.datasets))
        say(f"model: {trainer.describe()}; data: {sources}; {config.steps} steps of "
            f"{config.batch_size} x {config.seq_len} tokens ({config.packing})")
        trainer.fit(progress=not args.no_progress)
        last = latest_checkpoint(config.out_dir)
        if last is None or int(read_state(last)["step"]) != trainer.step:  # not saved by fit already
            say(f"saved {trainer.save_checkpoint()}")
        if config.export_dir:
            trainer.export(config.export_dir)
            say(f"exported the model ({config.export_format}) to {config.export_dir}")
    finally:
        shutdown()
    return 0


def run_train_text(args: argparse.Namespace) -> int:
    sources = [open_source(spec, text_field=args.key) for spec in args.data]  # bad paths fail here
    skipped: Counter[str] = Counter()
    count = 0

    def texts() -> Iterator[str]:
        nonlocal count
        for source in sources:
            for text in iter_texts(source, skipped):
                count += 1
                yield text

    tok = train_text_tokenizer(texts(), args.vocab_size, codebook_size=args.codebook_size,
                               num_reserved=args.num_reserved, min_frequency=args.min_frequency,
                               show_progress=True)
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
    if not count:
        raise ValueError(f"no text in {' '.join(args.data)}"
                         + (f" (skipped: {reasons})" if reasons else ""))
    if skipped:
        print(f"skipped {sum(skipped.values())} samples: {reasons}", file=sys.stderr)
    path = tok.save(args.out)
    print(f"wrote {path}: {len(tok)} ids from {count} texts ({tok.vocab.codebook_size} image codes)")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Register ``train`` and ``tokenizer {train-text}``; returns the tokenizer subparsers."""
    p = subparsers.add_parser(
        "train", help="train a model on a mixture of token datasets (under torchrun: every rank)",
        description="Train or fine-tune. One process: chameleon train CONFIG. Several (FSDP2): torchrun "
                    "--nproc-per-node N -m chameleon_lm train CONFIG (add --nnodes/--rdzv-endpoint for "
                    "several machines).")
    p.add_argument("config", help=f"a .toml/.yaml/.json file or a preset ({', '.join(TrainConfig.preset_names())})")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=100 model_overrides.n_layers=4")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train)

    tok = subparsers.add_parser("tokenizer", help="train tokenizers").add_subparsers(
        dest="tokenizer_command", required=True, metavar="TOKENIZER_COMMAND")
    t = tok.add_parser("train-text", help="train the byte-level BPE on the text of data sources")
    t.add_argument("--data", nargs="+", required=True,
                   help="data sources: JSONL or parquet text, tar shards or files folders (captions), "
                        "interleaved documents; files, folders, globs, brace patterns or URLs")
    t.add_argument("--key", default="text", help="the field holding the text of JSONL/parquet text")
    t.add_argument("--out", required=True, help="output folder or .json path")
    t.add_argument("--vocab-size", type=int, default=65536)
    t.add_argument("--codebook-size", type=int, default=8192)
    t.add_argument("--num-reserved", type=int, default=None)
    t.add_argument("--min-frequency", type=int, default=2)
    t.set_defaults(func=run_train_text)
    return tok

