"""``chameleon eval``: prompt sets, answer generation, human evaluation, benchmarks and reports."""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
from pathlib import Path

from PIL import Image

from chameleon_lm.checkpoints import load_model
from chameleon_lm.data.sources import open_source
from chameleon_lm.eval.metrics import write_json
from chameleon_lm.eval.pairs import evaluate_pairs, load_pairs
from chameleon_lm.eval.shapes_judge import ShapesPairJudge, world_from_manifest
from chameleon_lm.generation.sampling import GenerationConfig, ImageSampling, TextSampling


def pair_generation_config(seed: int, cfg_text: float, cfg_image: float, temperature: float,
                           top_p: float, max_new_tokens: int = 48) -> GenerationConfig:
    """Greedy captions; sampled, guided images."""
    return GenerationConfig(seed=seed, max_new_tokens=max_new_tokens,
                            text=TextSampling(greedy=True, repetition_penalty=1.0),
                            image=ImageSampling(temperature=temperature, top_p=top_p, cfg_text=cfg_text,
                                                cfg_image=cfg_image))


def load_judge(spec: str | None, manifest: str | None):
    """The pair judge: the shapes world's (``shapes``, with a manifest) or ``module:factory``, a
    callable returning a :class:`chameleon_lm.eval.pairs.PairJudge` (e.g. a GenEval-style detector)."""
    if spec in (None, "shapes"):
        if manifest is None:
            raise ValueError("the shapes judge needs --manifest (a `chameleon data synth` folder)")
        return ShapesPairJudge.from_manifest(manifest)
    module, sep, attr = spec.partition(":")
    if not sep:
        raise ValueError(f"judge {spec!r}: use 'shapes' or 'module:factory'")
    import importlib

    factory = getattr(importlib.import_module(module), attr, None)
    if factory is None:
        raise ValueError(f"judge {spec!r}: {module} has no {attr}")
    judge = factory(manifest) if manifest else factory()
    for needed in ("attributes", "reference", "read_images", "read_captions"):
        if not hasattr(judge, needed):
            raise ValueError(f"judge {spec!r} has no {needed} (see chameleon_lm.eval.pairs.PairJudge)")
    return judge


def pairs_results(model_dir, data: dict[str, str], judge, generation: GenerationConfig,
                  limit: int | None = None, device: str = "cpu", out: Path | None = None,
                  log=print) -> dict:
    """Text->image and image->text on every named pair source; ``out``: metrics.json + samples.html."""
    loaded = load_model(model_dir, device=device)
    if loaded.image_tokenizer is None:
        raise ValueError(f"{model_dir}: the model folder has no image tokenizer")
    codec = loaded.codec
    results, samples = {}, {}
    for name, spec in data.items():
        pairs = load_pairs(open_source(spec), limit)
        metrics, samples[name] = evaluate_pairs(loaded.model, codec, pairs, judge, generation)
        results[name] = metrics
        if log:
            log(f"{name}: text->image {metrics['text_to_image']['all']:.3f}, image->text "
                f"{metrics['image_to_text']['all']:.3f} ({metrics['n_pairs']} pairs; judge on real "
                f"images {metrics['judge_real']['all']:.3f}, on VQ reconstructions "
                f"{metrics['judge_vq_reconstruction']['all']:.3f})")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "metrics.json", results)
        (out / "samples.html").write_text(samples_page(samples))
        if log:
            log(f"wrote {out / 'metrics.json'} and {out / 'samples.html'}")
    return results


