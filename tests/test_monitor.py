"""Training monitor (block norms, spike detection, FLOPs/MFU) and the FSDP2 memory estimate."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random

import pytest
import torch

from chameleon_lm.model import Chameleon
from chameleon_lm.model.config import ChameleonConfig
from chameleon_lm.model.transformer import rope_cos_sin
from chameleon_lm.training import memory, monitor
from chameleon_lm.training.memory import estimate_memory, memory_table
from chameleon_lm.training.monitor import (
    BlockNorms,
    SpikeDetector,
    mfu,
    peak_flops,
)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return Chameleon(ChameleonConfig.preset("tiny")).eval()


def manual_block_rms(model: Chameleon, ids: torch.Tensor) -> torch.Tensor:
    """Each block's output RMS from a forward written out by hand."""
    B, T = ids.shape
    cos, sin = rope_cos_sin(torch.arange(T).expand(B, T), model.config.head_dim, model.config.rope_theta)
    h, rms = model.tok_embeddings(ids), []
    for block in model.layers:
        h = block(h, cos, sin, None, None)
        rms.append(h.float().pow(2).mean().sqrt())
    return torch.stack(rms)


def test_block_norms_match_a_manual_forward(tiny):
    ids1, ids2 = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (1, 9))
    norms = BlockNorms(tiny)
    with torch.no_grad():
        expected = (manual_block_rms(tiny, ids1) + manual_block_rms(tiny, ids2)) / 2
        norms.recording = True
        tiny(ids1)
        tiny(ids2)
    got = norms.pop()
    assert got.shape == (tiny.config.n_layers,)
    torch.testing.assert_close(got, expected)
    assert torch.isnan(norms.pop()).all()  # reset by pop


def test_block_norms_off_by_default_partial_and_removed(tiny):
    ids = torch.randint(0, 512, (1, 8))
    norms = BlockNorms(tiny)
    tiny(ids)
    assert torch.isnan(norms.pop()).all()  # off by default
    norms.recording = True
    tiny(ids)
    norms.recording = False
    tiny(ids)  # not recorded: the mean stays that of the first call
    torch.testing.assert_close(norms.pop(), manual_block_rms(tiny, ids).detach())
    # a block that did not run is NaN
    norms.recording = True
    tiny.layers[0](tiny.tok_embeddings(ids), *rope_cos_sin(torch.arange(8)[None], 16, 1e4), None, None)
    got = norms.pop()
    assert torch.isfinite(got[0]) and torch.isnan(got[1])
    norms.remove()
    tiny(ids)
    assert torch.isnan(norms.pop()).all()


def test_block_norms_through_a_compiled_block(tiny):
    ids = torch.randint(0, 512, (1, 8))
    norms = BlockNorms(tiny)
    expected = manual_block_rms(tiny, ids).detach()
    for block in tiny.layers:
        block.compile(backend="eager")
    norms.recording = True
    tiny(ids).sum().backward()
    torch.testing.assert_close(norms.pop(), expected)


