"""``chameleon quickstart --out DIR``: the user path end to end on the built-in shapes world.

Every stage is a ``chameleon`` command a user runs, with the shipped configs in
``chameleon_lm/configs/quickstart/``; the quickstart only fills in the paths. The commands are printed
and written to ``DIR/commands.sh``:

1. ``data synth``: the shapes world (WebDataset pairs, OBELICS-style stories, text JSONL);
2. ``tokenizer train-image`` (VQGAN, ``vq.toml``) and ``tokenizer train-text`` (BPE);
3. ``data tokenize``: caption→image pairs (10 % of captions dropped, for guidance) and image→caption
   pairs (loss on the caption) from the pair shards, stories, text, and held-out pairs for validation;
4. ``train`` (``train.toml``: the model and the mixture, packed rows);
5. ``eval report`` (``eval.toml``: text→image and image→text on held-out pairs of seen and unseen
   combinations, read by the shapes judge; per-modality perplexity on the held-out shards; the image
   tokenizer's reconstruction; the built-in prompt set answered into a results store) and
   ``generate --mode interleaved`` (one picture story);
6. ``DIR/metrics.json`` and ``DIR/report.html``.
"""

from __future__ import annotations

import argparse
import html
import json
import shlex
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from PIL import Image, ImageDraw

from chameleon_lm.utils.config import read_config_file

CONFIGS = resources.files("chameleon_lm") / "configs" / "quickstart"


@dataclass
class QuickstartConfig:
    """The quickstart run; the defaults are sized for about 10 minutes on 2 CPU cores."""

    seed: int = 0
    train_pairs: int = 10000
    test_pairs: int = 200
    stories: int = 1000
    text_docs: int = 1000
    bpe_vocab: int = 2048
    vq_steps: int | None = None
    """VQGAN steps (default: ``vq.toml``'s)."""
    model_steps: int | None = None
    """Model steps (default: ``train.toml``'s)."""
    train_overrides: list[str] = field(default_factory=list)
    """``key=value`` overrides of ``train.toml`` (e.g. ``model_overrides.dim=64``)."""
    workers: int = 2
    """Tokenization worker processes."""
    cfg_text: float = 1.5
    cfg_image: float = 1.0
    """Guidance for text->image: Meta's 3.0/1.2 over-sharpens a model this small (see docs)."""


def train_config(out: Path) -> dict:
    """``train.toml`` with its data, tokenizer and output paths inside ``out``."""
    cfg = read_config_file(Path(str(CONFIGS / "train.toml")))
    for key in ("tokenizers", "out_dir", "export_dir"):
        cfg[key] = str(out / cfg[key])
    for source in cfg["data"]["sources"]:
        source["path"] = str(out / source["path"])
    cfg["val"] = {name: str(out / path) for name, path in cfg["val"].items()}
    return cfg


def eval_config(out: Path, cfg: QuickstartConfig) -> dict:
    """``eval.toml`` with its paths inside ``out`` and the run's seed and guidance."""
    out = out.resolve()  # absolute: `eval report` reads relative paths from the config's folder
    ev = read_config_file(Path(str(CONFIGS / "eval.toml")))
    ev["model"], ev["out"], ev["seed"] = str(out / ev["model"]), str(out / ev["out"]), cfg.seed
    pairs = ev["pairs"]
    pairs["data"] = {k: str(out / v) for k, v in pairs["data"].items()}
    pairs["manifest"] = str(out / pairs["manifest"])
    pairs["cfg_text"], pairs["cfg_image"] = cfg.cfg_text, cfg.cfg_image
    ev["perplexity"]["data"] = {k: str(out / v) for k, v in ev["perplexity"]["data"].items()}
    ev["reconstruction"]["data"] = str(out / ev["reconstruction"]["data"])
    ev["answers"]["store"] = str(out / ev["answers"]["store"])
    return ev


