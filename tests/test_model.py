"""The transformer: presets, block orders, KV cache, padding."""

import numpy as np
import pytest
import torch

from chameleon_lm import Chameleon, ChameleonConfig


def spec_param_count(dim, layers, heads, kv_heads, ffn, vocab=65536, head_dim=128):
    """Parameter count re-derived from the spec's dimensions (independent of the model code)."""
    attn = 2 * dim * heads * head_dim + 2 * dim * kv_heads * head_dim
    qk_norm = 2 * head_dim * (heads + kv_heads)
    per_layer = attn + qk_norm + 3 * dim * ffn + 2 * dim
    return layers * per_layer + 2 * vocab * dim + dim


@pytest.mark.parametrize(
    "name,expected,approx",
    [
        ("7b", spec_param_count(4096, 32, 32, 32, 11008), 7.0e9),
        ("30b", spec_param_count(8192, 48, 64, 8, 22016), 34.3e9),
    ],
)
def test_official_presets_have_official_sizes(name, expected, approx):
    cfg = ChameleonConfig.preset(name)
    with torch.device("meta"):
        model = Chameleon(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == expected == cfg.num_params()
    assert abs(n - approx) / approx < 0.002  # the spec's rounded figures (7.0 B, 34.3 B)
    assert cfg.vocab_size == 65536 and cfg.head_dim == 128 and cfg.max_seq_len == 4096


def test_official_preset_shapes():
    seven, thirty = ChameleonConfig.preset("7b"), ChameleonConfig.preset("30b")
    assert (seven.dim, seven.n_layers, seven.n_heads, seven.kv_heads, seven.ffn_dim) == (4096, 32, 32, 32, 11008)
    assert (thirty.dim, thirty.n_layers, thirty.n_heads, thirty.kv_heads, thirty.ffn_dim) == (8192, 48, 64, 8, 22016)
    assert not seven.swin_norm and thirty.swin_norm
    small = ChameleonConfig.preset("small")
    assert (small.dim, small.n_layers, small.n_heads, small.ffn_dim, small.vocab_size) == (512, 8, 8, 1408, 65536)
    with torch.device("meta"):
        m = Chameleon(thirty)
    attn = m.layers[0].attention
    assert attn.wk.weight.shape == (1024, 8192) and attn.q_normalization.weight.shape == (64, 128)
    assert attn.k_normalization.bias.shape == (8, 128)
    assert not any(n.endswith("bias") and "normalization" not in n for n, _ in m.named_parameters())


def test_unknown_preset_and_bad_config():
    with pytest.raises(KeyError, match="tiny"):
        ChameleonConfig.preset("13b")
    with pytest.raises(ValueError, match="divisible"):
        ChameleonConfig(dim=100, n_heads=3)
    with pytest.raises(ValueError, match="n_kv_heads"):
        ChameleonConfig(dim=64, n_heads=4, n_kv_heads=3)


def test_config_json_round_trip(tmp_path):
    cfg = ChameleonConfig.preset("tiny", swin_norm=True, dropout=0.1)
    cfg.save(tmp_path / "c.json")
    assert ChameleonConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="unknown field"):
        ChameleonConfig.from_dict({**cfg.to_dict(), "n_experts": 8})


