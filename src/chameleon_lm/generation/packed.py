"""oneDNN-prepacked weights for decoding on CPU in fp32 (and bf16 where the CPU has bf16 instructions).

Decoding multiplies a handful of rows by every weight matrix, so its speed is how fast the weights
stream from memory. PyTorch's default CPU matmul (MKL) reads an ``[out, in]`` matrix at a third to a
half of the machine's memory bandwidth when the batch is 1–24 rows; oneDNN's inner-product primitive on
a weight reordered once into its blocked layout reads it 1.5–3× faster (bench/RESULTS.md), and it is
also faster for prefill. PyTorch ships both the reorder and the primitive (they are what
``torch.compile`` uses for frozen CPU linears); this module applies them to an eager model:

- :func:`pack_linears` swaps, once, every bias-free ``nn.Linear`` of the model for a
  :class:`PackedLinear` holding the same weight parameter and a packed copy (a non-persistent buffer):
  names, parameters and checkpoints are unchanged, and since nothing is patched per call, any number of
  threads may run the model. The packed copy is used only under ``torch.no_grad``/``inference_mode``
  for CPU inputs of the weight's dtype and while the weight is unchanged (its version counter; a write through
  ``weight.data`` bypasses the counter and is not seen): anything else goes through ``F.linear``.
- In a compiled graph (the engine's compiled decode step) the packed copy is one opaque op
  (``chameleon_lm::packed_linear``, a C++ operator built with the decoding kernels, see
  ``model/decode_attention.py``; without them the graph takes ``F.linear``), and the version check
  is the caller's (:meth:`PackedLinear.stale` before each call).
- :class:`PackedMatrix` is a packed ``x @ w.T`` for a matrix of its own (the engine's text and image
  rows of the output head).

A packed copy costs one more copy of the weights in memory: packing is skipped when it would not fit in
half the free memory.
"""

from __future__ import annotations

import os
import threading

import torch
import torch.nn.functional as F
from torch import nn

from chameleon_lm.model.decode_attention import loaded as cpu_kernels_loaded

BATCH_HINT = 8
"""Rows the reorder is tuned for; measured as good as hint 1 at one row and better at 3–512 rows."""

_LOCK = threading.Lock()


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), BATCH_HINT)


def _version(weight: torch.Tensor) -> int | None:
    return None if weight.is_inference() else weight._version


def supported(weight: torch.Tensor) -> bool:
    """On CPU, in fp32 (or bf16 where oneDNN has native bf16 kernels), with PyTorch's oneDNN reorder."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and weight.device.type == "cpu"):
        return False
    if weight.dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return weight.dtype == torch.float32


def fits(nbytes: int) -> bool:
    """Whether a packed copy of ``nbytes`` fits in half the free memory."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return True
    return 2 * nbytes <= free


def _primitive(x_ND: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x_ND, packed, None, "none", [], "")


def _packed_matmul(
    x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor, version: int | None
) -> torch.Tensor:
    """``x @ weight.T`` with the packed copy where that is valid, else plain ``F.linear``."""
    compiling = torch.compiler.is_compiling()
    if (torch.is_grad_enabled() or x.dtype != weight.dtype or x.device.type != "cpu"
            or (not compiling and _version(weight) != version)  # a graph can't read it: its caller checks
            or (compiling and not cpu_kernels_loaded())):  # inductor lowers the primitive for constants only
        return F.linear(x, weight)
    x_ND = x.reshape(-1, x.shape[-1])
    y = (torch.ops.chameleon_lm.packed_linear(x_ND, packed, weight.shape[0]) if compiling
         else _primitive(x_ND, packed))
    return y.view(*x.shape[:-1], weight.shape[0])


class PackedLinear(nn.Linear):
    """A bias-free ``nn.Linear`` (the same ``weight`` parameter) running on a packed copy when valid."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", None)
        self.register_buffer("packed", _pack(self.weight), persistent=False)
        self.version = _version(self.weight)

    @property
    def stale(self) -> bool:
        return _version(self.weight) != self.version

    def repack(self) -> None:
        self.packed, self.version = _pack(self.weight), _version(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _packed_matmul(x, self.packed, self.weight, self.version)


def _plain_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, name, layer) of every bias-free linear layer that is exactly ``nn.Linear`` or packed."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child) in (nn.Linear, PackedLinear) and child.bias is None]


def pack_linears(model: nn.Module) -> int:
    """Swap the model's bias-free ``nn.Linear`` layers for :class:`PackedLinear` (stale ones repacked).

    Only CPU weights in fp32 (or bf16, see :func:`supported`) are packed, and only when the copies fit
    in half the free memory. Returns the
    number of packed layers in the model afterwards.
    """
    with _LOCK:
        layers = [x for x in _plain_linears(model) if supported(x[2].weight)]
        todo = [x for x in layers if type(x[2]) is nn.Linear or x[2].stale]
        nbytes = sum(x[2].weight.nbytes for x in todo if type(x[2]) is nn.Linear)
        if todo and not fits(nbytes):
            return sum(type(x[2]) is PackedLinear for x in layers)
        for parent, name, layer in todo:
            if isinstance(layer, PackedLinear):
                layer.repack()
            else:
                setattr(parent, name, PackedLinear(layer))
        return len(layers)


def unpack_linears(model: nn.Module) -> None:
    """Undo :func:`pack_linears`: plain ``nn.Linear`` layers with the same weight parameters."""
    with _LOCK:
        for parent, name, layer in _plain_linears(model):
            if isinstance(layer, PackedLinear):
                plain = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
                plain.weight = layer.weight
                setattr(parent, name, plain)


class PackedMatrix:
    """``x @ w.T`` for a fixed matrix ``w`` ``[N, D]``, on a packed copy where supported."""

    def __init__(self, w: torch.Tensor, pack: bool = True):
        self.w = w.detach()
        self.packed = _pack(self.w) if pack and supported(self.w) and fits(self.w.nbytes) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.w)
        return _packed_matmul(x, self.packed, self.w, _version(self.w))
