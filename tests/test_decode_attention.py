"""The decoding step's attention: the CPU kernel and the reference path against plain float64 math."""

import os

import pytest
import torch
import torch.nn.functional as F

from chameleon_lm.model import decode_attention as da


def _math(q, k, v, k_new, v_new, lengths):
    """Softmax over row b's first lengths[b] keys and its new key, per query head, in float64."""
    B, K, G, E = q.shape
    out = torch.empty(B, K, G, E, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        keys = torch.cat([k[b, :, :n].double(), k_new[b, :, None].double()], 1)  # [K, n+1, E]
        values = torch.cat([v[b, :, :n].double(), v_new[b, :, None].double()], 1)
        scores = q[b].double() @ keys.transpose(-1, -2) / E**0.5  # [K, G, n+1]
        out[b] = torch.softmax(scores, -1) @ values
    return out


def _case(B, K, G, E, S_max, longest, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    cache = [torch.randn(B, K, S_max, E, generator=g).to(dtype) for _ in range(2)]
    k, v = (c[:, :, :longest] for c in cache)  # a view of the first slots, as DecodeStep passes
    q = torch.randn(B, K, G, E, generator=g) * scale  # peaked softmaxes: exp far below its peak
    k_new, v_new = torch.randn(B, K, E, generator=g), torch.randn(B, K, E, generator=g)
    lengths = torch.randint(0, longest + 1, (B,), generator=g)
    lengths[0], lengths[-1] = longest, 0  # a full row and a row with only its new key
    return q, k, v, k_new, v_new, lengths


def test_the_kernel_builds_on_this_machine():
    if os.environ.get("CHAMELEON_CPU_KERNELS") == "0":
        pytest.skip("CPU kernels disabled")
    assert da.cpu_kernel()  # the CI machine has a compiler: a build failure must fail here


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K,G,E", [(4, 1, 64), (2, 4, 16), (1, 2, 128), (3, 1, 32)])
@pytest.mark.parametrize("queries", ["fp32", "cache dtype"])  # a bf16 model's queries are bf16
def test_kernel_and_reference_equal_plain_math(dtype, K, G, E, queries):
    q, k, v, k_new, v_new, lengths = _case(5, K, G, E, S_max=40, longest=37, dtype=dtype)
    if queries == "cache dtype":
        q, k_new, v_new = q.to(dtype), k_new.to(dtype), v_new.to(dtype)
    want = _math(q, k, v, k_new, v_new, lengths)
    if da.cpu_kernel():
        got = torch.ops.chameleon_lm.decode_attention(q, k, v, k_new, v_new, lengths)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)  # bf16 keys are read exactly; fp32 math
    held = lengths.clamp(min=1)  # the reference's fused kernel needs a cached key per row
    ref = da.reference(q, k, v, k_new, v_new, held)
    ref_tol = 1e-5 if dtype == torch.float32 else 2e-2  # it computes in the cache's dtype
    torch.testing.assert_close(ref.double(), _math(q, k, v, k_new, v_new, held), atol=ref_tol, rtol=ref_tol)


def test_the_kernel_runs_inside_a_compiled_graph():
    if not da.cpu_kernel():
        pytest.skip("no CPU kernel here")
    q, k, v, k_new, v_new, lengths = _case(3, 2, 2, 64, S_max=16, longest=9, dtype=torch.float32, seed=1)

    def step(q, k, v, k_new, v_new, lengths):
        return da.decode_attention(q * 2, k, v, k_new, v_new, lengths).sum(-1)

    compiled = torch.compile(step, dynamic=True, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, k_new, v_new, lengths), step(q, k, v, k_new, v_new, lengths))


