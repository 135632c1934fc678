"""Attention of one decoding step over a KV cache with a length per row (:class:`DecodeStep`'s).

Each row's query attends over the row's first ``lengths[b]`` cached keys and its own new key, in one
softmax. On CPU this runs a small C++ kernel (``cpu_kernels.cpp``), built with
``torch.utils.cpp_extension`` on first use (a C++ compiler is needed, as for ``torch.compile``; the
build is cached) and registered as ``chameleon_lm::decode_attention``, so compiled steps call it too.
The same extension holds the step's other CPU operators: ``chameleon_lm::kv_append``
(:meth:`KVCache.append`'s write), ``chameleon_lm::pack_panels`` / ``panel_linear`` (fp32 linear layers
on weight panels, prefetching) and ``chameleon_lm::packed_linear`` (oneDNN's linear): the packed
layers of ``generation/packed.py``, callable from a compiled graph without a trip through Python.
It reads only each row's own keys, once per KV head, from fp32 or bf16 caches; the fused SDPA
kernels, made for long queries, stream decode-time caches at a fraction of the memory bandwidth
(bench/RESULTS.md). Without a compiler, off CPU, or with ``CHAMELEON_CPU_KERNELS=0``,
:func:`reference` runs instead.

Shape legend: B rows, K key/value heads, G query heads per KV head, S cache slots, E head dim.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_HEAD_DIMS = (16, 32, 64, 128)  # multiples of every vector width the kernel is built for, up to 16 vectors
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}
_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet


def cpu_kernel() -> bool:
    """Whether the CPU kernels are loaded, building them on the first call (False where they cannot
    be built, or with ``CHAMELEON_CPU_KERNELS=0``). Call it outside compiled code."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _build()
        return _loaded


def loaded() -> bool:
    """Whether the CPU kernels are loaded already (never builds; safe inside compiled code)."""
    return _loaded is True


def _build() -> bool:
    if os.environ.get("CHAMELEON_CPU_KERNELS", "1") == "0":
        return False
    from torch.utils import cpp_extension

    isa = torch.backends.cpu.get_cpu_capability()
    flags = [*_ISA_FLAGS[isa], f"-DCPU_CAPABILITY_{isa}", f"-DCPU_CAPABILITY={isa}"] if isa in _ISA_FLAGS else []
    name = f"chameleon_cpu_kernels_{isa.lower() if isa in _ISA_FLAGS else 'default'}"
    try:
        import ninja  # the pip package's binary, for a venv that is not activated

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    except (ImportError, AttributeError):
        pass
    try:
        log.info("loading the CPU decoding kernels (built once, then cached)")
        cpp_extension.load(name, [str(Path(__file__).with_name("cpu_kernels.cpp"))], is_python_module=False,
                           extra_cflags=["-O3", "-fopenmp", *flags], extra_ldflags=["-fopenmp"])
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, ...: the reference path works everywhere
        lines = str(e).splitlines()
        why = next((line for line in lines if "error" in line), lines[-1] if lines else "")
        log.warning("CPU decoding kernels unavailable (%s: %s); using the reference attention",
                    type(e).__name__, why.strip())
        return False

    @torch.library.register_fake("chameleon_lm::decode_attention")
    def _(q, k, v, k_new, v_new, lengths):
        return q.new_empty(q.shape, dtype=torch.float32)

    @torch.library.register_fake("chameleon_lm::packed_linear")
    def _(x, packed, out_features):
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("chameleon_lm::panel_linear")
    def _(x, panels, out_features):
        return x.new_empty(x.shape[0], out_features)

    return True


def kernel_applies(head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :func:`decode_attention` runs the CPU kernel for caches like these (which, unlike
    :func:`reference`, never reads a slot past a row's length). Builds the kernels on first call
    outside compiled code."""
    if device.type != "cpu" or head_dim not in _HEAD_DIMS or dtype not in (torch.float32, torch.bfloat16):
        return False
    return loaded() if torch.compiler.is_compiling() else cpu_kernel()


def decode_attention(q_BKGE: torch.Tensor, k_BKSE: torch.Tensor, v_BKSE: torch.Tensor,
                     k_new_BKE: torch.Tensor, v_new_BKE: torch.Tensor, lengths_B: torch.Tensor
                     ) -> torch.Tensor:
    """Attention ``[B, K, G, E]`` (fp32 on CPU) of each query over row b's keys ``[:lengths[b]]`` of
    ``k``/``v`` and its new key: the kernel where it applies, else :func:`reference`."""
    if kernel_applies(q_BKGE.shape[-1], k_BKSE.dtype, q_BKGE.device) and k_BKSE.stride(-1) == 1:
        return torch.ops.chameleon_lm.decode_attention(q_BKGE, k_BKSE, v_BKSE, k_new_BKE, v_new_BKE, lengths_B)
    return reference(q_BKGE, k_BKSE, v_BKSE, k_new_BKE, v_new_BKE, lengths_B)


def reference(q_BKGE: torch.Tensor, k_BKSE: torch.Tensor, v_BKSE: torch.Tensor, k_new_BKE: torch.Tensor,
              v_new_BKE: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
    """The same attention from torch ops, in the cache's dtype: softmax over the cached keys (with
    their log-sum-exp) merged with the new key's score."""
    E, S = q_BKGE.shape[-1], k_BKSE.shape[2]
    q = q_BKGE.to(k_BKSE.dtype)
    k_new, v_new = k_new_BKE.to(k_BKSE.dtype)[:, :, None], v_new_BKE.to(k_BKSE.dtype)[:, :, None]
    held = torch.arange(S, device=q.device) < lengths_B[:, None]  # [B, S]
    own = (q * k_new).sum(-1) * E**-0.5  # [B, K, G]: the score of the row's new key
    if q.device.type == "cpu":  # the fused kernel, which also returns the log-sum-exp
        bias = torch.zeros(held.shape, dtype=q.dtype, device=q.device).masked_fill(~held, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k_BKSE, v_BKSE, attn_mask=bias[:, None, None, :])  # [B, K, G, E], [B, K, G]
    else:
        scores = (q @ k_BKSE.transpose(-1, -2)) * E**-0.5  # [B, K, G, S]
        scores = scores.masked_fill(~held[:, None, None, :], float("-inf"))
        lse = scores.logsumexp(-1)
        out = torch.softmax(scores, -1) @ v_BKSE
    top = torch.maximum(lse, own)
    w_old, w_own = torch.exp(lse - top)[..., None], torch.exp(own - top)[..., None]
    return (w_old * out + w_own * v_new) / (w_old + w_own)  # one softmax over old keys and the new one
