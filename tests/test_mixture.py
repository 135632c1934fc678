"""Mixtures of token datasets: proportions, stages, up-weighting, exact resume, validation batches."""

import json
from collections import Counter

import pytest
import torch

from chameleon_lm.data.loader import TrainLoader, validation_batches
from chameleon_lm.data.mixture import DocumentStream, MixtureConfig, MixtureSource, Stage, Upweight
from chameleon_lm.data.shards import ShardWriter, TokenDataset, write_index
from chameleon_lm.documents import EncodedDocument
from chameleon_lm.tokenizers.vocab import IMAGE, TEXT

VOCAB = 64


def write_dataset(path, lengths, metas=None, vocab_size=VOCAB, first_id=1):
    """A real token dataset of documents of the given lengths in two shards; returns its path as str."""
    metas = metas or [{} for _ in lengths]
    halves = [range(0, len(lengths) // 2), range(len(lengths) // 2, len(lengths))]
    summaries = []
    for s, docs in enumerate(halves):
        writer = ShardWriter(path, s, f"unit-{s}", vocab_size)
        for i in docs:
            n = lengths[i]
            ids = (first_id + i * 7 + torch.arange(n)) % (vocab_size - 1) + 1
            modality = torch.full((n,), TEXT, dtype=torch.int8)
            modality[n // 2:] = IMAGE
            writer.add(EncodedDocument(ids, modality, torch.ones(n, dtype=torch.bool)), f"doc-{i}",
                       meta=metas[i])
        summaries.append(writer.close())
    write_index(path, summaries, vocab_size=vocab_size, info={"test": True})
    return str(path)


@pytest.fixture
def abc(tmp_path):
    """Three small sources of different document lengths."""
    return {name: write_dataset(tmp_path / name, lengths, first_id=k * 11)
            for k, (name, lengths) in enumerate([("a", [5, 9, 3, 12, 7, 4]), ("b", [20, 6, 8, 15]),
                                                  ("c", [10, 3, 30, 4, 6])])}


def mixture(paths, weights, stages=()):
    return MixtureConfig([MixtureSource(n, paths[n], weight=w) for n, w in weights.items()], list(stages))


def source_shares(stream, step, draws):
    counts = Counter(stream.next(step)[0][0] for _ in range(draws))
    return [counts[s] / draws for s in range(len(stream.names))]


def test_mixture_proportions_follow_the_weights(abc):
    stream = DocumentStream(mixture(abc, {"a": 1.0, "b": 3.0, "c": 0.0}), seed=0)
    shares = source_shares(stream, 0, 10_000)
    assert shares[2] == 0.0
    assert shares[0] == pytest.approx(0.25, abs=0.02) and shares[1] == pytest.approx(0.75, abs=0.02)
    assert stream.counts == [round(s * 10_000) for s in shares] and stream.draws == 10_000


def test_second_stage_halves_the_first_stage_and_adds_a_source(abc):
    cfg = mixture(abc, {"a": 1.0, "b": 1.0, "c": 0.0}, [Stage(start_step=100, scale_previous=0.5,
                                                              weights={"c": 1.0})])
    assert cfg.weights_at(99) == {"a": 1.0, "b": 1.0, "c": 0.0}
    assert cfg.weights_at(100) == cfg.weights_at(10**6) == {"a": 0.5, "b": 0.5, "c": 1.0}
    stream = DocumentStream(cfg, seed=3)
    before = source_shares(stream, 99, 5_000)
    assert before[2] == 0.0 and before[0] == pytest.approx(0.5, abs=0.02)
    after = source_shares(stream, 100, 10_000)
    assert after == pytest.approx([0.25, 0.25, 0.5], abs=0.02)


def test_every_document_once_per_epoch_in_a_new_order_each_epoch(tmp_path):
    path = write_dataset(tmp_path / "d", [4] * 10)
    stream = DocumentStream(MixtureConfig([MixtureSource("d", path)]), seed=1)
    epochs = [[stream.next(0)[0][1] for _ in range(10)] for _ in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1] and epochs[0] != list(range(10))


def test_upweighted_documents_appear_factor_times_per_epoch(tmp_path):
    metas = [{"faces": True}, {"faces": False}, {}, {"faces": True, "quality": "high"}, {"faces": 1},
             {"quality": "high"}, {}, {"faces": False}]
    path = write_dataset(tmp_path / "d", [5] * 8, metas)
    rules = [Upweight("faces", factor=2), Upweight("quality", equals="high", factor=3)]
    stream = DocumentStream(MixtureConfig([MixtureSource("d", path, upweight=rules)]), seed=0)
    # Rules multiply: doc 3 matches both; 1 is not True (doc 4), absent fields match nothing.
    copies = {0: 2, 1: 1, 2: 1, 3: 6, 4: 1, 5: 3, 6: 1, 7: 1}
    assert stream.epoch_sizes == [sum(copies.values())]
    for _ in range(3):
        epoch = Counter(stream.next(0)[0][1] for _ in range(stream.epoch_sizes[0]))
        assert dict(epoch) == copies


def test_upweighting_in_a_mixture_draws_flagged_documents_factor_times_as_often(tmp_path, abc):
    path = write_dataset(tmp_path / "d", [6] * 6, [{"faces": i % 3 == 0} for i in range(6)])
    cfg = MixtureConfig([MixtureSource("a", abc["a"]),
                         MixtureSource("d", path, upweight=[Upweight("faces", factor=2)])])
    stream = DocumentStream(cfg, seed=5)
    drawn = Counter(tuple(stream.next(0)[0]) for _ in range(4_000))
    flagged = sum(drawn[(1, i)] for i in (0, 3))
    plain = sum(drawn[(1, i)] for i in (1, 2, 4, 5))
    assert flagged / 2 == pytest.approx(2 * plain / 4, rel=0.05)


def batches_equal(x, y):
    for name in ("input_ids", "targets", "image_targets", "positions", "lengths"):
        assert torch.equal(getattr(x, name), getattr(y, name)), name
    assert (x.doc_ids is None) == (y.doc_ids is None)
    if x.doc_ids is not None:
        assert torch.equal(x.doc_ids, y.doc_ids)


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_resume_mid_epoch_gives_the_uninterrupted_batches(abc, mode):
    cfg = mixture(abc, {"a": 1.0, "b": 1.0, "c": 0.0}, [Stage(4, 0.5, {"c": 2.0})])
    kw = dict(seq_len=4, batch_size=3, pad_id=0, seed=7, mode=mode)
    run = TrainLoader(cfg, **kw)
    run.next_batch(0)
    step = 1
    while run.state_dict()["packer"]["carry"] is None and step < 3:  # stop inside a document
        run.next_batch(step)
        step += 1
    state = json.loads(json.dumps(run.state_dict()))
    assert state["packer"]["carry"] is not None
    stream = state["stream"]
    assert any(c % e for c, e in zip(stream["counts"], stream["epoch_sizes"]))  # mid-epoch
    resumed = TrainLoader(cfg, **kw)
    resumed.load_state_dict(state)
    for step in range(step, step + 6):  # across the stage change at step 4
        batches_equal(run.next_batch(step), resumed.next_batch(step))
    assert run.state_dict() == resumed.state_dict()


def test_batches_are_a_function_of_the_seed(abc):
    cfg = mixture(abc, {"a": 1.0, "b": 2.0})
    kw = dict(seq_len=16, batch_size=2, pad_id=0)
    one, two, other = (TrainLoader(cfg, seed=s, **kw) for s in (1, 1, 2))
    b1, b2, b3 = ([loader.next_batch(s) for s in range(4)] for loader in (one, two, other))
    for x, y in zip(b1, b2):
        batches_equal(x, y)
    assert any(not torch.equal(x.input_ids, z.input_ids) for x, z in zip(b1, b3))
    assert b1[0].input_ids.shape == (2, 16) and b1[0].num_pad == 0


def test_refused_loader_state_changes_nothing(abc):
    cfg = mixture(abc, {"a": 1.0, "b": 1.0})
    kw = dict(seq_len=8, batch_size=2, pad_id=0, seed=0)
    run = TrainLoader(cfg, **kw)
    run.next_batch(0)
    good = run.state_dict()
    fresh = TrainLoader(cfg, **kw)
    before = fresh.state_dict()
    bad_counts = json.loads(json.dumps(good))
    bad_counts["stream"]["counts"][0] += 1
    with pytest.raises(ValueError, match="sum of counts"):
        fresh.load_state_dict(bad_counts)
    bad_carry = json.loads(json.dumps(good))
    bad_carry["packer"]["carry"] = {"ref": [1, 99], "offset": 0}
    with pytest.raises(ValueError, match="source 'b' has 4 documents"):
        fresh.load_state_dict(bad_carry)
    with pytest.raises(ValueError, match="seed 0, this stream has 1"):
        TrainLoader(cfg, **{**kw, "seed": 1}).stream.load_state_dict(good["stream"])
    with pytest.raises(ValueError, match="batch_size"):
        TrainLoader(cfg, **{**kw, "batch_size": 3}).load_state_dict(good)
    assert fresh.state_dict() == before


def test_mixture_config_round_trips_through_json(tmp_path, abc):
    toml_like = {
        "sources": [{"name": "text", "path": abc["a"], "weight": 1},
                    {"name": "pairs", "path": abc["b"], "upweight": [{"field": "faces", "factor": 2}]},
                    {"name": "sft", "path": abc["c"], "weight": 0}],
        "stages": [{"start_step": 800, "scale_previous": 0.5, "weights": {"sft": 1}}],
    }
    cfg = MixtureConfig.from_dict(toml_like)
    assert isinstance(cfg.sources[1], MixtureSource) and cfg.sources[1].upweight == [Upweight("faces")]
    assert isinstance(cfg.stages[0], Stage) and cfg.weights_at(800) == {"text": 0.5, "pairs": 0.5, "sft": 1}
    cfg.save(tmp_path / "mix.json")
    assert MixtureConfig.load(tmp_path / "mix.json") == cfg
    assert json.loads((tmp_path / "mix.json").read_text())["sources"][1]["upweight"][0]["equals"] is True


def test_mixture_config_errors():
    src = lambda name, w=1.0: MixtureSource(name, "p", weight=w)  # noqa: E731
    with pytest.raises(ValueError, match=r"unknown source\(s\) \['d'\]"):
        MixtureConfig([src("a")], [Stage(10, weights={"d": 1.0})])
    with pytest.raises(ValueError, match="'a': weight must be a finite number >= 0"):
        src("a", -1.0)
    with pytest.raises(ValueError, match="weight of 'a' must be"):
        Stage(10, weights={"a": -0.5})
    with pytest.raises(ValueError, match="every weight is 0 from step 0"):
        MixtureConfig([src("a", 0.0), src("b", 0.0)])
    with pytest.raises(ValueError, match="every weight is 0 from step 20"):
        MixtureConfig([src("a")], [Stage(10, 0.5), Stage(20, 0.0)])
    with pytest.raises(ValueError, match=r"duplicate source name\(s\) \['a'\]"):
        MixtureConfig([src("a"), src("b"), src("a")])
    with pytest.raises(ValueError, match=r"sorted.*\[20, 10\]"):
        MixtureConfig([src("a")], [Stage(20), Stage(10)])
    with pytest.raises(ValueError, match="integer >= 1"):
        Upweight("faces", factor=1.5)
    with pytest.raises(ValueError, match=r"MixtureConfig\.sources\[1\]\.weight: expected"):
        MixtureConfig.from_dict({"sources": [{"name": "a", "path": "p"},
                                             {"name": "b", "path": "p", "weight": "high"}]})
    with pytest.raises(ValueError, match=r"MixtureConfig\.sources\[0\]\.upweight\[0\]: unknown field"):
        MixtureConfig.from_dict({"sources": [{"name": "a", "path": "p", "upweight": [{"feild": "x"}]}]})


def test_stream_errors_name_the_source(tmp_path, abc):
    empty = tmp_path / "empty"
    write_index(empty, [ShardWriter(empty, 0, "u", VOCAB).close()], vocab_size=VOCAB, info={})
    with pytest.raises(ValueError, match="source 'e'.*no documents"):
        DocumentStream(MixtureConfig([MixtureSource("a", abc["a"]), MixtureSource("e", str(empty))]), 0)
    big = write_dataset(tmp_path / "big", [4, 4], vocab_size=VOCAB * 2)
    with pytest.raises(ValueError, match="different vocabularies.*'b': 128"):
        DocumentStream(MixtureConfig([MixtureSource("a", abc["a"]), MixtureSource("b", big)]), 0)
    with pytest.raises(FileNotFoundError, match="source 'x'.*not a token dataset"):
        DocumentStream(MixtureConfig([MixtureSource("x", str(tmp_path / "nowhere"))]), 0)
    with pytest.raises(ValueError, match="no document has the metadata field 'faces'"):
        DocumentStream(MixtureConfig([MixtureSource("a", abc["a"], upweight=[Upweight("faces")])]), 0)
    with pytest.raises(ValueError, match="pad_id"):
        TrainLoader(mixture(abc, {"a": 1.0}), seq_len=8, batch_size=2, pad_id=VOCAB, seed=0)


def test_validation_batches_are_the_first_documents_in_order(tmp_path):
    lengths = [5, 9, 3, 12, 7, 4, 11, 6]
    ds = TokenDataset(write_dataset(tmp_path / "val", lengths))
    first = validation_batches(ds, seq_len=6, batch_size=2, pad_id=0, max_batches=2)
    again = validation_batches(TokenDataset(ds.path), seq_len=6, batch_size=2, pad_id=0, max_batches=2)
    assert len(first) == 2
    for x, y in zip(first, again):
        batches_equal(x, y)
    pairs = torch.cat([ds[i].ids[:-1] for i in range(len(ds))])
    assert torch.equal(torch.cat([b.input_ids.flatten() for b in first]), pairs[:24])
    # The whole set (49 pairs) is 4 full batches and one short last one; no more than that.
    every = validation_batches(ds, seq_len=6, batch_size=2, pad_id=0, max_batches=100)
    assert len(every) == 5 and sum(b.num_targets for b in every) == sum(n - 1 for n in lengths)
    assert every[-1].input_ids.shape == (1, 6) and every[-1].num_pad == 5
    with pytest.raises(ValueError, match="max_batches"):
        validation_batches(ds, seq_len=6, batch_size=2, pad_id=0, max_batches=0)


def test_stream_resumes_exactly_across_blocks_of_uniforms(abc):
    cfg = mixture(abc, {"a": 1.0, "b": 1.0, "c": 1.0})
    one = DocumentStream(cfg, seed=9)
    refs = [one.next(0)[0] for _ in range(5000)]
    two = DocumentStream(cfg, seed=9)
    for _ in range(4000):
        two.next(0)
    three = DocumentStream(cfg, seed=9)
    three.load_state_dict(json.loads(json.dumps(two.state_dict())))
    assert [three.next(0)[0] for _ in range(1000)] == refs[4000:]  # draw 4096 starts a new block
    s, i = refs[0]
    assert torch.equal(one.fetch(refs[0]).ids, TokenDataset(abc["abc"[s]])[i].ids)
    with pytest.raises(ValueError, match="not a mixture document ref"):
        one.fetch([0])
