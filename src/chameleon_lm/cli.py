"""The ``chameleon`` console script: one entry point, one subcommand per stage."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chameleon", description="chameleon-lm: early-fusion mixed-modal models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from chameleon_lm.data import synth, tokenize

    data = sub.add_parser("data", help="datasets").add_subparsers(
        dest="data_command", required=True, metavar="DATA_COMMAND"
    )
    synth.add_cli(data)
    tokenize.add_cli(data)

    from chameleon_lm import quickstart
    from chameleon_lm.checkpoints import convert
    from chameleon_lm.eval import cli as eval_cli
    from chameleon_lm.generation import cli as generation_cli
    from chameleon_lm.serve import cli as serve_cli
    from chameleon_lm.training import cli as training_cli
    from chameleon_lm.training import memory
    from chameleon_lm.training.vqgan import cli as vqgan_cli

    tokenizer = training_cli.add_cli(sub)
    vqgan_cli.add_cli(tokenizer)
    memory.add_cli(sub)
    generation_cli.add_cli(sub)
    serve_cli.add_cli(sub)
    convert.add_cli(sub)
    eval_cli.add_cli(sub)
    quickstart.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"chameleon: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