def commands(out: Path, cfg: QuickstartConfig) -> list[tuple[str, list[str]]]:
    """The stages, each a ``chameleon`` command line."""
    d, tok, s = out / "data", out / "tokenizers", str(cfg.seed)
    pairs = lambda split: str(d / "pairs" / f"{split}-*.tar")
    tokenize = ["data", "tokenize", "--tokenizers", str(tok), "--workers", str(cfg.workers),
                "--seed", s, "--no-progress"]
    vq_steps = ["--steps", str(cfg.vq_steps)] if cfg.vq_steps is not None else []
    model_steps = [f"steps={cfg.model_steps}"] if cfg.model_steps is not None else []
    return [
        ("data", ["data", "synth", "--out", str(d), "--seed", s, "--sizes", "medium", "large",
                  "--backgrounds", "grey", "--jitter", "0.3", "--snap", "4",
                  "--train-pairs", str(cfg.train_pairs), "--test-pairs", str(cfg.test_pairs),
                  "--interleaved", str(cfg.stories), "--interleaved-test", str(min(20, cfg.stories)),
                  "--text-docs", str(cfg.text_docs), "--overwrite"]),
        ("tokenizers", ["tokenizer", "train-image", "--config", str(CONFIGS / "vq.toml"),
                        "--data", pairs("train"), "--eval-data", pairs("test_seen"), "--out", str(tok),
                        "--seed", s, "--no-progress", *vq_steps]),
        ("tokenizers", ["tokenizer", "train-text", "--data", str(d / "text" / "train.jsonl"),
                        pairs("train"), str(d / "interleaved" / "train.jsonl"), "--out", str(tok),
                        "--vocab-size", str(cfg.bpe_vocab), "--codebook-size", "512"]),
        ("tokenize", [*tokenize, "--data", pairs("train"), "--recipe", "caption-image",
                      "--recipe", "image-caption", "--caption-dropout", "0.1",
                      "--out", str(out / "tokens" / "pairs")]),
        ("tokenize", [*tokenize, "--data", str(d / "interleaved" / "train.jsonl"),
                      "--recipe", "interleaved", "--out", str(out / "tokens" / "stories")]),
        ("tokenize", [*tokenize, "--data", str(d / "text" / "train.jsonl"), "--recipe", "text",
                      "--out", str(out / "tokens" / "text")]),
        ("tokenize", [*tokenize, "--data", pairs("test_seen"), "--recipe", "caption-image",
                      "--recipe", "image-caption", "--out", str(out / "tokens" / "val")]),
        ("model", ["train", str(out / "train.json"), f"seed={s}", *model_steps, *cfg.train_overrides,
                   "--no-progress"]),
        ("evaluation", ["eval", "report", "--config", str(out / "eval.json")]),
        ("evaluation", ["generate", "--model", str(out / "model"), "--prompt", _opening(d),
                        "--mode", "interleaved", "--seed", s, "--temperature", "0.7",
                        "--repetition-penalty", "1.0", "--cfg-text", str(cfg.cfg_text),
                        "--cfg-image", str(cfg.cfg_image), "--max-new-tokens", "400",
                        "--out", str(out / "story")]),
    ]


def _opening(data: Path) -> str:
    """The first sentence of the first held-out story (known once the data is written)."""
    path = data / "interleaved" / "test_seen.jsonl"
    if not path.is_file():
        return "<the opening sentence of the first test_seen story>"
    row = json.loads(path.read_text().splitlines()[0])
    return next(t for t in row["texts"] if t)


def run(out: Path, cfg: QuickstartConfig, log=print) -> dict:
    from chameleon_lm.cli import main  # the same entry point a user's shell calls

    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    script = ["#!/usr/bin/env bash", "set -euo pipefail"]
    for i, (stage, _) in enumerate(commands(out, cfg)):
        argv = commands(out, cfg)[i][1]  # rebuilt: later commands read what earlier ones wrote
        if stage == "model":
            (out / "train.json").write_text(json.dumps(train_config(out), indent=2) + "\n")
        if argv[:2] == ["eval", "report"]:
            (out / "eval.json").write_text(json.dumps(eval_config(out, cfg), indent=2) + "\n")
        line = "chameleon " + " ".join(shlex.quote(a) for a in argv)
        script.append(line)
        log(f"[{stage}] {line}")
        t0 = time.time()
        if main(argv) != 0:
            raise RuntimeError(f"quickstart: `{line}` failed")
        times[stage] = round(times.get(stage, 0.0) + time.time() - t0, 1)
    (out / "commands.sh").write_text("\n".join(script) + "\n")
    metrics = _metrics(out, cfg, times, t_start)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _write_report(out, metrics)
    log(f"done in {metrics['seconds']['total']} s: text->image {metrics['text_to_image_accuracy']:.3f} "
        f"(unseen {metrics['text_to_image_accuracy_unseen']:.3f}), image->text "
        f"{metrics['image_to_text_accuracy']:.3f} (unseen {metrics['image_to_text_accuracy_unseen']:.3f}); "
        f"report {out / 'report.html'}")
    return metrics


