"""Tests of the shapes world: determinism, held-out pairs, pixels, captions and file formats."""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chameleon_lm.data.synth import (
    BACKGROUNDS,
    COLOURS,
    NO_POSE,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesWorld,
    caption,
    parse_caption,
    read_interleaved,
    read_pairs,
    render,
    write_dataset,
)

SMALL = dict(n_train_pairs=300, n_test_pairs=60, n_interleaved=40, n_interleaved_test=10,
             n_text=60, shard_size=100)
MENTION = re.compile(
    rf"\b({'|'.join(COLOURS)})\s+(?:(?:{'|'.join(SIZES)})\s+)?({'|'.join(SHAPES)})(?:e?s)?\b",
    re.IGNORECASE,
)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes") / "data"
    return out, write_dataset(out, seed=0, **SMALL)


def _pairs(root: Path, manifest: dict, split: str) -> list[tuple[Image.Image, str, dict]]:
    return list(read_pairs([root / shard for shard in manifest["files"]["pairs"][split]]))


# ----------------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_other_seed_differs(dataset, tmp_path):
    root, _ = dataset
    again = tmp_path / "again"
    other = tmp_path / "other"
    write_dataset(again, seed=0, **SMALL)
    write_dataset(other, seed=1, **SMALL)
    first, second, third = _hashes(root), _hashes(again), _hashes(other)
    assert first == second
    data_files = [name for name in first if name.endswith((".tar", ".jsonl"))]
    assert len(data_files) == 5 + 3 + 1  # tar shards, interleaved and text JSONL
    assert all(first[name] != third[name] for name in data_files)


def test_tar_members_have_fixed_metadata(dataset):
    root, manifest = dataset
    with tarfile.open(root / manifest["files"]["pairs"]["train"][0]) as tar:
        members = tar.getmembers()
    assert len(members) == 3 * SMALL["shard_size"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}


def test_in_memory_samplers_are_deterministic():
    world = ShapesWorld(seed=3)
    a, b = world.pairs("train", 5, seed=1), world.pairs("train", 5, seed=1)
    assert [(t, lab) for _, t, lab in a] == [(t, lab) for _, t, lab in b]
    assert all(x.tobytes() == y.tobytes() for (x, _, _), (y, _, _) in zip(a, b))
    assert world.text_documents(4) == world.text_documents(4)
    assert [d.labels for d in world.interleaved("train", 4)] == [
        d.labels for d in world.interleaved("train", 4)]
    assert [lab for _, _, lab in world.pairs("train", 5, seed=2)] != [lab for _, _, lab in a]


# -------------------------------------------------------------------------------------- held out


@pytest.mark.parametrize("seed", range(5))
def test_heldout_pairs_leave_every_colour_and_shape_in_training(seed):
    world = ShapesWorld(seed=seed)
    held = set(world.heldout_pairs)
    assert 4 <= len(held) <= 0.2 * len(COLOURS) * len(SHAPES)
    train = set(world.allowed_pairs("train"))
    assert not held & train
    assert {c for c, _ in train} == set(COLOURS)
    assert {s for _, s in train} == set(SHAPES)
    assert set(world.allowed_pairs("test_unseen")) == held


def test_heldout_pairs_depend_on_seed_and_fraction_is_checked():
    assert len({ShapesWorld(seed=s).heldout_pairs for s in range(5)}) > 1
    assert len(ShapesWorld(holdout_fraction=0.5).heldout_pairs) == 24
    with pytest.raises(ValueError):
        ShapesWorld(holdout_fraction=0.0)
    with pytest.raises(ValueError):
        ShapesWorld(holdout_fraction=0.6)


def test_heldout_pairs_never_in_training_data(dataset):
    root, manifest = dataset
    held = {tuple(p) for p in manifest["heldout_pairs"]}
    train_texts: list[str] = []
    seen_colours, seen_shapes = set(), set()
    for _, text, meta in _pairs(root, manifest, "train"):
        assert (meta["colour"], meta["shape"]) not in held
        seen_colours.add(meta["colour"])
        seen_shapes.add(meta["shape"])
        train_texts.append(text)
    assert seen_colours == set(COLOURS) and seen_shapes == set(SHAPES)
    for row in _jsonl(root / "interleaved" / "train.jsonl"):
        assert all((lab["colour"], lab["shape"]) not in held for lab in row["labels"] if lab)
        train_texts += [t for t in row["texts"] if t]
    train_texts += [row["text"] for row in _jsonl(root / "text" / "train.jsonl")]
    mentions = [(c.lower(), s.lower()) for t in train_texts for c, s in MENTION.findall(t)]
    assert len(mentions) > 300
    assert not set(mentions) & held


