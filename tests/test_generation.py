"""Generation: logit processors, modality control, guided image decoding, the KV cache, streaming, CLI."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import shapes_codec, tiny_model

from chameleon_lm import Chameleon, ChameleonConfig, Document, DocumentCodec, train_text_tokenizer
from chameleon_lm.documents import ImagePart, TextPart
from chameleon_lm.generation import (
    Done,
    GenerationConfig,
    ImageComplete,
    ImageProgress,
    ImageSampling,
    TextDelta,
    TextSampling,
    generate_images,
    generate_text,
    stream,
)
from chameleon_lm.generation import sampling as S
from chameleon_lm.generation.engine import _Detokenizer
from chameleon_lm.tokenizers.vocab import IMAGE, TEXT

K, N = 64, 16  # codebook size, codes per image
INF = float("inf")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def codec():
    return shapes_codec(K, N)


@pytest.fixture(scope="module")
def model(codec):
    return tiny_model(codec)


def image_codes(seed):
    return torch.randint(0, K, (N,), generator=torch.Generator().manual_seed(seed))


def prompt(codec, *items):
    return codec.encode(Document.of(*items)).ids.tolist()


def biased_model(codec, logits: dict[int, float], rest: float = 0.0):
    """A model whose last hidden state is the same everywhere, so the logits are fixed: ``logits[id]``
    for the given ids, ``rest`` for the other non-image ids, small random values for the image codes."""
    torch.manual_seed(1)
    m = Chameleon(ChameleonConfig.preset("tiny", vocab_size=len(codec.text))).eval()
    with torch.no_grad():
        for layer in m.layers:  # each block adds nothing: h = norm(embedding)
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        e = torch.randn(m.config.dim)
        m.tok_embeddings.weight.copy_(e.expand_as(m.tok_embeddings.weight))
        h = m.norm(e)
        unit = h / h.dot(h)  # W_j = value · unit gives logit_j = value
        m.output.weight.copy_(rest * unit.expand_as(m.output.weight))
        v = codec.vocab
        m.output.weight[v.image_start : v.image_end] = torch.randn(K, 1) * unit
        for i, value in logits.items():
            m.output.weight[i] = value * unit
    return m


def word(codec, text=" red"):
    (i,) = codec.text.encode(text)
    return i


# ------------------------------------------------------------------------------------------ processors


def test_processors_by_hand():
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    penalised = S.repetition_penalty(x, torch.tensor([[0, 1, 1]]), 2.0)
    assert penalised.tolist() == [[0.5, -4.0, 3.0, 0.5]]
    assert S.top_k(x, 2).tolist() == [[1.0, -INF, 3.0, -INF]]
    assert S.top_k(x, 0) is x and S.top_p(x, 1.0) is x and S.repetition_penalty(x, x.long(), 1.0) is x
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    # Ascending cumulative: 0.05, 0.20, 0.50, 1.0; p = 0.75 drops those ≤ 0.25.
    assert torch.isinf(S.top_p(probs.log(), 0.75)).tolist() == [[False, False, True, True]]
    assert torch.isinf(S.top_p(probs.log(), 0.01)).tolist() == [[False, True, True, True]]  # keeps ≥ 1
    assert S.temperature(x, 0.5).tolist() == [[2.0, -4.0, 6.0, 1.0]]
    assert S.allow_only(x, torch.tensor([True, False, True, False])).tolist() == [[1.0, -INF, 3.0, -INF]]
    f, i, u = torch.tensor([[4.0]]), torch.tensor([[2.0]]), torch.tensor([[1.0]])
    assert S.cfg_mix(f, i, u, cfg_text=3.0, cfg_image=1.2).item() == pytest.approx(1 + 1.2 * 1 + 3 * 2)


def test_processors_match_transformers():
    hf = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 50, generator=g) * 3
    ids = torch.randint(0, 50, (3, 12), generator=g)
    torch.testing.assert_close(S.repetition_penalty(scores, ids, 1.2),
                               hf.RepetitionPenaltyLogitsProcessor(1.2)(ids, scores.clone()))
    torch.testing.assert_close(S.temperature(scores, 0.7), hf.TemperatureLogitsWarper(0.7)(ids, scores))
    for p in (0.05, 0.5, 0.9, 0.99):
        torch.testing.assert_close(S.top_p(scores, p), hf.TopPLogitsWarper(p)(ids, scores))
    for k in (1, 5, 49):
        torch.testing.assert_close(S.top_k(scores, k), hf.TopKLogitsWarper(k)(ids, scores))


def _top_p_by_argsort(scores, p):
    """Hugging Face's formulation (sort with indices, scatter back), the reference for ``top_p``."""
    sorted_, order = torch.sort(scores, descending=False)
    remove = sorted_.softmax(-1).cumsum(-1) <= 1 - p
    remove[:, -1] = False
    return scores.masked_fill(remove.scatter(1, order, remove), -INF)


