"""``chameleon eval pairs``: text→image and image→text on held-out pairs, judged."""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
from pathlib import Path

from PIL import Image

from chameleon_lm.checkpoints import load_model
from chameleon_lm.data.sources import open_source
from chameleon_lm.documents import DocumentCodec
from chameleon_lm.eval.pairs import evaluate_pairs, load_pairs
from chameleon_lm.eval.shapes_judge import ShapesPairJudge
from chameleon_lm.generation.sampling import GenerationConfig, ImageSampling, TextSampling


def pair_generation_config(seed: int, cfg_text: float, cfg_image: float, temperature: float,
                           top_p: float, max_new_tokens: int = 48) -> GenerationConfig:
    """Greedy captions; sampled, guided images."""
    return GenerationConfig(seed=seed, max_new_tokens=max_new_tokens,
                            text=TextSampling(greedy=True, repetition_penalty=1.0),
                            image=ImageSampling(temperature=temperature, top_p=top_p, cfg_text=cfg_text,
                                                cfg_image=cfg_image))


def run_pairs(args: argparse.Namespace) -> int:
    loaded = load_model(args.model, device=args.device)
    if loaded.image_tokenizer is None:
        raise ValueError(f"{args.model}: the model folder has no image tokenizer")
    codec = DocumentCodec(loaded.text_tokenizer, loaded.image_tokenizer)
    judge = ShapesPairJudge.from_manifest(args.manifest)
    gen = pair_generation_config(args.seed, args.cfg_text, args.cfg_image, args.temperature, args.top_p)
    results, samples = {}, {}
    for name, spec in (kv.split("=", 1) if "=" in kv else (Path(kv).stem, kv) for kv in args.data):
        pairs = load_pairs(open_source(spec), args.limit)
        metrics, samples[name] = evaluate_pairs(loaded.model, codec, pairs, judge, gen)
        results[name] = metrics
        print(f"{name}: text->image {metrics['text_to_image']['all']:.3f}, image->text "
              f"{metrics['image_to_text']['all']:.3f} ({metrics['n_pairs']} pairs; judge on real images "
              f"{metrics['judge_real']['all']:.3f}, on VQ reconstructions "
              f"{metrics['judge_vq_reconstruction']['all']:.3f})")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "samples.html").write_text(samples_page(samples))
        print(f"wrote {out / 'metrics.json'} and {out / 'samples.html'}")
    return 0


def png_data_uri(img: Image.Image, scale: int = 3) -> str:
    buf = io.BytesIO()
    img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def samples_page(samples: dict[str, list[dict]]) -> str:
    """One self-contained HTML page: per set, generated image | real image | captions."""
    sections = []
    for name, items in samples.items():
        cells = "".join(
            f"<figure><img src='{png_data_uri(s['generated_image'])}'><img src='{png_data_uri(s['real_image'])}'>"
            f"<figcaption><b>prompt:</b> {html.escape(s['caption'])}<br><b>caption of the real image:</b> "
            f"{html.escape(s['generated_caption'])}<br><small>{html.escape(' '.join(map(str, s['reference'].values())))}"
            "</small></figcaption></figure>" for s in items)
        sections.append(f"<h2>{html.escape(name)} (left: generated from the prompt, right: the real image, "
                        f"captioned by the model)</h2><div class='grid'>{cells}</div>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>pair samples</title><style>"
            "body{font-family:sans-serif;margin:2em} .grid{display:flex;flex-wrap:wrap;gap:12px}"
            "figure{margin:0;width:220px} figure img{margin-right:4px} figcaption{font-size:12px}"
            f"</style></head><body>{''.join(sections)}</body></html>\n")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser("eval", help="evaluate a model").add_subparsers(
        dest="eval_command", required=True, metavar="EVAL_COMMAND")
    p = ev.add_parser("pairs", help="text->image and image->text on held-out image-caption pairs",
                      description="Draw an image for every caption and caption every image; a judge "
                                  "reads both (the shapes-world judge, from a synth manifest).")
    p.add_argument("--model", required=True, help="model folder (any layout load_model reads)")
    p.add_argument("--data", nargs="+", required=True,
                   help="pair sources, optionally named: seen='DIR/pairs/test_seen-*.tar'")
    p.add_argument("--manifest", required=True, help="the shapes world's manifest.json (or its folder)")
    p.add_argument("--limit", type=int, default=None, help="at most this many pairs per source")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-text", type=float, default=1.5, help="text guidance (Meta's default is 3.0)")
    p.add_argument("--cfg-image", type=float, default=1.0, help="image guidance (Meta's default is 1.2)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="folder for metrics.json and samples.html")
    p.set_defaults(func=run_pairs)
