"""Training health and throughput: per-block activation norms, loss-spike detection, FLOPs and MFU.

- :class:`BlockNorms` records the RMS of every transformer block's output, the first place a diverging
  run shows (Chameleon's paper traces its 34B divergences to growing norms inside the blocks).
- :class:`SpikeDetector` flags loss (or gradient-norm) values far above their recent history; what to do
  about a spike is the trainer's choice among :data:`SPIKE_POLICIES`.
- :func:`peak_flops` and :func:`mfu` (with ``ChameleonConfig.flops_per_token``) give model-FLOPs
  utilisation.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections import deque
from typing import Any

import torch
from torch import nn


SPIKE_POLICIES = ("warn", "skip", "rollback")
"""What the trainer does when :class:`SpikeDetector` flags a step:

- ``warn``: log the spike and carry on with the update as usual.
- ``skip``: drop this step's update (no optimizer step, gradients zeroed); the schedule and data advance.
- ``rollback``: reload the last checkpoint and continue with the data after the spike, skipping the
  batches in between, as PaLM did (Chowdhery et al. 2022, section 5.1): spikes there came from particular
  batches meeting a particular model state, and did not recur when those batches were skipped.
"""


class BlockNorms:
    """Forward hooks on every ``model.layers[i]`` that accumulate the RMS of each block's output.

    While ``recording`` is True (it is off by default), each block call adds
    ``out.detach().float().pow(2).mean().sqrt()`` to a per-block sum kept on the output's device: no
    host sync happens until :meth:`pop` is read. Register before wrapping the blocks (FSDP2's
    ``fully_shard``, ``block.compile()``, activation-checkpoint wrappers): the hooks stay on the inner
    modules and run eagerly (``torch.compiler.disable``), after a compiled block's graph has returned.

    Activation checkpointing runs each block's forward again during the backward; where that goes
    through the module's hooks (``checkpoint_wrapper``; the composable ``checkpoint`` calls ``forward``
    directly) every block would be recorded twice: set ``recording = False`` before ``backward()``.
    """

    def __init__(self, model: nn.Module):
        self.recording = False
        self.n_layers = len(model.layers)
        self._sums: torch.Tensor | None = None
        self._counts = [0] * self.n_layers
        self._handles = [
            block.register_forward_hook(functools.partial(self._hook, i))
            for i, block in enumerate(model.layers)
        ]

    @torch.compiler.disable
    def _hook(self, i: int, _module: nn.Module, _args: Any, out: torch.Tensor) -> None:
        if not self.recording:
            return
        rms = out.detach().float().pow(2).mean().sqrt()
        if self._sums is None or self._sums.device != rms.device:
            self._sums = torch.zeros(self.n_layers, device=rms.device)
        self._sums[i] += rms
        self._counts[i] += 1

    def pop(self) -> torch.Tensor:
        """Mean output RMS of each block ``[n_layers]`` since the last pop (NaN where none was recorded),
        on the blocks' device; the sums are reset."""
        if self._sums is None:
            return torch.full((self.n_layers,), math.nan)
        counts = torch.tensor(self._counts, dtype=torch.float32).to(self._sums.device, non_blocking=True)
        means = self._sums / counts  # 0 / 0 = NaN for blocks that did not run
        self._sums = torch.zeros_like(self._sums)
        self._counts = [0] * self.n_layers
        return means

    def remove(self) -> None:
        """Remove the hooks; the object records nothing afterwards."""
        for h in self._handles:
            h.remove()
        self._handles = []


class SpikeDetector:
    """Flags values that are non-finite or above ``mean + threshold·std`` of the last ``window`` accepted.

    Only the upper side counts (a loss that drops is no spike). Until ``min_history`` values have been
    accepted only non-finite values are flagged. Flagged values are not added to the history, so a run of
    spikes does not raise the bar for the next ones. The state is a JSON-able dict, so a resumed run makes
    exactly the decisions the uninterrupted one would have.
    """

    def __init__(self, window: int = 128, threshold: float = 6.0, min_history: int = 20):
        if window < 2 or not 2 <= min_history <= window or threshold <= 0:
            raise ValueError(f"need window >= min_history >= 2 and threshold > 0, got window={window}, "
                             f"min_history={min_history}, threshold={threshold}")
        self.window, self.threshold, self.min_history = window, float(threshold), min_history
        self.history: deque[float] = deque(maxlen=window)

    def observe(self, value: float) -> bool:
        """Whether ``value`` is a spike; if it is not, it joins the history."""
        value = float(value)
        if not math.isfinite(value):
            return True
        if len(self.history) >= self.min_history:
            n = len(self.history)
            mean = sum(self.history) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / n)
            if value > mean + self.threshold * std:
                return True
        self.history.append(value)
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "threshold": self.threshold, "min_history": self.min_history,
                "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window, self.threshold = int(state["window"]), float(state["threshold"])
        self.min_history = int(state["min_history"])
        self.history = deque((float(x) for x in state["history"]), maxlen=self.window)


# Dense (no sparsity) bf16 tensor-core peaks from the vendor datasheets; the first matching pattern wins.
_CUDA_BF16_PEAKS = (
    (r"B200", 2250e12),
    (r"H200|GH200", 989.4e12),
    (r"H100.*NVL", 835e12),
    (r"H100.*PCIe", 756e12),
    (r"H100|H800", 989.4e12),
    (r"A100|A800", 312e12),
    (r"L40S", 362.05e12),
    (r"L40\b", 181.05e12),
    (r"L4\b", 121e12),
    (r"A10\b", 125e12),
)


def peak_flops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> float:
    """Peak dense matmul FLOP/s of one ``device`` in ``dtype``, the denominator of :func:`mfu`.

    On CUDA, the datasheet figure for known GPUs (looked up by device name): bf16 and fp16 the dense
    tensor-core peak, fp32 half of it when TF32 matmuls are allowed (``torch.backends.cuda.matmul.
    allow_tf32``). Otherwise (CPU, unknown GPUs, other dtypes) a measured figure: the best throughput of a
    few square matmuls in ``dtype`` after a warm-up, with the current thread count on CPU. The result is
    cached per device and dtype. An MFU on CPU is therefore relative to what this machine's matmul
    reaches, not to a datasheet peak.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _peak_flops(device, dtype)


@functools.cache
def _peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        bf16 = next((peak for pattern, peak in _CUDA_BF16_PEAKS if re.search(pattern, name)), None)
        if bf16 is not None and dtype in (torch.bfloat16, torch.float16):
            return bf16
        if bf16 is not None and dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
            return bf16 / 2
    return measured_matmul_flops(device, dtype)


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 2048,
                          repeats: int = 5) -> float:
    """Best FLOP/s of ``repeats`` ``[size, size] @ [size, size]`` products into a preallocated output,
    timed after two warm-ups (no allocation or thread-pool start-up in the timed calls)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    best = math.inf
    for i in range(repeats + 2):
        sync()
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        if i >= 2:
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak: float) -> float:
    """Model-FLOPs utilisation: the fraction of ``peak`` FLOP/s that the model's own FLOPs use."""
    return tokens_per_s_per_device * flops_per_token / peak
