"""The training loop: learning, packed batches from token datasets, validation, init_from, exact
resume, checkpoints (and killed saves), metrics logging."""

import json
import math
import shutil

import pytest
import torch
from conftest import write_token_dataset

from chameleon_lm import Chameleon, Document, DocumentCodec, load_model
from chameleon_lm.checkpoints import save_as
from chameleon_lm.data.loader import TrainLoader
from chameleon_lm.data.mixture import MixtureConfig, MixtureSource
from chameleon_lm.tokenizers.text import train_text_tokenizer
from chameleon_lm.training import checkpoint
from chameleon_lm.training.checkpoint import load_training_state, save_training_state
from chameleon_lm.training.logger import MetricsLogger
from chameleon_lm.training.trainer import TrainConfig, Trainer, latest_checkpoint

K, N = 64, 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    words = ["a red circle", "a blue square", "a green triangle", "now it turns yellow"]
    tok = train_text_tokenizer(words * 30, 600, codebook_size=K)
    codec = DocumentCodec(tok, image_seq_len=N)
    docs = []
    for i in range(64):  # caption -> image: each caption has its own fixed image
        codes = torch.randint(0, K, (N,), generator=torch.Generator().manual_seed(i % 4))
        docs.append(codec.encode(Document.of(words[i % 4], codes), eos=True))
    folder = tmp_path_factory.mktemp("data")
    pairs = write_token_dataset(folder / "pairs", docs, len(tok))
    chat = write_token_dataset(folder / "chat", [codec.encode_chat(Document.of("a red circle"),
                                                             Document.of("a blue square"))], len(tok))
    tok.save(folder / "tok")
    return tok, codec, {"pairs": pairs, "chat": chat, "tokenizers": str(folder / "tok")}


def tensorboard_scalars(log_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def train_config(tmp_path, setup, dropout=0.0, compile=False, **kw):
    tok, _, paths = setup
    mixture = MixtureConfig(sources=[MixtureSource("pairs", paths["pairs"], 1.0),
                                     MixtureSource("chat", paths["chat"], 0.05)])
    kw.setdefault("model_overrides", {"vocab_size": len(tok), "dropout": dropout})
    kw = {"lr": 3e-3, **kw}
    return TrainConfig(model="tiny", data=mixture, tokenizers=paths["tokenizers"], steps=40, batch_size=4, seq_len=64,
                       warmup_steps=5, out_dir=str(tmp_path), log_every=100, compile=compile, **kw)


def make_trainer(tmp_path, setup, dropout=0.0, compile=False, **kw):
    torch.manual_seed(0)
    return Trainer.from_config(train_config(tmp_path, setup, dropout, compile, **kw))


def test_trainer_reads_packed_batches_and_validates_per_modality(tmp_path, setup):
    tok, _, paths = setup
    tr = make_trainer(tmp_path, setup, val={"held_out": paths["pairs"]}, val_every=2, val_batches=2)
    assert isinstance(tr.loader, TrainLoader) and tr.loader.packer.mode == "packed"
    hist = tr.fit(steps=4, progress=False, log=None)
    assert all(h["padding"] == 0.0 for h in hist)  # packed rows are full
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [("val/held_out/ce_image" in r) for r in records] == [False, True, False, True]
    val = tr.validate()
    assert val["val/held_out/ce_image"] > 0 and val["val/held_out/ce_text"] > 0
    assert val == tr.validate()  # the same batches every time
    assert tensorboard_scalars(tmp_path / "tensorboard", "train/val/held_out/ce")[0][0] == 2
    padded = make_trainer(tmp_path / "padded", setup, packing="padded")
    h = padded.fit(steps=6, progress=False, log=None)
    assert sum(r["padding"] for r in h) > 0 and padded.loader.next_batch(6).doc_ids is None
    # one token dataset by path is a one-source mixture
    cfg = TrainConfig(data=paths["pairs"], tokenizers=paths["tokenizers"])
    assert [s.path for s in cfg.data.sources] == [paths["pairs"]]
    with pytest.raises(ValueError, match="no tokenizers"):
        Trainer.from_config(TrainConfig(data=paths["pairs"]))
    with pytest.raises(ValueError, match="packing"):
        TrainConfig(packing="stuffed")


def test_a_run_is_a_function_of_its_config(tmp_path, setup):
    cfg = train_config(tmp_path, setup)
    first = Trainer.from_config(cfg).model.state_dict()
    torch.rand(1000)  # whatever ran before in the process
    again = Trainer.from_config(cfg).model.state_dict()
    other = Trainer.from_config(cfg.replace(seed=1)).model.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["output.weight"], other["output.weight"])