def plateau(n: int, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [2.0 + rng.gauss(0.0, 0.05) for _ in range(n)]


def test_spike_detector_flags_jumps_not_noise():
    det = SpikeDetector()
    assert not any(det.observe(v) for v in plateau(300))
    values = list(det.history)
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    assert not det.observe(mean + 3 * std)
    assert det.observe(mean + 10 * std)
    assert det.observe(float("nan")) and det.observe(float("inf"))
    assert not det.observe(mean - 10 * std)  # a drop is no spike
    fresh = SpikeDetector(min_history=20)
    assert not fresh.observe(100.0)  # too little history to judge
    assert fresh.observe(float("nan"))


def test_spike_detector_does_not_learn_spikes():
    det = SpikeDetector(window=32, min_history=10)
    for v in plateau(32):
        det.observe(v)
    before = list(det.history)
    assert all(det.observe(5.0) for _ in range(50))  # a run of spikes never raises the bar
    assert list(det.history) == before


def test_spike_detector_state_round_trip():
    values = plateau(150, seed=1)
    future = plateau(100, seed=2) + [2.3, 2.0, 3.0, 2.21, 2.19, 2.25]
    a = SpikeDetector(window=64, threshold=4.0, min_history=30)
    for v in values:
        a.observe(v)
    b = SpikeDetector()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    decisions = [(a.observe(v), b.observe(v)) for v in future]
    assert all(x == y for x, y in decisions)
    assert any(x for x, _ in decisions) and not all(x for x, _ in decisions)
    assert a.state_dict() == b.state_dict()
    assert monitor.SPIKE_POLICIES == ("warn", "skip", "rollback")


def test_flops_per_token_7b():
    config, T = ChameleonConfig.preset("7b"), 4096
    by_hand = 6 * 6.7e9 + 12 * 32 * 4096 * T
    assert config.flops_per_token(T) == pytest.approx(by_hand, rel=0.01)
    gqa = config.replace(n_kv_heads=8)
    assert gqa.flops_per_token(T) - 6 * (gqa.num_params() - 65536 * 4096) == 12 * 32 * 4096 * T
    assert mfu(1000.0, 4e10, 1e14) == pytest.approx(0.4)


def test_peak_flops_cpu_is_measured_and_cached(monkeypatch):
    monitor._peak_flops.cache_clear()
    peak = peak_flops("cpu", torch.float32)
    assert peak > 0
    calls = []
    monkeypatch.setattr(monitor, "measured_matmul_flops", lambda *a, **k: calls.append(a) or 1.0)
    assert peak_flops(torch.device("cpu"), torch.float32) == peak  # cached: not measured again
    assert calls == []


def test_peak_flops_cuda_table(monkeypatch):
    monitor._peak_flops.cache_clear()
    monkeypatch.setattr(monitor, "measured_matmul_flops", lambda *a, **k: 7.0)
    tf32_before, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, True
    cases = {"NVIDIA H100 80GB HBM3": 989.4e12, "NVIDIA H200": 989.4e12, "NVIDIA H100 PCIe": 756e12,
             "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA L40S": 362.05e12, "NVIDIA A10": 125e12,
             "NVIDIA A10G": 7.0, "Some Future GPU": 7.0}
    try:
        for i, (name, expected) in enumerate(cases.items()):
            monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d, name=name: name)
            assert monitor._peak_flops(torch.device("cuda", i), torch.bfloat16) == expected, name
            tf32 = expected / 2 if expected != 7.0 else 7.0
            assert monitor._peak_flops(torch.device("cuda", i), torch.float32) == tf32, name
        torch.backends.cuda.matmul.allow_tf32 = False
        assert monitor._peak_flops(torch.device("cuda", 99), torch.float32) == 7.0  # true fp32: measured
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_before
        monitor._peak_flops.cache_clear()


def test_memory_state_sharding_and_trends():
    config = ChameleonConfig.preset("7b")
    kw = {"micro_batch": 1, "seq_len": 4096, "activation_checkpointing": True}
    est = estimate_memory(config, gpus=64, **kw)
    state = est["params"] + est["grads"] + est["optimizer"]
    assert state == pytest.approx(16 * config.num_params() / 64 / 2**30, rel=1e-9)
    block = 4 * 4096**2 + 2 * 64 * 128 + 3 * 4096 * 11008 + 2 * 4096
    assert est["gathered"] * 2**30 == 2 * 2 * (block + 65536 * 4096)  # 2 blocks, embedding and head
    totals = [estimate_memory(config, gpus=g, **kw)["total"] for g in (8, 16, 32, 64, 128)]
    assert all(a > b for a, b in itertools.pairwise(totals))
    no_ac = estimate_memory(config, gpus=64, **{**kw, "activation_checkpointing": False})
    assert est["activations"] + est["recompute"] < no_ac["activations"]
    assert est["total"] < no_ac["total"]
    # one layer without AC is Korthikanti's 34·s·b·h bytes (bf16), or more when scores are stored
    assert no_ac["activations"] * 2**30 == 32 * 34 * 4096 * 4096
    scores = estimate_memory(config, gpus=64, **kw, memory_efficient_attention=False)
    assert scores["recompute"] * 2**30 == 4096 * 4096 * (34 + 5 * 32 * 4096 / 4096)
    longer = estimate_memory(config, gpus=64, **{**kw, "micro_batch": 2})
    assert longer["activations"] == pytest.approx(2 * est["activations"])


def test_memory_table_and_cli(tmp_path, capsys):
    table = memory_table("30b", [8, 64], micro_batch=1, seq_len=4096, activation_checkpointing=True)
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| GPUs |") and lines[2].startswith("| 8 |")
    parser = argparse.ArgumentParser()
    memory.add_cli(parser.add_subparsers())
    ChameleonConfig.preset("tiny").save(tmp_path / "config.json")
    for model in ("7b", str(tmp_path), str(tmp_path / "config.json")):
        args = parser.parse_args(["memory", model, "--gpus", "8", "16", "--no-ac"])
        assert args.func(args) == 0
        out = capsys.readouterr().out
        assert "activation checkpointing off" in out and "| 16 |" in out
    with pytest.raises(FileNotFoundError):
        memory._load_config(str(tmp_path / "missing"))