def test_top_p_threshold_matches_argsort_formulation():
    g = torch.Generator().manual_seed(1)
    peaked = torch.randn(4, 65536, generator=g) * 4  # a trained model's shape: few words hold the mass
    flat = torch.randn(4, 65536, generator=g) * 0.02  # random weights: the nucleus is most of the vocabulary
    masked = S.allow_only(peaked, torch.rand(65536, generator=g) > 0.5)
    for scores in (peaked, flat, masked, peaked.double()):
        for p in (1e-9, 0.05, 0.5, 0.9, 0.999):
            assert torch.equal(S.top_p(scores, p), _top_p_by_argsort(scores, p)), p
    ties = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0]])  # p reaches into the tied words: all of them stay
    assert torch.isinf(S.top_p(ties, 0.6)).tolist() == [[False, False, False, False, True]]


def test_sample_draws_from_the_softmax_and_never_a_masked_word(monkeypatch):
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    draws = S.sample(probs.log().expand(40000, 4), torch.Generator().manual_seed(0), greedy=False)
    freq = torch.bincount(draws, minlength=4) / draws.numel()
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    assert freq[3] == 0
    # u · total can round up to the total itself: the draw steps back to the last possible word
    monkeypatch.setattr(S.torch, "rand", lambda *a, **k: torch.ones(a[:2], dtype=k.get("dtype")))
    assert S.sample(probs.log()[None], None, greedy=False).tolist() == [2]


def test_forbid_copies_unless_in_place():
    logits = torch.randn(2, 6)
    before = logits.clone()
    out = S.forbid(logits, [[1, 4], []])
    assert torch.equal(logits, before) and out[0, [1, 4]].isneginf().all() and torch.equal(out[1], before[1])
    same = S.forbid(logits, [[], [0]], inplace=True)
    assert same is logits and logits[1, 0].isneginf() and torch.equal(logits[0], before[0])


def test_text_chain_order_and_sampling():
    cfg = TextSampling(temperature=0.5, top_p=0.9, top_k=3, repetition_penalty=1.3)
    scores = torch.randn(2, 20)
    ids = torch.randint(0, 20, (2, 5))
    allowed = torch.rand(20) > 0.3
    expected = S.top_p(S.top_k(S.temperature(S.repetition_penalty(S.allow_only(scores, allowed), ids, 1.3),
                                              0.5), 3), 0.9)
    torch.testing.assert_close(S.text_scores(scores, ids, allowed, cfg), expected)
    greedy = S.text_scores(scores, ids, allowed, cfg.replace(greedy=True))
    assert torch.equal(S.sample(greedy, None, greedy=True), greedy.argmax(-1))
    draws = [S.sample(expected, torch.Generator().manual_seed(3), False) for _ in range(2)]
    assert torch.equal(*draws) and torch.isfinite(expected.gather(1, draws[0][:, None])).all()