def run_pairs(args: argparse.Namespace) -> int:
    data = dict(kv.split("=", 1) if "=" in kv else (Path(kv).stem, kv) for kv in args.data)
    gen = pair_generation_config(args.seed, args.cfg_text, args.cfg_image, args.temperature, args.top_p)
    pairs_results(args.model, data, load_judge(args.judge, args.manifest), gen, args.limit, args.device,
                  Path(args.out) if args.out else None)
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
    p.add_argument("--manifest", help="the shapes world's manifest.json (or its folder)")
    p.add_argument("--judge", default="shapes",
                   help="'shapes' (needs --manifest) or module:factory returning a PairJudge")
    p.add_argument("--limit", type=int, default=None, help="at most this many pairs per source")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-text", type=float, default=1.5, help="text guidance (Meta's default is 3.0)")
    p.add_argument("--cfg-image", type=float, default=1.0, help="image guidance (Meta's default is 1.2)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="folder for metrics.json and samples.html")
    p.set_defaults(func=run_pairs)
    add_generate_cli(ev)
    from chameleon_lm.eval import report
    from chameleon_lm.eval.human import annotate
    from chameleon_lm.eval.tasks import captioning, lm_harness, perplexity, reconstruction

    for module in (annotate, perplexity, reconstruction, captioning, lm_harness, report):
        module.add_cli(ev)


# ------------------------------------------------------------------------------------ prompt sets

def run_prompts(args: argparse.Namespace) -> int:
    from chameleon_lm.eval import prompts

    if args.prompts_command == "builtin":
        world = world_from_manifest(args.manifest) if args.manifest else None
        ps = prompts.shapes_prompt_set(args.out, world, args.per_category, args.seed)
        print(f"wrote {len(ps)} prompts to {Path(args.out) / 'prompts.jsonl'}: {ps.summary()}")
    elif args.prompts_command == "import-meta":
        ps = prompts.import_meta(args.file, args.images, args.output)
        ps.base = Path(args.out).parent
        ps.save(args.out)
        urls = sum("url" in p for q in ps for p in q.parts)
        print(f"wrote {len(ps)} prompts to {args.out}" + (f" ({urls} images left as URLs: download "
              "them into --images to use them)" if urls else ""))
    else:
        prompts.export_meta(prompts.PromptSet.load(args.file), args.out)
        print(f"wrote {args.out}")
    return 0


# ------------------------------------------------------------------------------------- generation

def _sampling(args: argparse.Namespace) -> dict:
    from chameleon_lm.generation.sampling import GenerationConfig, ImageSampling, TextSampling

    shared = {k: getattr(args, k) for k in ("temperature", "top_p") if getattr(args, k) is not None}
    image = {k: getattr(args, k) for k in ("cfg_text", "cfg_image") if getattr(args, k) is not None}
    text = {"repetition_penalty": args.repetition_penalty} if args.repetition_penalty is not None else {}
    return GenerationConfig(text=TextSampling(**shared, **text), image=ImageSampling(**shared, **image),
                            max_new_tokens=args.max_new_tokens).to_dict()


def _key(var: str | None) -> str | None:
    if var is None:
        return None
    if var not in os.environ:
        raise ValueError(f"environment variable {var} (the API key) is not set")
    return os.environ[var]


def answerer_from_args(args: argparse.Namespace):
    from chameleon_lm.eval import generate as g

    chosen = [x for x in ("model", "endpoint", "text_endpoint") if getattr(args, x)]
    if len(chosen) != 1:
        raise ValueError("give exactly one of --model, --endpoint or --text-endpoint (augmented)")
    if args.model:
        return g.LocalAnswerer(str(args.model), _sampling(args), device=args.device,
                               max_rows=args.max_rows)
    endpoint = {"model": args.endpoint_model, "temperature": args.temperature, "top_p": args.top_p,
                "max_tokens": args.max_new_tokens, "concurrency": args.concurrency,
                "extra_body": json.loads(args.extra_body) if args.extra_body else {}}
    if args.endpoint:
        return g.EndpointAnswerer(args.endpoint, api_key=_key(args.api_key_env),
                                  chameleon_modes=args.chameleon_modes, **endpoint)
    if not (args.image_endpoint and args.image_model):
        raise ValueError("the augmented baseline needs --image-endpoint and --image-model")
    return g.AugmentedAnswerer(g.EndpointAnswerer(args.text_endpoint, api_key=_key(args.api_key_env),
                                                  **endpoint),
                               args.image_endpoint, args.image_model, _key(args.image_api_key_env),
                               args.image_size)


def run_generate_answers(args: argparse.Namespace) -> int:
    from chameleon_lm.eval.generate import run_generation
    from chameleon_lm.eval.prompts import PromptSet
    from chameleon_lm.eval.store import ResultStore

    prompts = PromptSet.load(args.prompts)
    answerer = answerer_from_args(args)
    with ResultStore(args.store) as store:
        counts = run_generation(store, prompts, answerer, args.run, seed=args.seed, samples=args.samples,
                                limit=args.limit, retry_errors=args.retry_errors)
    print(f"{args.run}: {counts['answered']} answered, {counts['kept']} kept, {counts['errors']} "
          f"errors -> {args.store}")
    return 1 if counts["errors"] else 0


def add_generate_cli(ev: argparse._SubParsersAction) -> None:
    p = ev.add_parser("prompts", help="prompt sets: the built-in shapes set, Meta's format")
    sub = p.add_subparsers(dest="prompts_command", required=True, metavar="PROMPTS_COMMAND")
    b = sub.add_parser("builtin", help="write the shapes world's prompt set (draw, describe, story)")
    b.add_argument("--out", required=True, help="folder for prompts.jsonl and its images")
    b.add_argument("--manifest", help="a `data synth` folder: use its world (default: seed 0)")
    b.add_argument("--per-category", type=int, default=4)
    b.add_argument("--seed", type=int, default=0)
    i = sub.add_parser("import-meta", help="Meta's prompts_for_human_evaluations.jsonl -> a prompt set")
    i.add_argument("file")
    i.add_argument("--images", help="folder holding the downloaded images (named as in the URLs)")
    i.add_argument("--output", choices=("text", "image", "mixed"), default="mixed")
    i.add_argument("--out", required=True, help="the prompt set JSONL to write")
    e = sub.add_parser("export-meta", help="a prompt set -> Meta's JSONL format")
    e.add_argument("file")
    e.add_argument("--out", required=True)
    for q in (b, i, e):
        q.set_defaults(func=run_prompts)

    g = ev.add_parser("generate", help="answer a prompt set with a model or an endpoint; store answers",
                      description="Answers go to a SQLite results store, one per (prompt, sample); "
                                  "rerunning resumes. Exactly one of --model, --endpoint, "
                                  "--text-endpoint (the augmented baseline).")
    g.add_argument("--prompts", required=True, help="prompt set JSONL")
    g.add_argument("--store", required=True, help="results store (SQLite file; created when missing)")
    g.add_argument("--run", required=True, help="name of this system in the store")
    g.add_argument("--model", type=Path, help="a local model folder")
    g.add_argument("--endpoint", help="an OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--endpoint-model", default="chameleon", help="the model name sent to endpoints")
    g.add_argument("--chameleon-modes", action="store_true",
                   help="send chameleon serve's mode (text/image/interleaved) per expected output")
    g.add_argument("--extra-body", help="JSON object sent with every chat request")
    g.add_argument("--text-endpoint", help="augmented baseline: the text endpoint (writes <caption>s)")
    g.add_argument("--image-endpoint", help="augmented baseline: the images API base URL")
    g.add_argument("--image-model", help="augmented baseline: the image model name")
    g.add_argument("--image-size", help="augmented baseline: e.g. 1024x1024")
    g.add_argument("--api-key-env", help="environment variable holding the (text) endpoint's API key")
    g.add_argument("--image-api-key-env", help="environment variable holding the image API key")
    g.add_argument("--concurrency", type=int, default=4, help="parallel endpoint requests")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--samples", type=int, default=1, help="answers per prompt")
    g.add_argument("--limit", type=int, help="only the first N prompts")
    g.add_argument("--max-new-tokens", type=int, default=1024)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--cfg-text", type=float)
    g.add_argument("--cfg-image", type=float)
    g.add_argument("--max-rows", type=int, default=24, help="local model: rows of the batch")
    g.add_argument("--device", default="cpu")
    g.add_argument("--retry-errors", action="store_true", help="answer again where an error was stored")
    g.set_defaults(func=run_generate_answers)
