"""``chameleon eval report --config eval.toml``: one command, one report of every configured task.

The config names the model and seed once and has one table per task (each optional)::

    model = "out/model"
    seed = 0
    [pairs]           # text->image and image->text, read by a judge
    data = {seen = "data/pairs/test_seen-*.tar"}
    manifest = "data"             # the shapes judge; or judge = "module:factory"
    [perplexity]
    data = {val = "tokens/val"}
    [reconstruction]
    data = "data/pairs/test_seen-*.tar"
    [answers]         # answer a prompt set into a results store (for the human evaluation)
    prompts = "prompts/prompts.jsonl"     # or builtin = true (the shapes set; uses pairs.manifest)
    store = "eval.sqlite"
    [human]           # summarise the store's judgments
    store = "eval.sqlite"
    [captioning] / [vqa] / [lm_harness]  # the arguments of `chameleon eval caption|vqa|lm-harness`

Relative paths are relative to the config file. ``report.json`` holds the config as run, every
result, the model's hash, the package versions and the seconds per task; ``report.html`` shows it
with the plots.
"""

from __future__ import annotations

import argparse
import html
import math
import time
from pathlib import Path
from typing import Any

from chameleon_lm.eval.metrics import write_json
from chameleon_lm.eval.provenance import model_hash, versions
from chameleon_lm.utils.config import apply_overrides, read_config_file

SECTIONS = ("pairs", "perplexity", "reconstruction", "answers", "human", "captioning", "vqa",
            "lm_harness")
_KNOWN_TOP = {"model", "seed", "device", "out", *SECTIONS}


def _path(base: Path, value: str | None) -> str | None:
    if value is None:
        return None
    p = Path(value)
    return str(p if p.is_absolute() or "://" in value else base / p)


def _need(section: str, cfg: dict, *keys: str) -> None:
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise ValueError(f"[{section}] needs {', '.join(missing)}")


def _pairs(cfg: dict, top: dict, base: Path, out: Path) -> dict:
    from chameleon_lm.eval.cli import load_judge, pair_generation_config, pairs_results

    _need("pairs", cfg, "data")
    gen = pair_generation_config(top["seed"], cfg.get("cfg_text", 1.5), cfg.get("cfg_image", 1.0),
                                 cfg.get("temperature", 0.7), cfg.get("top_p", 0.9),
                                 cfg.get("max_new_tokens", 48))
    judge = load_judge(cfg.get("judge", "shapes"), _path(base, cfg.get("manifest")))
    data = {name: _path(base, spec) for name, spec in cfg["data"].items()}
    return pairs_results(top["model"], data, judge, gen, cfg.get("limit"), top["device"], out / "pairs")


def _perplexity(cfg: dict, top: dict, base: Path, out: Path) -> dict:
    from chameleon_lm.eval.tasks.perplexity import run_perplexity

    _need("perplexity", cfg, "data")
    return run_perplexity(top["model"], {k: _path(base, v) for k, v in cfg["data"].items()},
                          out / "perplexity", cfg.get("limit"), device=top["device"])


def _reconstruction(cfg: dict, top: dict, base: Path, out: Path) -> dict:
    from chameleon_lm.eval.tasks.reconstruction import run_reconstruction

    _need("reconstruction", cfg, "data")
    return run_reconstruction(_path(base, cfg.get("tokenizer")) or top["model"], _path(base, cfg["data"]),
                              cfg.get("limit"), _path(base, cfg.get("inception_weights")),
                              out / "reconstruction")


def _answers(cfg: dict, top: dict, base: Path, out: Path) -> dict:
    from chameleon_lm.eval.generate import LocalAnswerer, run_generation
    from chameleon_lm.eval.prompts import PromptSet, shapes_prompt_set
    from chameleon_lm.eval.shapes_judge import world_from_manifest
    from chameleon_lm.eval.store import ResultStore
    from chameleon_lm.generation.sampling import GenerationConfig

    _need("answers", cfg, "store")
    if cfg.get("builtin"):
        manifest = cfg.get("manifest") or top.get("pairs", {}).get("manifest")
        world = world_from_manifest(_path(base, manifest)) if manifest else None
        prompts = shapes_prompt_set(out / "prompts", world, cfg.get("per_category", 4), top["seed"])
    else:
        _need("answers", cfg, "prompts")
        prompts = PromptSet.load(_path(base, cfg["prompts"]))
    sampling = GenerationConfig.from_dict(cfg.get("sampling", {})).replace(
        max_new_tokens=cfg.get("max_new_tokens", 256)).to_dict()
    answerer = LocalAnswerer(top["model"], sampling, device=top["device"])
    with ResultStore(_path(base, cfg["store"])) as store:
        counts = run_generation(store, prompts, answerer, cfg.get("run", "model"), seed=top["seed"],
                                samples=cfg.get("samples", 1), limit=cfg.get("limit"))
        answers = [a for a in store.answers(cfg.get("run", "model")) if a.prompt in {p.id for p in prompts}]
    by_output: dict[str, dict[str, int]] = {}
    outputs = {p.id: p.output for p in prompts}
    for a in answers:
        row = by_output.setdefault(outputs[a.prompt], {"answers": 0, "with_image": 0, "with_text": 0})
        row["answers"] += 1
        row["with_image"] += bool(a.image_shas)
        row["with_text"] += bool(a.text.strip())
    return {**counts, "prompts": len(prompts), "store": _path(base, cfg["store"]),
            "by_expected_output": by_output}


def _human(cfg: dict, top: dict, base: Path, out: Path) -> dict:
    from chameleon_lm.eval.human.results import human_results, plot_human_results
    from chameleon_lm.eval.store import ResultStore

    _need("human", cfg, "store")
    path = Path(_path(base, cfg["store"]))
    if not path.is_file():
        raise FileNotFoundError(f"[human] store {path} not found")
    with ResultStore(path) as store:
        results = human_results(store, cfg.get("n_boot", 1000), top["seed"])
    results["plots"] = plot_human_results(results, out)
    return results


