"""``chameleon eval perplexity``: per-modality CE on token shards, against hand computations, training's
validation and the CLI."""

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import shapes_codec, tiny_model, write_token_dataset

from chameleon_lm import Chameleon, Document
from chameleon_lm.data.shards import TokenDataset
from chameleon_lm.eval.tasks.perplexity import add_cli, parse_data, perplexity, windows

pytestmark = pytest.mark.usefixtures("one_thread")


def write_dataset(folder, docs, vocab_size):
    return TokenDataset(write_token_dataset(folder, docs, vocab_size))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    codec = shapes_codec()
    g = torch.Generator().manual_seed(0)

    def codes():
        return torch.randint(0, 64, (16,), generator=g)

    mixed = [
        codec.encode(Document.of("a red circle", codes(), "moves to the left"), eos=True),
        codec.encode(Document.of("a red circle turns blue"), eos=True),
        codec.encode(Document.of(codes(), "Describe the picture:", codes()), eos=True),
        codec.encode_chat(Document.of("Describe the picture:", codes()), Document.of("a blue circle")),
        codec.encode(Document(), bos=True),  # one token: nothing to predict
    ]
    text = [codec.encode(Document.of(s), eos=True) for s in
            ("a red circle turns blue", "and moves to the left", "Describe the picture:")]
    root = tmp_path_factory.mktemp("ppl")
    n = len(codec.text)
    return codec, {"mixed": write_dataset(root / "mixed", mixed, n),
                   "text": write_dataset(root / "text", text, n)}, root


def reference(model, docs, image_start, image_end):
    """Summed CE over loss targets (all, text, image) from the model's full logits, doc by doc."""
    sums = dict.fromkeys(("all", "text", "image"), 0.0)
    counts = dict.fromkeys(sums, 0)
    with torch.no_grad():
        for d in docs:
            if len(d) < 2:
                continue
            logits = model(d.ids[None])[0, :-1].double()
            target = d.ids[1:]
            ce = F.cross_entropy(logits, target, reduction="none")
            keep = d.loss_mask[1:]
            image = keep & (target >= image_start) & (target < image_end)
            for k, m in (("all", keep), ("text", keep & ~image), ("image", image)):
                sums[k] += float(ce[m].sum())
                counts[k] += int(m.sum())
    return sums, counts


def test_ce_matches_the_logits_by_hand_with_the_text_image_split(setup):
    codec, data, _ = setup
    v = codec.vocab
    model = tiny_model(codec)
    ds = data["mixed"]
    got = perplexity(model, ds, batch_tokens=64, vocab=v)  # several padded batches
    sums, counts = reference(model, [ds[i] for i in range(len(ds))], v.image_start, v.image_end)
    assert got["documents"] == len(ds) == 5 and got["windowed_documents"] == 0
    for k in ("all", "text", "image"):
        assert got[k]["tokens"] == counts[k] > 0
        assert got[k]["ce"] == pytest.approx(sums[k] / counts[k], rel=1e-5)
        assert got[k]["ppl"] == pytest.approx(math.exp(got[k]["ce"]), rel=1e-12)
    mix = (got["text"]["ce"] * counts["text"] + got["image"]["ce"] * counts["image"]) / counts["all"]
    assert got["all"]["ce"] == pytest.approx(mix, rel=1e-9)
    chat = ds[3]
    assert counts["all"] == sum(int(ds[i].loss_mask[1:].sum()) for i in range(len(ds)))
    assert not chat.loss_mask.all()  # only the answer is a target
    # the modality recorded in the shards gives the same split as the vocabulary's id range
    by_modality = perplexity(model, ds, batch_tokens=10_000)
    for k in ("all", "text", "image"):
        assert by_modality[k]["tokens"] == got[k]["tokens"]
        assert by_modality[k]["ce"] == pytest.approx(got[k]["ce"], rel=1e-5)
    assert perplexity(model, ds, vocab=v) == perplexity(model, ds, vocab=v)  # deterministic


def test_a_text_only_set_has_no_image_targets_and_limit_counts_documents(setup):
    codec, data, _ = setup
    model = tiny_model(codec)
    got = perplexity(model, data["text"], vocab=codec.vocab, limit=2)
    assert got["documents"] == 2 and got["image"]["tokens"] == 0
    assert math.isnan(got["image"]["ce"]) and math.isnan(got["image"]["ppl"])
    assert got["text"] == got["all"] and got["all"]["tokens"] == sum(len(data["text"][i]) - 1
                                                                      for i in range(2))
    with pytest.raises(ValueError, match="vocabulary"):
        perplexity(Chameleon(model.config.replace(vocab_size=100)), data["text"])


