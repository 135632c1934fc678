"""``data = "builtin:shapes"``: a small tokenized shapes world, prepared once and cached.

A config that names the built-in data (and ``tokenizers = "builtin:shapes"``) trains with no other step:
the first run prepares it with the same ``chameleon`` commands a user runs (``data synth``, ``tokenizer
train-image`` / ``train-text``, ``data tokenize``), at a size that takes about a minute on two cores,
into ``$CHAMELEON_CACHE/builtin/shapes-v1`` (default ``~/.cache/chameleon_lm``). Concurrent runs (the
ranks of a torchrun job, two jobs) take a file lock; the folder appears complete or not at all.
It is for smoke tests and scale-out checks; the quickstart trains the larger version of the same world.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
from importlib import resources
from pathlib import Path

BUILTIN = "builtin:shapes"
VERSION = "shapes-v1"
SOURCES = {"caption-image": ("tokens/pairs/caption-image", 10), "image-caption": ("tokens/pairs/image-caption", 10),
           "stories": ("tokens/stories", 1), "text": ("tokens/text", 1)}
VAL = {"caption-image": "tokens/val/caption-image", "image-caption": "tokens/val/image-caption"}


def cache_root() -> Path:
    return Path(os.environ.get("CHAMELEON_CACHE", Path.home() / ".cache" / "chameleon_lm")) / "builtin"


def _commands(root: Path) -> list[list[str]]:
    d, tok = root / "data", root / "tokenizers"
    pairs = lambda split: str(d / "pairs" / f"{split}-*.tar")  # noqa: E731
    vq = str(resources.files("chameleon_lm") / "configs" / "quickstart" / "vq.toml")
    tokenize = ["data", "tokenize", "--tokenizers", str(tok), "--workers", "1", "--seed", "0", "--no-progress"]
    return [
        ["data", "synth", "--out", str(d), "--seed", "0", "--sizes", "medium", "large", "--backgrounds", "grey",
         "--train-pairs", "2000", "--test-pairs", "64", "--interleaved", "200", "--interleaved-test", "10",
         "--text-docs", "200", "--overwrite"],
        ["tokenizer", "train-image", "--config", vq, "--data", pairs("train"), "--out", str(tok), "--seed", "0",
         "--steps", "150", "--no-progress"],
        ["tokenizer", "train-text", "--data", str(d / "text" / "train.jsonl"), pairs("train"),
         str(d / "interleaved" / "train.jsonl"), "--out", str(tok), "--vocab-size", "1024",
         "--codebook-size", "512"],
        [*tokenize, "--data", pairs("train"), "--recipe", "caption-image", "--recipe", "image-caption",
         "--caption-dropout", "0.1", "--out", str(root / "tokens" / "pairs")],
        [*tokenize, "--data", str(d / "interleaved" / "train.jsonl"), "--recipe", "interleaved",
         "--out", str(root / "tokens" / "stories")],
        [*tokenize, "--data", str(d / "text" / "train.jsonl"), "--recipe", "text",
         "--out", str(root / "tokens" / "text")],
        [*tokenize, "--data", pairs("test_seen"), "--recipe", "caption-image", "--recipe", "image-caption",
         "--out", str(root / "tokens" / "val")],
    ]


def _parser() -> argparse.ArgumentParser:
    from chameleon_lm.data import synth, tokenize
    from chameleon_lm.training import cli as training_cli
    from chameleon_lm.training.vqgan import cli as vqgan_cli

    parser = argparse.ArgumentParser(prog="chameleon")
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data").add_subparsers(dest="data_command", required=True)
    synth.add_cli(data)
    tokenize.add_cli(data)
    vqgan_cli.add_cli(training_cli.add_cli(sub))
    return parser


def prepare_shapes(log=print) -> Path:
    """The prepared built-in data's folder (``tokenizers/``, ``tokens/…``), made on first use."""
    root = cache_root() / VERSION
    if (root / "READY").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be preparing it
        if (root / "READY").is_file():
            return root
        tmp = root.with_name(f"{VERSION}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if log:
            log(f"preparing the built-in shapes data in {root} (once; about a minute)")
        parser = _parser()
        for argv in _commands(tmp):
            args = parser.parse_args(argv)
            if int(args.func(args) or 0):
                raise RuntimeError(f"preparing the built-in data failed at: chameleon {' '.join(argv)}")
        (tmp / "READY").write_text("ok\n")
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    return root


def resolve(config_dict: dict, log=print) -> dict:
    """``config_dict`` (a ``TrainConfig`` as a dict) with ``builtin:shapes`` replaced by real paths:
    ``data`` by the built-in mixture (and ``val`` by its held-out pairs, unless set), ``tokenizers`` by its
    tokenizers. Unchanged when nothing names the built-in data."""
    if BUILTIN not in (config_dict.get("data"), config_dict.get("tokenizers")):
        return config_dict
    root = prepare_shapes(log)
    out = dict(config_dict)
    if out.get("data") == BUILTIN:
        out["data"] = {"sources": [{"name": name, "path": str(root / path), "weight": weight}
                                   for name, (path, weight) in SOURCES.items()]}
        if not out.get("val"):
            out["val"] = {name: str(root / path) for name, path in VAL.items()}
    if out.get("tokenizers") == BUILTIN:
        out["tokenizers"] = str(root / "tokenizers")
    return out
