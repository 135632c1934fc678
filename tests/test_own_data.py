"""The README's "Train on your own data" path at toy scale: WebDataset shards of jpg + txt pairs and
nothing else, through the documented commands only."""

import io
import json
import random

import webdataset as wds
from PIL import Image, ImageDraw

from chameleon_lm import load_model
from chameleon_lm.cli import main
from chameleon_lm.data.shards import TokenDataset

COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 180, 60)}


def _jpg(colour, box) -> bytes:
    img = Image.new("RGB", (48, 40), (200, 200, 200))
    ImageDraw.Draw(img).ellipse(box, fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_captioned_jpg_shards_to_a_model_that_draws_and_captions(tmp_path):
    rng = random.Random(0)
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(3):
        with wds.TarWriter(str(shards / f"{s:06d}.tar")) as w:
            for i in range(12):
                name = rng.choice(list(COLOURS))
                x, y = rng.randint(4, 20), rng.randint(4, 12)
                w.write({"__key__": f"{s:06d}{i:04d}", "jpg": _jpg(COLOURS[name], (x, y, x + 20, y + 20)),
                         "txt": f"a {name} ball on grey".encode()})
    data, tok = str(shards / "{000000..000001}.tar"), str(tmp_path / "tok")
    assert main(["tokenizer", "train-image", "--data", data, "--out", tok, "--steps", "3",
                 "--batch-size", "4", "--ckpt-every", "2", "--no-progress"]) == 0
    assert main(["tokenizer", "train-text", "--data", data, "--out", tok, "--vocab-size", "1024",
                 "--codebook-size", "512"]) == 0
    assert main(["data", "tokenize", "--data", data, "--recipe", "caption-image", "--recipe", "image-caption",
                 "--caption-dropout", "0.1", "--tokenizers", tok, "--out", str(tmp_path / "tokens/pairs"),
                 "--workers", "2", "--no-progress"]) == 0
    assert main(["data", "tokenize", "--data", str(shards / "000002.tar"), "--recipe", "caption-image",
                 "--recipe", "image-caption", "--tokenizers", tok, "--out", str(tmp_path / "tokens/val"),
                 "--no-progress"]) == 0
    assert len(TokenDataset(tmp_path / "tokens/pairs/caption-image")) == 24
    config = tmp_path / "run.toml"
    config.write_text(f"""
model = "tiny"
tokenizers = "{tok}"
out_dir = "{tmp_path / 'run'}"
export_dir = "{tmp_path / 'run/model'}"
steps = 4
batch_size = 2
seq_len = 128
warmup_steps = 1
val_every = 2
val_batches = 1
[[data.sources]]
name = "pairs"
path = "{tmp_path / 'tokens/pairs/caption-image'}"
weight = 1.0
[[data.sources]]
name = "captions"
path = "{tmp_path / 'tokens/pairs/image-caption'}"
weight = 1.0
[val]
pairs = "{tmp_path / 'tokens/val/caption-image'}"
""")
    assert main(["train", str(config), "--no-progress"]) == 0
    log = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and "val/pairs/ce_image" in log[-1]
    model = str(tmp_path / "run/model")
    assert load_model(model).image_tokenizer is not None
    assert main(["generate", "--model", model, "--prompt", "a red ball", "--mode", "image", "--seed", "0",
                 "--out", str(tmp_path / "img")]) == 0
    assert Image.open(tmp_path / "img/image_0.png").size == (32, 32)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(_jpg(COLOURS["blue"], (10, 10, 30, 30)))
    assert main(["generate", "--model", model, "--prompt", "", "--image", str(photo), "--mode", "text",
                 "--max-new-tokens", "6", "--seed", "0", "--out", str(tmp_path / "cap")]) == 0
    assert json.loads((tmp_path / "cap/document.json").read_text())["parts"]
