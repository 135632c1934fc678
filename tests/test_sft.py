"""SFT conversations end to end: ``messages`` sources, the multi-turn layout, the ``sft`` recipe, packing."""

import base64
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_tiny_tokenizers
import torch
from PIL import Image

from chameleon_lm.cli import main
from chameleon_lm.data.packing import IGNORE_INDEX, Packer
from chameleon_lm.data.recipes import RecipeConfig, RecipeError, build_conversation, build_document
from chameleon_lm.data.shards import TokenDataset
from chameleon_lm.data.sources import ImageRef, Sample, Skipped, open_source
from chameleon_lm.documents import Document, DocumentCodec
from chameleon_lm.tokenizers.image import load_image_tokenizer
from chameleon_lm.tokenizers.text import load_text_tokenizer, train_text_tokenizer
from chameleon_lm.tokenizers.vocab import IMAGE

K, N = 64, 16  # codebook size, codes per image (the fake image tokenizer)
CORPUS = ["Describe the picture. a red square on a grey background. Now draw it blue. Be brief."] * 100


class FakeImages:
    """An image tokenizer whose codes tell the image (its red value) and the resize mode."""

    num_tokens, codebook_size = N, K

    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    def encode(self, images, mode=None):
        mode = mode or "crop"
        self.calls.append((mode, len(images)))
        codes = [2 * img.getpixel((0, 0))[0] + (mode == "pad") for img in images]
        return torch.stack([torch.full((N,), c) for c in codes])


@pytest.fixture(scope="module")
def text_tokenizer():
    return train_text_tokenizer(CORPUS, 600, codebook_size=K)


def _png(colour=(200, 30, 30), size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# ------------------------------------------------------------------------------------------ layout


def test_two_turn_layout_and_loss_mask(text_tokenizer):
    images = FakeImages()
    codec = DocumentCodec(text_tokenizer, images)
    v, enc_text = codec.vocab, text_tokenizer.encode
    prompt_img, answer_img = Image.new("RGB", (8, 8), (3, 0, 0)), Image.new("RGB", (8, 8), (5, 0, 0))
    turns = [("user", Document.of("Describe the picture.", prompt_img)),
             ("assistant", Document.of("a red square")),
             ("user", Document.of("Now draw it blue.")), ("assistant", Document.of(answer_img))]
    enc = codec.encode_conversation(turns)
    block = lambda code: [v.boi_id] + [v.image_start + code] * N + [v.eoi_id]
    u1, a1 = enc_text("Describe the picture.") + block(2 * 3 + 1), enc_text("a red square")  # padded
    u2, a2 = enc_text("Now draw it blue."), block(2 * 5)  # centre-cropped
    assert enc.ids.tolist() == [v.bos_id, *u1, v.eot_id, *a1, v.eos_id, *u2, v.eot_id, *a2, v.eos_id]
    expected = ([False] * (1 + len(u1) + 1) + [True] * (len(a1) + 1)
                + [False] * (len(u2) + 1) + [True] * (len(a2) + 1))
    assert enc.loss_mask.tolist() == expected
    assert enc.ids.tolist().count(v.bos_id) == 1 and enc.modality.tolist() == v.modality(enc.ids).tolist()
    assert images.calls == [("pad", 1), ("crop", 1)]  # one tokenizer call per mode
    # the single-turn chat layout is the one-turn conversation
    one = codec.encode_chat(turns[0][1], turns[1][1])
    two = codec.encode_conversation(turns[:2])
    assert one.ids.tolist() == two.ids.tolist() == enc.ids.tolist()[: len(one)]
    assert one.loss_mask.tolist() == two.loss_mask.tolist() == expected[: len(one)]


def test_system_prompt_is_prepended_and_turn_order_is_checked(text_tokenizer):
    codec = DocumentCodec(text_tokenizer, image_seq_len=N)
    user, answer = Document.of("Describe the picture."), Document.of("a red square")
    with_system = codec.encode_conversation([("system", Document.of("Be brief.")), ("user", user),
                                             ("assistant", answer)])
    merged = codec.encode_conversation([("user", Document.of("Be brief.", "\n\n", "Describe the picture.")),
                                        ("assistant", answer)])
    assert with_system.ids.tolist() == merged.ids.tolist()
    assert with_system.loss_mask.tolist() == merged.loss_mask.tolist()
    # a last user turn is a generation prompt: it ends with <eot> and has no targets
    prompt = codec.encode_conversation([("user", user), ("assistant", answer), ("user", user)])
    assert prompt.ids[-1] == codec.vocab.eot_id and not prompt.loss_mask[-len(text_tokenizer.encode(
        "Describe the picture.")) - 1:].any()
    for bad, match in [([("assistant", answer)], "turn 0 is assistant, expected user"),
                       ([("user", user), ("user", user)], "turn 1 is user, expected assistant"),
                       ([("user", user), ("system", user), ("assistant", answer)], "before the first user"),
                       ([("bot", user)], "unknown role"), ([("system", user)], "no user turn")]:
        with pytest.raises(ValueError, match=match):
            codec.encode_conversation(bad)


# ----------------------------------------------------------------------------------------- sources


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_messages_jsonl_segments_roles_and_category(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png())
    png = _png((30, 200, 30))
    row = {"category": "visual_chat", "id": 7, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": "img/a.png"}}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(png)}}]},
        {"role": "assistant", "content": "Two squares."},
        {"role": "user", "content": [{"type": "text", "text": "Draw one."}]},
        {"role": "assistant", "content": [{"type": "image", "path": "img/a.png"}]}]}
    source = open_source(_jsonl(tmp_path / "chat.jsonl", [row]))
    assert source.kind == "messages"
    (sample,) = list(source)
    local = ImageRef(path=str(tmp_path / "img" / "a.png"))
    assert sample.segments == ["Be brief.", "What is this?", local, "\n\n", ImageRef(data=png),
                               "Two squares.", "Draw one.", local]
    assert sample.roles == ["system", "user", "user", "user", "user", "assistant", "user", "assistant"]
    assert sample.meta == {"category": "visual_chat", "id": 7}


