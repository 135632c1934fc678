"""SFT with LoRA at toy scale: teach a quickstart model a visual-chat behaviour it never saw.

The quickstart model (``chameleon quickstart``) was pre-trained on caption->image, image->caption,
stories and text; it never saw the chat layout ``<s> user <reserved08706> answer </s>``. This script

1. writes OpenAI-style conversations from the quickstart's shapes-world pairs (three question types,
   the ``category`` of each line): ``colour`` ("What colour is the shape?" -> "The colour is red."),
   ``shape`` ("What shape is it?" -> "The shape is a circle.") and ``describe`` ("Describe the picture." -> the canonical
   caption "A large red circle on the left on a grey background."); training lines from the ``train``
   shards, held-out questions from the ``test_seen`` shards (other images, seen colour/shape pairs);
2. tokenizes the training lines with ``chameleon data tokenize --kind messages --recipe sft``;
3. answers the held-out questions with the original model (greedy, ``--chat`` prompts);
4. fine-tunes with LoRA: ``chameleon train configs/sft-lora-cpu.toml init_from=... data=...``;
5. answers the same questions with the exported (merged) model;
6. writes ``OUT/sft.json`` and exits 1 unless the overall accuracy after is >= before + ``--margin``
   (0.3 by default, set after the first result: seed 0 went from 0.36 to 1.00; the original model's
   captioning habit alone gives 0.18-0.36, so a gain of 0.3 cannot come from noise on 300 questions).

Metric: an answer to a colour question is right when it names the expected colour and no other
colour word; a shape question likewise with shape words (plurals accepted); a describe answer is
right when ``synth.parse_caption`` of it gives the expected colour and shape. Answers are greedy
(argmax, repetition penalty 1.0), at most 32 new tokens, prompt = ``<s> image question
<reserved08706>`` exactly as ``chameleon generate --chat --image FILE`` builds it.

    python examples/sft_shapes.py --quickstart /tmp/qsA0 --out /tmp/sftA0 --seed 0
"""

from __future__ import annotations

import argparse
import base64
import glob
import json
import random
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "sft-lora-cpu.toml"

QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "describe": "Describe the picture.",
}
_WORD = re.compile(r"[a-z]+")


def read_pairs(pattern: str, limit: int | None = None) -> list[dict]:
    """``{"png": bytes, "label": sidecar json}`` of the pairs in the shards, in shard order."""
    out: list[dict] = []
    for shard in sorted(glob.glob(pattern)):
        samples: dict[str, dict] = {}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition(".")
                data = tar.extractfile(member).read()
                samples.setdefault(key, {})[ext] = data
        for key in sorted(samples):
            s = samples[key]
            if "png" in s and "json" in s:
                out.append({"key": key, "png": s["png"], "label": json.loads(s["json"])})
            if limit is not None and len(out) >= limit:
                return out
    return out