def test_config_round_trip_presets_and_validation(tmp_path):
    cfg = GenerationConfig(mode="interleaved", text=TextSampling(top_k=5),
                           image=ImageSampling(cfg_text=5.0), seed=3, max_seq_len=100)
    cfg.save(tmp_path / "g.json")
    assert GenerationConfig.load(tmp_path / "g.json") == cfg
    meta = GenerationConfig.preset("meta")
    assert (meta.text.temperature, meta.text.top_p, meta.text.repetition_penalty) == (0.7, 0.9, 1.2)
    assert (meta.image.temperature, meta.image.top_p, meta.image.cfg_text, meta.image.cfg_image) == (
        0.7, 0.9, 3.0, 1.2)
    assert GenerationConfig.preset("anole").mode == "interleaved"
    with pytest.raises(ValueError, match="mode"):
        GenerationConfig(mode="video")
    with pytest.raises(ValueError, match="top_p"):
        TextSampling(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        ImageSampling(temperature=0.0)
    with pytest.raises(ValueError, match="unknown field"):
        GenerationConfig.from_dict({"text": {"temp": 1.0}})


# ------------------------------------------------------------------------------------------ KV cache


def test_kv_cache_rows_of_different_lengths_decode_as_if_alone(model):
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(10, 300, (n,), generator=g) for n in (9, 5, 3))
    cache = model.new_cache(3, 12)
    for row, seq in enumerate((a, b, c)):  # each prefilled alone, in its own row
        model(seq[None], cache.rows(slice(row, row + 1)))
    assert cache.host_lengths.tolist() == [9, 5, 3] and cache.length == 9
    nxt = torch.randint(10, 300, (3, 1), generator=g)
    step = model(nxt, cache)[:, 0]  # one batched step over rows of three lengths
    for row, seq in enumerate((a, b, c)):
        alone = model(torch.cat([seq, nxt[row]])[None])[0, -1]
        torch.testing.assert_close(step[row], alone, atol=1e-5, rtol=1e-5)
    cache.grow(20)  # more room keeps every row
    cache.move(2, 0)  # row 0 now holds c (row 2's tokens), as when a finished request's row is reused
    two = cache.rows(slice(0, 2))
    nxt2 = torch.randint(10, 300, (2, 1), generator=g)
    step = model(nxt2, two)[:, 0]
    assert cache.host_lengths.tolist() == [5, 7, 4] and cache.max_len == 20
    for row, seq in enumerate((torch.cat([c, nxt[2]]), torch.cat([b, nxt[1]]))):
        alone = model(torch.cat([seq, nxt2[row]])[None])[0, -1]
        torch.testing.assert_close(step[row], alone, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- guidance and image mode


def reference_images(model, v, prompts, cfg: ImageSampling):
    """Greedy guided decoding the slow way: no cache, full-vocabulary logits, then Meta's image mask."""
    seqs = [p + [v.boi_id] for p in prompts]
    keep = lambda t: v.classes[t] == IMAGE or t in (v.bos_id, v.boi_id, v.eoi_id)
    rows = seqs + [[t for t in s if keep(t)] for s in seqs] + [[v.bos_id, v.boi_id]] * len(seqs)
    image = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    image[v.image_start : v.image_end] = True
    out = []
    for _ in range(N):
        last = torch.stack([model(torch.tensor([r]))[0, -1] for r in rows])
        f, i, u = last.split(len(seqs))
        tok = S.allow_only(S.cfg_mix(f, i, u, cfg.cfg_text, cfg.cfg_image), image).argmax(-1)
        out.append(tok)
        rows = [r + [int(tok[j % len(seqs)])] for j, r in enumerate(rows)]
    return torch.stack(out, 1) - v.image_start


def test_restricted_head_batched_images_equal_full_vocabulary_reference(model, codec):
    v = codec.vocab
    prompts = [prompt(codec, "a red circle turns blue"), prompt(codec, image_codes(1), "left")]
    cfg = GenerationConfig(image=ImageSampling(greedy=True, cfg_text=2.5, cfg_image=1.5))
    codes = generate_images(model, v, prompts, cfg, N)
    assert codes.shape == (2, N) and codes.dtype == torch.long
    assert torch.equal(codes, reference_images(model, v, prompts, cfg.image))
    # The batch equals each prompt alone, and a prompt already ending with BOI is not extended.
    assert torch.equal(generate_images(model, v, [prompts[1] + [v.boi_id]], cfg, N)[0], codes[1])


def test_image_mode_stream_gives_one_block(model, codec):
    v = codec.vocab
    cfg = GenerationConfig(mode="image", seed=5, progress_every=5)
    events = list(stream(model, codec, Document.of("a red circle"), cfg))
    done = events[-1]
    assert done.ids[0] == v.boi_id and done.ids[-1] == v.eoi_id and len(done.ids) == N + 2
    assert all(v.image_start <= t < v.image_end for t in done.ids[1:-1])
    assert [e.done for e in events if isinstance(e, ImageProgress)] == [5, 10, 15, 16]
    (complete,) = [e for e in events if isinstance(e, ImageComplete)]
    assert complete.codes.tolist() == [t - v.image_start for t in done.ids[1:-1]] and complete.image is None
    # An open BOI at the end of the prompt becomes part of the output; the codes are the same.
    ids = prompt(codec, "a red circle")
    again = list(stream(model, codec, ids + [v.boi_id], cfg))[-1]
    assert again.ids == done.ids
    # Same codes as the batched path with the same seed.
    assert generate_images(model, v, [ids], cfg, N)[0].tolist() == complete.codes.tolist()


# ------------------------------------------------------------------------------------------ text mode


def test_text_mode_allows_only_text_and_eos(model, codec):
    v = codec.vocab
    cfg = GenerationConfig(seed=0, max_new_tokens=40, text=TextSampling(temperature=2.0, top_p=1.0))
    rows = generate_text(model, v, [prompt(codec, "a red"), prompt(codec, image_codes(0), "the")], cfg)
    for row in rows:
        assert 1 <= len(row) <= 40
        assert all(v.classes[t] == TEXT for t in row[:-1])
        assert v.classes[row[-1]] == TEXT or row[-1] == v.eos_id
    done = list(stream(model, codec, prompt(codec, "a red"), cfg))[-1]
    assert all(v.classes[t] == TEXT for t in done.ids if t != v.eos_id)
    # A model that prefers specials and images still writes only text, and stops at </s>.
    eos_model = biased_model(codec, {v.boi_id: 9.0, v.eoi_id: 9.0, v.pad_id: 9.0, v.image_start: 9.0,
                                     v.eos_id: 5.0, word(codec): 4.0})
    greedy = cfg.replace(text=TextSampling(greedy=True))
    assert generate_text(eos_model, v, [prompt(codec, "a")], greedy) == [[v.eos_id]]


def reference_text(model, v, ids, steps, penalty):
    """Greedy text the slow way: full forward each step, Meta's processors."""
    allowed = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    allowed[: v.size] = v.text_mask()
    allowed[v.eos_id] = True
    ids = list(ids)
    for _ in range(steps):
        x = torch.tensor([ids])
        scores = S.repetition_penalty(S.allow_only(model(x)[:, -1], allowed), x, penalty)
        ids.append(int(scores.argmax()))
    return ids


def test_greedy_text_batch_equals_rows_alone_and_reference(model, codec):
    v = codec.vocab
    prompts = [prompt(codec, "a red circle turns"), prompt(codec, "the")]
    cfg = GenerationConfig(max_new_tokens=12, text=TextSampling(greedy=True, repetition_penalty=1.3))
    batch = generate_text(model, v, prompts, cfg)
    assert batch == generate_text(model, v, prompts, cfg)  # greedy is deterministic
    for p, row in zip(prompts, batch):
        assert generate_text(model, v, [p], cfg) == [row]
        ref = reference_text(model, v, p, len(row), 1.3)[len(p) :]
        assert ref == row


def test_seeds_reproduce_and_differ(model, codec):
    v = codec.vocab
    p = [prompt(codec, "a red")]
    cfg = GenerationConfig(max_new_tokens=30, text=TextSampling(temperature=1.0, top_p=1.0))
    runs = [generate_text(model, v, p, cfg.replace(seed=s)) for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]
    imgs = [generate_images(model, v, p, cfg.replace(seed=s), N) for s in (1, 1, 2)]
    assert torch.equal(imgs[0], imgs[1]) and not torch.equal(imgs[0], imgs[2])


def test_incremental_text_never_splits_a_character(codec):
    text = "héllo € 😀 a red circle"
    ids = codec.text.encode(text)
    detok = _Detokenizer(codec.text)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == codec.text.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert sum(1 for d in deltas if d) < len(ids)  # multi-byte characters were held back


# ------------------------------------------------------------------------------------ interleaved mode


def blocks(seq, v):
    """(position of BOI, codes) of every image block in ``seq``, checking each is well-formed."""
    found = []
    for i, t in enumerate(seq):
        if t == v.boi_id:
            codes = seq[i + 1 : i + 1 + N]
            assert len(codes) == N and all(v.image_start <= c < v.image_end for c in codes)
            assert seq[i + 1 + N] == v.eoi_id
            found.append(i)
    assert sum(v.image_start <= t < v.image_end for t in seq) == N * len(found)
    return found


@pytest.mark.parametrize("room,expected_blocks", [(2 * (N + 2), 2), (2 * (N + 2) - 1, 1), (N + 1, 0)])
@pytest.mark.parametrize("limit_by", ["max_new_tokens", "max_seq_len"])
def test_interleaved_opens_a_block_only_when_it_fits(codec, room, expected_blocks, limit_by):
    v = codec.vocab
    m = biased_model(codec, {v.boi_id: 3.0, word(codec): 2.0, v.eos_id: 1.0})  # BOI always wins
    ids = prompt(codec, "a red circle")
    limit = len(ids) + room
    cfg = GenerationConfig(mode="interleaved", text=TextSampling(greedy=True, repetition_penalty=1.0),
                           image=ImageSampling(greedy=True))
    by_tokens = limit_by == "max_new_tokens"
    cfg = cfg.replace(max_new_tokens=room) if by_tokens else cfg.replace(max_seq_len=limit)
    done = list(stream(m, codec, ids, cfg))[-1]
    seq = ids + done.ids
    assert len(seq) == limit
    starts = blocks(seq, v)
    assert len(starts) == expected_blocks
    assert all(limit - i >= N + 2 for i in starts)
    tail = starts[-1] + N + 2 if starts else len(ids)
    assert all(t == word(codec) for t in seq[tail:])  # then text, as BOI no longer fits


def check_events(events, codec, model):
    """The event grammar: (TextDelta | ImageProgress… ImageComplete)* Done, consistent with Done."""
    v = codec.vocab
    assert isinstance(events[-1], Done) and not any(isinstance(e, Done) for e in events[:-1])
    done = events[-1]
    texts, current, progress = [], "", []
    for e in events[:-1]:
        if isinstance(e, TextDelta):
            assert e.text and not progress
            current += e.text
        elif isinstance(e, ImageProgress):
            assert e.total == N and e.done > (progress[-1] if progress else 0)
            progress.append(e.done)
        else:
            assert isinstance(e, ImageComplete) and progress[-1] == N and e.codes.shape == (N,)
            texts.append(current)
            current, progress = "", []
    texts.append(current)
    expected = codec.decode(done.ids)
    assert [type(p) for p in done.document.parts] == [type(p) for p in expected.parts]
    for got, want in zip(done.document.parts, expected.parts):
        if isinstance(want, TextPart):
            assert got.text == want.text
        else:
            assert torch.equal(got.codes, want.codes)
    # The text between images streamed exactly as the document's text parts.
    runs, seen_text = [], ""
    for part in done.document.parts:
        if isinstance(part, ImagePart):
            runs.append(seen_text)
            seen_text = ""
        else:
            seen_text += part.text
    runs.append(seen_text)
    assert runs == texts
    images = [e.codes.tolist() for e in events if isinstance(e, ImageComplete)]
    assert images == [p.codes.tolist() for p in done.document.images]
    blocks(done.ids, v)


def test_interleaved_stream_events_and_no_reprefill(codec):
    v = codec.vocab
    m = biased_model(codec, {v.boi_id: 2.0, word(codec): 3.0, word(codec, " blue"): 2.5, v.eos_id: -5.0},
                     rest=-10.0)
    calls = []
    inner = m.hidden_states

    def counting(ids, cache=None):
        calls.append(tuple(ids.shape))
        return inner(ids, cache)

    m.hidden_states = counting
    ids = prompt(codec, "a red circle")
    cfg = GenerationConfig(mode="interleaved", seed=4, max_new_tokens=90,
                           text=TextSampling(temperature=1.0, top_p=1.0, repetition_penalty=1.0))
    events = list(stream(m, codec, ids, cfg))
    check_events(events, codec, m)
    done = events[-1]
    seq = ids + done.ids
    n_images = len(done.document.images)
    assert n_images >= 2 and done.document.text  # both modalities appeared
    assert calls[0] == (1, len(ids))  # one prefill of the prompt …
    # … then, per image, only the guidance rows, packed in one call (image-conditioned: <s>, earlier
    # images and BOI; unconditioned: <s> BOI); every other call is one token per row.
    image_only = [1 + (N + 2) * k + 1 for k in range(n_images)]
    prefills = [c for c in calls[1:] if c[1] > 1]
    assert prefills == [(1, n + 2) for n in image_only]
    assert all(t == 1 or b == 1 for b, t in calls[1:])
    assert [c for c in calls if c[0] == 3] == [(3, 1)] * ((N - 1) * n_images)
    full_row_tokens = len(ids) + sum(1 for c in calls[1:] if c[1] == 1)
    assert full_row_tokens == len(seq) - 1 - (seq[-1] == v.eoi_id)  # each token fed exactly once


def test_stream_sampling_reproducible_with_the_regular_model(model, codec):
    cfg = GenerationConfig(mode="interleaved", seed=11, max_new_tokens=60,
                           text=TextSampling(temperature=1.0, top_p=1.0))
    doc = Document.of(image_codes(2), "a red circle")
    first, second = list(stream(model, codec, doc, cfg)), list(stream(model, codec, doc, cfg))
    check_events(first, codec, model)
    assert first[-1].ids == second[-1].ids
    assert [e for e in first if isinstance(e, TextDelta)] == [e for e in second if isinstance(e, TextDelta)]


def test_errors(model, codec):
    v = codec.vocab
    with pytest.raises(ValueError, match="no room"):
        list(stream(model, codec, [v.bos_id] * 250, GenerationConfig(mode="image")))
    with pytest.raises(ValueError, match="no room"):
        generate_text(model, v, [[v.bos_id] * 256], GenerationConfig())
    with pytest.raises(ValueError, match="ids must be in"):
        generate_text(model, v, [[v.size + 3]], GenerationConfig())
    with pytest.raises(ValueError, match="empty prompt"):
        list(stream(model, codec, [], GenerationConfig()))
    with pytest.raises(ValueError, match="no prompts"):
        generate_images(model, v, [], GenerationConfig(), N)
    with pytest.raises(ValueError, match="no room"):
        generate_images(model, v, [[v.bos_id] * (256 - N - 1)], GenerationConfig(), N)


def test_model_mode_is_restored(model, codec):
    model.train()
    try:
        generate_text(model, codec.vocab, [prompt(codec, "a")], GenerationConfig(max_new_tokens=2))
        assert model.training
    finally:
        model.eval()


# ------------------------------------------------------------------------------------------------ CLI


def cli_args(tmp_path, *extra):
    import argparse

    from chameleon_lm.generation.cli import add_cli

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    return parser.parse_args(["generate", "--model", "unused", "--prompt", "a red circle",
                              "--out", str(tmp_path), *extra])


def test_cli_run_generate_writes_images_and_document(tmp_path, capsys):
    from PIL import Image

    from chameleon_lm import VQGAN, VQGANConfig
    from chameleon_lm.generation.cli import run_generate
    from chameleon_lm.tokenizers.image import ImageTokenizer

    vq = VQGANConfig.preset("tiny")
    text_tok = train_text_tokenizer(["a red circle on grey"] * 50, 600, codebook_size=vq.n_embed)
    codec = DocumentCodec(text_tok, ImageTokenizer(VQGAN(vq)))
    m = Chameleon(ChameleonConfig.preset("tiny", vocab_size=len(text_tok)))
    Image.new("RGB", (40, 30), (220, 20, 20)).save(tmp_path / "in.png")
    bundle = SimpleNamespace(model=m, codec=codec)
    args = cli_args(tmp_path / "out", "--image", str(tmp_path / "in.png"), "--mode", "image", "--seed", "3",
                    "--cfg-text", "2.0", "--chat")
    assert run_generate(bundle, args) == 0
    record = json.loads((tmp_path / "out" / "document.json").read_text())
    assert record["config"]["seed"] == 3 and record["config"]["image"]["cfg_text"] == 2.0
    assert record["prompt_ids"][-1] == codec.vocab.eot_id
    (part,) = record["parts"]
    assert part["type"] == "image" and part["file"] == "image_0.png" and len(part["codes"]) == vq.num_tokens
    with Image.open(tmp_path / "out" / "image_0.png") as im:
        assert im.size == (vq.resolution, vq.resolution)
    assert record["ids"][1:-1] == [c + codec.vocab.image_start for c in part["codes"]]

    args = cli_args(tmp_path / "text", "--max-new-tokens", "8", "--temperature", "1.0", "--top-k", "20")
    assert run_generate(bundle, args) == 0
    record = json.loads((tmp_path / "text" / "document.json").read_text())
    text = "".join(p["text"] for p in record["parts"])
    assert text in capsys.readouterr().out and record["config"]["text"]["top_k"] == 20
    assert isinstance(record["config"]["seed"], int)  # a random seed is recorded
    assert math.isclose(record["config"]["image"]["temperature"], 1.0)


def test_packed_cpu_weights_match_eager_and_follow_weight_updates(codec):
    from chameleon_lm.generation.packed import (
        PackedGroup,
        PackedLinear,
        PackedMatrix,
        pack_linears,
        unpack_linears,
    )

    torch.manual_seed(3)
    m = Chameleon(ChameleonConfig.preset("tiny", vocab_size=len(codec.text))).eval()
    ids = torch.randint(0, len(codec.text), (3, 7))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    params = dict(m.named_parameters())
    with torch.inference_mode():
        eager = m(ids)
    assert pack_linears(m) == 7 * m.config.n_layers  # every block projection, not the head
    attention, ffn = m.layers[0].attention, m.layers[0].feed_forward
    assert isinstance(attention.wo, PackedLinear) and type(m.output).__name__ == "OutputHead"
    assert isinstance(attention.wqkv, PackedGroup) and isinstance(ffn.w13, PackedGroup)  # one matmul each
    assert type(attention.wq) is torch.nn.Linear and type(ffn.w1) is torch.nn.Linear
    assert m.state_dict().keys() == state.keys() and dict(m.named_parameters()) == params  # same objects
    with torch.inference_mode():
        torch.testing.assert_close(m(ids), eager, rtol=1e-5, atol=1e-5)
    head = PackedMatrix(m.output.weight[5:20])
    torch.testing.assert_close(head(torch.ones(2, m.config.dim)),
                               torch.ones(2, m.config.dim) @ m.output.weight[5:20].t())
    m(ids).sum().backward()  # with gradients on, the layers run as plain linears (and train)
    assert m.layers[0].feed_forward.w1.weight.grad is not None
    torch.optim.SGD(m.parameters(), lr=0.1).step()  # the packed copies are now stale: not used
    with torch.inference_mode():
        updated = m(ids)
    assert not torch.allclose(updated, eager)
    unpack_linears(m)
    assert type(m.layers[0].attention.wo) is torch.nn.Linear and "wqkv" not in m.layers[0].attention._modules
    with torch.inference_mode():
        torch.testing.assert_close(m(ids), updated)
    pack_linears(m)
    pack_linears(m)  # idempotent
    with torch.inference_mode():
        torch.testing.assert_close(m(ids), updated, rtol=1e-5, atol=1e-5)


def test_sampling_at_a_vanishing_temperature_is_the_argmax():
    scores = S.warp(torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.0]]), 5e-324, 0, 5e-324)  # overflows to inf
    g = torch.Generator().manual_seed(0)
    assert S.sample(scores, g, greedy=False).tolist() == [1, 0]
    assert S.sample(scores, [torch.Generator().manual_seed(i) for i in range(2)], greedy=False).tolist() == [1, 0]