def test_every_bad_conversation_is_skipped_with_its_reason(tmp_path):
    u, a = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    img = lambda url: {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
    rows = {
        "no_assistant": [u],
        "unknown_role": [u, {"role": "bot", "content": "x"}, a],
        "assistant_first": [a, u, a],
        "misplaced_system": [u, {"role": "system", "content": "x"}, a],
        "empty_turn": [u, {"role": "assistant", "content": "  "}],
        "bad_image_data": [img("data:image/png;base64,@@not base64@@"), a],
        "remote_image_refused": [img("https://example.com/a.png"), a],
        "missing_image": [img("nowhere.png"), a],
        "bad_record": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}, a],
        "undecodable_text": [{"role": "user", "content": "\ud800"}, a],
    }
    lines = [{"messages": m} for m in rows.values()] + [{"messages": "not a list"},
                                                        {"messages": [u, a], "category": 3},
                                                        {"messages": [img("data:text/plain,hello"), a]}]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))  # json.dumps keeps "\ud800" escaped
    items = list(open_source(str(path)))
    assert all(isinstance(i, Skipped) for i in items)
    assert [i.reason for i in items] == list(rows) + ["bad_record", "bad_record", "bad_image_data"]
    remote = list(open_source(str(path), allow_remote=True))[6]
    assert isinstance(remote, Sample) and remote.segments[0] == ImageRef(url="https://example.com/a.png")


def test_messages_parquet(tmp_path):
    png = _png()
    part = pa.struct([("type", pa.string()), ("text", pa.string()), ("image", pa.binary())])
    message = pa.struct([("role", pa.string()), ("content", pa.list_(part))])
    messages = [[{"role": "user", "content": [{"type": "image", "text": None, "image": png},
                                              {"type": "text", "text": "What is this?", "image": None}]},
                 {"role": "assistant", "content": [{"type": "text", "text": "A square.", "image": None}]}]]
    pq.write_table(pa.table({"messages": pa.array(messages, pa.list_(message)), "category": ["visual_chat"]}),
                   tmp_path / "chat.parquet")
    source = open_source(str(tmp_path / "chat.parquet"))
    (sample,) = list(source)
    assert source.kind == "messages" and sample.meta == {"category": "visual_chat"}
    assert sample.segments == [ImageRef(data=png), "What is this?", "A square."]
    assert sample.roles == ["user", "user", "assistant"]


