"""Model folders for the serving benchmark (``bench_serve.py``): ours (native) and Hugging Face's.

    python bench/serve_models.py small /tmp/serve-bench            # small-native/ + small-hf/
    python bench/serve_models.py export /tmp/qsA0/model /tmp/serve-bench/qs-hf   # any native folder

``build_small(dir)`` writes the ``small`` preset (dim 512, 8 layers, 8 heads, ffn 1408, vocab 65,536)
with random weights (``torch.manual_seed(0)``), a byte-level BPE text tokenizer in the official id
layout filled to exactly 65,536 ids, and a random taming VQGAN with the official codebook (8192) and
token count (512 px -> 32 x 32 = 1024 codes per image, narrow channels), as ``DIR/small-native``;
then exports it with ``chameleon convert --to hf`` as ``DIR/small-hf``, the folder that
``transformers.ChameleonForConditionalGeneration`` and vLLM load.

Why the tokenizer is filled to the model's vocabulary: a random model samples any of the 65,536 ids, and
a server detokenizing an id its tokenizer lacks fails or drops it. The ids past the trained merges are
plain text tokens (``~f12345``) that no text encodes to, but that decode.

``export_hf(native, hf)`` converts an existing native folder (e.g. the quickstart's ``/tmp/qsA0/model``).
The HF layout holds taming VQ encoders only; a model whose VQGAN has a patch encoder (the quickstart's)
is exported with a random taming VQGAN of the same codebook and resolution in its place (HF and vLLM use
the VQ encoder for image *inputs* only, so text serving is unaffected), and the export says so.

Both also write ``preprocessor_config.json`` and ``processor_config.json`` (HF's ``ChameleonProcessor``,
which vLLM builds for a Chameleon model) sized to the VQGAN, which ``save_hf_model`` does not write.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer

from chameleon_lm import Chameleon, ChameleonConfig
from chameleon_lm.checkpoints import load_model, save_as, save_model
from chameleon_lm.tokenizers.image import ImageTokenizer
from chameleon_lm.tokenizers.text import TextTokenizer, train_text_tokenizer
from chameleon_lm.tokenizers.vqgan import VQGAN, VQGANConfig

SEED = 0


def synthetic_corpus(n_docs: int = 20000, seed: int = SEED) -> list[str]:
    """Seeded pseudo-English: words of 1-4 syllables, so BPE finds tens of thousands of merges."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
              "z", "br", "ch", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "sl", "st", "th", "tr", "wh"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ie", "oa", "oo", "ou", "y"]
    codas = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "rk", "st", "sh", "ck"]
    words = []
    for _ in range(30000):
        w = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                    for _ in range(rng.choice((1, 1, 2, 2, 2, 3, 3, 4))))
        words.append(w.capitalize() if rng.random() < 0.1 else w)
    cum, total = [], 0.0
    for i in range(len(words)):  # Zipf-like frequencies
        total += 1 / (i + 10)
        cum.append(total)
    docs = []
    for _ in range(n_docs):
        n = rng.randint(20, 80)
        text = " ".join(rng.choices(words, cum_weights=cum, k=n))
        docs.append(text + rng.choice([".", "!", "?", ".", ". 42", ", 2024."]))
    return docs


def filled(tokenizer: TextTokenizer, size: int) -> TextTokenizer:
    """``tokenizer`` with plain text tokens ``~fNNNNN`` appended up to exactly ``size`` ids."""
    data = json.loads(tokenizer.tokenizer.to_str())
    vocab = data["model"]["vocab"]
    n = len(tokenizer)
    if n > size:
        raise ValueError(f"the tokenizer has {n} ids, more than {size}")
    for i in range(n, size):
        vocab[f"~f{i:05d}"] = i
    return TextTokenizer(Tokenizer.from_str(json.dumps(data)))


def small_text_tokenizer(vocab_size: int = 65536, codebook_size: int = 8192) -> TextTokenizer:
    """A BPE in the official layout (ids 0-8195 specials and image codes, 8710 end-of-turn, 8711
    HF's ``<image>``), trained on :func:`synthetic_corpus`, filled to ``vocab_size`` ids."""
    tok = train_text_tokenizer(synthetic_corpus(), vocab_size, codebook_size=codebook_size)
    return filled(tok, vocab_size)


