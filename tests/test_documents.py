"""Mixed-modal documents: encoding, decoding, the chat layout and malformed sequences."""

import re

import pytest
import torch

from chameleon_lm.documents import DecodeError, Document, DocumentCodec, ImagePart, TextPart
from chameleon_lm.tokenizers.text import train_text_tokenizer
from chameleon_lm.tokenizers.vocab import IMAGE, SPECIAL, TEXT

K, N = 64, 16  # codebook size, codes per image


@pytest.fixture(scope="module")
def codec():
    corpus = ["a red circle turns blue and moves to the left", "Describe the picture:"] * 100
    return DocumentCodec(train_text_tokenizer(corpus, 600, codebook_size=K), image_seq_len=N)


def codes(seed):
    return torch.randint(0, K, (N,), generator=torch.Generator().manual_seed(seed))


def test_encode_layout(codec):
    v = codec.vocab
    doc = Document.of("a red circle", codes(0), " now it turns blue", codes(1))
    enc = codec.encode(doc)
    ids, mod = enc.ids.tolist(), enc.modality.tolist()
    assert ids[0] == v.bos_id and mod[0] == SPECIAL
    n_text = len(codec.text.encode("a red circle"))
    boi = 1 + n_text
    assert ids[boi] == v.boi_id and ids[boi + N + 1] == v.eoi_id
    assert ids[boi + 1 : boi + 1 + N] == (codes(0) + v.image_start).tolist()
    assert mod[boi + 1 : boi + 1 + N] == [IMAGE] * N and mod[1:boi] == [TEXT] * n_text
    assert enc.modality.tolist() == codec.vocab.modality(enc.ids).tolist()
    assert enc.loss_mask.all() and len(enc) == len(ids)
    assert codec.encode(doc, bos=False, eos=True).ids.tolist() == ids[1:] + [v.eos_id]


def test_round_trip(codec):
    doc = Document.of("a red circle", codes(0), codes(1), " now it turns blue ", codes(2), "end")
    back = codec.decode(codec.encode(doc, eos=True).ids)
    assert not back.repairs
    assert len(back.parts) == len(doc.parts)
    for a, b in zip(doc.parts, back.parts):
        assert type(a) is type(b)
        if isinstance(a, TextPart):
            assert a.text == b.text
        else:
            assert torch.equal(a.codes, b.codes)


def test_normalized_merges_text():
    doc = Document.of("a", "", "b", codes(0), "c")
    assert [type(p) for p in doc.normalized().parts] == [TextPart, ImagePart, TextPart]
    assert doc.normalized().parts[0].text == "ab" and doc.text == "abc"


def test_chat_layout_and_loss_mask(codec):
    v = codec.vocab
    prompt, answer = Document.of("Describe the picture:", codes(3)), Document.of("a red circle")
    enc = codec.encode_chat(prompt, answer)
    ids = enc.ids.tolist()
    eot = ids.index(v.eot_id)
    assert ids[0] == v.bos_id and ids[-1] == v.eos_id
    assert not enc.loss_mask[: eot + 1].any() and enc.loss_mask[eot + 1 :].all()
    assert enc.loss_mask.sum() == len(codec.text.encode("a red circle")) + 1
    p, a = codec.decode_chat(enc.ids)
    assert p.text == "Describe the picture:" and torch.equal(p.images[0].codes, codes(3))
    assert a.text == "a red circle"


def test_text_with_special_names_is_text(codec):
    enc = codec.encode(Document.of("IMGIMGBZ <racm3:break>"))
    assert (enc.modality[1:] == TEXT).all()


def test_wrong_code_count_rejected_on_encode(codec):
    with pytest.raises(ValueError, match="16 codes"):
        codec.encode(Document.of(torch.zeros(5, dtype=torch.long)))
    with pytest.raises(ValueError, match="image codes must be in"):
        codec.encode(Document.of(torch.full((N,), K)))
    with pytest.raises(ValueError, match="no image tokenizer"):
        from PIL import Image
        codec.encode(Document.of(Image.new("RGB", (8, 8))))


def _ids(codec, *chunks):
    out = []
    for c in chunks:
        out += codec.text.encode(c) if isinstance(c, str) else list(c)
    return out


