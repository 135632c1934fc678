"""Parameter-efficient adapters: LoRA on the block projections and image-rows-only head training train
exactly their parameters, merge back into a plain model, and survive deepcopy and state-dict round trips."""

import copy

import pytest
import torch

from chameleon_lm import Chameleon
from chameleon_lm.model.config import ChameleonConfig
from chameleon_lm.model.head import OutputHead
from chameleon_lm.tokenizers.vocab import BOI, BOS, EOI, EOS, PAD, Vocab, image_token_name
from chameleon_lm.training.adapters import (
    AdapterConfig,
    ImageRowsHead,
    LoRALinear,
    apply_adapters,
    apply_image_head_only,
    image_head_rows,
    merge_adapters,
    trainable_parameters,
)
from chameleon_lm.training.loss import lm_loss_sums
from chameleon_lm.training.optim import build_adamw

V, K = 96, 32  # vocabulary size, image codes
TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def tiny_model(seed: int = 0) -> Chameleon:
    torch.manual_seed(seed)
    return Chameleon(ChameleonConfig.preset("tiny", vocab_size=V, dim=32, n_layers=2, n_heads=4,
                                            n_kv_heads=2, ffn_dim=64))


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    names = {BOS: 0, PAD: 1, EOS: 2, BOI: 3, EOI: 4}
    names |= {image_token_name(c): 10 + c for c in range(K)}
    names |= {f"w{i}": i for i in range(10 + K, V) if i not in names.values()}
    names |= {f"t{i}": i for i in range(5, 10)}
    return Vocab.from_names(names, size=V)


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (2, 12), generator=g), torch.randint(0, V, (2, 12), generator=g)