def test_other_kinds_are_unchanged(tmp_path):
    text = open_source(_jsonl(tmp_path / "t.jsonl", [{"text": "a red square", "messages_seen": 2}]))
    both = open_source(_jsonl(tmp_path / "i.jsonl", [{"texts": ["x"], "images": [None], "messages": []}]))
    forced = open_source(_jsonl(tmp_path / "f.jsonl", [{"text": "hi", "messages": [{"role": "user"}]}]),
                         kind="text")
    assert (text.kind, both.kind, forced.kind) == ("text", "interleaved", "text")
    assert [s.roles for src in (text, both, forced) for s in src] == [None, None, None]
    assert next(iter(text)) == Sample(text.units()[0] + "/0", ["a red square"], {"messages_seen": 2})


# ------------------------------------------------------------------------------------------ recipe


def test_sft_recipe_turns_and_errors():
    config = RecipeConfig("sft")
    segments = ["Be brief.", "hi", "hello", "and?"]
    turns = build_conversation(config, segments, ["system", "user", "assistant", "user"], "k", 0)
    assert [(r, d.text) for r, d in turns] == [("system", "Be brief."), ("user", "hi"),
                                               ("assistant", "hello")]
    with pytest.raises(RecipeError) as e:
        build_conversation(config, ["a red square"], None, "k", 0)
    assert e.value.reason == "not_a_conversation"
    with pytest.raises(RecipeError) as e:
        build_conversation(config, ["hi"], ["user"], "k", 0)
    assert e.value.reason == "no_answer"
    with pytest.raises(ValueError, match="sft recipe only"):
        RecipeConfig("chat", augment=0.1)
    with pytest.raises(ValueError, match="build_conversation"):
        build_document(config, segments, "k", 0)


def test_augmentation_is_a_deterministic_crop_without_flips_and_off_by_default():
    w, h = 40, 30
    image = Image.new("RGB", (w, h))
    image.putdata([(x, y, 0) for y in range(h) for x in range(w)])  # each pixel names its place
    roles = ["user", "assistant"]

    def jittered(key, amount=0.2, seed=0):
        turns = build_conversation(RecipeConfig("sft", augment=amount), [image, "ok"], roles, key, seed)
        return turns[0][1].images[0].image

    off = build_conversation(RecipeConfig("sft"), [image, "ok"], roles, "k", 0)
    assert off[0][1].images[0].image is image
    crops = [jittered(f"k{i}") for i in range(8)]
    for crop in crops:
        x0, y0, _ = crop.getpixel((0, 0))
        assert 0.8 * w - 1 <= crop.width <= w and 0.8 * h - 1 <= crop.height <= h
        pixels = np.asarray(crop).astype(int)  # a plain crop: every pixel still names its place
        assert (pixels[..., 0] == x0 + np.arange(crop.width)).all()
        assert (pixels[..., 1] == y0 + np.arange(crop.height)[:, None]).all()
    assert jittered("k3").tobytes() == crops[3].tobytes()  # same key, same crop
    assert len({(c.size, c.getpixel((0, 0))) for c in crops}) > 1
    assert any(jittered(f"k{i}", seed=1).tobytes() != crops[i].tobytes() for i in range(8))


# ------------------------------------------------------------------------------ tokenize and pack


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return write_tiny_tokenizers(tmp_path_factory.mktemp("tokenizers"), CORPUS)


def _conversations(tmp_path):
    (tmp_path / "img").mkdir()
    wide = Image.new("RGB", (48, 24), (200, 30, 30))
    wide.paste((30, 30, 200), (0, 0, 12, 24))  # a blue band at the left: padding and cropping differ
    wide.save(tmp_path / "img" / "wide.png")
    ask = lambda text, *imgs: {"role": "user", "content": [{"type": "text", "text": text}] + [
        {"type": "image_url", "image_url": {"url": u}} for u in imgs]}
    rows = [
        {"category": "visual_chat", "messages": [
            ask("Describe the picture.", "img/wide.png"), {"role": "assistant", "content": "a red square"},
            ask("Now draw it blue."),
            {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "img/wide.png"}}]}]},
        {"category": "text", "messages": [{"role": "system", "content": "Be brief."},
                                          ask("Describe the picture."),
                                          {"role": "assistant", "content": "a red square"}]},
        {"category": "image_generation", "messages": [
            ask("Now draw it blue."), {"role": "assistant", "content": [
                {"type": "image_url", "image_url": {"url": _data_url(_png((30, 30, 200)))}}]}]},
        {"category": "text", "messages": [ask("Describe the picture.")]},  # no answer: skipped
    ]
    return _jsonl(tmp_path / "sft.jsonl", rows), wide