def test_packed_bf16_linears_equal_plain_bf16(codec):
    from chameleon_lm.generation.packed import PackedLinear, pack_linears, supported

    m = Chameleon(ChameleonConfig.preset("tiny", vocab_size=len(codec.text))).to(torch.bfloat16).eval()
    if not supported(m.layers[0].attention.wq.weight):
        pytest.skip("no native bf16 oneDNN kernels on this CPU")
    ids = torch.randint(0, len(codec.text), (2, 5))
    with torch.inference_mode():
        plain = m(ids)
    pack_linears(m)
    assert isinstance(m.layers[0].feed_forward.w2, PackedLinear)
    with torch.inference_mode():
        torch.testing.assert_close(m(ids), plain, rtol=0, atol=0)


def test_argmax_is_torchs_argmax_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2048, generator=g)
    x[1, 700] = x[1, 1500] = 50.0  # a tie across chunks: the first one
    x[2, 3] = x[2, 9] = 50.0  # a tie within a chunk
    x[3] = float("-inf")  # nothing allowed
    x[4, 1800], x[4, 900] = float("nan"), float("nan")  # NaN counts as the largest, first one wins
    x[5, :1024] = float("-inf")
    x[0, 2047] = 60.0  # the maximum in the last column
    tail = x[:, :1900].clone()  # a last chunk of 108 columns, ending on a maximum
    tail[1, 1899] = tail[1, 1890] = 70.0
    for scores in (x, x[:, :1536], x.t().contiguous().t(), x.to(torch.bfloat16), x[:, :1000], tail,
                   tail[:, :1899], x[:, :1025]):
        assert torch.equal(S.argmax(scores), scores.argmax(-1))
    assert S.sample(x[[0, 1, 2]], None, greedy=True).tolist() == x[[0, 1, 2]].argmax(-1).tolist()


