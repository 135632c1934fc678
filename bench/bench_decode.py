"""Decode throughput: chameleon-lm vs Hugging Face transformers, and image-head vs text decoding.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python bench/bench_decode.py

``small`` preset, fp32, 256 new tokens after a 16-token prompt, batch 1 and batch 8. Ours runs the
generation engine's text path (``generate_text``); HF runs ``generate(min_new_tokens=max_new_tokens=256)``
on the same weights. Two settings: greedy (allow-list, no repetition penalty, argmax; HF
``do_sample=False``) and sampled with Meta's text defaults (repetition penalty 1.2, temperature 0.7,
top-p 0.9; HF the same processors, ``top_k=0``). Ours runs with
oneDNN-prepacked weights (``GenerationConfig.cpu_packed_weights``, the default) and, for reference,
without; the three take turns and each figure is a median. The
roofline is the weight bytes read per token divided by the measured copy bandwidth. The image-token
rate uses the engine's restricted head (the 8192 image rows) against the full-vocabulary head, same
batch, no guidance. Appends the figures to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy

import torch
from bench_train import hf_twin
from common import append_results, copy_bandwidth, timed_interleaved

from chameleon_lm import Chameleon, ChameleonConfig
from chameleon_lm.generation.engine import generate_text
from chameleon_lm.generation.packed import PackedMatrix, pack_linears
from chameleon_lm.generation.sampling import GenerationConfig, TextSampling
from chameleon_lm.tokenizers.text import special_tokens
from chameleon_lm.tokenizers.vocab import Vocab


def official_vocab() -> Vocab:
    names = special_tokens(8192, 1024)
    table = {n: i for i, n in enumerate(names)} | {f"t{i}": i for i in range(len(names), 65536)}
    return Vocab.from_names(table)


def decode_steps(model: Chameleon, batch: int, steps: int, head) -> None:
    """``steps`` single-token decode steps with a given output head (greedy)."""
    cache = model.new_cache(batch, steps + 1)
    tok = torch.zeros(batch, 1, dtype=torch.long)
    for _ in range(steps):
        h = model.hidden_states(tok, cache)[:, -1]
        tok = head(h).argmax(-1, keepdim=True)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    ours = Chameleon(ChameleonConfig.preset("small")).eval()
    hf = hf_twin(ours).eval()
    vocab = official_vocab()
    settings = {
        "greedy": (GenerationConfig(max_new_tokens=args.new, text=TextSampling(greedy=True, repetition_penalty=1.0)),
                   dict(do_sample=False)),
        "sampled": (GenerationConfig(max_new_tokens=args.new, text=TextSampling(), seed=0),
                    dict(do_sample=True, temperature=0.7, top_p=0.9, top_k=0, repetition_penalty=1.2)),
    }
    bandwidth = copy_bandwidth()
    weight_bytes = sum(p.numel() * p.element_size() for n, p in ours.named_parameters()
                       if n != "tok_embeddings.weight")  # an embedding lookup reads one row
    unpacked = copy.deepcopy(ours)  # never packed: the engine's packing is a one-time module swap
    rows = []
    for name, (config, hf_kwargs) in settings.items():
        for batch in (1, 8):
            prompts = torch.randint(8200, 65536, (batch, 16))
            # ours stops once every row has sampled </s> (HF's min_new_tokens forbids it): check
            out = generate_text(ours, vocab, prompts.tolist(), config)
            assert all(len(r) == args.new for r in out), "a row sampled </s>: pick another seed"
            plain = config.replace(cpu_packed_weights=False)
            t = timed_interleaved({
                "ours": lambda: generate_text(ours, vocab, prompts.tolist(), config),
                "plain": lambda: generate_text(unpacked, vocab, prompts.tolist(), plain),
                "hf": lambda: hf.generate(input_ids=prompts, max_new_tokens=args.new, min_new_tokens=args.new,
                                          pad_token_id=1, **hf_kwargs),
            }, repeat=args.repeat)
            t_ours, t_hf = t["ours"], t["hf"]
            ours_rate, hf_rate = batch * args.new / t_ours, batch * args.new / t_hf
            roofline = bandwidth / weight_bytes * batch
            rows.append(f"| {name}, batch {batch} | {ours_rate:,.0f} | {batch * args.new / t['plain']:,.0f} | "
                        f"{hf_rate:,.0f} | **{ours_rate / hf_rate:.2f}×** | "
                        f"{roofline:,.0f} ({ours_rate / roofline:.0%}) |")
            print(rows[-1], flush=True)
    image_rows = []
    assert pack_linears(ours), "oneDNN packing is not usable here"
    full_head, image_head = PackedMatrix(ours.output.weight), PackedMatrix(ours.output.weight[4:8196])
    for batch in (1, 8):
        t = timed_interleaved({
            "full": lambda: decode_steps(ours, batch, args.new, full_head),
            "image": lambda: decode_steps(ours, batch, args.new, image_head),
        }, repeat=args.repeat)
        full, img = t["full"], t["image"]
        image_rows.append(f"| batch {batch} | {batch * args.new / full:,.0f} | {batch * args.new / img:,.0f} | "
                          f"**{full / img:.2f}×** |")
        print(image_rows[-1], flush=True)
    append_results(
        f"Decode, `small` preset, fp32, {args.new} new tokens",
        f"Copy bandwidth {bandwidth / 1e9:.1f} GB/s; weights read per token {weight_bytes / 1e6:.0f} MB.\n\n"
        "| mode | ours tok/s | ours, plain weights | HF tok/s | ours / HF | roofline tok/s (ours' share) |\n"
        "| --- | --- | --- | --- | --- | --- |\n"
        + "\n".join(rows) + "\n\nImage-token decode (head restricted to the 8192 image rows) vs the full head:\n\n"
        "| batch | full-head tok/s | image-head tok/s (both packed) | speed-up |\n| --- | --- | --- | --- |\n"
        + "\n".join(image_rows) + "\n",
    )


if __name__ == "__main__":
    main()