def small_vqgan_config(resolution: int = 512, n_embed: int = 8192) -> VQGANConfig:
    """A narrow taming VQGAN with the official downsampling (16x: 512 px -> 1024 codes)."""
    return VQGANConfig(resolution=resolution, ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1,
                       z_channels=32, embed_dim=32, n_embed=n_embed, norm_groups=32)


def write_processor_configs(hf_dir: Path, vq: VQGANConfig) -> None:
    """HF's ``ChameleonProcessor`` files (the official ones, resized to this VQGAN)."""
    r = vq.resolution
    pre = {
        "image_processor_type": "ChameleonImageProcessor", "processor_class": "ChameleonProcessor",
        "do_resize": True, "size": {"shortest_edge": r}, "resample": 1,
        "do_center_crop": True, "crop_size": {"height": r, "width": r},
        "do_rescale": True, "rescale_factor": 0.0078, "do_normalize": True,
        "image_mean": [1.0, 1.0, 1.0], "image_std": [1.0, 1.0, 1.0], "do_convert_rgb": True,
    }
    (hf_dir / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    proc = {"processor_class": "ChameleonProcessor", "image_seq_length": vq.num_tokens,
            "image_token": "<image>"}
    (hf_dir / "processor_config.json").write_text(json.dumps(proc, indent=2) + "\n")


def export_hf(native_dir: str | Path, hf_dir: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``hf_dir`` (new or empty) from the model folder ``native_dir`` (any layout we load)."""
    native_dir, hf_dir = Path(native_dir), Path(hf_dir)
    if hf_dir.exists() and any(hf_dir.iterdir()):
        raise FileExistsError(f"{hf_dir}: exists and is not an empty folder")
    loaded = load_model(native_dir, dtype=dtype)
    vq = loaded.image_tokenizer.config if loaded.image_tokenizer is not None else None
    if vq is None or vq.encoder != "taming" or vq.norm_groups != 32:
        # HF's layout (and vLLM) need a taming encoder with 32 GroupNorm groups.
        base = vq or small_vqgan_config(n_embed=loaded.text_tokenizer.vocab.codebook_size)
        vq = base.replace(encoder="taming", norm_groups=32,
                          ch=max(32, (base.ch + 31) // 32 * 32))
        torch.manual_seed(SEED)
        loaded.image_tokenizer = ImageTokenizer(VQGAN(vq))
        print(f"{native_dir}: its VQGAN cannot be exported to HF; a random taming VQGAN "
              f"({vq.resolution} px, {vq.num_tokens} codes of {vq.n_embed}) stands in", file=sys.stderr)
    save_as("hf", hf_dir, loaded)
    write_processor_configs(hf_dir, vq)
    return hf_dir


def build_small(directory: str | Path, *, image_resolution: int = 512) -> tuple[Path, Path]:
    """``(DIR/small-native, DIR/small-hf)``: the ``small`` preset, seed 0 (reused if already there)."""
    directory = Path(directory)
    native, hf = directory / "small-native", directory / "small-hf"
    if not (native / "model.safetensors").is_file():
        torch.manual_seed(SEED)
        model = Chameleon(ChameleonConfig.preset("small")).eval()
        vq = small_vqgan_config(image_resolution)
        torch.manual_seed(SEED)
        image_tok = ImageTokenizer(VQGAN(vq))
        text_tok = small_text_tokenizer(model.config.vocab_size, vq.n_embed)
        save_model(native, model, text_tok, image_tok)
    if not (hf / "config.json").is_file():
        export_hf(native, hf)
    return native, hf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("small", help="build DIR/small-native and DIR/small-hf")
    s.add_argument("dir", type=Path, nargs="?", default=Path("/tmp/serve-bench"))
    s.add_argument("--image-resolution", type=int, default=512)
    e = sub.add_parser("export", help="export a native model folder to the HF layout")
    e.add_argument("src", type=Path)
    e.add_argument("dst", type=Path)
    args = ap.parse_args()
    if args.cmd == "small":
        for p in build_small(args.dir, image_resolution=args.image_resolution):
            print(p)
    else:
        print(export_hf(args.src, args.dst))


if __name__ == "__main__":
    main()
