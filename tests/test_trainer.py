"""The training loop: learning, exact resume, checkpoints (and killed saves), metrics logging,
token files."""

import json
import math
import shutil

import pytest
import torch

from chameleon_lm import Chameleon, Document, DocumentCodec, load_model
from chameleon_lm.data.tokens import IGNORE_INDEX, TokenDocuments
from chameleon_lm.tokenizers.text import train_text_tokenizer
from chameleon_lm.training import checkpoint
from chameleon_lm.training.checkpoint import load_training_state, save_training_state
from chameleon_lm.training.logger import MetricsLogger
from chameleon_lm.training.trainer import Trainer, TrainConfig, latest_checkpoint

K, N = 64, 16


@pytest.fixture(scope="module")
def setup():
    words = ["a red circle", "a blue square", "a green triangle", "now it turns yellow"]
    tok = train_text_tokenizer(words * 30, 600, codebook_size=K)
    codec = DocumentCodec(tok, image_seq_len=N)
    g = torch.Generator().manual_seed(0)
    docs = []
    for i in range(64):  # caption -> image: each caption has its own fixed image
        codes = torch.randint(0, K, (N,), generator=torch.Generator().manual_seed(i % 4))
        docs.append(codec.encode(Document.of(words[i % 4], codes), eos=True))
    docs.append(codec.encode_chat(Document.of("a red circle"), Document.of("a blue square")))
    del g
    return tok, codec, TokenDocuments.from_encoded(docs)


