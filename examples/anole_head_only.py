"""Anole at toy scale: bring back a model's image generation by training only its image-head rows.

Meta released Chameleon with image generation disabled; Anole (GAIR) brought it back by fine-tuning
only the rows of the output head (the logits) of the image tokens, on a few thousand images. This
script replays that story on a finished quickstart run (``chameleon quickstart``), with the public
commands:

1. evaluate the quickstart model's text->image accuracy on the seen test pairs (``chameleon eval pairs``);
2. write a *disabled* copy of it: the rows of ``output.weight`` of the image codes and ``<eoss>``
   re-drawn from N(0, init_std) (seeded), everything else untouched;
3. evaluate the disabled copy (text->image should collapse);
4. ``chameleon train configs/anole-head-only-cpu.toml`` from the disabled copy on the quickstart's
   caption->image token dataset, with ``adapter.mode = "image-head"``;
5. evaluate the fine-tuned model;
6. check that every parameter other than those rows is bit-identical between the disabled and the
   fine-tuned model;
7. write ``OUT/anole.json`` (accuracies, recovered/original ratio, steps, seconds per stage).

It exits non-zero when the recovered accuracy is below ``--min-ratio`` (0.9) of the original one, or
when the bit-identity check fails.

    python examples/anole_head_only.py --quickstart /tmp/qs0 --out runs/anole0 --seed 0
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "anole-head-only-cpu.toml"


def run(cmd: list[str]) -> float:
    """Run a command (printed first), fail loudly; returns its wall time in seconds."""
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def chameleon(*args: str) -> list[str]:
    return [sys.executable, "-m", "chameleon_lm", *args]


def evaluate(model: Path, qs: Path, out: Path, seed: int, cfg_text: float, cfg_image: float,
             limit: int | None) -> tuple[float, float]:
    """Text->image accuracy on the seen test pairs; returns (accuracy, seconds)."""
    cmd = chameleon("eval", "pairs", "--model", str(model), "--manifest", str(qs / "data"),
                    "--data", f"seen={qs / 'data' / 'pairs' / 'test_seen-*.tar'}", "--seed", str(seed),
                    "--cfg-text", str(cfg_text), "--cfg-image", str(cfg_image), "--out", str(out))
    if limit:
        cmd += ["--limit", str(limit)]
    seconds = run(cmd)
    metrics = json.loads((out / "metrics.json").read_text())
    return float(metrics["seen"]["text_to_image"]["all"]), seconds


def image_rows(vocab) -> torch.Tensor:
    """The rows ``adapter.mode = "image-head"`` trains: the image codes and ``<eoss>``."""
    from chameleon_lm.training.adapters import image_head_rows

    return image_head_rows(vocab).long().unique()


def write_disabled(src: Path, dst: Path, seed: int) -> dict:
    """Copy ``src`` with the image-code and ``<eoss>`` rows of the head re-drawn from N(0, init_std)."""
    from chameleon_lm import load_model
    from chameleon_lm.checkpoints import save_model

    loaded = load_model(src, dtype=torch.float32)
    model, vocab = loaded.model, loaded.text_tokenizer.vocab
    rows = image_rows(vocab)
    std = model.config.init_std
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.output.weight
        fresh = torch.randn(rows.numel(), w.shape[1], generator=gen, dtype=torch.float32) * std
        w[rows] = fresh.to(w.dtype)
    save_model(dst, model, loaded.text_tokenizer, loaded.image_tokenizer)
    print(f"disabled {rows.numel()} head rows (image codes {vocab.image_start}..{vocab.image_end - 1} "
          f"and <eoss> {vocab.eoi_id}) of {w.shape[0]}, redrawn from N(0, {std}) with seed {seed}; "
          f"wrote {dst}", flush=True)
    return {"rows": int(rows.numel()), "vocab_size": int(w.shape[0]), "init_std": std}


def check_identity(disabled: Path, tuned: Path) -> dict:
    """Every parameter but the trained head rows bit-identical; the trained rows changed."""
    from chameleon_lm import load_model

    a, b = load_model(disabled, dtype=torch.float32), load_model(tuned, dtype=torch.float32)
    rows = image_rows(a.text_tokenizer.vocab)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    problems = []
    if sa.keys() != sb.keys():
        problems.append(f"different keys: {sorted(sa.keys() ^ sb.keys())}")
    compared, rows_changed = 0, False
    for name in sorted(sa.keys() & sb.keys()):
        x, y = sa[name], sb[name]
        if x.shape != y.shape:
            problems.append(f"{name}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
            continue
        if name == "output.weight":
            keep = torch.ones(x.shape[0], dtype=torch.bool)
            keep[rows] = False
            if not torch.equal(x[keep], y[keep]):
                problems.append("output.weight: rows outside the image rows changed")
            rows_changed = not torch.equal(x[rows], y[rows])
        elif not torch.equal(x, y):
            problems.append(f"{name} changed")
        compared += 1
    return {"ok": not problems, "tensors_compared": compared, "image_rows_changed": rows_changed,
            "problems": problems}


def final_train_metrics(out_dir: Path) -> dict:
    for name in ("metrics.jsonl", "train_log.jsonl"):
        path = out_dir / name
        if path.is_file():
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            steps = [r for r in lines if "ce" in r]
            if steps:
                last = steps[-1]
                return {k: last[k] for k in ("step", "ce", "ce_image", "ce_text") if k in last}
    return {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quickstart", required=True, type=Path, help="a finished quickstart run's folder")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: QUICKSTART/anole)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the re-initialisation, training and evaluation (default: the quickstart's)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    p.add_argument("--config", type=Path, default=CONFIG, help="the training config")
    p.add_argument("--limit", type=int, default=None, help="at most this many seen pairs per evaluation")
    p.add_argument("--min-ratio", type=float, default=0.9,
                   help="fail unless recovered/original text->image accuracy reaches this")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for chameleon train")
    args = p.parse_args(argv)

    qs = args.quickstart.resolve()
    out = (args.out or qs / "anole").resolve()
    out.mkdir(parents=True, exist_ok=True)
    qs_metrics = json.loads((qs / "metrics.json").read_text()) if (qs / "metrics.json").is_file() else {}
    seed = args.seed if args.seed is not None else int(qs_metrics.get("seed", 0))
    guidance = qs_metrics.get("text_to_image_guidance", {})
    cfg_text, cfg_image = float(guidance.get("text", 1.5)), float(guidance.get("image", 1.0))
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()

    original, seconds["eval_original"] = evaluate(qs / "model", qs, out / "eval_original", seed, cfg_text,
                                                  cfg_image, args.limit)
    print(f"original text->image (seen): {original:.3f}", flush=True)

    t0 = time.perf_counter()
    disabled_dir = out / "disabled"
    disabled_info = write_disabled(qs / "model", disabled_dir, seed)
    seconds["disable"] = time.perf_counter() - t0
    disabled, seconds["eval_disabled"] = evaluate(disabled_dir, qs, out / "eval_disabled", seed, cfg_text,
                                                  cfg_image, args.limit)
    print(f"disabled text->image (seen): {disabled:.3f}", flush=True)

    tuned_dir, train_dir = out / "model", out / "train"
    overrides = [f"init_from={disabled_dir}", f"data={qs / 'tokens' / 'pairs' / 'caption-image'}",
                 f"out_dir={train_dir}", f"export_dir={tuned_dir}", f"seed={seed}"]
    val = qs / "tokens" / "val" / "caption-image"
    if val.is_dir():
        overrides.append(f"val.caption-image={val}")
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    overrides += args.overrides
    seconds["train"] = run(chameleon("train", str(args.config), *overrides, "--no-progress"))

    recovered, seconds["eval_recovered"] = evaluate(tuned_dir, qs, out / "eval_recovered", seed, cfg_text,
                                                    cfg_image, args.limit)
    print(f"recovered text->image (seen): {recovered:.3f}", flush=True)

    t0 = time.perf_counter()
    identity = check_identity(disabled_dir, tuned_dir)
    seconds["identity_check"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_all

    from chameleon_lm.training.cli import load_train_config  # the config as chameleon train read it
    from chameleon_lm.training.trainer import TrainConfig

    train_config: TrainConfig = load_train_config(str(args.config), overrides)
    ratio = recovered / original if original > 0 else 0.0
    report = {
        "quickstart": str(qs), "seed": seed, "guidance": {"text": cfg_text, "image": cfg_image},
        "text_to_image_seen": {"original": original, "disabled": disabled, "recovered": recovered},
        "ratio_recovered_over_original": ratio, "min_ratio": args.min_ratio,
        "passed": bool(ratio >= args.min_ratio and identity["ok"]),
        "disabled_rows": disabled_info, "identity": identity,
        "train": {"config": str(args.config), "overrides": overrides, "steps": train_config.steps,
                  "lr": train_config.lr, "batch_size": train_config.batch_size,
                  "warmup_steps": train_config.warmup_steps, "schedule": train_config.schedule,
                  "final": final_train_metrics(train_dir)},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    (out / "anole.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"original {original:.3f}, disabled {disabled:.3f}, recovered {recovered:.3f} "
          f"(ratio {ratio:.3f}); other parameters bit-identical: {identity['ok']}; wrote {out / 'anole.json'}")
    if not identity["ok"]:
        print("bit-identity check failed: " + "; ".join(identity["problems"]), file=sys.stderr)
    if ratio < args.min_ratio:
        print(f"recovered/original {ratio:.3f} is below {args.min_ratio}", file=sys.stderr)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