@pytest.mark.parametrize("layout", ["native", "hf", "meta"])
def test_init_from_starts_from_each_checkpoint_layout(tmp_path, setup, layout):
    tr = make_trainer(tmp_path / "a", setup)
    tr.fit(steps=3, progress=False, log=None)
    with torch.no_grad():  # Meta's layout shares one QK-norm row between the heads of a shard
        for name, p in tr.model.named_parameters():
            if "normalization" in name:
                p.copy_(p.mean(0, keepdim=True).expand_as(p))
    src = tmp_path / layout
    save_as(layout, src, load_model(tr.save_checkpoint()))
    again = make_trainer(tmp_path / "b", setup, init_from=str(src), model_overrides={"dropout": 0.1})
    assert again.model.config.dropout == 0.1 and again.model.config.dim == tr.model.config.dim
    for k, v in tr.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    with pytest.raises(ValueError, match="do not fit the weights"):
        make_trainer(tmp_path / "c", setup, init_from=str(src), model_overrides={"dim": 32})


def test_short_run_lowers_the_loss(tmp_path, setup):
    tr = make_trainer(tmp_path, setup)
    hist = tr.fit(progress=False, log=None)
    first, last = sum(h["ce"] for h in hist[:5]) / 5, sum(h["ce"] for h in hist[-5:]) / 5
    assert last < 0.65 * first, [round(h["ce"], 2) for h in hist]
    assert all(h["ce_image"] == h["ce_image"] for h in hist)  # image targets present, not NaN
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
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
    assert resumed.loader.state_dict() == part.loader.state_dict()
    rest = [h["loss"] for h in resumed.fit(progress=False, log=None)]
    torch.testing.assert_close(torch.tensor(rest), torch.tensor(ref[15:]), rtol=1e-5, atol=1e-6)
    # Resuming in the run's own folder drops the log lines written after the checkpoint.
    part.fit(steps=20, progress=False, log=None)  # the run went on past its checkpoint, and died
    again = make_trainer(tmp_path / "b", setup, dropout=0.1)
    again.load_checkpoint(ckpt)
    again.fit(steps=18, progress=False, log=None)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b/metrics.jsonl").open()]
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

    monkeypatch.setattr(checkpoint, "rng_state", killed)  # dies after the weights, before the state
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

    tok = setup[0]
    base = make_trainer(tmp_path, setup)
    tr = Positioned(base.config, base.model, base.loader, tok)
    tr.fit(steps=2, progress=False, log=None)
    ckpt = tr.save_checkpoint()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["extra"] == {"data": {"epoch": 2, "position": 16}}
    assert state["config"] == base.config.to_dict()
    other = Positioned(base.config, Chameleon(base.config.model_config()), base.loader)
    other.load_checkpoint(ckpt)
    assert other.step == 2 and other.restored == {"epoch": 2, "position": 16}
    # the real loader's position is what a Trainer saves
    state = json.loads((base.save_checkpoint(tmp_path / "real") / "trainer_state.json").read_text())
    assert state["extra"]["data"] == base.loader.state_dict()


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


def test_image_head_only_run_changes_only_those_rows_and_exports_a_plain_model(tmp_path, setup):
    from chameleon_lm.training.adapters import AdapterConfig, image_head_rows

    tok = setup[0]
    before = make_trainer(tmp_path / "ref", setup).model.state_dict()  # the same seeded init
    tr = make_trainer(tmp_path / "run", setup, adapter=AdapterConfig(mode="image-head"), weight_decay=0.1)
    dim = tr.model.config.dim
    assert f"({(tok.vocab.codebook_size + 1) * dim:,} trained, adapter image-head)" in tr.describe()
    tr.fit(steps=6, progress=False, log=None)
    ckpt = tr.save_checkpoint()
    again = make_trainer(tmp_path / "run", setup, adapter=AdapterConfig(mode="image-head"))
    again.load_checkpoint(ckpt)
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in tr.model.state_dict().items())
    after = load_model(tr.export(tmp_path / "model")).model.state_dict()
    assert after.keys() == before.keys()
    rows = image_head_rows(tok.vocab)
    others = torch.ones(len(tok), dtype=torch.bool)
    others[rows] = False
    for k, v in before.items():
        if k == "output.weight":
            assert torch.equal(after[k][others], v[others])
            assert not torch.equal(after[k][rows], v[rows])
        else:
            assert torch.equal(after[k], v), k