def _captioning(cfg: dict, top: dict, base: Path, out: Path) -> dict:
    from chameleon_lm.eval.tasks.captioning import run_captioning

    _need("captioning", cfg, "annotations")
    return run_captioning(top["model"], _path(base, cfg["annotations"]), _path(base, cfg.get("images")),
                          out / "captioning", top["seed"], cfg.get("limit"),
                          **({"prompt": cfg["prompt"]} if "prompt" in cfg else {}))


def _vqa(cfg: dict, top: dict, base: Path, out: Path) -> dict:
    from chameleon_lm.eval.tasks.captioning import run_vqa

    _need("vqa", cfg, "questions", "annotations")
    return run_vqa(top["model"], _path(base, cfg["questions"]), _path(base, cfg["annotations"]),
                   _path(base, cfg.get("images")), out / "vqa", top["seed"], cfg.get("limit"))


def _lm_harness(cfg: dict, top: dict, base: Path, out: Path) -> dict:
    from chameleon_lm.eval.tasks.lm_harness import run_lm_harness

    _need("lm_harness", cfg, "tasks")
    return run_lm_harness(top["model"], list(cfg["tasks"]), out / "lm_harness", cfg.get("limit"),
                          cfg.get("num_fewshot"), top["seed"], _path(base, cfg.get("include_path")))


RUNNERS = {"pairs": _pairs, "perplexity": _perplexity, "reconstruction": _reconstruction,
           "answers": _answers, "human": _human, "captioning": _captioning, "vqa": _vqa,
           "lm_harness": _lm_harness}


def run_report(config_path: str | Path, out: str | Path | None = None, overrides: list[str] = (),
               log=print) -> dict[str, Any]:
    """Run every task of the config; write ``report.json`` and ``report.html`` to the output folder."""
    config_path = Path(config_path)
    if not config_path.is_file():
        raise FileNotFoundError(f"report config {config_path} not found")
    cfg = apply_overrides(read_config_file(config_path), list(overrides))
    unknown = set(cfg) - _KNOWN_TOP
    if unknown:
        raise ValueError(f"{config_path}: unknown keys {sorted(unknown)} (known: {sorted(_KNOWN_TOP)})")
    base = config_path.parent
    sections = [s for s in SECTIONS if s in cfg]
    if not sections:
        raise ValueError(f"{config_path}: no task tables (any of {', '.join(SECTIONS)})")
    needs_model = [s for s in sections if s not in ("human",) and not (
        s == "reconstruction" and "tokenizer" in cfg[s])]
    if needs_model and "model" not in cfg:
        raise ValueError(f"{config_path}: 'model' is needed by {', '.join(needs_model)}")
    top = {"model": _path(base, cfg.get("model")), "seed": int(cfg.get("seed", 0)),
           "device": cfg.get("device", "cpu"), "pairs": cfg.get("pairs", {})}
    out = Path(out or _path(base, cfg.get("out", "report")))
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "config": cfg, "config_file": str(config_path.resolve()), "seed": top["seed"],
        "model": top["model"], "model_hash": model_hash(top["model"]) if top["model"] else None,
        "versions": versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": {},
        "results": {}}
    for section in sections:
        if log:
            log(f"[{section}]")
        t0 = time.monotonic()
        report["results"][section] = RUNNERS[section](cfg[section], top, base, out)
        report["seconds"][section] = round(time.monotonic() - t0, 1)
        write_json(out / "report.json", report)  # after each task: a crash keeps the rest
    (out / "report.html").write_text(report_html(report))
    if log:
        log(f"wrote {out / 'report.json'} and {out / 'report.html'}")
    return report


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else f"{v:.4g}"
    return html.escape(str(v))


def _table(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for k, v in d.items():
        if isinstance(v, dict):
            rows += _table(v, f"{prefix}{k}.")
        elif not isinstance(v, list):
            rows.append((prefix + str(k), v))
    return rows


def report_html(report: dict[str, Any]) -> str:
    """A self-contained page: provenance, then one table (and its plots) per task."""
    head = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in (
        ("model", report["model"]), ("model hash", report["model_hash"]), ("seed", report["seed"]),
        ("config", report["config_file"]), ("started", report["started"]),
        *sorted(report["versions"].items())))
    sections = []
    for name, result in report["results"].items():
        plots = "".join(f"<img src='{html.escape(p)}' alt='{html.escape(p)}'>"
                        for p in result.get("plots", []) if p.endswith(".png"))
        rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>"
                       for k, v in _table({k: v for k, v in result.items() if k != "plots"}))
        sections.append(f"<section id='{name}'><h2>{html.escape(name)} "
                        f"<small>({report['seconds'].get(name, 0)} s)</small></h2>{plots}"
                        f"<table>{rows}</table></section>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>chameleon-lm evaluation report"
            "</title><style>body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:"
            "collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:2px 8px;text-align:left;"
            "font-size:13px}th{font-weight:normal;color:#444}img{max-width:48%;margin:4px}</style>"
            f"</head><body><h1>Evaluation report</h1><table>{head}</table>{''.join(sections)}"
            "</body></html>\n")


def add_cli(ev: argparse._SubParsersAction) -> None:
    p = ev.add_parser("report", help="run every task of an evaluation config; write one report",
                      description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="TOML/YAML/JSON evaluation config")
    p.add_argument("--out", help="report folder (default: the config's out, else ./report)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seed=1 pairs.limit=50")
    p.set_defaults(func=lambda args: run_report(args.config, args.out, args.overrides) and 0)
