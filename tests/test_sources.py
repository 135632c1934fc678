"""Tests of the data sources: every format written here, units, bad samples, kinds, URLs, train-text."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from chameleon_lm.data.sources import (
    ImageRef, Sample, ShardError, Skipped, SourceConfig, detect_format, iter_images, iter_texts,
    load_image, open_source, read_pairs, write_webdataset,
)
from chameleon_lm.tokenizers.images import ImageError

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]


def _image(i: int) -> Image.Image:
    return Image.new("RGB", (8, 8), COLOURS[i % len(COLOURS)])


def _encoded(i: int, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    _image(i).save(buffer, format=fmt)
    return buffer.getvalue()


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A tar shard of (key, extension -> bytes) samples, files in the given order."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _shards(tmp_path: Path, n: int = 5, shard_size: int = 2) -> tuple[Path, list[str]]:
    samples = [(_image(i), f"a shape number {i}", {"index": i, "pose": {"dx": 0.1}})
               for i in range(n)]
    folder = tmp_path / "pairs"
    return folder, write_webdataset(folder, samples, prefix="train", shard_size=shard_size)


def _items(source) -> list[Sample | Skipped]:
    return list(source)


def _samples(items) -> list[Sample]:
    return [s for s in items if isinstance(s, Sample)]


def _skips(items) -> list[tuple[str, str]]:
    return [(s.key, s.reason) for s in items if isinstance(s, Skipped)]


# ---------------------------------------------------------------------------------- webdataset


def test_webdataset_units_samples_and_patterns(tmp_path):
    folder, names = _shards(tmp_path)
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    shards = [str(folder / n) for n in names]
    source = open_source(str(folder / "train-{000000..000002}.tar"))
    assert source.kind == "pairs" and source.format == "webdataset"
    assert source.units() == shards
    items = _items(source)
    assert [s.key for s in items] == [f"{shards[i // 2]}/{i:09d}" for i in range(5)]
    first = items[0]
    assert isinstance(first.segments[0], ImageRef) and first.segments[1] == "a shape number 0"
    assert first.meta["index"] == 0 and first.meta["key"] == "000000000"
    assert "pose" not in first.meta  # nested values stay out of the metadata
    assert load_image(first.segments[0]).getpixel((0, 0)) == COLOURS[0]
    # a unit read alone gives exactly its part of the stream; globs and folders name the same shards
    assert [s.key for s in source.read(shards[1])] == [s.key for s in items[2:4]]
    for spec in (str(folder / "train-*.tar"), str(folder)):
        assert open_source(spec).units() == shards
    assert list(iter_texts(source)) == [f"a shape number {i}" for i in range(5)]
    assert [key for key, _ in iter_images(source)] == [s.key for s in items]
    with pytest.raises(KeyError, match="not a unit"):
        source.read(str(folder / "other.tar"))
    # the synth-facing reader gives the whole sidecar, nested fields included
    image, text, meta = next(read_pairs(str(folder / "train-{000000..000002}.tar")))
    assert image.mode == "RGB" and text == "a shape number 0" and meta["pose"] == {"dx": 0.1}


def test_gzipped_shards_read_like_plain_ones(tmp_path):
    import gzip

    folder, names = _shards(tmp_path, n=3, shard_size=3)
    (tmp_path / "train.tar.gz").write_bytes(gzip.compress((folder / names[0]).read_bytes()))
    plain = [(s.segments[0].data, s.segments[1]) for s in open_source(str(folder / names[0]))]
    zipped = open_source(str(tmp_path / "train.tar.gz"))
    assert [(s.segments[0].data, s.segments[1]) for s in zipped] == plain


def test_webdataset_writer_is_byte_identical(tmp_path):
    a, names = _shards(tmp_path / "a")
    b, _ = _shards(tmp_path / "b")
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_brace_pattern_with_a_missing_shard_names_it(tmp_path):
    folder, _ = _shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="train-000003.tar"):
        open_source(str(folder / "train-{000000..000003}.tar")).units()


def test_webdataset_through_fsspec_file_and_memory_urls(tmp_path):
    folder, names = _shards(tmp_path)
    local = [(s.key.rsplit("/", 1)[1], s.segments[1], s.segments[0].data)
             for s in open_source(str(folder))]
    file_source = open_source(f"file://{folder}/train-{{000000..000002}}.tar")
    assert file_source.units() == [f"file://{folder}/{n}" for n in names]
    memory = fsspec.filesystem("memory")
    try:
        for n in names:
            memory.pipe(f"/sources-test/{n}", (folder / n).read_bytes())
        memory_source = open_source("memory://sources-test/train-*.tar")
        assert memory_source.units() == [f"memory:///sources-test/{n}" for n in names]
        for source in (file_source, memory_source):
            assert [(s.key.rsplit("/", 1)[1], s.segments[1], s.segments[0].data)
                    for s in source] == local
    finally:
        memory.rm("/sources-test", recursive=True)


def test_webdataset_bad_samples_are_skipped_not_raised(tmp_path):
    png = _encoded(0)
    _write_tar(tmp_path / "bad.tar", [
        ("a", {"jpg": _encoded(1, "JPEG"), "txt": b"good caption"}),
        ("b", {"png": png, "txt": b"\xff\xfe broken"}),
        ("c", {"txt": b"caption without an image"}),
        ("d", {"png": png, "json": b"{not json"}),
        ("e", {"webp": png, "json": b'{"caption": "from the sidecar", "url": "u", "n": [1]}'}),
        ("f", {"png": png}),
    ])
    items = _items(open_source(str(tmp_path / "bad.tar")))
    unit = str(tmp_path / "bad.tar")
    assert _skips(items) == [(f"{unit}/b", "undecodable_text"), (f"{unit}/c", "no_image"),
                             (f"{unit}/d", "bad_record")]
    good = {s.key.rsplit("/", 1)[1]: s for s in _samples(items)}
    assert good["a"].segments[1] == "good caption"
    assert good["e"].segments[1] == "from the sidecar" and good["e"].meta == {
        "caption": "from the sidecar", "url": "u"}
    assert len(good["f"].segments) == 1  # an image without a caption is still an image


def test_truncated_or_corrupt_shard_gives_what_it_has_then_a_skip(tmp_path):
    folder, names = _shards(tmp_path, n=4, shard_size=4)
    whole = (folder / names[0]).read_bytes()
    full = [s.key.rsplit("/", 1)[1] for s in open_source(str(folder / names[0]))]
    assert full == [f"{i:09d}" for i in range(4)]
    with tarfile.open(folder / names[0]) as tar:
        members = tar.getmembers()  # 3 files per sample: json, png, txt
    end_of_members = members[-1].offset_data + (members[-1].size + 511) // 512 * 512
    cuts = {
        "inside a member's data": members[7].offset_data + 5,
        "at a member boundary": members[9].offset,
        "inside a header": members[9].offset + 100,
        "before the end-of-archive blocks": end_of_members,
        "empty file": 0,
    }
    for what, cut in cuts.items():
        path = tmp_path / "cut.tar"
        path.write_bytes(whole[:cut])
        items = list(open_source(str(path)).read(str(path)))
        *samples, last = items
        assert isinstance(last, Skipped) and last.reason == "truncated_shard", what
        assert last.key == str(path) and str(path) in last.detail
        keys = [s.key.rsplit("/", 1)[1] for s in samples]
        assert all(isinstance(s, Sample) for s in samples) and keys == full[:len(keys)], what
        # the sample being read at the cut is dropped, even if its files happen to be complete
        assert len(keys) == {"before the end-of-archive blocks": 3, "empty file": 0}.get(what, 2), what
        with pytest.raises(ShardError):
            list(read_pairs([path]))
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file at all" * 40)
    assert _skips(open_source(str(tmp_path / "junk.tar"))) == [
        (str(tmp_path / "junk.tar"), "truncated_shard")]


# --------------------------------------------------------------------------------------- files


def test_img2dataset_files_folder(tmp_path):
    root = tmp_path / "out"
    for shard, keys in (("00000", range(0, 3)), ("00001", range(3, 5))):
        (root / shard).mkdir(parents=True)
        for i in keys:
            (root / shard / f"{i:09d}.jpg").write_bytes(_encoded(i, "JPEG"))
            (root / shard / f"{i:09d}.txt").write_text(f"caption {i}")
            (root / shard / f"{i:09d}.json").write_text(json.dumps({"key": f"{i:09d}", "w": 8}))
        (root / f"{shard}.parquet").write_bytes(b"PAR1 img2dataset metadata, never read")
        (root / f"{shard}_stats.json").write_text("{}")
    (root / "00001" / "orphan.txt").write_text("no image")
    (root / "00001" / "000000004.txt").write_bytes(b"\xc3\x28")
    source = open_source(str(root))
    assert source.format == "files" and source.kind == "pairs"
    assert source.units() == [str(root / "00000"), str(root / "00001")]
    items = _items(source)
    assert _skips(items) == [(str(root / "00001" / "000000004"), "undecodable_text"),
                             (str(root / "00001" / "orphan"), "no_image")]
    samples = _samples(items)
    assert [s.segments[1] for s in samples] == [f"caption {i}" for i in range(4)]
    assert samples[0].segments[0] == ImageRef(path=str(root / "00000" / "000000000.jpg"))
    assert samples[0].meta == {"key": "000000000", "w": 8}


def test_plain_image_folder_is_readable_for_images(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"photo_{i}.PNG").write_bytes(_encoded(i))
    (folder / "notes.md").write_text("not a sample")
    source = open_source(str(folder))
    assert source.units() == [str(folder)]
    assert list(iter_texts(source)) == []
    refs = list(iter_images(source))
    assert [key for key, _ in refs] == [str(folder / f"photo_{i}") for i in range(3)]
    assert [load_image(ref).getpixel((0, 0)) for _, ref in refs] == COLOURS[:3]


# ------------------------------------------------------------------------------------- parquet


def test_parquet_pairs_one_unit_per_row_group(tmp_path):
    (tmp_path / "img.png").write_bytes(_encoded(1))
    pq.write_table(pa.table({
        "image": [{"bytes": _encoded(0), "path": None}, {"bytes": None, "path": "img.png"}, None],
        "caption": ["a red square", "a green square", "nothing"],
        "width": [8, 8, 8],
        "tags": [["x"], [], []],
    }), tmp_path / "pairs.parquet", row_group_size=2)
    path = str(tmp_path / "pairs.parquet")
    source = open_source(path)
    assert source.format == "parquet" and source.kind == "pairs"
    assert source.units() == [f"{path}#rg0", f"{path}#rg1"]
    items = _items(source)
    assert [s.key for s in items] == [f"{path}#rg0/0", f"{path}#rg0/1", f"{path}#rg1/2"]
    assert _skips(items) == [(f"{path}#rg1/2", "no_image")]
    first, second = _samples(items)
    assert first.segments[1] == "a red square" and first.meta == {"width": 8}
    assert second.segments[0] == ImageRef(path=str(tmp_path / "img.png"))
    assert load_image(first.segments[0]).getpixel((0, 0)) == COLOURS[0]
    assert [s.key for s in open_source(path).read(f"{path}#rg1")] == [f"{path}#rg1/2"]
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 but nothing else")
    with pytest.raises(ValueError, match="broken.parquet: not a readable parquet"):
        open_source(str(tmp_path / "broken.parquet"))


def test_parquet_text_and_interleaved(tmp_path):
    pq.write_table(pa.table({"text": ["hello world", "", None], "id": [1, 2, 3]}),
                   tmp_path / "text.parquet")
    text = open_source(str(tmp_path / "text.parquet"))
    assert text.kind == "text"
    items = _items(text)
    assert [s.segments for s in _samples(items)] == [["hello world"]]
    assert [r for _, r in _skips(items)] == ["empty_text", "empty_text"]
    assert _samples(items)[0].meta == {"id": 1}

    (tmp_path / "img.png").write_bytes(_encoded(2))
    pq.write_table(pa.table({
        "texts": [["Look:", None, "a blue square."], [None, "remote"]],
        "images": [[None, "img.png", None], ["https://example.com/a.jpg", None]],
        "url": ["https://example.com/page", "https://example.com/other"],
    }), tmp_path / "obelics.parquet")
    docs = open_source(str(tmp_path / "obelics.parquet"))
    assert docs.kind == "interleaved"
    items = _items(docs)
    assert _samples(items)[0].segments == ["Look:", ImageRef(path=str(tmp_path / "img.png")),
                                           "a blue square."]
    assert _samples(items)[0].meta == {"url": "https://example.com/page"}
    assert [r for _, r in _skips(items)] == ["remote_image_refused"]


# --------------------------------------------------------------------------------------- jsonl


def test_jsonl_text_units_and_bad_lines(tmp_path):
    lines = [b'{"text": "first", "source": "web", "extra": {"a": 1}}', b"{not json",
             b'{"text": "caf\xe9"}', b'{"text": "   "}', b"", b"[1, 2]", b'{"other": "x"}',
             b'{"text": "last"}']
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"\n".join(lines))  # no newline after the last line
    source = open_source(str(path), rows_per_unit=3)
    assert source.kind == "text"
    unit = str(path)
    assert source.units() == [f"{unit}@0", f"{unit}@3", f"{unit}@6"]
    items = _items(source)
    assert [s.key for s in _samples(items)] == [f"{unit}@0/0", f"{unit}@6/7"]
    assert _samples(items)[0].meta == {"source": "web"}
    assert _skips(items) == [(f"{unit}@0/1", "bad_record"), (f"{unit}@0/2", "undecodable_text"),
                             (f"{unit}@3/3", "empty_text"), (f"{unit}@3/5", "bad_record"),
                             (f"{unit}@6/6", "bad_record")]
    # a fresh source reads one unit by seeking to it, with the same keys
    fresh = open_source(SourceConfig(path=str(path), rows_per_unit=3))
    assert [s.key for s in fresh.read(f"{unit}@6")] == [f"{unit}@6/6", f"{unit}@6/7"]
    for bad in (f"{unit}@1", f"{unit}@9", f"{unit}", "elsewhere.jsonl@0"):
        with pytest.raises(KeyError):
            fresh.read(bad)


def test_jsonl_interleaved_images_missing_and_remote(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "0.png").write_bytes(_encoded(0))
    rows = [
        {"texts": ["A red square.", None], "images": [None, "images/0.png"], "id": 7},
        {"texts": [None, "gone"], "images": ["images/missing.png", None]},
        {"texts": ["remote", None], "images": [None, "http://example.com/x.jpg"]},
        {"texts": ["misaligned"], "images": []},
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = _items(open_source(str(path)))
    assert [r for _, r in _skips(items)] == ["missing_image", "remote_image_refused", "bad_record"]
    (doc,) = _samples(items)
    assert doc.segments == ["A red square.", ImageRef(path=str(tmp_path / "images" / "0.png"))]
    assert doc.meta == {"id": 7}
    remote = _samples(open_source(str(path), allow_remote=True))
    assert remote[1].segments[1] == ImageRef(url="http://example.com/x.jpg")
    with pytest.raises(ImageError, match="refused"):
        load_image(remote[1].segments[1])
    with pytest.raises(ImageError, match=r"^<9 bytes>: not a readable image \(.*\)$") as error:
        load_image(ImageRef(data=b"not a png"))
    assert " at 0x" not in str(error.value)  # reruns write the same skip messages
    with pytest.raises(ImageError, match="missing.png") as error:
        load_image(ImageRef(path=str(tmp_path / "images" / "missing.png")))
    assert isinstance(error.value.__cause__, FileNotFoundError)


def test_jsonl_from_a_memory_url_reads_relative_images(tmp_path):
    memory = fsspec.filesystem("memory")
    try:
        memory.pipe("/sources-jsonl/images/0.png", _encoded(3))
        memory.pipe("/sources-jsonl/d.jsonl",
                    b'{"texts": ["Hi", null], "images": [null, "images/0.png"]}\n')
        (doc,) = _samples(open_source("memory://sources-jsonl/d.jsonl"))
        assert doc.key == "memory:///sources-jsonl/d.jsonl@0/0"
        assert load_image(doc.segments[1]).getpixel((0, 0)) == COLOURS[3]
    finally:
        memory.rm("/sources-jsonl", recursive=True)


# ------------------------------------------------------------------------------ kinds, formats


def test_kind_and_format_detection(tmp_path):
    (tmp_path / "cat.png").write_bytes(_encoded(0))

    def jsonl(name: str, record: dict) -> str:
        (tmp_path / name).write_text(json.dumps(record) + "\n")
        return str(tmp_path / name)

    assert open_source(jsonl("t.jsonl", {"text": "x"})).kind == "text"
    assert open_source(jsonl("c.jsonl", {"content": "x"}), text_field="content").kind == "text"
    pairs = open_source(jsonl("p.jsonl", {"image": "cat.png", "caption": "a cat"}))
    assert pairs.kind == "pairs" and _samples(pairs)[0].segments[1] == "a cat"
    # an image with a text field: the text is its caption
    assert _samples(open_source(jsonl("q.jsonl", {"image": "cat.png", "text": "a cat"})))[0] \
        .segments == [ImageRef(path=str(tmp_path / "cat.png")), "a cat"]
    both = jsonl("i.jsonl", {"texts": ["x"], "images": [None], "text": "y"})
    assert open_source(both).kind == "interleaved"
    assert open_source(both, kind="text").kind == "text"
    with pytest.raises(ValueError, match="u.jsonl.*cannot tell"):
        open_source(jsonl("u.jsonl", {"foo": 1}))
    with pytest.raises(ValueError, match="notes.txt.*unknown format"):
        (tmp_path / "notes.txt").write_text("hi")
        open_source(str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="u.jsonl.*unknown format 'csv'"):
        open_source(str(tmp_path / "u.jsonl"), format="csv")
    with pytest.raises(ValueError, match="tar shards hold pairs"):
        open_source(str(tmp_path / "x.tar"), kind="text")
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        open_source(str(tmp_path / "nowhere.jsonl"))
    assert detect_format(str(tmp_path)) == "files"  # the image decides over the JSONL files
    hf = tmp_path / "hf"
    (hf / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["a"]}), hf / "data" / "train-00000.parquet")
    (hf / "README.md").write_text("a dataset card")
    assert detect_format(str(hf)) == "parquet"
    assert open_source(str(hf)).units() == [str(hf / "data" / "train-00000.parquet#rg0")]


# ---------------------------------------------------------------------------------- train-text


def test_train_text_reads_captions_from_tar_shards_and_jsonl(tmp_path, capsys):
    from chameleon_lm.cli import main
    from chameleon_lm.tokenizers.text import load_text_tokenizer

    samples = [(_image(i), f"a purple zebra number {i}", {}) for i in range(8)]
    write_webdataset(tmp_path / "pairs", samples, prefix="train", shard_size=4)
    (tmp_path / "t.jsonl").write_text("".join(
        json.dumps({"body": "the quokka smiles"}) + "\n" for _ in range(4)) + "{broken\n")
    argv = ["tokenizer", "train-text", "--data", str(tmp_path / "pairs/train-{000000..000001}.tar"),
            str(tmp_path / "t.jsonl"), "--key", "body", "--out", str(tmp_path / "tok"),
            "--vocab-size", "400", "--codebook-size", "16"]
    assert main(argv) == 0
    assert "skipped 1 samples: 1 bad_record" in capsys.readouterr().err
    tok = load_text_tokenizer(tmp_path / "tok")
    assert len(tok.encode(" zebra")) == 1 and len(tok.encode(" quokka")) == 1
    images_only = tmp_path / "photos"
    images_only.mkdir()
    (images_only / "a.png").write_bytes(_encoded(0))
    assert main(["tokenizer", "train-text", "--data", str(images_only), "--out",
                 str(tmp_path / "tok2"), "--vocab-size", "400", "--codebook-size", "16"]) == 2
    assert "no text in" in capsys.readouterr().err
