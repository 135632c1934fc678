"""``chameleon generate``: one prompt (text and optional images) to text, images or both.

Text is printed as it streams; the run writes ``OUT/image_K.png`` for each generated image (when the
model has an image tokenizer) and ``OUT/document.json`` with the parts, the ids and the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Protocol, TextIO

import torch
from chameleon_lm.documents import Document, DocumentCodec, TextPart
from chameleon_lm.generation.engine import Done, ImageComplete, ImageProgress, TextDelta, stream
from chameleon_lm.generation.sampling import MODES, GenerationConfig, ImageSampling, TextSampling
from chameleon_lm.model import Chameleon
from chameleon_lm.tokenizers.images import open_image


class Bundle(Protocol):
    """What generation needs from a loaded model folder (``chameleon_lm.checkpoints.LoadedModel``)."""

    model: Chameleon
    codec: DocumentCodec


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``generate``."""
    p = subparsers.add_parser("generate", help="generate text and/or images from a prompt")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text (after the --image images)")
    p.add_argument("--image", action="append", default=[], type=Path, metavar="FILE",
                   help="a prompt image, placed before the text (repeatable)")
    p.add_argument("--mode", choices=MODES, default="text")
    p.add_argument("--chat", action="store_true",
                   help="end the prompt with the end-of-turn token <reserved08706> (chat/SFT layout)")
    p.add_argument("--seed", type=int, help="sampling seed (default: random, recorded in the JSON)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float, help="text and image temperature (default 0.7)")
    p.add_argument("--top-p", type=float, help="text and image top-p (default 0.9)")
    p.add_argument("--top-k", type=int, help="text and image top-k (default off)")
    p.add_argument("--repetition-penalty", type=float, help="text only (default 1.2)")
    p.add_argument("--cfg-text", type=float, help="image guidance by the full prompt (default 3.0)")
    p.add_argument("--cfg-image", type=float, help="image guidance by the prompt images (default 1.2)")
    p.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    p.set_defaults(func=_cmd_generate)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model`` and ``--vqgan`` (shared by the commands that load a model)."""
    p.add_argument("--model", required=True, type=Path, metavar="DIR",
                   help="a model folder: chameleon-lm's, Hugging Face's, or Meta's data/ or models/<size>/")
    p.add_argument("--vqgan", type=Path, metavar="CKPT",
                   help="Meta's vqgan.ckpt, to decode images with a Hugging Face model (HF has no decoder)")


def _cmd_generate(args: argparse.Namespace) -> int:
    from chameleon_lm.checkpoints import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return run_generate(load_model(args.model, device=device, vqgan=args.vqgan), args)


def config_from_args(args: argparse.Namespace) -> GenerationConfig:
    """Defaults (Meta's) overridden by the options given; a missing seed becomes a random one."""
    names = ("temperature", "top_p", "top_k")
    shared = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.greedy:
        shared["greedy"] = True
    text = {"repetition_penalty": args.repetition_penalty} if args.repetition_penalty is not None else {}
    image = {k: getattr(args, k) for k in ("cfg_text", "cfg_image") if getattr(args, k) is not None}
    config = GenerationConfig(
        mode=args.mode,
        text=TextSampling(**shared, **text),
        image=ImageSampling(**shared, **image),
        seed=args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little"),
    )
    return config.replace(max_new_tokens=args.max_new_tokens) if args.max_new_tokens else config


def prompt_ids(codec: DocumentCodec, text: str, images: list[Path], chat: bool) -> list[int]:
    """``<s>`` + the images + the text (+ end-of-turn when ``chat``)."""
    pictures = [open_image(path) for path in images]  # clear errors on bad files
    ids = codec.encode(Document.of(*pictures, text), bos=True).ids.tolist()
    if chat:
        if codec.vocab.eot_id is None:
            raise ValueError("the tokenizer has no end-of-turn token <reserved08706> (needed by --chat)")
        ids.append(codec.vocab.eot_id)
    return ids


def run_generate(bundle: Bundle, args: argparse.Namespace, stdout: TextIO | None = None) -> int:
    """Generate with an already-loaded model; print the text as it comes and write ``args.out``."""
    stdout = stdout or sys.stdout
    config = config_from_args(args)
    ids = prompt_ids(bundle.codec, args.prompt, args.image, args.chat)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    files: list[str | None] = []
    done: Done | None = None
    for event in stream(bundle.model, bundle.codec, ids, config):
        if isinstance(event, TextDelta):
            print(event.text, end="", file=stdout, flush=True)
        elif isinstance(event, ImageProgress):
            print(f"\r[image {len(files)}: {event.done}/{event.total} codes]", end="", file=sys.stderr,
                  flush=True)
        elif isinstance(event, ImageComplete):
            name = f"image_{len(files)}.png" if event.image is not None else None
            if name is not None:
                event.image.save(out / name)
            files.append(name)
            print(file=sys.stderr)
            print(f"[image: {out / name if name else 'codes only (no VQ decoder)'}]", file=stdout)
        else:
            done = event
    print(file=stdout)
    assert done is not None  # stream always ends with Done
    record = {
        "prompt": args.prompt,
        "prompt_images": [str(p) for p in args.image],
        "chat": args.chat,
        "config": config.to_dict(),
        "prompt_ids": ids,
        "ids": done.ids,
        "parts": _parts_json(done.document, files),
    }
    (out / "document.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out / 'document.json'}", file=stdout)
    return 0


def _parts_json(document: Document, files: list[str | None]) -> list[dict[str, Any]]:
    images = iter(files)
    return [
        {"type": "text", "text": part.text} if isinstance(part, TextPart)
        else {"type": "image", "file": next(images), "codes": part.codes.tolist()}
        for part in document.parts
    ]