def test_lora_run_exports_the_merged_model(tmp_path, setup):
    from chameleon_lm.training.adapters import AdapterConfig

    before = make_trainer(tmp_path / "ref", setup).model.state_dict()
    tr = make_trainer(tmp_path / "run", setup, adapter=AdapterConfig(mode="lora", lora_rank=4), lr=1e-2)
    hist = tr.fit(steps=8, progress=False, log=None)
    assert hist[-1]["ce"] < hist[0]["ce"]
    merged = load_model(tr.export(tmp_path / "model")).model
    assert merged.state_dict().keys() == before.keys()
    assert torch.equal(merged.state_dict()["tok_embeddings.weight"], before["tok_embeddings.weight"])
    assert not torch.equal(merged.state_dict()["layers.0.attention.wq.weight"],
                           before["layers.0.attention.wq.weight"])
    ids = torch.randint(0, 100, (2, 11))
    tr.model.eval()
    torch.testing.assert_close(merged(ids), tr.model(ids), rtol=1e-5, atol=1e-5)


def test_a_non_finite_loss_stops_with_a_checkpoint_and_spikes_follow_the_policy(tmp_path, setup):
    from chameleon_lm.training.trainer import NonFiniteLossError

    tr = make_trainer(tmp_path / "nan", setup)
    tr.fit(steps=2, progress=False, log=None)
    with torch.no_grad():
        tr.model.norm.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="non-finite") as info:
        tr.fit(steps=4, progress=False, log=None)
    assert info.value.checkpoint == tmp_path / "nan/checkpoints/step_0000002"
    assert latest_checkpoint(tmp_path / "nan") == info.value.checkpoint
    # skip: a spike's batch leaves the weights as they were
    tr = make_trainer(tmp_path / "skip", setup, spike_policy="skip")
    tr.fit(steps=3, progress=False, log=None)
    tr.spikes.observe = lambda value: True
    weights = {k: v.clone() for k, v in tr.model.state_dict().items()}
    m = tr.train_step()
    assert m["spike"] == 1.0 and tr.step == 4
    assert all(torch.equal(v, tr.model.state_dict()[k]) for k, v in weights.items())
    # rollback: back to the last checkpoint's weights, the data goes on after the spike
    tr = make_trainer(tmp_path / "rb", setup, spike_policy="rollback")
    tr.fit(steps=3, progress=False, log=None)
    saved = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.save_checkpoint()
    tr.fit(steps=5, progress=False, log=None)
    data = tr.loader.state_dict()
    tr.spikes.observe = lambda value: True
    tr.train_step()
    assert tr.step == 3 and tr.loader.state_dict() != data
    assert all(torch.equal(v, tr.model.state_dict()[k]) for k, v in saved.items())


def test_shipped_configs_parse():
    from pathlib import Path

    from chameleon_lm.training.cli import load_train_config

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))
    assert {"tiny-cpu.toml", "7b-pretrain.toml", "34b-pretrain.toml", "7b-sft.toml",
            "anole-7b-head-only.toml"} <= {p.name for p in configs}
    for path in configs:
        if "builtin:" in path.read_text():
            continue  # resolving it prepares the data: tests/test_distributed.py runs that one
        config = load_train_config(str(path), [])
        assert config.steps > 0 and config.batch_size % max(config.micro_batch_size, 1) == 0


def test_keep_last_checkpoints(tmp_path, setup):
    from chameleon_lm.training.checkpoint import prune_checkpoints

    tr = make_trainer(tmp_path, setup, ckpt_every=2, keep_checkpoints=2)
    tr.fit(steps=8, progress=False, log=None)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000006", "step_0000008"]
    (tmp_path / "checkpoints" / "step_0000007").mkdir()  # a save killed before it completed
    assert prune_checkpoints(tmp_path, 1) == [tmp_path / "checkpoints" / n for n in ("step_0000006", "step_0000007")]
    assert latest_checkpoint(tmp_path).name == "step_0000008"


@pytest.mark.parametrize("layout", ["native", "hf", "meta"])
def test_export_writes_each_layout(tmp_path, setup, layout):
    tr = make_trainer(tmp_path, setup)
    tr.fit(steps=2, progress=False, log=None)
    with torch.no_grad():  # Meta's layout shares one QK-norm row between the heads of a shard
        for name, p in tr.model.named_parameters():
            if "normalization" in name:
                p.copy_(p.mean(0, keepdim=True).expand_as(p))
    exported = load_model(tr.export(tmp_path / layout, layout), dtype=torch.float32).model
    ids = torch.randint(0, 100, (2, 9))
    tr.model.eval()
    torch.testing.assert_close(exported(ids), tr.model(ids), rtol=1e-5, atol=1e-5)