def test_malformed_sequences(codec):
    v = codec.vocab
    img = (codes(0) + v.image_start).tolist()
    cases = {
        "unterminated": ([v.bos_id] + _ids(codec, "hi") + [v.boi_id] + img[:5], "5 of 16 codes"),
        "short block": ([v.boi_id] + img[:7] + [v.eoi_id], "7 of 16"),
        "long block": ([v.boi_id] + img + img[:3] + [v.eoi_id], "3 code(s) beyond"),
        "missing eoi": ([v.boi_id] + img + _ids(codec, "red"), "not closed"),
        "stray code": (_ids(codec, "red") + img[:1], "outside an image block"),
        "stray special": (_ids(codec, "red") + [v.eot_id], "unexpected special"),
        "after eos": (_ids(codec, "red") + [v.eos_id] + _ids(codec, "blue"), "after </s>"),
        "empty block": ([v.boi_id, v.eoi_id] + _ids(codec, "red"), "empty image block"),
        "interrupted": ([v.boi_id] + img[:4] + _ids(codec, "red"), "non-image token"),
    }
    for name, (ids, msg) in cases.items():
        with pytest.raises(DecodeError, match=re.escape(msg)):
            codec.decode(ids)
        doc = codec.decode(ids, on_error="repair")
        assert doc.repairs and msg.split()[0] in doc.repairs[0], name
        for part in doc.images:
            assert part.codes.numel() == N


def test_repairs_are_the_documented_ones(codec):
    v = codec.vocab
    img = (codes(0) + v.image_start).tolist()
    doc = codec.decode([v.boi_id] + img[:5], on_error="repair")
    assert doc.images[0].codes.tolist() == (codes(0)[:5].tolist() + [codes(0)[0].item()] * 11)
    doc = codec.decode([v.boi_id] + img + img[:3] + [v.eoi_id] + _ids(codec, "red"), on_error="repair")
    assert torch.equal(doc.images[0].codes, codes(0)) and doc.text == "red"
    doc = codec.decode(_ids(codec, "red") + [v.eos_id] + _ids(codec, "blue"), on_error="repair")
    assert doc.text == "red"


def test_out_of_range_is_always_an_error(codec):
    with pytest.raises(ValueError, match="token ids must be in"):
        codec.decode([0, codec.vocab.size + 5], on_error="repair")
    with pytest.raises(ValueError, match="on_error"):
        codec.decode([0], on_error="ignore")


def test_decode_chat_needs_eot(codec):
    with pytest.raises(DecodeError, match="end-of-turn"):
        codec.decode_chat(codec.encode(Document.of("hi")).ids)


def test_pixel_images_through_a_real_image_tokenizer():
    from PIL import Image

    from chameleon_lm import VQGAN, VQGANConfig
    from chameleon_lm.tokenizers.image import ImageTokenizer

    vq_cfg = VQGANConfig.preset("tiny")
    image_tok = ImageTokenizer(VQGAN(vq_cfg))
    text_tok = train_text_tokenizer(["a red circle on grey"] * 50, 600, codebook_size=vq_cfg.n_embed)
    codec = DocumentCodec(text_tok, image_tok)
    assert codec.image_seq_len == vq_cfg.num_tokens
    red = Image.new("RGB", (40, 30), (220, 20, 20))
    enc = codec.encode(Document.of("a red circle", red, "on grey"))
    assert (enc.modality == IMAGE).sum() == vq_cfg.num_tokens
    doc = codec.decode(enc.ids)
    assert doc.images[0].image.size == (vq_cfg.resolution, vq_cfg.resolution)
    assert torch.equal(doc.images[0].codes, image_tok.encode([red])[0])
    # Chat prompts are padded, not cropped: a wide image gives other codes than its centre crop.
    wide = Image.new("RGB", (64, 16), (20, 20, 220))
    chat = codec.encode_chat(Document.of(wide, "describe"), Document.of("blue"))
    first = chat.ids[2 : 2 + vq_cfg.num_tokens] - codec.vocab.image_start
    assert torch.equal(first, image_tok.encode([wide], mode="pad")[0])
    with pytest.raises(ValueError, match="image tokenizer has 256 codes"):
        DocumentCodec(train_text_tokenizer(["x y"] * 20, 400, codebook_size=64), image_tok)