def test_packed_groups_step_aside_for_adapters_put_in_later(codec):
    from chameleon_lm.generation.packed import PackedGroup, pack_linears
    from chameleon_lm.training.adapters import apply_lora

    torch.manual_seed(4)
    m = Chameleon(ChameleonConfig.preset("tiny", vocab_size=len(codec.text))).eval()
    ids = torch.randint(0, len(codec.text), (2, 6))
    pack_linears(m)
    assert isinstance(m.layers[0].attention.wqkv, PackedGroup)
    apply_lora(m, ["wq", "wv", "w1"], rank=2, alpha=4.0)
    for layer in m.layers:  # a non-zero update, so that skipping the adapters would show
        for lora in (layer.attention.wq, layer.attention.wv, layer.feed_forward.w1):
            torch.nn.init.normal_(lora.lora_b, std=0.5)
    plain = apply_lora(Chameleon(m.config).eval(), ["wq", "wv", "w1"], rank=2, alpha=4.0)
    plain.load_state_dict(m.state_dict())  # the same weights, never packed (packed copies don't deepcopy)
    with torch.inference_mode():
        want = plain(ids)
        torch.testing.assert_close(m(ids), want)  # the stale groups are not used
    pack_linears(m)  # repacking drops the groups whose layers were replaced
    assert "wqkv" not in m.layers[0].attention._modules and "w13" not in m.layers[0].feed_forward._modules
    with torch.inference_mode():
        torch.testing.assert_close(m(ids), want, rtol=1e-5, atol=1e-5)