def _metrics(out: Path, cfg: QuickstartConfig, times: dict, t_start: float) -> dict:
    vq = json.loads((out / "tokenizers" / "vq_metrics.json").read_text())
    report = json.loads((out / "eval" / "report.json").read_text())["results"]
    ev = report["pairs"]
    log = [json.loads(line) for line in (out / "train" / "metrics.jsonl").open()]
    last = log[-1]
    m = {"seed": cfg.seed, "vq_psnr": vq["psnr"], "vq_ssim": vq["ssim"],
         "vq_codebook_usage": vq["codebook_usage"]}
    for split in ("seen", "unseen"):
        e = ev[split]
        suffix = "" if split == "seen" else "_unseen"
        m[f"text_to_image_accuracy{suffix}"] = e["text_to_image"]["all"]
        m[f"image_to_text_accuracy{suffix}"] = e["image_to_text"]["all"]
        m[f"text_to_image_{split}_detail"] = e["text_to_image"]
        m[f"image_to_text_{split}_detail"] = e["image_to_text"]
        m[f"judge_accuracy_real_{split}"] = e["judge_real"]["all"]
        m[f"judge_accuracy_vq_reconstruction_{split}"] = e["judge_vq_reconstruction"]["all"]
    m["n_test_pairs"] = ev["seen"]["n_pairs"]
    for name, result in report["perplexity"].items():
        for modality in ("text", "image"):
            m[f"val_perplexity_{name}_{modality}"] = result[modality]["ppl"]
    m["final_train_ce"] = last["ce"]
    m.update({k: v for k, v in last.items() if k.startswith("val/")})
    m["text_to_image_guidance"] = {"text": cfg.cfg_text, "image": cfg.cfg_image}
    m["seconds"] = {**times, "total": round(time.time() - t_start, 1)}
    return m


def _curves_png(history: list[dict], path: Path) -> None:
    """Training curves (total, text and image CE) drawn with PIL."""
    w, h, m = 720, 360, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    series = {"ce": (30, 30, 30), "ce_text": (30, 90, 220), "ce_image": (220, 60, 30)}
    vals = [v for s in series for r in history for v in [r[s]] if v == v]
    top, n = max(vals), len(history)
    d.rectangle([m, m // 2, w - m // 2, h - m], outline=(160, 160, 160))
    for name, colour in series.items():
        pts = [(m + (w - 1.5 * m) * i / max(n - 1, 1), h - m - (h - 1.5 * m) * r[name] / top)
               for i, r in enumerate(history) if r[name] == r[name]]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
    for i, (name, colour) in enumerate(series.items()):
        d.text((m + 10 + 110 * i, m // 2 + 6), name, fill=colour)
    d.text((4, m // 2), f"{top:.1f}", fill=(0, 0, 0))
    d.text((4, h - m - 8), "0", fill=(0, 0, 0))
    d.text((w // 2 - 20, h - m + 8), f"step (0..{n})", fill=(0, 0, 0))
    img.save(path)


def _write_report(out: Path, metrics: dict) -> None:
    history = [json.loads(line) for line in (out / "train" / "metrics.jsonl").open()]
    _curves_png(history, out / "training_curves.png")
    story = json.loads((out / "story" / "document.json").read_text())
    story_html = "".join(
        f"<img src='story/{p['file']}' width='96'>" if p["type"] == "image" and p["file"]
        else f"<span>{html.escape(p.get('text', ''))}</span>" for p in story["parts"])
    table = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>"
                    for k, v in metrics.items() if isinstance(v, float))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>chameleon-lm quickstart</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} td{{padding:2px 10px;border-bottom:1px solid #ddd}}
.story img{{vertical-align:middle;margin:4px;image-rendering:pixelated}} iframe{{width:100%;height:900px;border:0}}</style>
</head><body><h1>chameleon-lm quickstart</h1>
<p>A small Chameleon trained from scratch on the built-in shapes world: image tokenizer, BPE and model.
Held-out test images; "unseen" combinations of colour and shape never appear in training. The commands
that made this run are in <a href="commands.sh">commands.sh</a>.</p>
<h2>Metrics</h2><table>{table}</table><p>Time per stage (s): {html.escape(json.dumps(metrics['seconds']))}</p>
<h2>Training curves</h2><img src="training_curves.png" alt="training curves">
<h2>An interleaved generation</h2><p>Prompt: {html.escape(story['prompt'])}</p><p class="story">{story_html}</p>
<p>The whole evaluation: <a href="eval/report.html">eval/report.html</a>; the built-in prompt set's answers
are in eval/answers.sqlite, for <code>chameleon eval annotate</code>.</p>
<h2>Held-out pairs (<a href="eval/pairs/samples.html">open alone</a>)</h2><iframe src="eval/pairs/samples.html"></iframe>
</body></html>"""
    (out / "report.html").write_text(page)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quickstart", help="train and generate end to end on the built-in dataset")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-steps", type=int, default=None, help="default: train.toml's")
    p.add_argument("--vq-steps", type=int, default=None, help="default: vq.toml's")
    p.add_argument("--train-pairs", type=int, default=QuickstartConfig.train_pairs)
    p.add_argument("--test-pairs", type=int, default=QuickstartConfig.test_pairs)
    p.add_argument("--workers", type=int, default=QuickstartConfig.workers, help="tokenization processes")
    p.set_defaults(func=lambda a: run(a.out, QuickstartConfig(
        seed=a.seed, model_steps=a.model_steps, vq_steps=a.vq_steps, train_pairs=a.train_pairs,
        test_pairs=a.test_pairs, workers=a.workers)) and 0)