def test_test_splits_hold_the_right_pairs(dataset):
    root, manifest = dataset
    held = {tuple(p) for p in manifest["heldout_pairs"]}
    unseen = _pairs(root, manifest, "test_unseen")
    assert len(unseen) == SMALL["n_test_pairs"]
    assert all((m["colour"], m["shape"]) in held for _, _, m in unseen)
    seen = _pairs(root, manifest, "test_seen")
    assert all((m["colour"], m["shape"]) not in held for _, _, m in seen)
    for row in _jsonl(root / "interleaved" / "test_unseen.jsonl"):
        assert all((lab["colour"], lab["shape"]) in held for lab in row["labels"] if lab)
    for row in _jsonl(root / "interleaved" / "test_seen.jsonl"):
        assert all((lab["colour"], lab["shape"]) not in held for lab in row["labels"] if lab)


# ---------------------------------------------------------------------------------------- pixels


def test_palette_is_well_separated():
    assert not set(COLOURS) & set(BACKGROUNDS)
    fg = np.array(list(COLOURS.values()), dtype=float)
    bg = np.array(list(BACKGROUNDS.values()), dtype=float)
    assert np.linalg.norm(fg[:, None] - bg[None], axis=-1).min() > 90
    fg_gaps = np.linalg.norm(fg[:, None] - fg[None], axis=-1)
    assert fg_gaps[~np.eye(len(fg), dtype=bool)].min() > 110


@pytest.mark.parametrize("image_size", [32, 64])
def test_labels_match_pixels(image_size):
    world = ShapesWorld(seed=0, image_size=image_size)
    rng = random.Random(0)
    for split in ("train", "test_unseen"):
        for _ in range(150):
            label = world.sample_label(rng, split)
            image = world.render(label)
            assert image.size == (image_size, image_size) and image.mode == "RGB"
            pixels = np.asarray(image).reshape(-1, 3)
            border = np.concatenate([np.asarray(image)[[0, -1]].reshape(-1, 3),
                                     np.asarray(image)[:, [0, -1]].reshape(-1, 3)])
            background = BACKGROUNDS[label["background"]]
            assert Counter(map(tuple, border)).most_common(1)[0][0] == background
            counts = Counter(map(tuple, pixels))
            del counts[background]
            assert counts.most_common(1)[0][0] == COLOURS[label["colour"]], label


def _area(label: dict) -> int:
    image = np.asarray(render(label, 32)).reshape(-1, 3)
    return int((image != BACKGROUNDS[label["background"]]).any(axis=1).sum())


@pytest.mark.parametrize("shape", SHAPES)
def test_sizes_are_ordered_by_area(shape):
    for position in POSITIONS:
        base = {"colour": "red", "shape": shape, "position": position, "background": "grey",
                "pose": NO_POSE}
        areas = [_area({**base, "size": size}) for size in SIZES]
        assert areas == sorted(areas) and areas[0] * 1.5 < areas[1] and areas[1] * 1.3 < areas[2]


def test_position_moves_the_shape():
    def centroid(position: str) -> np.ndarray:
        label = {"colour": "black", "shape": "square", "size": "medium", "position": position,
                 "background": "sand"}
        ys, xs = np.nonzero((np.asarray(render(label, 32)) != BACKGROUNDS["sand"]).any(axis=-1))
        return np.array([xs.mean(), ys.mean()])

    centre = centroid("centre")
    assert centroid("left")[0] < centre[0] - 3 < centre[0] + 3 < centroid("right")[0]
    assert centroid("top")[1] < centre[1] - 3 < centre[1] + 3 < centroid("bottom")[1]


# -------------------------------------------------------------------------------------- captions


def test_parse_caption_recovers_caption_attributes():
    world = ShapesWorld(seed=0)
    rng = random.Random(1)
    for i in range(1000):
        label = world.sample_label(rng, "train" if i % 2 else "test_unseen")
        text = caption(label, rng)
        assert f"{label['colour']} {label['shape']}" in text
        parsed = parse_caption(text)
        assert parsed is not None
        assert all(parsed[key] == label[key] for key in parsed), (text, parsed)
        attributes = ("colour", "shape", "size", "position", "background")
        assert parse_caption(caption(label)) == {k: label[k] for k in attributes}


def test_parse_caption_robust_and_rejects_nonsense():
    assert parse_caption("THERE IS A SMALL BLUE TRIANGLE, AT THE TOP!!!") == {
        "colour": "blue", "shape": "triangle", "size": "small", "position": "top"}
    assert parse_caption("a red...circle") == {"colour": "red", "shape": "circle"}
    assert parse_caption("The ring is white.") == {"colour": "white", "shape": "ring"}
    assert parse_caption("a green cross on a gray background")["background"] == "grey"
    for text in ("", "hello world", "a red thing", "a lovely circle", "1234 !!"):
        assert parse_caption(text) is None