def tensorboard_scalars(log_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def make_trainer(tmp_path, setup, dropout=0.0, compile=False):
    tok, codec, data = setup
    cfg = TrainConfig(model="tiny", model_overrides={"vocab_size": len(tok), "dropout": dropout},
                      steps=40, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5,
                      out_dir=str(tmp_path), log_every=100, compile=compile)
    torch.manual_seed(0)
    return Trainer(cfg, Chameleon(cfg.model_config()), data, tok.vocab.pad_id, tok)


def test_token_file_round_trip_and_batches(tmp_path, setup):
    _, codec, data = setup
    data.save(tmp_path / "t.safetensors")
    again = TokenDocuments.load(tmp_path / "t.safetensors")
    assert len(again) == len(data) and torch.equal(again[3].ids, data[3].ids)
    chat = data[len(data) - 1]
    b = data.batch([0, len(data) - 1], seq_len=64, pad_id=1)
    assert b.input_ids.shape == b.targets.shape == (2, max(len(data[0]), len(chat)) - 1)
    # targets are the next tokens; prompt tokens of the chat document carry no loss
    assert torch.equal(b.targets[0, : len(data[0]) - 1], data[0].ids[1:])
    n_loss = int(chat.loss_mask[1:].sum())
    assert (b.targets[1] != IGNORE_INDEX).sum() == n_loss
    assert b.image_targets[0].sum() == N
    # batches are a pure function of (seed, step), and cover each epoch exactly once
    assert data.sample_indices(3, 8, seed=1) == data.sample_indices(3, 8, seed=1)
    epoch = sum((data.sample_indices(s, 5, seed=1) for s in range(13)), [])[: len(data)]
    assert sorted(epoch) == list(range(len(data)))
    # length grouping: same documents per window, each batch sorted by length, still deterministic
    grouped = sum((data.sample_indices(s, 4, seed=1, group=3) for s in range(6)), [])
    plain = sum((data.sample_indices(s, 4, seed=1) for s in range(6)), [])
    assert sorted(grouped[:12]) == sorted(plain[:12]) and sorted(grouped[12:]) == sorted(plain[12:])
    assert data.sample_indices(4, 4, seed=1, group=3) == grouped[16:20]
    spread = lambda b: max(len(data[i]) for i in b) - min(len(data[i]) for i in b)  # noqa: E731
    assert sum(spread(grouped[s : s + 4]) for s in range(0, 24, 4)) <= sum(
        spread(plain[s : s + 4]) for s in range(0, 24, 4))
    with pytest.raises(ValueError, match="not a token file"):
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
        TokenDocuments.load(tmp_path / "bad.safetensors")


def test_short_run_lowers_the_loss(tmp_path, setup):
    tr = make_trainer(tmp_path, setup)
    hist = tr.fit(progress=False, log=None)
    first, last = sum(h["ce"] for h in hist[:5]) / 5, sum(h["ce"] for h in hist[-5:]) / 5
    assert last < 0.65 * first, [round(h["ce"], 2) for h in hist]
    assert all(h["ce_image"] == h["ce_image"] for h in hist)  # image targets present, not NaN
    lines = (tmp_path / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == 40 and json.loads(lines[-1])["step"] == 40
    ce = tensorboard_scalars(tmp_path / "tensorboard", "train/ce")
    assert ce == [(h["step"], pytest.approx(h["ce"])) for h in hist]


def test_resume_continues_the_same_curve(tmp_path, setup):
    full = make_trainer(tmp_path / "a", setup, dropout=0.1)  # dropout: the RNG state must resume
    ref = [h["loss"] for h in full.fit(progress=False, log=None)]
    part = make_trainer(tmp_path / "b", setup, dropout=0.1)
    part.fit(steps=15, progress=False, log=None)
    ckpt = part.save_checkpoint()
    assert latest_checkpoint(tmp_path / "b") == ckpt
    resumed = make_trainer(tmp_path / "c", setup, dropout=0.1)
    resumed.load_checkpoint(ckpt)
    assert resumed.step == 15
    rest = [h["loss"] for h in resumed.fit(progress=False, log=None)]
    torch.testing.assert_close(torch.tensor(rest), torch.tensor(ref[15:]), rtol=1e-5, atol=1e-6)
    # Resuming in the run's own folder drops the log lines written after the checkpoint.
    part.fit(steps=20, progress=False, log=None)  # the run went on past its checkpoint, and died
    again = make_trainer(tmp_path / "b", setup, dropout=0.1)
    again.load_checkpoint(ckpt)
    again.fit(steps=18, progress=False, log=None)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b/train_log.jsonl").open()]
    assert steps == list(range(1, 19))


def test_checkpoint_is_a_loadable_model(tmp_path, setup):
    tr = make_trainer(tmp_path, setup)
    tr.fit(steps=3, progress=False, log=None)
    loaded = load_model(tr.save_checkpoint())
    ids = torch.randint(0, 100, (1, 9))
    tr.model.eval()
    torch.testing.assert_close(loaded.model(ids), tr.model(ids))
    assert loaded.codec.vocab == setup[0].vocab


@pytest.mark.skipif(not shutil.which("g++"), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_blocks_follow_the_eager_curve_and_save_plain_names(tmp_path, setup):
    eager = make_trainer(tmp_path / "a", setup)
    ref = [h["loss"] for h in eager.fit(steps=4, progress=False, log=None)]
    compiled = make_trainer(tmp_path / "b", setup, compile=True)
    got = [h["loss"] for h in compiled.fit(steps=4, progress=False, log=None)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=1e-5)
    assert compiled.model.state_dict().keys() == eager.model.state_dict().keys()
    loaded = load_model(compiled.save_checkpoint())
    ids = torch.randint(0, 100, (1, 9))
    compiled.model.eval()
    torch.testing.assert_close(loaded.model(ids), compiled.model(ids), rtol=1e-4, atol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")


def test_a_killed_save_never_looks_complete(tmp_path, setup, monkeypatch):
    tr = make_trainer(tmp_path, setup)
    tr.fit(steps=2, progress=False, log=None)
    first = tr.save_checkpoint()
    tr.fit(steps=3, progress=False, log=None)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", killed)  # dies writing trainer.pt
    for directory in (tr.checkpoint_dir(), first):  # a new folder, and one saved before
        with pytest.raises(KeyboardInterrupt):
            tr.save_checkpoint(directory)
        assert not (directory / "trainer_state.json").exists()
        with pytest.raises(FileNotFoundError, match="not a complete training checkpoint"):
            make_trainer(tmp_path, setup).load_checkpoint(directory)
    assert latest_checkpoint(tmp_path) is None
    monkeypatch.undo()
    assert tr.save_checkpoint(first) == first and latest_checkpoint(tmp_path) == first
    assert not list(first.glob("*.tmp"))


def test_data_state_travels_with_the_checkpoint(tmp_path, setup):
    class Positioned(Trainer):
        def data_state(self):
            return {"epoch": 2, "position": self.step * 8}

        def load_data_state(self, state):
            self.restored = state

    tok, _, data = setup
    base = make_trainer(tmp_path, setup)
    tr = Positioned(base.config, base.model, data, tok.vocab.pad_id, tok)
    tr.fit(steps=2, progress=False, log=None)
    ckpt = tr.save_checkpoint()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["extra"] == {"data": {"epoch": 2, "position": 16}}
    assert state["config"] == base.config.to_dict()
    other = Positioned(base.config, Chameleon(base.config.model_config()), data, tok.vocab.pad_id)
    other.load_checkpoint(ckpt)
    assert other.step == 2 and other.restored == {"epoch": 2, "position": 16}


def test_training_state_round_trip_and_errors(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(11)
    save_training_state(tmp_path / "c", step=7, optimizers={"opt": opt}, schedulers={"lr": sched},
                        generators={"g": gen}, extra={"pos": [1, 2]}, config={"lr": 0.1})
    expected = (torch.rand(3), torch.rand(3, generator=gen))
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 0.5**s)
    gen2 = torch.Generator()
    step, extra = load_training_state(tmp_path / "c", {"opt": opt2}, {"lr": sched2}, {"g": gen2})
    assert (step, extra) == (7, {"pos": [1, 2]})
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert all(torch.equal(a, b) for a, b in zip(expected, (torch.rand(3), torch.rand(3, generator=gen2))))
    with pytest.raises(KeyError, match="other"):
        load_training_state(tmp_path / "c", {"other": opt2})
    with pytest.raises(TypeError):  # not JSON-able: nothing written
        save_training_state(tmp_path / "d", step=1, optimizers={}, extra={"x": object()})
    assert not (tmp_path / "d").exists()
    # The single-optimizer trainer.pt of earlier checkpoints still loads.
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": torch.get_rng_state()}, tmp_path / "c" / "trainer.pt")
    assert load_training_state(tmp_path / "c", {"optimizer": opt2}, {"scheduler": sched2})[0] == 7
    # The highest complete step wins, whatever the digits.
    for step in (9, 10, 200):
        (tmp_path / "run/checkpoints" / f"step_{step:07d}").mkdir(parents=True)
    (tmp_path / "run/checkpoints/step_12345678").mkdir()
    for step in (9, 10, 12345678):
        save_training_state(tmp_path / "run/checkpoints" / f"step_{step:07d}", step=step,
                            optimizers={})
    assert latest_checkpoint(tmp_path / "run").name == "step_12345678"


def test_metrics_logger_writes_jsonl_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path, "vq") as logger:
        for step in (1, 2, 3):
            logger.log(step, {"loss": 1.0 / step, "note": "text", "nan": math.nan,
                              "flag": True, "tokens": 10 * step})
    records = [json.loads(line) for line in (tmp_path / "vq_log.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2, 3] and records[0]["note"] == "text"
    assert math.isnan(records[0]["nan"])
    assert tensorboard_scalars(tmp_path / "tensorboard", "vq/loss") == [
        (1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert tensorboard_scalars(tmp_path / "tensorboard", "vq/tokens")[-1] == (3, 30.0)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["vq/loss", "vq/tokens"]  # no text, NaN, bool
    # A run resumed at step 1 drops the later records; it then appends.
    with MetricsLogger(tmp_path, "vq", purge_step=2) as logger:
        logger.log(2, {"loss": 0.25})
    records = [json.loads(line) for line in (tmp_path / "vq_log.jsonl").open()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 0.25)]
    assert tensorboard_scalars(tmp_path / "tensorboard", "vq/loss") == [(1, 1.0), (2, 0.25)]
