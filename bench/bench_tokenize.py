"""`chameleon data tokenize` throughput: images/s and tokens/s with 1 and 2 worker processes.

    python bench/bench_tokenize.py [--pairs 4000] [--shard-size 500] [--repeat 2] [--official] [--no-write]

Writes the shapes world's training pairs (WebDataset tar shards of 32-px PNGs + captions, one unit per
shard) into a temp folder, makes the quickstart's tokenizers (the ``shapes-32`` VQGAN with
the overrides of configs/quickstart/vq.toml: patch encoder, 8x8 = 64 codes of 512; a 2,048-id BPE trained on the
captions) and tokenizes the shards with the caption-image (caption dropout 0.1) and image-caption
recipes, as `chameleon data tokenize` does. workers=1 and workers=2 take turns (1, 2, 1, 2, ...), each
run into a fresh output folder, and each figure is the median over ``--repeat`` runs of tokenize()'s own
stats (wall time of the whole call: worker start, tokenizer loading and index writing included).
The VQGAN keeps its random initial weights: throughput does not depend on the weights (the same layers
do the same work on any values), only which codes come out does.

``--official`` also measures the official-size taming VQGAN (``VQGANConfig.preset("chameleon")``: 512 px
-> 32x32 = 1024 codes of 8192, 69 M parameters), what real users run, on ``--official-images``
shapes-world pictures drawn at 512 px, with a BPE in the official 65,536-id layout (the captions fill
fewer). On 2 CPU cores one such image takes ~6 s, so the default 64 images cost ~25 minutes.
Appends the figures to bench/RESULTS.md unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
from common import append_results

from chameleon_lm.data.recipes import RecipeConfig
from chameleon_lm.data.sources import SourceConfig
from chameleon_lm.data.synth import read_pairs, write_dataset
from chameleon_lm.data.tokenize import TokenizeConfig, tokenize
from chameleon_lm.quickstart import CONFIGS
from chameleon_lm.utils.config import read_config_file
from chameleon_lm.tokenizers.image import ImageTokenizer
from chameleon_lm.tokenizers.text import train_text_tokenizer
from chameleon_lm.tokenizers.vqgan import VQGAN, VQGANConfig

WORKERS = (1, 2)


def make_case(root: Path, pairs: int, shard_size: int, image_size: int, vq: VQGANConfig, bpe_vocab: int
              ) -> tuple[str, Path]:
    """Write the pairs and the tokenizers under ``root``; the source pattern and the tokenizer folder."""
    write_dataset(root / "data", image_size=image_size, n_train_pairs=pairs, n_test_pairs=0, n_interleaved=0,
                  n_interleaved_test=0, n_text=0, shard_size=shard_size)
    shards = sorted(str(p) for p in (root / "data" / "pairs").glob("train-*.tar"))
    torch.manual_seed(0)
    ImageTokenizer(VQGAN(vq)).save(root / "tokenizers")  # random weights: same work as trained ones
    captions = [c for _, c, _ in read_pairs(shards)]
    train_text_tokenizer(captions, bpe_vocab, codebook_size=vq.n_embed).save(root / "tokenizers")
    return str(root / "data" / "pairs" / "train-*.tar"), root / "tokenizers"


def measure(name: str, root: Path, source: str, tokenizers: Path, repeat: int) -> tuple[list[str], dict]:
    """Table rows for ``name`` (median of each side, turns taken) and the last run's result."""
    runs: dict[int, list[dict]] = {w: [] for w in WORKERS}
    result: dict = {}
    for rep in range(repeat):
        for w in WORKERS:
            out = root / f"out-w{w}-{rep}"
            cfg = TokenizeConfig(source=SourceConfig(path=source), out=str(out), tokenizers=str(tokenizers),
                                 recipes=[RecipeConfig("caption-image", caption_dropout=0.1),
                                          RecipeConfig("image-caption")], workers=w)
            result = tokenize(cfg, progress=False, log=lambda *a: None)
            runs[w].append(result["stats"])
            print(f"  {name}, workers={w}, run {rep + 1}: {result['stats']['seconds']} s, "
                  f"{result['stats']['images_per_s']:.3g} images/s", flush=True)
            shutil.rmtree(out)
    med = {w: {k: statistics.median(s[k] for s in runs[w]) for k in ("images_per_s", "tokens_per_s")}
           for w in WORKERS}
    rows = [f"| {name} | {w} | {med[w]['images_per_s']:.3g} | {med[w]['tokens_per_s']:,.0f} | "
            f"{'**' if w > 1 else ''}{med[w]['images_per_s'] / med[1]['images_per_s']:.2f}×"
            f"{'**' if w > 1 else ''} |" for w in WORKERS]
    return rows, result


def summary(name: str, result: dict) -> list[str]:
    lines = []
    for recipe, ix in result["indexes"].items():
        s = ix["summary"]
        mod = s["tokens_by_modality"]
        lines.append(f"- {name}, {recipe}: {s['documents']:,} documents, {s['tokens_written']:,} tokens "
                     f"(text {mod['text']:,}, image {mod['image']:,}, special {mod['special']:,})")
    return lines


QUICKSTART_VQ = read_config_file(Path(str(CONFIGS / "vq.toml")))["vq_overrides"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=4000, help="shapes-world training pairs")
    ap.add_argument("--shard-size", type=int, default=500, help="pairs per tar shard (= per unit)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per worker count (median), taken in turns")
    ap.add_argument("--official", action="store_true", help="also the official-size 512-px taming VQGAN")
    ap.add_argument("--official-images", type=int, default=64, help="images of the --official case")
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = ap.parse_args()
    cases = [("quickstart shapes-32, 32 px", args.pairs, args.shard_size, 32,
              VQGANConfig.preset("shapes-32", **QUICKSTART_VQ), 2048)]
    if args.official:  # 4 units, so that both workers have work
        cases.append(("official chameleon, 512 px", args.official_images, math.ceil(args.official_images / 4),
                      512, VQGANConfig.preset("chameleon"), 65536))
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="bench_tokenize_") as tmp:
        for i, (name, pairs, shard_size, size, vq, bpe) in enumerate(cases):
            root = Path(tmp) / f"case{i}"
            source, tokenizers = make_case(root, pairs, shard_size, size, vq, bpe)
            case_rows, result = measure(name, root, source, tokenizers, args.repeat)
            rows += case_rows
            units = result["stats"]["units"]
            notes += summary(name, result)
            notes.append(f"- {name}: {pairs:,} pairs in {units} units of {shard_size}; VQGAN "
                         f"{vq.num_tokens} codes of {vq.n_embed}, {vq.encoder} encoder; BPE "
                         f"{bpe:,} ids requested")
    threads = (f"- torch threads per worker: workers=1 tokenizes in the calling process "
               f"({torch.get_num_threads()} threads); workers=2 spawns 2 processes of "
               f"max(1, {os.cpu_count()} cores // 2) = {max(1, (os.cpu_count() or 1) // 2)} threads each")
    table = ("| VQGAN | workers | images/s | tokens/s (both recipes) | images/s vs 1 worker |\n"
             "| --- | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n")
    body = (f"{table}\nMedian of {args.repeat} runs each, the worker counts taking turns; recipes "
            f"caption-image (caption dropout 0.1) + image-caption; random VQGAN weights.\n\n"
            + "\n".join(notes + [threads]) + "\n")
    print("\n" + body)
    if not args.no_write:
        append_results(f"Tokenize throughput, shapes world, workers {' vs '.join(map(str, WORKERS))}", body)


if __name__ == "__main__":
    main()