def test_captions_vary():
    world = ShapesWorld()
    rng = random.Random(0)
    label = world.sample_label(rng)
    assert len({caption(label, rng) for _ in range(200)}) >= 8


# ------------------------------------------------------------------------------ interleaved, text


def test_stories_change_one_attribute_per_step_as_the_text_says():
    world = ShapesWorld(seed=0)
    docs = world.interleaved("train", 60)
    assert {len(d.segments) // 2 for d in docs} == {2, 3, 4}
    for doc in docs:
        is_text = [isinstance(s, str) for s in doc.segments]
        assert is_text == [i % 2 == 0 for i in range(len(doc.segments))]
        labels = [lab for lab in doc.labels if lab]
        for i, (before, after) in enumerate(zip(labels, labels[1:])):
            changed = [k for k in before if before[k] != after[k]]
            assert len(changed) == 1
            text = doc.segments[2 * i + 2].lower()
            assert after[changed[0]] in text, (text, changed)
        for segment, lab in zip(doc.segments, doc.labels):
            if lab is not None:
                assert segment.tobytes() == world.render(lab).tobytes()


def test_world_can_be_restricted_to_some_sizes(tmp_path):
    world = ShapesWorld(seed=0, sizes=("large", "medium"), backgrounds=("slate", "grey"))
    assert world.sizes == ("medium", "large") and world.backgrounds == ("grey", "slate")
    labels = [lab for _, _, lab in world.pairs("train", 200)]
    labels += [lab for d in world.interleaved("train", 40) for lab in d.labels if lab]
    assert {lab["size"] for lab in labels} == {"medium", "large"}
    assert {lab["background"] for lab in labels} == {"grey", "slate"}
    assert ShapesWorld(seed=0, sizes=("small",)).pairs("train", 1)[0][2]["size"] == "small"
    for bad in ((), ("huge",)):
        with pytest.raises(ValueError, match="sizes"):
            ShapesWorld(seed=0, sizes=bad)
        with pytest.raises(ValueError, match="backgrounds"):
            ShapesWorld(seed=0, backgrounds=bad)
    manifest = write_dataset(tmp_path, sizes=["large", "medium"], backgrounds=["grey"], n_train_pairs=5,
                             n_test_pairs=2, n_interleaved=2, n_interleaved_test=1, n_text=2)
    assert manifest["vocab"]["sizes"] == ["medium", "large"]
    assert list(manifest["vocab"]["backgrounds"]) == ["grey"]


def test_snap_puts_shapes_on_a_pixel_grid_and_jitter_scales_the_pose(tmp_path):
    def bbox_centre(label: dict) -> tuple[float, float]:
        ys, xs = np.nonzero((np.asarray(render(label, 32)) != BACKGROUNDS["grey"]).any(axis=-1))
        return (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2

    world = ShapesWorld(seed=0, sizes=("medium", "large"), backgrounds=("grey",), snap=4, jitter=0.0)
    labels = [lab for _, _, lab in world.pairs("train", 120)]
    assert {lab["position"] for lab in labels} == set(POSITIONS)
    offsets = set()
    for lab in labels:
        assert lab["pose"]["scale"] == 1.0 and lab["pose"]["rotation"] == 0.0
        x, y = bbox_centre(lab)  # a symmetric shape at a whole pixel: the box is centred on it
        offsets.add((lab["size"], lab["position"], x - 16, y - 16))
        assert (x - 16) % 4 == 0 and (y - 16) % 4 == 0, lab
    # one offset per size and position: left/right and top/bottom are mirror images, centre is 0
    assert len(offsets) == 2 * len(POSITIONS)
    assert {(o[2], o[3]) for o in offsets if o[1] == "centre"} == {(0, 0)}
    # a labelled image still renders from its label alone, and the manifest records the options
    manifest = write_dataset(tmp_path, sizes=["medium"], backgrounds=["grey"], snap=4, jitter=0.5,
                             n_train_pairs=20, n_test_pairs=2, n_interleaved=2, n_interleaved_test=1,
                             n_text=2)
    assert (manifest["snap"], manifest["jitter"]) == (4, 0.5)
    for image, _, meta in _pairs(tmp_path, manifest, "train"):
        assert image.tobytes() == render(meta, 32).tobytes()
        assert abs(meta["pose"]["rotation"]) <= 5.0 and abs(meta["pose"]["scale"] - 1) <= 0.03
    with pytest.raises(ValueError, match="jitter"):
        ShapesWorld(jitter=1.5)
    with pytest.raises(ValueError, match="snap"):
        ShapesWorld(snap=-1)


def test_text_documents_are_varied_sentences():
    docs = ShapesWorld(seed=0).text_documents(50)
    assert len(docs) == 50 and len(set(docs)) == 50
    assert all(3 <= d.count(". ") + 1 <= 6 and d.endswith(".") for d in docs)


# --------------------------------------------------------------------------------------- formats


def test_webdataset_reads_the_shards(dataset):
    import webdataset as wds

    root, manifest = dataset
    shard = str(root / manifest["files"]["pairs"]["test_seen"][0])
    raw = list(wds.WebDataset(shard, shardshuffle=False))
    assert len(raw) == SMALL["n_test_pairs"]
    assert {k for k in raw[0] if not k.startswith("__")} == {"png", "txt", "json"}
    assert raw[0]["__key__"] == "000000000" and raw[-1]["__key__"] == f"{len(raw) - 1:09d}"
    image, text, meta = next(iter(wds.WebDataset(shard, shardshuffle=False).decode("pil")
                                  .to_tuple("png", "txt", "json")))
    assert isinstance(image, Image.Image) and image.size == (32, 32)
    assert meta["caption"] == text and meta["key"] == "000000000"
    assert image.tobytes() == render(meta, 32).tobytes()


def test_interleaved_jsonl_is_obelics_style(dataset):
    root, manifest = dataset
    for split in ("train", "test_seen", "test_unseen"):
        path = root / manifest["files"]["interleaved"][split]
        rows = _jsonl(path)
        assert len(rows) == manifest["counts"]["interleaved_documents"][split]
        n_images = 0
        for row in rows:
            assert len(row["texts"]) == len(row["images"]) == len(row["labels"])
            for text, image, label in zip(row["texts"], row["images"], row["labels"]):
                assert (text is None) != (image is None)
                assert (label is None) == (image is None)
                if image is not None:
                    n_images += 1
                    assert not Path(image).is_absolute()
                    with Image.open(path.parent / image) as loaded:
                        assert loaded.format == "PNG" and loaded.size == (32, 32)
        assert n_images == manifest["counts"]["interleaved_images"][split]
        docs = list(read_interleaved(path))
        assert len(docs) == len(rows)
        assert isinstance(docs[0].segments[1], Image.Image)


def test_text_jsonl_and_manifest(dataset):
    root, manifest = dataset
    rows = _jsonl(root / "text" / "train.jsonl")
    assert len(rows) == SMALL["n_text"]
    assert all(isinstance(r["text"], str) and r["text"] for r in rows)
    on_disk = json.loads((root / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["seed"] == 0 and manifest["image_size"] == 32
    assert manifest["vocab"]["shapes"] == list(SHAPES)
    assert manifest["vocab"]["colours"] == {k: list(v) for k, v in COLOURS.items()}
    assert [tuple(p) for p in manifest["heldout_pairs"]] == list(ShapesWorld(seed=0).heldout_pairs)
    assert manifest["counts"]["pairs"] == {"train": 300, "test_seen": 60, "test_unseen": 60}
    assert manifest["files"]["pairs"]["train"] == [f"pairs/train-00000{i}.tar" for i in range(3)]
    shards = [f for split in manifest["files"]["pairs"].values() for f in split]
    assert all((root / f).is_file() for f in shards)


def test_refuses_non_empty_directory_unless_overwrite(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_dataset(out, **SMALL)
    tiny = dict(SMALL, n_train_pairs=10, shard_size=5)
    write_dataset(out, overwrite=True, **tiny)
    write_dataset(out, overwrite=True, **dict(tiny, n_train_pairs=4))
    assert sorted(p.name for p in (out / "pairs").glob("train-*")) == ["train-000000.tar"]
    assert (out / "notes.txt").read_text() == "keep me"


def _synth_only_main(argv: list[str]) -> int:
    """``chameleon_lm.cli.main`` restricted to ``data synth``: isolates this module's CLI."""
    from chameleon_lm.data import synth

    parser = argparse.ArgumentParser(prog="chameleon")
    data = parser.add_subparsers(required=True).add_parser("data").add_subparsers(required=True)
    synth.add_cli(data)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FileExistsError as e:
        print(f"chameleon: error: {e}", file=sys.stderr)
        return 2


def _chameleon_main(argv: list[str]) -> int:
    from chameleon_lm.cli import main

    return main(argv)


@pytest.mark.parametrize("main", [_synth_only_main, _chameleon_main])
def test_cli_writes_the_dataset(main, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["data", "synth", "--out", str(out), "--seed", "2", "--image-size", "64",
            "--train-pairs", "20", "--test-pairs", "5", "--interleaved", "3",
            "--interleaved-test", "2", "--text-docs", "4", "--shard-size", "8"]
    assert main(argv) == 0
    summary = capsys.readouterr().out
    assert str(out) in summary and "20 train" in summary
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 2 and manifest["image_size"] == 64
    assert len(manifest["files"]["pairs"]["train"]) == 3
    assert main(argv) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
