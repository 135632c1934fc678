"""Training building blocks: chunked CE + z-loss, LR schedules, optimizer groups."""

import math

import pytest
import torch
import torch.nn.functional as F

from chameleon_lm import Chameleon, ChameleonConfig
from chameleon_lm.training.loss import IGNORE_INDEX, lm_loss_sums
from chameleon_lm.training.optim import build_adamw
from chameleon_lm.training.schedule import warmup_cosine, warmup_exp_decay


def naive(hidden, weight, targets):
    logits = (hidden @ weight.t()).float().flatten(0, 1)
    t = targets.flatten()
    valid = t != IGNORE_INDEX
    ce = F.cross_entropy(logits[valid], t[valid], reduction="sum")
    z = torch.logsumexp(logits[valid], -1).pow(2).sum()
    return ce, z, valid.sum()


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_chunked_loss_equals_naive(chunk):
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 11))
    targets[0, :4] = IGNORE_INDEX
    image = torch.zeros(3, 11, dtype=torch.bool)
    image[1] = True
    s = lm_loss_sums(hidden, weight, targets, image, chunk_size=chunk, z_loss_weight=1e-4)
    ce, z, n = naive(hidden, weight, targets)
    torch.testing.assert_close(s.ce, ce)
    torch.testing.assert_close(s.z, z)
    assert s.n == n == 29 and s.n_image == 11 and s.n_text == 18
    torch.testing.assert_close(s.ce_text + s.ce_image, ce)
    torch.testing.assert_close(s.loss, ce + 1e-4 * z)
    g = torch.autograd.grad((s.loss / s.n), (hidden, weight))
    g_ref = torch.autograd.grad((ce + 1e-4 * z) / n, (hidden, weight))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_fused_head_loss_partial_grads_no_grad_and_bf16():
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(40, 16)
    targets = torch.randint(0, 40, (2, 9))
    s = lm_loss_sums(hidden, weight, targets, chunk_size=5, z_loss_weight=1e-3)
    ce, z, n = naive(hidden, weight, targets)
    (g,) = torch.autograd.grad(s.loss * 3.0, hidden)  # the upstream gradient scales the result
    (g_ref,) = torch.autograd.grad((ce + 1e-3 * z) * 3.0, hidden)
    torch.testing.assert_close(g, g_ref)
    with torch.no_grad():
        s = lm_loss_sums(hidden, weight, targets)
    assert not s.loss.requires_grad
    torch.testing.assert_close(s.loss, ce.detach())
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = hidden.detach().to(torch.bfloat16)
        s = lm_loss_sums(h, w, targets, chunk_size=4)
    s.loss.backward()
    (gw_ref,) = torch.autograd.grad(naive(hidden.detach(), w, targets)[0], w)
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad, gw_ref, atol=0.15, rtol=0.05)


def test_z_loss_formula():
    hidden, weight = torch.randn(1, 2, 4), torch.randn(6, 4)
    s = lm_loss_sums(hidden, weight, torch.tensor([[1, 2]]))
    logits = hidden[0] @ weight.t()
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist())
    assert abs(s.z.item() - expected) < 1e-4


def test_exp_schedule():
    f = [warmup_exp_decay(s, warmup=10, total=110, final_ratio=0.01) for s in range(130)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[110] == pytest.approx(0.01)
    assert f[60] == pytest.approx(0.1)  # geometric: halfway in log space
    assert all(a > b for a, b in zip(f[10:], f[11:]))
    with pytest.raises(ValueError):
        warmup_exp_decay(0, warmup=1, total=10, final_ratio=0)


def test_cosine_schedule():
    f = [warmup_cosine(s, warmup=5, total=105) for s in range(106)]
    assert f[4] == pytest.approx(1.0) and f[55] == pytest.approx(0.5) and f[105] == pytest.approx(0.0)


def test_adamw_groups_and_defaults():
    model = Chameleon(ChameleonConfig.preset("tiny"))
    opt = build_adamw(model, lr=1e-3)
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-5
    decayed = {names[id(p)] for p in decay["params"]}
    assert "output.weight" in decayed and "layers.0.attention.wq.weight" in decayed
    assert not any("norm" in n or "embeddings" in n for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
