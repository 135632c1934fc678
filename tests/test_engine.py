"""The continuous-batching engine: batch independence, joining and leaving, cancel, limits, threads."""

import shutil
import threading

import pytest
import torch
from conftest import shapes_codec, tiny_model

from chameleon_lm import Chameleon, ChameleonConfig, Document
from chameleon_lm.generation import GenerationConfig, ImageSampling, TextSampling
from chameleon_lm.generation.engine import Done, Engine, ImageComplete, ImageProgress, TextDelta
from chameleon_lm.model.decode_attention import cpu_kernel

K, N = 64, 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def codec():
    return shapes_codec(K, N)


@pytest.fixture(scope="module")
def model(codec):
    return tiny_model(codec)


def ids(codec, *items):
    return codec.encode(Document.of(*items), bos=True).ids.tolist()


def requests(codec):
    """Different modes, lengths, sampling settings and seeds."""
    loose = TextSampling(temperature=1.0, top_p=1.0, repetition_penalty=1.0)
    return [
        (ids(codec, "a red circle"), GenerationConfig(mode="text", seed=1, max_new_tokens=40, text=loose)),
        (ids(codec, "Describe the picture: a red"), GenerationConfig(mode="text", seed=2, max_new_tokens=25)),
        (ids(codec, "blue"), GenerationConfig(mode="image", seed=3,
                                              image=ImageSampling(temperature=1.0, top_k=20))),
        (ids(codec, "turns"), GenerationConfig(mode="interleaved", seed=4, max_new_tokens=60, text=loose)),
        (ids(codec, "left"), GenerationConfig(mode="text", seed=5, max_new_tokens=30,
                                              text=TextSampling(greedy=True))),
    ]


def alone(model, codec, prompt, config):
    engine = Engine(model, codec.vocab, codec=codec, max_rows=3)
    (done,) = engine.run([engine.submit(prompt, config)])
    return done


def test_outputs_do_not_depend_on_the_batch(model, codec):
    reqs = requests(codec)
    expected = [alone(model, codec, p, c) for p, c in reqs]
    assert any(len(d.document.images) for d in expected) and len({tuple(d.ids) for d in expected}) == 5
    # Together, with requests joining at different steps and a batch too small for all of them (some wait).
    engine = Engine(model, codec.vocab, codec=codec, max_rows=7)
    jobs = [engine.submit(*reqs[0]), engine.submit(*reqs[2])]
    for _ in range(3):
        engine.step()
    noise = engine.submit(ids(codec, "a"), GenerationConfig(mode="image", seed=99))
    jobs += [engine.submit(*r) for r in reqs[3:]]
    engine.step()
    jobs.insert(1, engine.submit(*reqs[1]))
    widths = []
    while not all(j.finished for j in jobs + [noise]):
        engine.step()
        widths.append(len(engine.rows))
    assert max(widths) == 7 and engine.rows == [] and engine.reserved == 0  # full batch, then all freed
    for job, want in zip(jobs, expected):
        assert job.finished.ids == want.ids and job.finished.reason == want.reason


def test_events_of_a_batched_request(model, codec):
    engine = Engine(model, codec.vocab, codec=codec, max_rows=6)
    events = {i: [] for i in range(2)}
    for i, (p, c) in enumerate(requests(codec)[2:4]):
        engine.submit(p, c.replace(progress_every=4), sink=events[i].append)
    while engine.step():
        pass
    image = events[0]
    assert [e.done for e in image if isinstance(e, ImageProgress)] == [4, 8, 12, 16]
    assert isinstance(image[-2], ImageComplete) and isinstance(image[-1], Done)
    assert image[-2].codes.tolist() == image[-1].document.images[0].codes.tolist()
    assert image[-1].reason == "stop" and len(image[-1].ids) == N + 2  # BOI, N codes, EOI
    text = "".join(e.text for e in events[1] if isinstance(e, TextDelta))
    assert text == events[1][-1].document.text


def test_length_limits_and_finish_reasons(model, codec):
    p = ids(codec, "a red")
    cfg = GenerationConfig(mode="text", seed=0, max_new_tokens=7, text=TextSampling(temperature=5.0))
    done = alone(model, codec, p, cfg)
    assert (done.reason == "length" and len(done.ids) == 7) or done.ids[-1] == codec.vocab.eos_id
    done = alone(model, codec, p, cfg.replace(max_new_tokens=100, max_seq_len=len(p) + 3))
    assert len(done.ids) <= 3
    engine = Engine(model, codec.vocab, codec=codec, max_rows=1)
    with pytest.raises(ValueError, match="needs 3 rows"):
        engine.submit(p, cfg.replace(mode="image"))
    with pytest.raises(ValueError, match="no room"):
        engine.submit([codec.vocab.bos_id] * 256, cfg)
    with pytest.raises(ValueError, match="ids must be in"):
        engine.submit([10**6], cfg)


