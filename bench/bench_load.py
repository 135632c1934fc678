"""Peak resident memory of ``load_model`` on a 7B-shaped bf16 checkpoint, against its size on disk.

    python bench/bench_load.py                      # 7b: writes ~14 GB per layout, appends to RESULTS.md
    python bench/bench_load.py --preset small       # a quick check that the script works (not recorded)

For each layout (Meta's ``consolidated.pth``, Hugging Face's safetensors) it writes a synthetic
checkpoint of the preset's shapes (uninitialised bf16 tensors: the values do not matter, the bytes
do), then runs ``load_model`` in a fresh subprocess and reads its peak RSS (``ru_maxrss``) twice: right
after loading (memory-mapped weights are not read yet) and after a one-token forward pass, which reads
every weight. The target is a peak ≤ 1.3× the checkpoint size. The Meta figure includes the permuted
copies of ``wq``/``wk`` (the interleaved → rotate-half RoPE rows, ~15 % of a 7B model). The baseline is
the peak RSS of a subprocess that only imports torch and chameleon-lm. Needs 14 GB of free disk per
layout for 7b (checked first) and as much RAM as the checkpoint; the files are deleted afterwards
unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import append_results

from chameleon_lm import Chameleon, ChameleonConfig
from chameleon_lm.checkpoints.hf import save_hf_model
from chameleon_lm.checkpoints.meta import save_meta_model
from chameleon_lm.tokenizers.text import train_text_tokenizer

MEASURE = """
import json, resource, sys, torch
from chameleon_lm import load_model
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = {"baseline": peak()}
if sys.argv[1] != "-":
    model = load_model(sys.argv[1]).model
    out["load"] = peak()
    with torch.inference_mode():
        model(torch.zeros(1, 1, dtype=torch.long))
    out["forward"] = peak()
print(json.dumps(out))
"""


def synthetic_model(config: ChameleonConfig) -> Chameleon:
    """A bf16 model of the preset's shapes: uninitialised matrices (untouched pages cost no memory
    until written), ones for the norms (the QK-norm rows must be shared, as in a 7B checkpoint)."""
    with torch.device("meta"):
        model = Chameleon(config)
    state = {k: (torch.ones if "norm" in k else torch.empty)(v.shape, dtype=torch.bfloat16)
             for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    return model


def write_checkpoint(layout: str, model: Chameleon, root: Path, tokenizer) -> tuple[Path, int]:
    """A checkpoint folder of ``layout`` and the bytes of its weight files."""
    if layout == "meta":
        save_meta_model(root, model, tokenizer, name="7b")
        weights = list(root.glob("models/7b/*.pth"))
    else:
        save_hf_model(root, model, tokenizer)
        weights = list(root.glob("*.safetensors"))
    return root, sum(p.stat().st_size for p in weights)


def measure(path: Path | str) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="7b", choices=["7b", "small"])
    parser.add_argument("--layout", default="both", choices=["meta", "hf", "both"])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where to write")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()
    config = ChameleonConfig.preset(args.preset)
    layouts = ["meta", "hf"] if args.layout == "both" else [args.layout]
    need = 2 * config.num_params() * len(layouts)
    free = shutil.disk_usage(args.dir).free
    if free < need * 1.05:
        sys.exit(f"need {need / 1e9:.1f} GB free in {args.dir}, have {free / 1e9:.1f} GB: pass --dir")
    # The official id layout (8192 image codes, 1024 reserved) with a handful of merges.
    tokenizer = train_text_tokenizer(["a synthetic corpus"] * 8, 9500, codebook_size=8192)
    base = measure("-")["baseline"]
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench_load_", dir=args.dir))
    model = synthetic_model(config)
    try:
        for layout in layouts:
            path, size = write_checkpoint(layout, model, work / layout, tokenizer)
            r = measure(path)
            rows.append(f"| {layout} | {size / 1e9:.2f} | {r['load'] / 1e9:.2f} ({r['load'] / size:.2f}×) | "
                        f"{r['forward'] / 1e9:.2f} (**{r['forward'] / size:.2f}×**) | "
                        f"{(r['forward'] - base) / size:.2f}× |")
            print(rows[-1], flush=True)
            if not args.keep:
                shutil.rmtree(work / layout)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    body = (f"Baseline (python + torch + chameleon-lm imported): {base / 1e9:.2f} GB peak RSS. Target: "
            f"peak ≤ 1.3× the checkpoint size.\n\n"
            "| layout | checkpoint GB | peak RSS after load_model GB | peak RSS after a forward GB | "
            "(peak − baseline) / size |\n| --- | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n")
    print(body)
    if args.preset == "7b":
        append_results(f"load_model peak memory, `7b` shapes, bf16 ({', '.join(layouts)})", body)


if __name__ == "__main__":
    main()