@pytest.mark.parametrize("swin", [False, True])
def test_forward_shapes_and_block_order(swin):
    cfg = ChameleonConfig.preset("tiny", swin_norm=swin)
    model = Chameleon(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 17))
    logits = model(ids)
    assert logits.shape == (3, 17, cfg.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    # The other block order with the same weights computes something else.
    other = Chameleon(cfg.replace(swin_norm=not swin)).eval()
    other.load_state_dict(model.state_dict())
    assert not torch.allclose(other(ids), logits)


def test_causality():
    cfg = ChameleonConfig.preset("tiny")
    model = Chameleon(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % cfg.vocab_size
    torch.testing.assert_close(model(ids)[:, :8], model(changed)[:, :8])


@pytest.mark.parametrize("swin", [False, True])
@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_kv_cache_decode_equals_full_forward(swin, kv_heads):
    cfg = ChameleonConfig.preset("tiny", swin_norm=swin, n_kv_heads=kv_heads)
    model = Chameleon(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    full = model(ids)
    cache = model.new_cache(2, max_len=32)
    steps = [model(ids[:, :7], cache), model(ids[:, 7:12], cache)]  # chunked prefill
    steps += [model(ids[:, t : t + 1], cache) for t in range(12, 20)]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_rows_of_different_lengths_take_several_tokens_at_once():
    cfg = ChameleonConfig.preset("tiny")
    model = Chameleon(cfg).eval()
    a = torch.randint(0, cfg.vocab_size, (9,))
    b = torch.randint(0, cfg.vocab_size, (5,))
    cache = model.new_cache(2, max_len=16)
    model(a[None], cache.rows(slice(0, 1)))
    model(b[None], cache.rows(slice(1, 2)))
    nxt = torch.randint(0, cfg.vocab_size, (2, 3))
    step = model(nxt, cache)  # three new tokens on rows holding 9 and 5
    assert cache.host_lengths.tolist() == [12, 8]
    for row, seq in enumerate((a, b)):
        alone = model(torch.cat([seq, nxt[row]])[None])[0, -3:]
        torch.testing.assert_close(step[row], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [None, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_equals_the_cache_path(kv_heads, dtype):
    """A DecodeStep reads the cache, attends over it and the new key in one softmax, leaves the cache
    alone; KVCache.append then writes what the in-place path writes."""
    from chameleon_lm.model.transformer import DecodeStep

    cfg = ChameleonConfig.preset("tiny", n_kv_heads=kv_heads)
    model = Chameleon(cfg).eval().to(dtype)
    prompts = [torch.randint(0, cfg.vocab_size, (n,)) for n in (9, 3, 6)]
    caches = [model.new_cache(3, max_len=16) for _ in range(2)]
    for cache in caches:
        for row, seq in enumerate(prompts):
            model(seq[None], cache.rows(slice(row, row + 1)))
    nxt = torch.randint(0, cfg.vocab_size, (3, 1))
    with torch.no_grad():
        want = model.hidden_states(nxt, caches[0])
        cache = caches[1]
        k_before = cache.k.clone()
        step = DecodeStep(cache.k, cache.v, torch.tensor([9, 3, 6]), 9)
        got = model.hidden_states(nxt, step)
        assert torch.equal(cache.k, k_before) and cache.host_lengths.tolist() == [9, 3, 6]
        k_new, v_new = step.new_keys()
        assert k_new.shape == (cfg.n_layers, 3, cfg.kv_heads, cfg.head_dim)
        cache.append(k_new, v_new)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert cache.host_lengths.tolist() == caches[0].host_lengths.tolist() == [10, 4, 7]
    torch.testing.assert_close(cache.k, caches[0].k, atol=tol, rtol=tol)
    torch.testing.assert_close(cache.v, caches[0].v, atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="decode step"):
        model.hidden_states(torch.zeros(3, 2, dtype=torch.long), DecodeStep(cache.k, cache.v,
                                                                            torch.tensor([1, 1, 1]), 1))


def test_cache_errors():
    cfg = ChameleonConfig.preset("tiny")
    model = Chameleon(cfg).eval()
    cache = model.new_cache(1, max_len=4)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(1, 5, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="rows"):
        model(torch.zeros(2, 1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="batch, seq"):
        model(torch.zeros(5, dtype=torch.long))


def test_dropout_only_in_training():
    cfg = ChameleonConfig.preset("tiny", dropout=0.5)
    model = Chameleon(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    model.train()
    assert not torch.allclose(model(ids), model(ids))
    model.eval()
    torch.testing.assert_close(model(ids), model(ids))


def test_backward_reaches_every_parameter():
    cfg = ChameleonConfig.preset("tiny")
    model = Chameleon(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    model(ids).logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_bf16_forward_close_to_fp32():
    cfg = ChameleonConfig.preset("tiny")
    model = Chameleon(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    ref = model(ids)
    low = Chameleon(cfg).eval().to(torch.bfloat16)
    low.load_state_dict(model.state_dict())
    out = low(ids)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_explicit_positions_and_one_document_match_the_default():
    cfg = ChameleonConfig.preset("tiny")
    model = Chameleon(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    ref = model(ids)
    torch.testing.assert_close(model(ids, positions=torch.arange(9).expand(2, 9)), ref)
    one_doc = torch.zeros(2, 9, dtype=torch.int32)
    torch.testing.assert_close(model(ids, doc_ids=one_doc), ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(ids, positions=torch.zeros(2, 9, dtype=torch.long)), ref)
    # Two documents in a row: the second one is computed as if it stood alone.
    two_docs = torch.tensor([[0] * 4 + [1] * 5] * 2, dtype=torch.int32)
    positions = torch.tensor([list(range(4)) + list(range(5))] * 2)
    packed = model(ids, positions=positions, doc_ids=two_docs)
    torch.testing.assert_close(packed[:, 4:], model(ids[:, 4:]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, :4], ref[:, :4], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lengths", [(7, 3, 5), (5, 3, 5), (4, 4, 4), (1, 6, 1)])
def test_packed_prefill_fills_each_row_as_if_alone(lengths):
    # each length alone, a length twice apart, one length only (a strided batch), one-token prompts
    cfg = ChameleonConfig.preset("tiny")
    model = Chameleon(cfg).eval()
    seqs = [torch.randint(0, cfg.vocab_size, (n,)) for n in lengths]
    cache = model.new_cache(4, max_len=16)
    model(seqs[0][None], cache.rows(slice(0, 1)))  # row 0 already busy; rows 1-3 are new
    h = model.hidden_states(torch.cat(seqs)[None], cache.packed([1, 2, 3], list(lengths)))[0]
    assert cache.host_lengths.tolist() == [lengths[0], *lengths]
    for seq, end in zip(seqs, np.cumsum(lengths) - 1):
        torch.testing.assert_close(h[end], model.hidden_states(seq[None])[0, -1], atol=1e-5, rtol=1e-5)
    nxt = torch.randint(0, cfg.vocab_size, (4, 1))
    step = model(nxt, cache)[:, 0]
    for row, seq in enumerate([seqs[0]] + seqs):
        alone = model(torch.cat([seq, nxt[row]])[None])[0, -1]
        torch.testing.assert_close(step[row], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="empty cache rows"):
        cache.packed([0], [2])