def test_messages_jsonl_tokenized_with_sft_and_packed(tokenizers, tmp_path):
    data, wide = _conversations(tmp_path)
    out = tmp_path / "tok"
    assert main(["data", "tokenize", "--data", data, "--recipe", "sft", "--tokenizers", str(tokenizers),
                 "--out", str(out), "--no-progress"]) == 0
    ds = TokenDataset(out)
    assert len(ds) == 3 and ds.summary["skipped"] == {"no_assistant": 1}
    assert ds.meta_values("category") == ["visual_chat", "text", "image_generation"]
    codec = DocumentCodec(load_text_tokenizer(tokenizers), load_image_tokenizer(tokenizers))
    v, image = codec.vocab, codec.image
    first = ds[0]
    blocks = first.ids[first.modality == IMAGE].view(2, -1) - v.image_start
    assert torch.equal(blocks[0], image.encode([wide], mode="pad")[0])  # prompt image: padded
    assert torch.equal(blocks[1], image.encode([wide], mode="crop")[0])  # answer image: centre-cropped
    assert first.ids.tolist().count(v.bos_id) == 1 and first.ids.tolist().count(v.eot_id) == 2
    # every document's mask: exactly the assistant turns and their </s>
    for i in range(len(ds)):
        doc, ids = ds[i], ds[i].ids.tolist()
        in_answer, expected = False, []
        for t in ids:
            expected.append(in_answer)
            in_answer = (in_answer or t == v.eot_id) and t != v.eos_id
        assert doc.loss_mask.tolist() == expected and ids[-1] == v.eos_id
    # several conversations share one packed row, separated by doc_ids; prompts are never targets
    docs = [ds[i] for i in range(len(ds))]
    total = sum(len(d) - 1 for d in docs)
    stream = iter(enumerate(docs))
    batch = Packer(total, v.pad_id, "packed").next_batch(1, lambda: next(stream))
    assert batch.doc_ids[0].tolist() == [j for j, d in enumerate(docs) for _ in range(len(d) - 1)]
    expected_targets = torch.cat([torch.where(d.loss_mask[1:], d.ids[1:], IGNORE_INDEX) for d in docs])
    assert torch.equal(batch.targets[0], expected_targets)
    assert batch.num_targets == sum(int(d.loss_mask[1:].sum()) for d in docs)
    targets = batch.targets[0]
    assert (targets == v.eos_id).sum() == 4 and (targets == v.eot_id).sum() == 0


def test_augmented_tokenization_is_deterministic(tokenizers, tmp_path):
    data, _ = _conversations(tmp_path)
    run = lambda out, *extra: main(["data", "tokenize", "--data", data, "--recipe", "sft", "--tokenizers",
                                    str(tokenizers), "--out", str(tmp_path / out), "--no-progress", *extra])
    assert run("a", "--augment", "0.3") == run("b", "--augment", "0.3") == run("plain") == 0
    a, b, plain = (TokenDataset(tmp_path / name) for name in ("a", "b", "plain"))
    assert [a[i].ids.tolist() for i in range(3)] == [b[i].ids.tolist() for i in range(3)]
    assert [a[i].ids.tolist() for i in range(3)] != [plain[i].ids.tolist() for i in range(3)]
    assert [a[i].loss_mask.tolist() for i in range(3)] == [plain[i].loss_mask.tolist() for i in range(3)]
    assert main(["data", "tokenize", "--data", data, "--recipe", "chat", "--augment", "0.1", "--tokenizers",
                 str(tokenizers), "--out", str(tmp_path / "c")]) == 2  # augment is for sft only