def test_bad_inputs_are_refused():
    if not da.cpu_kernel():
        pytest.skip("no CPU kernel here")
    q, k, v, k_new, v_new, lengths = _case(2, 2, 1, 64, S_max=8, longest=8, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="cache shape"):
        torch.ops.chameleon_lm.decode_attention(q, k[:, :1], v[:, :1], k_new, v_new, lengths)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.chameleon_lm.decode_attention(q, k.half(), v.half(), k_new, v_new, lengths)
    with pytest.raises(RuntimeError, match="one length per row"):
        torch.ops.chameleon_lm.decode_attention(q, k, v, k_new, v_new, lengths[:1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_append_writes_each_rows_next_slot(dtype):
    if not da.cpu_kernel():
        pytest.skip("no CPU kernel here")
    g = torch.Generator().manual_seed(2)
    k, v = (torch.randn(3, 5, 2, 6, 16, generator=g).to(dtype) for _ in range(2))  # [L, B', K, S, E]
    k_new, v_new = (torch.randn(3, 4, 2, 16, generator=g) for _ in range(2))  # fp32 into any cache
    at = torch.tensor([0, 5, 2, 3])
    want_k, want_v = k.clone(), v.clone()
    rows = torch.arange(4)
    want_k[:, rows, :, at] = k_new.transpose(0, 1).to(dtype)
    want_v[:, rows, :, at] = v_new.transpose(0, 1).to(dtype)
    torch.ops.chameleon_lm.kv_append(k, v, k_new, v_new, at)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
    with pytest.raises(RuntimeError, match="row 1 is full"):
        torch.ops.chameleon_lm.kv_append(k, v, k_new, v_new, torch.tensor([0, 6, 0, 0]))
    assert torch.equal(k, want_k)  # refused before anything was written


def test_packed_linear_op_equals_linear():
    if not da.cpu_kernel():
        pytest.skip("no CPU kernel here")
    from chameleon_lm.generation.packed import BATCH_HINT

    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(48, 32, generator=g), torch.randn(5, 32, generator=g)
    got = torch.ops.chameleon_lm.packed_linear(x, torch.ops.mkldnn._reorder_linear_weight(w, BATCH_HINT), 48)
    torch.testing.assert_close(got, x @ w.T, atol=1e-4, rtol=1e-4)


def _panels_or_skip() -> int:
    if not da.cpu_kernel() or torch.ops.chameleon_lm.panel_width() == 0:
        pytest.skip("no panel kernel in this build")
    return torch.ops.chameleon_lm.panel_width()


# rows: 0, 1, a partial row tile, several tiles and a partial one; inputs: a partial k block (130),
# several blocks; outputs: less than a panel, a partial last panel, many panels
@pytest.mark.parametrize("M,K,N", [(0, 16, 5), (1, 64, 3), (5, 130, 49), (19, 300, 97), (33, 512, 1000),
                                   (96, 40, 130)])
def test_panel_linear_equals_float64_math(M, K, N):
    NR = _panels_or_skip()
    g = torch.Generator().manual_seed(M + K + N)
    w, x = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g)
    panels = torch.ops.chameleon_lm.pack_panels(w)
    assert panels.shape == (-(-N // NR), K, NR)
    got = torch.ops.chameleon_lm.panel_linear(x, panels, N)
    assert got.shape == (M, N) and got.dtype == torch.float32
    if M == 0:
        return
    want = x.double() @ w.double().T
    # fp32 with k blocks: as close to the exact sums as the plain fp32 matmul is
    plain = (F.linear(x, w).double() - want).abs().max()
    assert (got.double() - want).abs().max() <= max(3 * plain, 1e-5 * K**0.5)
    xt = torch.randn(K, M, generator=g).t()  # a non-contiguous input
    torch.testing.assert_close(torch.ops.chameleon_lm.panel_linear(xt, panels, N), F.linear(xt, w),
                               rtol=1e-4, atol=1e-4)


def test_panel_linear_refuses_mismatched_panels():
    _panels_or_skip()
    panels = torch.ops.chameleon_lm.pack_panels(torch.randn(10, 8))
    with pytest.raises(RuntimeError, match="inputs"):
        torch.ops.chameleon_lm.panel_linear(torch.randn(2, 9), panels, 10)
    with pytest.raises(RuntimeError, match="do not hold"):
        torch.ops.chameleon_lm.panel_linear(torch.randn(2, 8), panels, 1000)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.chameleon_lm.panel_linear(torch.randn(2, 8).double(), panels, 10)
