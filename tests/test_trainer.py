"""The training loop: learning, exact resume, checkpoints, token files."""

import json
import shutil

import pytest
import torch

from chameleon_lm import Chameleon, Document, DocumentCodec, load_model
from chameleon_lm.data.tokens import IGNORE_INDEX, TokenDocuments
from chameleon_lm.tokenizers.text import train_text_tokenizer
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