def test_cancel_and_timeout_free_the_rows(model, codec):
    engine = Engine(model, codec.vocab, codec=codec, max_rows=3)
    long = GenerationConfig(mode="text", seed=0, max_new_tokens=200,
                            text=TextSampling(temperature=1.0, top_p=1.0, repetition_penalty=1.0))
    a = engine.submit(ids(codec, "a"), long)
    waiting = engine.submit(ids(codec, "red"), GenerationConfig(mode="image", seed=1))
    for _ in range(3):
        engine.step()
    assert len(engine.rows) == 1 and len(engine.waiting) == 1  # the image request waits for 3 rows
    a.cancel()
    engine.step()
    assert a.finished.reason == "cancelled" and len(engine.rows) == 3  # freed; the waiting one runs
    engine.run([waiting])
    assert waiting.finished.reason == "stop"
    late = engine.submit(ids(codec, "a"), long, timeout=0.0)
    engine.step()
    assert late.finished.reason == "timeout" and not engine.busy


def test_a_failing_sink_cancels_only_its_request(model, codec):
    engine = Engine(model, codec.vocab, codec=codec, max_rows=2)

    def broken(event):
        raise BrokenPipeError("client gone")

    p, c = requests(codec)[0]
    bad = engine.submit(p, c, sink=broken)
    good = engine.submit(p, c)
    engine.run([bad, good])
    assert bad.finished.reason == "cancelled" and good.finished.ids == alone(model, codec, p, c).ids


def test_engine_thread_serves_concurrent_submitters_and_survives_a_failed_step(model, codec):
    reqs = requests(codec)
    expected = [alone(model, codec, p, c).ids for p, c in reqs]
    engine = Engine(model, codec.vocab, codec=codec, max_rows=9)
    engine.start()
    try:
        results = [None] * len(reqs)

        def client(i):
            done = threading.Event()
            out = []
            engine.submit(*reqs[i], sink=lambda e: (out.append(e), isinstance(e, Done) and done.set()))
            assert done.wait(60)
            results[i] = out[-1].ids

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == expected
        # A step that raises ends the running requests with an error; the engine keeps serving.
        original = engine._feed
        engine._feed = lambda feed: (_ for _ in ()).throw(RuntimeError("boom"))
        failed = threading.Event()
        first = []
        engine.submit(*reqs[0], sink=lambda e: (first.append(e), isinstance(e, Done) and failed.set()))
        assert failed.wait(30) and first[-1].reason == "error" and "boom" in first[-1].error
        engine._feed = original
        again = threading.Event()
        second = []
        engine.submit(*reqs[0], sink=lambda e: (second.append(e), isinstance(e, Done) and again.set()))
        assert again.wait(30) and second[-1].ids == expected[0]
    finally:
        engine.stop()


def test_a_bf16_model_batches_rows_of_different_lengths(codec):
    """On CPU the KV cache of a bf16 model is bf16 with the decode kernel (fp32 without); batched
    rows still equal rows alone."""
    torch.manual_seed(0)
    m = Chameleon(ChameleonConfig.preset("tiny", vocab_size=len(codec.text))).to(torch.bfloat16).eval()
    assert m.new_cache(1, 4).k.dtype == (torch.bfloat16 if cpu_kernel() else torch.float32)
    reqs = requests(codec)[:3]
    expected = [alone(m, codec, p, c) for p, c in reqs]
    engine = Engine(m, codec.vocab, codec=codec, max_rows=5)
    together = engine.run([engine.submit(p, c) for p, c in reqs])
    assert [d.ids for d in together] == [d.ids for d in expected]
    assert all(d.reason != "error" for d in together)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_decoding_matches_eager_and_stays_batch_independent(model, codec):
    reqs = requests(codec)
    eager = [alone(model, codec, p, c) for p, c in reqs]
    engine = Engine(model, codec.vocab, codec=codec, max_rows=7, compile=True)
    jobs = [engine.submit(*r) for r in reqs[:2]]
    engine.step()
    jobs += [engine.submit(*r) for r in reqs[2:]]  # join a running batch: other batch sizes, lengths
    engine.run(jobs)
    assert engine._compiled is not None, "the compiled step fell back to eager"
    for job, want in zip(jobs, eager):
        assert job.finished.ids == want.ids and job.finished.reason == want.reason
    alone_compiled = Engine(model, codec.vocab, codec=codec, max_rows=3, compile=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        alone_compiled.cache.grow(2 * alone_compiled.cache.max_len)  # as a long request makes it
    (done,) = alone_compiled.run([alone_compiled.submit(*reqs[1])])  # one row: run as two
    assert done.ids == eager[1].ids
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "a step recompiled"