def test_an_unzeroed_cache_grows_its_rows_intact_for_the_decode_kernel(model):
    from chameleon_lm.generation.engine import decode_step
    from chameleon_lm.model.decode_attention import kernel_applies

    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(10, 300, (n,), generator=g) for n in (6, 2)]
    cache = model.new_cache(2, 8)
    for row, seq in enumerate(seqs):
        model(seq[None], cache.rows(slice(row, row + 1)))
    k_before = cache.k[:, :, :, :6].clone()
    cache.grow(64, zeroed=False)
    assert cache.max_len == 64 and torch.equal(cache.k[:, 0, :, :6], k_before[:, 0])
    assert torch.equal(cache.k[:, 1, :, :2], k_before[:, 1, :, :2])
    if not kernel_applies(cache.k.shape[-1], cache.k.dtype, cache.k.device):
        pytest.skip("the reference attention reads past a row's length: caches grow zeroed for it")
    cache.k[:, :, :, 6:].fill_(float("nan"))  # what an unwritten slot may hold
    cache.v[:, :, :, 6:].fill_(float("nan"))
    cache.k[:, 1, :, 2:6], cache.v[:, 1, :, 2:6] = float("nan"), float("nan")
    nxt = torch.randint(10, 300, (2, 1), generator=g)
    with torch.inference_mode():
        h, _, _ = decode_step(model, nxt, cache.k, cache.v, torch.tensor([6, 2]), 6)
        for row, seq in enumerate(seqs):
            alone = model.hidden_states(torch.cat([seq, nxt[row]])[None])[0, -1]
            torch.testing.assert_close(h[row, -1], alone, atol=1e-5, rtol=1e-5)
