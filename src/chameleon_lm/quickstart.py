"""``chameleon quickstart``: the first thing a new user runs.

This version exercises the core end to end without training the model: it writes the built-in shapes
dataset, trains the BPE on its text, builds a small image tokenizer and a tiny model, round-trips an
interleaved document through the one id sequence, and checks incremental decoding against the full
forward. (Training both tokenizers and the model, and generating, come with the end-to-end issue.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from chameleon_lm.data.synth import read_interleaved, write_dataset
from chameleon_lm.documents import Document, DocumentCodec, TextPart
from chameleon_lm.model import Chameleon, ChameleonConfig
from chameleon_lm.tokenizers.image import ImageTokenizer
from chameleon_lm.tokenizers.text import iter_jsonl_texts, train_text_tokenizer
from chameleon_lm.tokenizers.vocab import IMAGE, SPECIAL, TEXT
from chameleon_lm.tokenizers.vqgan import VQGAN, VQGANConfig


def run(out: Path, seed: int = 0) -> dict:
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    data_dir = out / "data"
    write_dataset(data_dir, seed=seed, n_train_pairs=200, n_test_pairs=20, n_interleaved=50,
                  n_interleaved_test=5, n_text=200, overwrite=True)
    print(f"[1/4] shapes dataset written to {data_dir}")

    vq_config = VQGANConfig.preset("shapes-32")
    image_tok = ImageTokenizer(VQGAN(vq_config))
    stories = list(read_interleaved(data_dir / "interleaved" / "train.jsonl"))
    corpus = list(iter_jsonl_texts([data_dir / "text" / "train.jsonl"]))
    corpus += [s for story in stories for s in story.segments if isinstance(s, str)]
    text_tok = train_text_tokenizer(corpus, 1024, codebook_size=vq_config.n_embed)
    text_tok.save(out / "tokenizers")
    image_tok.save(out / "tokenizers")
    print(f"[2/4] BPE trained: {len(text_tok)} ids ({vq_config.n_embed} image codes); "
          f"image tokenizer {vq_config.resolution}px -> {vq_config.num_tokens} codes "
          f"(untrained); both saved to {out / 'tokenizers'}")

    codec = DocumentCodec(text_tok, image_tok)
    doc = Document.of(*stories[0].segments)
    enc = codec.encode(doc, eos=True)
    back = codec.decode(enc.ids)
    same_text = [a.text for a in doc.parts if isinstance(a, TextPart)] == [
        b.text for b in back.parts if isinstance(b, TextPart)]
    if not same_text or not torch.equal(codec.encode(back, eos=True).ids, enc.ids):
        raise RuntimeError("document round trip failed")
    counts = {name: int((enc.modality == c).sum()) for name, c in
              (("text", TEXT), ("image", IMAGE), ("special", SPECIAL))}
    print(f"[3/4] interleaved document -> {len(enc)} ids {counts} -> back to "
          f"{len(back.parts)} parts, identical")

    config = ChameleonConfig.preset("tiny", vocab_size=len(text_tok), max_seq_len=512)
    model = Chameleon(config).eval()
    ids = enc.ids[None]
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, ids.shape[1])
        half = ids.shape[1] // 2
        steps = [model(ids[:, :half], cache)] + [model(ids[:, t : t + 1], cache)
                                                  for t in range(half, ids.shape[1])]
    err = (torch.cat(steps, 1) - full).abs().max().item()
    print(f"[4/4] tiny model ({config.num_params():,} parameters): KV-cache decode vs full "
          f"forward, max |diff| = {err:.2e}")

    summary = {
        "document_tokens": len(enc), "token_counts": counts, "text_vocab": len(text_tok),
        "image_codes_per_image": vq_config.num_tokens, "model_parameters": config.num_params(),
        "kv_cache_max_abs_diff": err, "seconds": round(time.time() - t0, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"done in {summary['seconds']} s; summary in {out / 'summary.json'}")
    return summary


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quickstart", help="the end-to-end demo on the built-in dataset")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=lambda args: run(args.out, args.seed) and 0)
