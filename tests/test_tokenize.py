"""``chameleon data tokenize``: recipes, token shards, bad samples, dedup, resumability."""

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_tokenizers
import torch
import webdataset as wds
from PIL import Image

from chameleon_lm import VQGANConfig
from chameleon_lm.cli import main
from chameleon_lm.data.recipes import RecipeConfig, RecipeError, build_document
from chameleon_lm.data.shards import TokenDataset
from chameleon_lm.data.sources import SourceConfig
from chameleon_lm.data.tokenize import TokenizeConfig, tokenize
from chameleon_lm.tokenizers.vocab import IMAGE, TEXT

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "white": (250, 250, 250)}


def _png(size=(32, 32), colour=(220, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else 0).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    corpus = [f"a {c} square on a grey background" for c in COLOURS] * 50
    return write_tiny_tokenizers(tmp_path_factory.mktemp("tokenizers"), corpus)


def _write_pairs(folder: Path, n_shards: int = 2, per_shard: int = 6, bad: bool = True) -> str:
    """Tar shards in img2dataset's layout; shard 0 holds one sample of every kind of bad input."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = list(COLOURS.items())
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"{s:05d}.tar"), user="", group="", mtime=0, encoder=False) as w:
            for i in range(per_shard):
                name, rgb = colours[(s * per_shard + i) % len(colours)]
                w.write({"__key__": f"{s:05d}{i:04d}", "png": _png((32 + i, 32), rgb),
                         "txt": f"a {name} square number {s} {i}".encode(),
                         "json": json.dumps({"faces": i % 2 == 0, "n": i}).encode()})
            if bad and s == 0:
                w.write({"__key__": "bad_bytes", "jpg": b"\xff\xd8 not a jpeg", "txt": b"broken"})
                w.write({"__key__": "bomb", "png": _png((3000, 3000), mode="L"), "txt": b"a bomb"})
                w.write({"__key__": "empty", "png": _png(), "txt": b"   "})
                w.write({"__key__": "latin1", "png": _png(), "txt": "caf\xe9".encode("latin-1")})
                w.write({"__key__": "tiny", "png": _png((4, 4)), "txt": b"a tiny one"})
                w.write({"__key__": "wide", "png": _png((200, 20)), "txt": b"a wide one"})
                w.write({"__key__": "dupe", "png": _png((32, 32), COLOURS["red"]),
                         "txt": b"a red square number 0 0"})
    return str(folder / ("{00000..%05d}.tar" % (n_shards - 1)))


def _config(tokenizers, data, out, **kw) -> TokenizeConfig:
    recipes = kw.pop("recipes", [RecipeConfig("caption-image", caption_dropout=0.25),
                                 RecipeConfig("image-caption")])
    return TokenizeConfig(source=SourceConfig(path=data), out=str(out), tokenizers=str(tokenizers),
                          recipes=recipes, image_batch=4, min_image_size=8, max_aspect_ratio=4.0,
                          max_image_pixels=1_000_000, **kw)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_pairs_become_two_datasets_and_bad_samples_are_skipped_and_counted(tokenizers, tmp_path):
    data = _write_pairs(tmp_path / "pairs")
    result = tokenize(_config(tokenizers, data, tmp_path / "tok"), progress=False, log=lambda *_: None)
    t2i, i2t = TokenDataset(tmp_path / "tok" / "caption-image"), TokenDataset(tmp_path / "tok" / "image-caption")
    summary = t2i.summary
    assert summary["skipped"] == {"aspect_ratio": 1, "bad_image": 1, "decompression_bomb": 1,
                                  "empty_text": 1, "image_too_small": 1, "undecodable_text": 1}
    assert summary["duplicates_removed"] == 1 and summary["documents"] == len(t2i) == 12
    assert summary["images"] == 13  # the duplicate was tokenized, then dropped from the index
    skipped = [json.loads(line) for line in (tmp_path / "tok" / "caption-image" / "000000.skipped.jsonl").open()]
    assert {s["key"].rsplit("/", 1)[-1] for s in skipped} == {"bad_bytes", "bomb", "empty", "latin1", "tiny", "wide"}
    assert result["stats"]["images"] == 13 and result["stats"]["tokens"] > 0
    n_codes = VQGANConfig.preset("tiny").num_tokens
    dropped = 0
    for i in range(len(t2i)):
        a, b = t2i[i], i2t[i]
        assert int((a.modality == IMAGE).sum()) == int((b.modality == IMAGE).sum()) == n_codes
        assert a.loss_mask.all()
        first_text = int((b.modality == TEXT).nonzero()[0, 0])
        assert not b.loss_mask[:first_text].any() and b.loss_mask[first_text:].all()
        assert b.modality[1] != TEXT  # image first
        dropped += int(not (a.modality == TEXT).any())
    assert 0 < dropped < len(t2i)  # caption dropout 0.25 over 12 samples
    info = t2i.documents_info()
    assert info[0]["meta"] == {"faces": True, "n": 0} and len({d["hash"] for d in info}) == len(info)


def test_killed_and_rerun_tokenization_is_byte_identical(tokenizers, tmp_path):
    data = _write_pairs(tmp_path / "pairs", n_shards=3)
    quiet = dict(progress=False, log=lambda *_: None)
    tokenize(_config(tokenizers, data, tmp_path / "clean"), **quiet)
    reference = _files(tmp_path / "clean")
    # A run killed while writing shard 1: its summary never written, its ids half written, no index.
    out = tmp_path / "killed"
    tokenize(_config(tokenizers, data, out), **quiet)
    for recipe in ("caption-image", "image-caption"):
        (out / recipe / "000001.json").unlink()
        ids = out / recipe / "000001.ids.npy"
        ids.write_bytes(ids.read_bytes()[:100])
        (out / recipe / "index.json").unlink()
        (out / recipe / "000002.flags.npy.tmp").write_bytes(b"partial")
    tokenize(_config(tokenizers, data, out), **quiet)
    for recipe in ("caption-image", "image-caption"):
        (out / recipe / "000002.flags.npy.tmp").unlink()  # a stray temp file is never read
    assert _files(out) == reference
    # And a real kill of the command, part-way, then the same command again.
    out = tmp_path / "sigkill"
    cmd = [sys.executable, "-m", "chameleon_lm.cli", "data", "tokenize", "--data", data, "--out", str(out),
           "--tokenizers", str(tokenizers), "--recipe", "caption-image", "--recipe", "image-caption",
           "--caption-dropout", "0.25", "--image-batch", "4", "--min-image-size", "8",
           "--max-aspect-ratio", "4", "--no-progress"]
    cfg_extra = tmp_path / "bomb.toml"
    cfg_extra.write_text("max_image_pixels = 1000000\n")
    cmd += ["--config", str(cfg_extra)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not (out / "caption-image" / "000000.json").exists():
        time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = subprocess.run(cmd, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    (out / "tokenize_run.json").unlink()
    (tmp_path / "clean" / "tokenize_run.json").unlink()
    assert _files(out) == _files(tmp_path / "clean")


def test_moved_data_gives_the_same_documents(tokenizers, tmp_path):
    import shutil

    data = _write_pairs(tmp_path / "here", n_shards=1, bad=False)
    quiet = dict(progress=False, log=lambda *_: None)
    tokenize(_config(tokenizers, data, tmp_path / "a"), **quiet)
    shutil.move(tmp_path / "here", tmp_path / "there")
    tokenize(_config(tokenizers, data.replace("here", "there"), tmp_path / "b"), **quiet)
    for recipe in ("caption-image", "image-caption"):
        a, b = tmp_path / "a" / recipe, tmp_path / "b" / recipe
        assert (a / "000000.docs.jsonl").read_bytes() == (b / "000000.docs.jsonl").read_bytes()
        assert (a / "000000.ids.npy").read_bytes() == (b / "000000.ids.npy").read_bytes()
    assert TokenDataset(tmp_path / "a" / "caption-image").documents_info()[0]["key"] == "00000.tar/000000000"


def test_two_workers_write_the_same_documents(tokenizers, tmp_path):
    data = _write_pairs(tmp_path / "pairs", n_shards=3, bad=False)
    quiet = dict(progress=False, log=lambda *_: None)
    tokenize(_config(tokenizers, data, tmp_path / "one"), **quiet)
    tokenize(_config(tokenizers, data, tmp_path / "two", workers=2), **quiet)
    for recipe in ("caption-image", "image-caption"):
        one, two = TokenDataset(tmp_path / "one" / recipe), TokenDataset(tmp_path / "two" / recipe)
        assert np.array_equal(one.lengths, two.lengths)
        assert one.documents_info() == two.documents_info()
        for i in range(len(one)):
            assert torch.equal(one[i].modality, two[i].modality)
            assert torch.equal(one[i].ids[one[i].modality == TEXT], two[i].ids[two[i].modality == TEXT])


def test_a_folder_is_never_resumed_with_other_settings(tokenizers, tmp_path):
    data = _write_pairs(tmp_path / "pairs", n_shards=1, bad=False)
    tokenize(_config(tokenizers, data, tmp_path / "tok"), progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="different config"):
        tokenize(_config(tokenizers, data, tmp_path / "tok", dedup="none"), progress=False,
                 log=lambda *_: None)


def test_text_and_interleaved_sources_through_the_cli(tokenizers, tmp_path):
    texts = tmp_path / "text.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n"
                             for t in ["a red square", "", "a blue square", "a red square"]))
    assert main(["data", "tokenize", "--data", str(texts), "--recipe", "text", "--tokenizers", str(tokenizers),
                 "--out", str(tmp_path / "text"), "--no-progress"]) == 0
    ds = TokenDataset(tmp_path / "text")
    assert len(ds) == 2 and ds.summary["duplicates_removed"] == 1 and ds.summary["skipped"] == {"empty_text": 1}
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png())
    rows = [{"texts": ["Here is a red square.", None, "Now it is blue."], "images": [None, "img/a.png", None]},
            {"texts": ["Gone.", None], "images": [None, "img/missing.png"]}]
    stories = tmp_path / "stories.jsonl"
    stories.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "tokenize", "--data", str(stories), "--recipe", "interleaved",
                 "--tokenizers", str(tokenizers), "--out", str(tmp_path / "stories"), "--no-progress"]) == 0
    ds = TokenDataset(tmp_path / "stories")
    assert len(ds) == 1 and ds.summary["skipped"] == {"missing_image": 1}
    mod = ds[0].modality
    assert mod[1] == TEXT and (mod == IMAGE).sum() == VQGANConfig.preset("tiny").num_tokens and mod[-2] == TEXT
    assert main(["data", "tokenize", "--data", str(stories), "--tokenizers", str(tokenizers)]) == 2  # no --out


def test_recipes():
    codes = torch.arange(4)
    seg = [codes, "a red square"]
    assert build_document(RecipeConfig("caption-image"), seg, "k", 0)[0].parts[0].text == "a red square"
    assert build_document(RecipeConfig("image-caption"), seg, "k", 0)[0].parts[1].text == "a red square"
    dropped = sum(len(build_document(RecipeConfig("caption-image", caption_dropout=0.3), seg, f"k{i}", 0)[0].parts) == 1
                  for i in range(2000))
    assert 0.27 < dropped / 2000 < 0.33
    again = [len(build_document(RecipeConfig("caption-image", caption_dropout=0.3), seg, f"k{i}", 0)[0].parts)
             for i in range(50)]
    assert again == [len(build_document(RecipeConfig("caption-image", caption_dropout=0.3), seg, f"k{i}", 0)[0].parts)
                     for i in range(50)]
    prompt, answer = build_document(RecipeConfig("chat"), ["Draw a red square.", codes], "k", 0)
    assert prompt.parts[0].text == "Draw a red square." and answer.images
    prompt, answer = build_document(RecipeConfig("chat", chat_answer="text"), [codes, "red", codes], "k", 0)
    assert answer.parts[0].text == "red" and len(prompt.images) == 2
    with pytest.raises(RecipeError) as e:
        build_document(RecipeConfig("image-caption"), ["only text"], "k", 0)
    assert e.value.reason == "no_image"
    with pytest.raises(ValueError, match="unknown recipe"):
        RecipeConfig("captions")
    with pytest.raises(ValueError, match="caption-image recipe only"):
        RecipeConfig("text", caption_dropout=0.1)
