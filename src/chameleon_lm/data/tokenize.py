"""``chameleon data tokenize``: a source, through recipes, into memory-mapped token shards.

Each unit of the source (a tar shard, a parquet row group, a slice of a JSONL file) becomes one shard
of each output dataset, so the work runs in parallel over worker processes and a killed run resumes
where it stopped: completed shards are kept, the others are written again, and the result is
byte-identical to an uninterrupted run. Images are decoded and filtered in the worker and encoded by
the VQGAN in batches on the chosen device.

A sample that cannot be used never stops the run: unreadable or truncated images, decompression bombs,
images below the minimum size or beyond the maximum aspect ratio, empty or undecodable text and exact
duplicates are left out, counted by reason in ``index.json`` and listed by key in the shards'
``skipped.jsonl`` (duplicates in ``index.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from chameleon_lm.data.recipes import RecipeConfig, RecipeError, encode_sample
from chameleon_lm.data.shards import (
    ShardWriter, completed_shard, read_docs_jsonl, write_index,
)
from chameleon_lm.data.sources import Skipped, SourceConfig, load_image, open_source
from chameleon_lm.documents import DocumentCodec
from chameleon_lm.tokenizers.image import load_image_tokenizer
from chameleon_lm.tokenizers.images import ImageError
from chameleon_lm.tokenizers.text import load_text_tokenizer
from chameleon_lm.utils.config import Config, read_config_file

RUN_FILE = "tokenize_run.json"
DEDUP = ("none", "sample", "image")


@dataclass
class TokenizeConfig(Config):
    """One tokenization run: a source, the recipes applied to each sample, and where shards go."""

    source: SourceConfig
    """The data (path, brace pattern or URL; format and fields)."""
    out: str
    """Output folder: the token dataset, or one sub-folder per recipe when there are several."""
    tokenizers: str
    """Folder with ``tokenizer.json`` and, for images, ``vqgan.json`` + ``vqgan.safetensors``."""
    recipes: list[RecipeConfig] = field(default_factory=lambda: [RecipeConfig()])
    """The documents each sample gives, one output dataset per recipe."""
    workers: int = 1
    """Worker processes (each takes whole units)."""
    device: str = "cpu"
    """Where the VQGAN encodes images (``cuda`` on a GPU machine)."""
    image_batch: int = 64
    """Images encoded per VQGAN call."""
    min_image_size: int = 0
    """Leave out images whose shorter side has fewer pixels (0: no limit)."""
    max_aspect_ratio: float = 0.0
    """Leave out images whose long side exceeds this many times the short side (0: no limit)."""
    max_image_pixels: int = 89_478_485
    """Images with more pixels are refused as possible decompression bombs (PIL's default)."""
    dedup: str = "sample"
    """Exact-duplicate removal: ``sample`` (same texts and image bytes), ``image`` (same image bytes,
    any text) or ``none``; the first occurrence in unit order is kept."""
    seed: int = 0
    """Seeds each sample's random choices (caption dropout) together with its key."""

    def __post_init__(self) -> None:
        if isinstance(self.source, dict):
            self.source = SourceConfig.from_dict(self.source)
        self.recipes = [RecipeConfig.from_dict(r) if isinstance(r, dict) else r for r in self.recipes]
        if not self.recipes:
            raise ValueError("no recipes")
        names = [r.name for r in self.recipes]
        if len(set(names)) != len(names):
            raise ValueError(f"each recipe may appear once, got {names}")
        if self.dedup not in DEDUP:
            raise ValueError(f"dedup must be one of {DEDUP}, got {self.dedup!r}")
        for name in ("workers", "image_batch", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.min_image_size < 0 or self.max_aspect_ratio < 0:
            raise ValueError("min_image_size and max_aspect_ratio must be >= 0")

    def output_dir(self, recipe: RecipeConfig) -> Path:
        return Path(self.out) if len(self.recipes) == 1 else Path(self.out) / recipe.name


class _SampleError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(folder: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of the tokenizer files, so a resumed run can refuse different tokenizers."""
    folder = Path(folder)
    return {name: _file_sha256(folder / name)
            for name in ("tokenizer.json", "vqgan.json", "vqgan.safetensors") if (folder / name).is_file()}


class _Worker:
    """Everything a process needs to tokenize units: the source, tokenizers and codec."""

    def __init__(self, config: TokenizeConfig):
        self.config = config
        self.source = open_source(config.source)
        self.text = load_text_tokenizer(config.tokenizers)
        self.needs_images = any(r.needs_images for r in config.recipes)
        self.image = None
        if self.needs_images:
            if not (Path(config.tokenizers) / "vqgan.json").is_file():
                raise FileNotFoundError(f"{config.tokenizers}: no vqgan.json (the recipes "
                                        f"{[r.name for r in config.recipes]} need the image tokenizer)")
            self.image = load_image_tokenizer(config.tokenizers)
            self.image.vqgan.to(config.device)
        self.codec = DocumentCodec(self.text, self.image)
        Image.MAX_IMAGE_PIXELS = config.max_image_pixels

    def _decode(self, segments: list, roles: list[str] | None = None) -> tuple[list, str, int]:
        """Segments with images decoded (PIL), the content hash, and the image count."""
        cfg = self.config
        h = hashlib.sha256()
        if roles is not None and cfg.dedup == "sample":
            h.update(b"R" + " ".join(roles).encode() + b"\0")  # the same texts in other turns differ
        out: list = []
        images = 0
        for seg in segments:
            if isinstance(seg, str):
                if cfg.dedup == "sample":
                    h.update(b"T" + seg.encode() + b"\0")
                out.append(seg)
                continue
            images += 1
            raw = seg.data if seg.data is not None else None
            if cfg.dedup != "none":
                if raw is None and seg.path is not None:
                    h.update(b"I" + bytes.fromhex(_file_sha256(seg.path)) + b"\0")
                else:
                    h.update(b"I" + (raw or (seg.url or "").encode()) + b"\0")
            if not self.needs_images:
                out.append(seg)
                continue
            try:
                img = load_image(seg, allow_remote=cfg.source.allow_remote)
            except ImageError as e:
                if isinstance(e.__cause__, FileNotFoundError):
                    raise _SampleError("missing_image", str(e)) from e
                bomb = isinstance(e.__cause__, (Image.DecompressionBombError, Image.DecompressionBombWarning))
                raise _SampleError("decompression_bomb" if bomb else "bad_image", str(e)) from e
            short, long = sorted(img.size)
            if short < cfg.min_image_size:
                raise _SampleError("image_too_small", f"{img.width}x{img.height} < {cfg.min_image_size} px")
            if cfg.max_aspect_ratio and long > cfg.max_aspect_ratio * short:
                raise _SampleError("aspect_ratio", f"{img.width}x{img.height} beyond {cfg.max_aspect_ratio}:1")
            out.append(img)
        return out, h.hexdigest(), images

    def run_unit(self, index: int, unit: str) -> list[dict[str, Any]]:
        """Tokenize one unit into shard ``index`` of every output dataset; their summaries."""
        cfg = self.config
        vocab_size = len(self.text)
        writers = [ShardWriter(cfg.output_dir(r), index, unit, vocab_size) for r in cfg.recipes]
        pending: list[tuple[Any, list, str, int]] = []

        def skip(key: str, reason: str, detail: str) -> None:
            for w in writers:
                w.skip(portable(key), reason, detail)

        unit_name = Path(unit.split("://", 1)[-1]).name

        def portable(key: str) -> str:
            # the unit's file name, not its full path: keys and caption dropout survive moving the data
            return unit_name + key[len(unit):] if key.startswith(unit) else key

        # chat/sft prompts pad their images (the SFT recipe), so the codec encodes those itself
        coded_needed = self.needs_images and not all(r.wants_pixels for r in cfg.recipes)

        def flush() -> None:
            pil = [s for _, segs, _, _ in pending for s in segs if isinstance(s, Image.Image)]
            codes = iter(self.image.encode(pil).cpu()) if pil and coded_needed else iter(())
            for sample, segs, digest, n_images in pending:
                coded = [s if isinstance(s, str) else next(codes) for s in segs] if coded_needed else segs
                for recipe, writer in zip(cfg.recipes, writers):
                    try:
                        enc = encode_sample(self.codec, recipe, segs if recipe.wants_pixels else coded,
                                            portable(sample.key), cfg.seed, sample.roles)
                    except RecipeError as e:
                        writer.skip(portable(sample.key), e.reason, str(e))
                        continue
                    writer.add(enc, portable(sample.key), digest, sample.meta, n_images)
            pending.clear()

        n_pending_images = 0
        for item in self.source.read(unit):
            if isinstance(item, Skipped):
                skip(item.key, item.reason, item.detail)
                continue
            try:
                segs, digest, n_images = self._decode(item.segments, item.roles)
            except _SampleError as e:
                skip(item.key, e.reason, str(e))
                continue
            pending.append((item, segs, digest, n_images))
            n_pending_images += n_images if self.needs_images else 0
            if n_pending_images >= cfg.image_batch or (not self.needs_images and len(pending) >= 1024):
                flush()
                n_pending_images = 0
        flush()
        return [w.close() for w in writers]


_WORKER: _Worker | None = None


def _init_worker(config_dict: dict, threads: int) -> None:
    global _WORKER
    torch.set_num_threads(threads)
    _WORKER = _Worker(TokenizeConfig.from_dict(config_dict))


def _run_unit(index: int, unit: str) -> tuple[int, list[dict[str, Any]]]:
    assert _WORKER is not None
    return index, _WORKER.run_unit(index, unit)


def _dedup(directory: Path, n_shards: int) -> list[int]:
    """Global indices of documents whose content hash appeared earlier (in shard order)."""
    seen: set[str] = set()
    duplicates = []
    g = 0
    for s in range(n_shards):
        for doc in read_docs_jsonl(directory, s):
            if doc["hash"] in seen:
                duplicates.append(g)
            else:
                seen.add(doc["hash"])
            g += 1
    return duplicates


def _check_run_file(config: TokenizeConfig, units: list[str]) -> None:
    """Refuse to resume into a folder made with other settings, tokenizers or units."""
    record = {"config": config.to_dict() | {"out": None, "workers": None, "device": None},
              "tokenizers": tokenizer_fingerprint(config.tokenizers), "units": units}
    Path(config.out).mkdir(parents=True, exist_ok=True)
    path = Path(config.out) / RUN_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if old != record:
            changed = [k for k in record if old.get(k) != record[k]]
            raise ValueError(f"{config.out} was tokenized with different {', '.join(changed)}; "
                             "tokenize into a new folder (or delete this one)")
        return
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def tokenize(config: TokenizeConfig, progress: bool = True, log=print) -> dict[str, Any]:
    """Run (or resume) a tokenization; returns per-recipe indexes and throughput figures."""
    t0 = time.perf_counter()
    source = open_source(config.source)
    units = source.units()
    if not units:
        raise ValueError(f"{config.source.path}: the source has no data")
    _check_run_file(config, units)
    done: dict[int, list[dict]] = {}
    for i, unit in enumerate(units):
        summaries = [completed_shard(config.output_dir(r), i, unit) for r in config.recipes]
        if all(s is not None for s in summaries):
            done[i] = summaries
    todo = [(i, u) for i, u in enumerate(units) if i not in done]
    log(f"tokenizing {len(todo)} of {len(units)} units of {config.source.path} "
        f"({len(done)} already done) with {min(config.workers, max(len(todo), 1))} worker(s)")
    bar = tqdm(total=len(units), initial=len(done), disable=not progress, desc="tokenize", unit="unit")
    if config.workers == 1 or len(todo) <= 1:
        worker = _Worker(config) if todo else None
        for i, unit in todo:
            done[i] = worker.run_unit(i, unit)
            bar.update(1)
    else:
        threads = max(1, (os.cpu_count() or 1) // config.workers)
        with ProcessPoolExecutor(config.workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(config.to_dict(), threads)) as pool:
            for fut in as_completed([pool.submit(_run_unit, i, u) for i, u in todo]):
                i, summaries = fut.result()
                done[i] = summaries
                bar.update(1)
    bar.close()

    text_vocab = len(load_text_tokenizer(config.tokenizers))
    info_base = {"source": config.source.to_dict(), "tokenizers": tokenizer_fingerprint(config.tokenizers),
                 "min_image_size": config.min_image_size, "max_aspect_ratio": config.max_aspect_ratio,
                 "max_image_pixels": config.max_image_pixels, "dedup": config.dedup, "seed": config.seed}
    indexes = {}
    for r_i, recipe in enumerate(config.recipes):
        directory = config.output_dir(recipe)
        shards = [done[i][r_i] for i in range(len(units))]
        duplicates = _dedup(directory, len(units)) if config.dedup != "none" else []
        indexes[recipe.name] = write_index(directory, shards, vocab_size=text_vocab,
                                           info={**info_base, "recipe": recipe.to_dict()},
                                           duplicates=duplicates)
    seconds = time.perf_counter() - t0
    first = next(iter(indexes.values()))["summary"]
    tokens = sum(ix["summary"]["tokens_written"] for ix in indexes.values())
    stats = {"units": len(units), "units_run": len(todo), "seconds": round(seconds, 2),
             "images": first["images"], "tokens": tokens,
             "images_per_s": first["images"] / seconds, "tokens_per_s": tokens / seconds}
    for name, ix in indexes.items():
        s = ix["summary"]
        mod = s["tokens_by_modality"]
        skipped = ", ".join(f"{k} {v}" for k, v in s["skipped"].items()) or "none"
        log(f"{config.output_dir(next(r for r in config.recipes if r.name == name))}: {s['documents']:,} "
            f"documents, {s['tokens_written']:,} tokens (text {mod['text']:,}, image {mod['image']:,}, "
            f"special {mod['special']:,}), {s['images']:,} images; duplicates removed "
            f"{s['duplicates_removed']}; skipped: {skipped}")
    log(f"done in {seconds:.1f} s ({stats['images_per_s']:.1f} images/s, {stats['tokens_per_s']:,.0f} tokens/s)")
    return {"indexes": indexes, "stats": stats}


# --------------------------------------------------------------------------------------------- CLI


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``tokenize`` (``chameleon data tokenize``)."""
    p = subparsers.add_parser(
        "tokenize", help="tokenize a source into token shards",
        description="Tokenize a source (WebDataset shards, img2dataset folders, parquet, JSONL) with "
                    "one or more recipes into memory-mapped token shards; resumable.")
    p.add_argument("--config", type=Path, help="a .toml/.yaml/.json TokenizeConfig (flags override it)")
    p.add_argument("--data", help="the source: path, glob, brace pattern or URL")
    p.add_argument("--format", choices=("auto", "webdataset", "files", "parquet", "jsonl"))
    p.add_argument("--kind", choices=("auto", "pairs", "text", "interleaved", "messages"))
    p.add_argument("--text-field", help="text field of text JSONL/parquet (default text)")
    p.add_argument("--caption-field", help="caption field/column (default caption)")
    p.add_argument("--recipe", action="append", metavar="NAME",
                   help="caption-image, image-caption, interleaved, text, chat or sft (repeat for several)")
    p.add_argument("--caption-dropout", type=float, help="caption-image: share of captions dropped")
    p.add_argument("--augment", type=float, help="sft: image crop jitter (share of each side, e.g. 0.1)")
    p.add_argument("--tokenizers", help="folder with tokenizer.json (+ vqgan.json/.safetensors)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--workers", type=int)
    p.add_argument("--device")
    p.add_argument("--image-batch", type=int)
    p.add_argument("--min-image-size", type=int)
    p.add_argument("--max-aspect-ratio", type=float)
    p.add_argument("--dedup", choices=DEDUP)
    p.add_argument("--seed", type=int)
    p.add_argument("--allow-remote", action="store_true", help="fetch http(s) images of interleaved data")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_cli)
    return p


def config_from_args(args: argparse.Namespace) -> TokenizeConfig:
    data: dict[str, Any] = read_config_file(args.config) if args.config else {}
    source = dict(data.get("source", {}))
    for flag, key in (("data", "path"), ("format", "format"), ("kind", "kind"),
                      ("text_field", "text_field"), ("caption_field", "caption_field")):
        if getattr(args, flag) is not None:
            source[key] = getattr(args, flag)
    if args.allow_remote:
        source["allow_remote"] = True
    if "path" not in source:
        raise ValueError("no source: give --data (or source.path in --config)")
    data["source"] = source
    if args.recipe:
        data["recipes"] = [{"name": n} for n in args.recipe]
    if args.caption_dropout is not None:
        recipes = data.get("recipes") or [{"name": "caption-image"}]
        for r in recipes:
            if r.get("name", "caption-image") == "caption-image":
                r["caption_dropout"] = args.caption_dropout
        data["recipes"] = recipes
    if args.augment is not None:
        sft = [r for r in data.get("recipes") or [] if r.get("name") == "sft"]
        if not sft:
            raise ValueError("--augment applies to the sft recipe: add --recipe sft")
        for r in sft:
            r["augment"] = args.augment
    for flag in ("tokenizers", "out", "workers", "device", "image_batch", "min_image_size",
                 "max_aspect_ratio", "dedup", "seed"):
        if getattr(args, flag) is not None:
            data[flag] = getattr(args, flag)
    for needed in ("out", "tokenizers"):
        if needed not in data:
            raise ValueError(f"--{needed} is required")
    return TokenizeConfig.from_dict(data)


def run_cli(args: argparse.Namespace) -> int:
    tokenize(config_from_args(args), progress=not args.no_progress)
    return 0