def test_windows_score_every_target_once_with_enough_context():
    for pairs in range(40):
        for max_len, stride in ((8, 4), (8, 8), (8, 1), (5, 3)):
            ws = windows(pairs, max_len, stride)
            scored = [j for s, e, f in ws for j in range(f, e)]
            assert scored == list(range(pairs))
            assert all(0 <= s <= f < e and e - s <= max_len for s, e, f in ws)
            assert all(f - s >= max_len - stride for s, e, f in ws[1:])
    with pytest.raises(ValueError, match="stride"):
        windows(10, 8, 9)


def test_long_documents_are_scored_in_windows(setup):
    codec, data, _ = setup
    v = codec.vocab
    full = tiny_model(codec)
    T, stride = 24, 8
    short = Chameleon(full.config.replace(max_seq_len=T)).eval()
    short.load_state_dict(full.state_dict())
    ds = data["mixed"]
    got = perplexity(short, ds, batch_tokens=50, vocab=v, stride=stride)
    assert got["windowed_documents"] == 3 and got["windows"] > len(ds)
    # by hand, target by target: pair j >= T is predicted in the window ending at
    # min(T + k * stride, pairs) for the least k that reaches j, from the T inputs before that end
    ce_sum, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            d = ds[i]
            pairs = len(d) - 1
            for j in range(pairs):
                if not d.loss_mask[j + 1]:
                    continue
                end = pairs if pairs <= T else min(T + max(0, -(-(j + 1 - T) // stride)) * stride, pairs)
                start = max(0, end - T)
                logits = short(d.ids[None, start : j + 1])[0, -1].double()
                ce_sum += float(F.cross_entropy(logits[None], d.ids[j + 1 : j + 2]))
                n += 1
    assert got["all"]["tokens"] == n
    assert got["all"]["ce"] == pytest.approx(ce_sum / n, rel=1e-5)
    whole = perplexity(full, ds, vocab=v)
    assert whole["all"]["tokens"] == n and whole["all"]["ce"] != got["all"]["ce"]


def test_ce_equals_the_trainers_validation(setup, tmp_path):
    from chameleon_lm.training.trainer import TrainConfig, Trainer

    codec, data, _ = setup
    codec.text.save(tmp_path / "tok")
    ds = data["mixed"]
    cfg = TrainConfig(model="tiny", data=str(ds.path), tokenizers=str(tmp_path / "tok"),
                      model_overrides={"vocab_size": len(codec.text)}, steps=1, batch_size=1,
                      seq_len=ds.num_tokens, val={"held": str(ds.path)}, val_batches=1,
                      precision="fp32", out_dir=str(tmp_path / "run"))
    tr = Trainer.from_config(cfg)  # every document in one packed validation row: none is cut
    val = tr.validate()
    got = perplexity(tr.model, ds, vocab=codec.vocab)
    assert got["all"]["ce"] == pytest.approx(val["val/held/ce"], rel=1e-5)
    assert got["text"]["ce"] == pytest.approx(val["val/held/ce_text"], rel=1e-5)
    assert got["image"]["ce"] == pytest.approx(val["val/held/ce_image"], rel=1e-5)


def test_the_cli_writes_metrics_json(setup, tmp_path):
    from chameleon_lm.checkpoints import save_model

    codec, data, _ = setup
    model = tiny_model(codec)
    save_model(tmp_path / "model", model, codec.text)
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="eval_command"))
    args = parser.parse_args(["perplexity", "--model", str(tmp_path / "model"), "--data",
                              f"held={data['mixed'].path}", str(data["text"].path), "--limit", "3",
                              "--out", str(tmp_path / "eval")])
    assert args.func(args) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"held", "text"}
    assert metrics["held"]["documents"] == 3 and metrics["held"]["image"]["tokens"] > 0
    assert metrics["text"]["image"] == {"tokens": 0, "ce": None, "ppl": None}  # strict JSON: no NaN
    expect = perplexity(model, data["mixed"], limit=3, vocab=codec.vocab)
    assert metrics["held"]["all"]["ce"] == pytest.approx(expect["all"]["ce"], rel=1e-6)
    with pytest.raises(ValueError, match="twice"):
        parse_data(["a=x", "a=y"])
