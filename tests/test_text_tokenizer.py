"""The byte-level BPE text tokenizer and the Chameleon id layout."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from chameleon_lm.tokenizers.text import (
    load_text_tokenizer, special_tokens, train_text_tokenizer,
)
from chameleon_lm.tokenizers.vocab import IMAGE, SPECIAL, TEXT, Vocab, image_code_from_name, image_token_name

CORPUS = [
    "A red circle on a grey background. Now it turns blue and moves to the left.",
    "def area(r):\n    return 3.14159 * r ** 2  # the circle's area\n",
    "Ein roter Kreis. Un cercle rouge. Un círculo rojo. 赤い円。 Красный круг. دائرة حمراء",
    "Emoji: 🔴🟦🔺 and 👩‍👩‍👧 family; tabs\tand  double  spaces\n\nnew paragraph 12345",
] * 50

ROUND_TRIP = [
    "the red circle",
    "  leading spaces and trailing  ",
    "unicode: ñ, ü, 日本語, 한국어, עברית, 🤖🦎",
    "code:\n\tif x != y:\n\t\treturn {'k': [1, 2, 3]}\n",
    "numbers 0 7 42 3.14 1e-5 -17",
    "",
]


@pytest.fixture(scope="module")
def small_tok():
    return train_text_tokenizer(CORPUS, 700, codebook_size=64)


def test_image_token_names():
    assert image_token_name(0) == "IMGIMGAZ"
    assert image_token_name(53) == "IMGIMGFDZ"
    assert image_token_name(8191) == "IMGIMGIBJBZ"
    for c in (0, 9, 10, 99, 100, 4095, 8191):
        assert image_code_from_name(image_token_name(c)) == c
    for not_image in ("IMGIMGZ", "IMGIMGKZ", "<s>", "IMGIMGAB", "hello"):
        assert image_code_from_name(not_image) is None


def test_small_layout(small_tok):
    v = small_tok.vocab
    assert (v.bos_id, v.pad_id, v.eos_id, v.unk_id) == (0, 1, 2, 3)
    assert (v.image_start, v.codebook_size) == (4, 64)
    assert (v.eoi_id, v.boi_id) == (68, 69)
    assert small_tok.id_to_token(v.eot_id) == "<reserved08706>" and v.eot_id == 70
    assert [small_tok.id_to_token(i) for i in (4, 5, 14, 67)] == [
        "IMGIMGAZ", "IMGIMGBZ", "IMGIMGBAZ", "IMGIMGGDZ"]
    assert len(small_tok) <= 700
    assert v.classes[4:68].eq(IMAGE).all() and v.classes[68:70 + 15].eq(SPECIAL).all()
    assert v.classes[70 + 16 :].eq(TEXT).all()


def test_official_layout_ids():
    tok = train_text_tokenizer(CORPUS, 9600, codebook_size=8192)
    v = tok.vocab
    assert (v.image_start, v.codebook_size, v.eoi_id, v.boi_id, v.eot_id) == (4, 8192, 8196, 8197, 8710)
    assert tok.token_to_id("IMGIMGIBJBZ") == 8195
    assert tok.token_to_id("<reserved08707>") == 8711
    assert tok.token_to_id("<reserved08194>") == 8198
    names = special_tokens(8192, 1024)
    assert names[8710] == "<reserved08706>" and names[8197] == "<racm3:break>"


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(small_tok, text):
    ids = small_tok.encode(text)
    assert small_tok.decode(ids) == text
    assert all(small_tok.vocab.classes[i] == TEXT for i in ids)


def test_specials_in_text_stay_text(small_tok):
    text = "<s> IMGIMGBZ <racm3:break> </s> <reserved08706>"
    ids = small_tok.encode(text)
    assert all(small_tok.vocab.classes[i] == TEXT for i in ids)
    assert small_tok.decode(ids) == text


def test_digits_and_punctuation_are_split(small_tok):
    pieces = small_tok.tokenizer.pre_tokenizer.pre_tokenize_str("abc 123!!")
    assert [p for p, _ in pieces] == ["abc", "Ġ", "1", "2", "3", "!", "!"]


def test_save_and_load(tmp_path, small_tok):
    path = small_tok.save(tmp_path / "tok")
    assert path.name == "tokenizer.json"
    again = load_text_tokenizer(tmp_path / "tok")
    assert again.encode(CORPUS[2]) == small_tok.encode(CORPUS[2])
    assert again.vocab == small_tok.vocab


def _official_style_json(tmp_path):
    """A tokenizer.json in the official layout: IMGIMG names in the BPE vocab, specials as added tokens."""
    names = ["<s>", "<pad>", "</s>", "<unk>"] + [image_token_name(c) for c in range(8192)]
    names += ["<eoss>", "<racm3:break>"] + [f"<reserved{i - 4:05d}>" for i in range(8198, 8720)]
    vocab = {n: i for i, n in enumerate(names)}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens([n for n in names if n.startswith("<")])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    root = tmp_path / "data" / "tokenizer"
    root.mkdir(parents=True)
    tok.save(str(root / "text_tokenizer.json"))
    return tmp_path / "data"


def test_loads_official_layout(tmp_path):
    meta_root = _official_style_json(tmp_path)
    tok = load_text_tokenizer(meta_root)
    v = tok.vocab
    assert (v.bos_id, v.eos_id, v.pad_id, v.boi_id, v.eoi_id, v.eot_id) == (0, 2, 1, 8197, 8196, 8710)
    assert (v.image_start, v.codebook_size) == (4, 8192)
    assert tok.decode(tok.encode("hi there")) == "hi there"


def test_hf_image_placeholder_is_special(tmp_path):
    meta_root = _official_style_json(tmp_path)
    data = json.loads((meta_root / "tokenizer" / "text_tokenizer.json").read_text())
    data["model"]["vocab"]["<image>"] = data["model"]["vocab"].pop("<reserved08707>")
    for t in data["added_tokens"]:
        if t["content"] == "<reserved08707>":
            t["content"] = "<image>"
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    v = load_text_tokenizer(tmp_path / "tokenizer.json").vocab
    assert v.classes[8711] == SPECIAL and v.eot_id == 8710


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no text tokenizer"):
        load_text_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_text_tokenizer(tmp_path / "missing.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_text_tokenizer(tmp_path)
    plain = Tokenizer(models.BPE(vocab={"a": 0, "<s>": 1}, merges=[]))
    plain.save(str(tmp_path / "plain.json"))
    with pytest.raises(ValueError, match="plain.json.*image tokens"):
        load_text_tokenizer(tmp_path / "plain.json")


def test_vocab_rejects_gaps():
    names = {"<s>": 0, "<pad>": 1, "</s>": 2, "<eoss>": 3, "<racm3:break>": 4,
             image_token_name(0): 5, image_token_name(2): 6}
    with pytest.raises(ValueError, match="incomplete"):
        Vocab.from_names(names)
    names = {"<s>": 0, "<pad>": 1, "</s>": 2, "<eoss>": 3, "<racm3:break>": 4,
             image_token_name(1): 5, image_token_name(0): 6}
    with pytest.raises(ValueError, match="contiguous"):
        Vocab.from_names(names)


def test_too_small_vocab():
    with pytest.raises(ValueError, match="too small"):
        train_text_tokenizer(CORPUS, 300, codebook_size=64)