def train(model: Chameleon, steps: int = 3, lr: float = 1e-2, weight_decay: float = 0.1):
    opt = build_adamw(model, lr=lr, weight_decay=weight_decay)
    ids, targets = batch()
    for _ in range(steps):
        lm_loss_sums(model.hidden_states(ids), model.output, targets).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lora_trains_only_the_factors_and_merges_exactly():
    model = tiny_model()
    ids, _ = batch()
    base_logits = model(ids).detach()
    original = snapshot(model)
    apply_adapters(model, AdapterConfig(mode="lora", lora_rank=4, lora_alpha=8.0))
    assert torch.equal(model(ids), base_logits)  # B = 0: the adapted model starts as the base model
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    parent = {t: "attention" if t in ("wq", "wk", "wv", "wo") else "feed_forward" for t in TARGETS}
    assert trained == {f"layers.{i}.{parent[t]}.{t}.lora_{ab}"
                       for i in range(2) for t in TARGETS for ab in "ab"}
    before = snapshot(model)
    opt = train(model)
    decay, no_decay = opt.param_groups
    assert len(decay["params"]) == len(trained) and not no_decay["params"] and opt.defaults["fused"]
    after = model.state_dict()
    assert set(after) == set(original) | trained  # base keys kept under their own names
    for name, value in after.items():
        if "lora_" in name:
            assert not torch.equal(value, before[name]), name
        else:
            assert torch.equal(value, original[name]), name

    adapted_logits = model(ids).detach()
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-3)
    merge_adapters(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    merged = model.state_dict()
    assert list(merged) == list(original)
    assert all(merged[k].shape == original[k].shape and merged[k].dtype == original[k].dtype for k in merged)
    torch.testing.assert_close(model(ids), adapted_logits, atol=1e-5, rtol=0)
    fresh = tiny_model(seed=5)
    fresh.load_state_dict(merged, strict=True)
    torch.testing.assert_close(fresh(ids), adapted_logits, atol=1e-5, rtol=0)


def test_lora_linear_is_base_plus_scaled_update():
    base = torch.nn.Linear(8, 6, bias=False)
    lora = LoRALinear.from_linear(base, rank=2, alpha=6.0)
    assert lora.weight is not None and torch.equal(lora.weight, base.weight) and lora.scale == 3.0
    assert lora.lora_a.shape == (2, 8) and lora.lora_b.shape == (6, 2) and not lora.lora_b.any()
    assert not lora.weight.requires_grad and lora.lora_a.requires_grad and lora.lora_a.std() > 0
    with torch.no_grad():
        lora.lora_b.normal_()
    x = torch.randn(5, 8)
    expected = x @ (base.weight + 3.0 * lora.lora_b @ lora.lora_a).T
    torch.testing.assert_close(lora(x), expected)
    torch.testing.assert_close(x @ lora.merged_weight().T, expected)
    drop = LoRALinear.from_linear(base, rank=2, alpha=6.0, dropout=0.5)
    drop.load_state_dict(lora.state_dict())
    assert not torch.allclose(drop(x), expected)  # training: the update's input is dropped out
    torch.testing.assert_close(drop.eval()(x), expected)


def test_lora_targets_subset():
    model = apply_adapters(tiny_model(), AdapterConfig(mode="lora", lora_rank=2, lora_targets=["wq", "w2"]))
    swapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert swapped == {f"layers.{i}.{p}" for i in range(2) for p in ("attention.wq", "feed_forward.w2")}
    n_trained, n_total = trainable_parameters(model)
    d, f = 32, 64
    assert n_trained == 2 * 2 * ((d + d) + (f + d))  # layers · rank · (in + out) per target
    assert n_total == model.config.num_params() + n_trained


def test_image_head_only_trains_exactly_the_rows(vocab):
    rows = image_head_rows(vocab)
    assert rows.tolist() == list(range(10, 10 + K)) + [vocab.eoi_id]
    model = tiny_model()
    original = snapshot(model)
    apply_adapters(model, AdapterConfig(mode="image-head"), vocab)
    assert isinstance(model.output, ImageRowsHead)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["output.trained_rows"]
    assert set(model.state_dict()) == set(original) | {"output.trained_rows", "output.rows"}
    opt = train(model, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert [p for g in opt.param_groups for p in g["params"]] == [model.output.trained_rows]
    assert decay["params"] == [model.output.trained_rows] and not no_decay["params"]

    merge_adapters(model)
    assert type(model.output) is OutputHead and all(p.requires_grad for p in model.parameters())
    merged = model.state_dict()
    assert list(merged) == list(original)
    chosen = torch.zeros(V, dtype=torch.bool)
    chosen[rows] = True
    for name, value in merged.items():
        if name == "output.weight":
            assert torch.equal(value[~chosen], original[name][~chosen])  # frozen rows are not even decayed
            assert (value[chosen] != original[name][chosen]).any(dim=1).all()
        else:
            assert torch.equal(value, original[name]), name


def test_image_head_matches_a_plain_head_with_the_merged_weight():
    model = apply_image_head_only(tiny_model(), torch.tensor([7, 3, 50, 3]))
    head = model.output
    assert head.rows.tolist() == [3, 7, 50]  # sorted, unique
    with torch.no_grad():
        head.trained_rows.normal_()
    plain = OutputHead(32, V)
    with torch.no_grad():
        plain.weight.copy_(head.effective_weight())
    assert torch.equal(plain.weight[[3, 7, 50]], head.trained_rows)
    ids, targets = batch()
    h = model.hidden_states(ids).detach().requires_grad_()
    h_plain = h.detach().clone().requires_grad_()
    torch.testing.assert_close(head(h), plain(h_plain), atol=0, rtol=0)
    ours = lm_loss_sums(h, head, targets, chunk_size=7, z_loss_weight=1e-2)
    ref = lm_loss_sums(h_plain, plain, targets, chunk_size=7, z_loss_weight=1e-2)
    for field in ("loss", "ce", "z", "ce_text", "logit_norm"):
        torch.testing.assert_close(getattr(ours, field), getattr(ref, field))
    ours.loss.backward()
    ref.loss.backward()
    assert head.weight.grad is None
    torch.testing.assert_close(head.trained_rows.grad, plain.weight.grad[[3, 7, 50]])
    torch.testing.assert_close(h.grad, h_plain.grad)


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "qlora"}, "unknown adapter mode 'qlora'"),
    ({"lora_rank": 0}, "lora_rank must be an integer >= 1"),
    ({"lora_alpha": 0.0}, "lora_alpha must be positive"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
    ({"lora_targets": ["wq", "q_proj"]}, r"unknown lora_targets \['q_proj'\]"),
    ({"lora_targets": []}, "must be non-empty"),
])
def test_bad_config_values_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**kwargs)


def test_mode_checks_and_config_round_trip():
    model = tiny_model()
    original = snapshot(model)
    with pytest.raises(ValueError, match="'image-head' needs the vocabulary"):
        apply_adapters(model, AdapterConfig(mode="image-head"))
    assert apply_adapters(model, AdapterConfig()) is model  # full: nothing changes
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    apply_adapters(model, AdapterConfig(mode="lora", lora_rank=2))
    with pytest.raises(ValueError, match="already has adapters"):
        apply_image_head_only(model, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"rows must be ids in \[0, 96\)"):
        apply_image_head_only(tiny_model(), torch.tensor([1, V]))
    cfg = AdapterConfig(mode="lora", lora_rank=8, lora_targets=["wv"])
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("mode", ["lora", "image-head"])
def test_deepcopy_and_state_dict_round_trip(mode, vocab):
    cfg = AdapterConfig(mode=mode, lora_rank=3)
    model = apply_adapters(tiny_model(), cfg, vocab)
    train(model, steps=2)
    ids, _ = batch(seed=3)
    logits = model(ids).detach()

    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(ids), logits, atol=0, rtol=0)
    trained = [n for n, p in clone.named_parameters() if p.requires_grad]
    assert trained == [n for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(1.0)
    torch.testing.assert_close(model(ids), logits, atol=0, rtol=0)  # the copy shares no storage

    other = apply_adapters(tiny_model(seed=9), cfg, vocab)
    other.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(other(ids), logits, atol=0, rtol=0)
    torch.testing.assert_close(merge_adapters(other)(ids), logits, atol=1e-5, rtol=0)