def answer_for(category: str, label: dict) -> str:
    """The target answer, in words the shapes BPE has whole tokens for ("The", " colour", " is", " red").

    Tried first on seed 0: bare "red." (the BPE splits it into rare pieces "re" "d" ".": colour 0.02 and
    shape 0.03 after SFT) and "It is red." ("I" "t": the model answered "I up like a cross." to
    both short questions, colour 0.29). Naming the attribute in the answer ("The colour is ...")
    lets the model copy " colour"/" shape" from the question before it names the value."""
    from chameleon_lm.data.synth import caption

    if category == "colour":
        return f"The colour is {label['colour']}."
    if category == "shape":
        return f"The shape is a {label['shape']}."
    return caption(label)


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def write_jsonl(path: Path, pairs: list[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for pair in pairs:
            for category, question in QUESTIONS.items():
                record = {
                    "messages": [
                        {"role": "user", "content": [
                            {"type": "image_url", "image_url": {"url": data_url(pair["png"])}},
                            {"type": "text", "text": question}]},
                        {"role": "assistant", "content": answer_for(category, pair["label"])},
                    ],
                    "category": category,
                }
                f.write(json.dumps(record) + "\n")
                n += 1
    return n


def correct(category: str, answer: str, label: dict) -> bool:
    from chameleon_lm.data import synth

    words = _WORD.findall(answer.lower())
    if category == "colour":
        named = {w for w in words if w in synth.COLOURS}
        return named == {label["colour"]}
    if category == "shape":
        shapes = synth._SHAPE_WORDS  # word (plurals too) -> shape
        named = {shapes[w] for w in words if w in shapes}
        return named == {label["shape"]}
    parsed = synth.parse_caption(answer)
    return parsed is not None and parsed["colour"] == label["colour"] and parsed["shape"] == label["shape"]


def evaluate(model_dir: Path, pairs: list[dict], out_file: Path, batch: int = 64) -> dict:
    """Greedy answers to every held-out question; accuracy per category and overall."""
    import tempfile

    import torch

    from chameleon_lm.checkpoints import load_model
    from chameleon_lm.generation.cli import prompt_ids
    from chameleon_lm.generation.engine import generate_text
    from chameleon_lm.generation.sampling import GenerationConfig, TextSampling

    torch.manual_seed(0)
    bundle = load_model(model_dir, device="cpu")
    codec = bundle.codec
    config = GenerationConfig(mode="text", text=TextSampling(greedy=True, repetition_penalty=1.0),
                              max_new_tokens=32, seed=0)
    jobs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, pair in enumerate(pairs):
            image = Path(tmp) / f"{i}.png"
            image.write_bytes(pair["png"])
            for category, question in QUESTIONS.items():
                jobs.append((category, pair, prompt_ids(codec, question, [image], chat=True)))
    rows = []
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        outs = generate_text(bundle.model, codec.vocab, [j[2] for j in chunk], config)
        for (category, pair, _), ids in zip(chunk, outs):
            text_ids = [t for t in ids if t != codec.vocab.eos_id]
            answer = codec.text.decode(text_ids)
            rows.append({"key": pair["key"], "category": category, "expected": answer_for(category, pair["label"]),
                         "answer": answer, "correct": correct(category, answer, pair["label"])})
    with open(out_file, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    acc = {c: sum(r["correct"] for r in rows if r["category"] == c) / max(1, sum(r["category"] == c for r in rows))
           for c in QUESTIONS}
    acc["overall"] = sum(r["correct"] for r in rows) / max(1, len(rows))
    return acc


def run(cmd: list[str], log: Path) -> None:
    print("+", " ".join(cmd), flush=True)
    with open(log, "a") as f:
        f.write("+ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        print(log.read_text()[-4000:], file=sys.stderr)
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quickstart", required=True, type=Path, help="a finished quickstart run folder")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-images", type=int, default=3000, help="train pairs used (3 questions each)")
    p.add_argument("--eval-images", type=int, default=100, help="test_seen pairs asked (3 questions each)")
    p.add_argument("--margin", type=float, default=0.3, help="required overall gain in accuracy")
    p.add_argument("--steps", type=int, help="override the config's steps")
    args = p.parse_args(argv)

    qs, out = args.quickstart, args.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    log.write_text("")
    wall: dict[str, float] = {}

    t = time.perf_counter()
    train_pairs = read_pairs(str(qs / "data" / "pairs" / "train-*.tar"))
    random.Random(args.seed).shuffle(train_pairs)
    train_pairs = train_pairs[: args.train_images]
    eval_pairs = read_pairs(str(qs / "data" / "pairs" / "test_seen-*.tar"), limit=args.eval_images)
    n_train = write_jsonl(out / "sft_train.jsonl", train_pairs)
    n_eval = write_jsonl(out / "sft_heldout.jsonl", eval_pairs)
    tokens = out / "tokens" / "sft"
    run(["chameleon", "data", "tokenize", "--data", str(out / "sft_train.jsonl"), "--kind", "messages",
         "--recipe", "sft", "--tokenizers", str(qs / "tokenizers"), "--out", str(tokens),
         "--workers", "2", "--seed", str(args.seed), "--no-progress"], log)
    wall["data"] = time.perf_counter() - t

    t = time.perf_counter()
    before = evaluate(qs / "model", eval_pairs, out / "answers_before.jsonl")
    wall["eval_before"] = time.perf_counter() - t
    print("before:", json.dumps(before), flush=True)

    t = time.perf_counter()
    cmd = ["chameleon", "train", str(CONFIG), f"init_from={qs / 'model'}", f"data={tokens}",
           f"out_dir={out / 'train'}", f"export_dir={out / 'model'}", f"seed={args.seed}", "--no-progress"]
    if args.steps:
        cmd.insert(-1, f"steps={args.steps}")
    run(cmd, log)
    wall["train"] = time.perf_counter() - t

    t = time.perf_counter()
    after = evaluate(out / "model", eval_pairs, out / "answers_after.jsonl")
    wall["eval_after"] = time.perf_counter() - t
    print("after:", json.dumps(after), flush=True)

    train_log = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()
                 if line.strip()]
    steps = max((r.get("step", 0) for r in train_log), default=0)
    passed = after["overall"] >= before["overall"] + args.margin
    result = {
        "quickstart": str(qs), "seed": args.seed, "train_conversations": n_train,
        "heldout_questions": n_eval, "steps": steps,
        "final_train_ce": train_log[-1].get("ce") if train_log else None,
        "before": before, "after": after, "margin": args.margin, "passed": passed,
        "seconds": {k: round(v, 1) for k, v in wall.items()},
    }
    (out / "sft.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
