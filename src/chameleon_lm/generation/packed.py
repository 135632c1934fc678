"""oneDNN-prepacked weights for decoding on CPU in fp32.

Decoding multiplies a handful of rows by every weight matrix, so its speed is how fast the weights
stream from memory. PyTorch's default CPU matmul (MKL) reads an ``[out, in]`` matrix at a third to a
half of the machine's memory bandwidth when the batch is 1–24 rows; oneDNN's inner-product primitive on
a weight reordered once into its blocked layout reads it 1.5–3× faster (bench/RESULTS.md), and it is
also faster for prefill. PyTorch ships both the reorder and the primitive (they are what
``torch.compile`` uses for frozen CPU linears); this module applies them to an eager model:

- :func:`packed_linears` is a context manager that runs every ``nn.Linear`` of the model on packed
  weights, only under ``torch.no_grad``/``inference_mode`` and for fp32 CPU inputs — anything else
  (training, autocast, other devices) goes through ``F.linear`` unchanged;
- the packed copies are built once per model and kept (weakly) with it until a weight changes (their
  version counters and storages are checked at every entry; a write through ``weight.data`` bypasses
  the counter and is not seen), so they cost one extra copy of the weights in memory: they are
  skipped when that copy would not fit in half the free memory.

Nothing here changes the model's parameters, names or checkpoints.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

BATCH_HINT = 8
"""Rows the reorder is tuned for; measured as good as hint 1 at one row and better at 3–512 rows."""

_PACKS: weakref.WeakKeyDictionary[nn.Module, _Packs] = weakref.WeakKeyDictionary()


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), BATCH_HINT)


def _version(weight: torch.Tensor) -> int | None:
    return None if weight.is_inference() else weight._version


def _packed_matmul(
    x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor, version: int | None
) -> torch.Tensor:
    """``x @ weight.T`` with the packed copy where that is valid, else plain ``F.linear``.

    ``version`` is the weight's version counter when it was packed: a weight updated since (say, a
    training step while a ``stream`` generator is suspended) makes this call fall back to ``F.linear``.
    """
    if (torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu"
            or _version(weight) != version):
        return F.linear(x, weight)
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, None, "none", [], "")
    return y.view(*x.shape[:-1], weight.shape[0])


def _linears(model: nn.Module) -> list[nn.Linear]:
    """The layers this module packs: every bias-free ``nn.Linear`` (all of Chameleon's)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.bias is None]


class _Packs:
    """Packed copies of the given linear weights, plus any row slices asked for (e.g. image head)."""

    def __init__(self, linears: list[nn.Linear]):
        self.linears = linears
        self.key = self._key(linears)
        self.weights = [_pack(m.weight) for m in linears]
        self.slices: dict[tuple[int, int, int], torch.Tensor] = {}

    @staticmethod
    def _key(linears: list[nn.Linear]) -> tuple:
        """The weights' storages and version counters (in-place updates such as an optimizer step or
        ``load_state_dict`` bump the counter; inference tensors have none)."""
        return tuple((m.weight.data_ptr(), _version(m.weight), tuple(m.weight.shape)) for m in linears)

    def valid_for(self, linears: list[nn.Linear]) -> bool:
        """Same layers, same weights, none updated since packing (never, for inference tensors)."""
        return (not any(m.weight.is_inference() for m in linears)
                and len(linears) == len(self.linears)
                and all(a is b for a, b in zip(linears, self.linears)) and self._key(linears) == self.key)

    def rows(self, linear: nn.Linear, start: int, end: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x @ linear.weight[start:end].T`` on a packed copy of those rows (built on first use)."""
        key = (self.linears.index(linear), start, end)
        if key not in self.slices:
            self.slices[key] = _pack(linear.weight[start:end])
        packed, weight = self.slices[key], linear.weight[start:end]  # a view shares the version counter
        version = _version(weight)
        return lambda x: _packed_matmul(x, packed, weight, version)


def _supported(linears: list[nn.Linear]) -> bool:
    """fp32 weights on CPU and PyTorch's oneDNN reorder present."""
    return (bool(linears) and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and all(m.weight.device.type == "cpu" and m.weight.dtype == torch.float32 for m in linears))


def _fits(linears: list[nn.Linear]) -> bool:
    """Whether a packed copy of the weights fits in half the free memory."""
    size = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return True
    return 2 * size <= free


def _packs_for(model: nn.Module) -> _Packs | None:
    """The model's packs: the cached ones while valid, else new ones (stale ones freed first)."""
    linears = _linears(model)
    if not _supported(linears):
        return None
    packs = _PACKS.get(model)
    if packs is not None and packs.valid_for(linears):
        return packs
    _PACKS.pop(model, None)  # before measuring free memory: a stale copy is about to go
    if not _fits(linears):
        return None
    _PACKS[model] = packs = _Packs(linears)
    return packs


@contextmanager
def packed_linears(model: nn.Module, enabled: bool = True) -> Iterator[_Packs | None]:
    """Run the model's bias-free ``nn.Linear`` layers on packed weights for the duration.

    Yields the packs (for :meth:`_Packs.rows`), or None when disabled or not possible (not fp32 on CPU,
    no oneDNN, no room for the copy) — the model then runs exactly as without this context.
    """
    packs = _packs_for(model) if enabled else None
    if packs is None:
        yield None
        return
    for linear, packed in zip(packs.linears, packs.weights):
        linear.forward = (lambda x, p=packed, w=linear.weight, v=_version(linear.weight):
                          _packed_matmul(x, p, w, v))
    try:
        yield packs
    finally:
        for linear in packs.linears:
            linear.__dict__.pop("forward", None)
