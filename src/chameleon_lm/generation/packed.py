"""Prepacked weights for decoding on CPU: fp32 on panels for our kernel, bf16 on oneDNN.

Decoding multiplies a handful of rows by every weight matrix, so its speed is how well the weight
stream from memory overlaps the arithmetic. PyTorch's default CPU matmul (MKL) reads an ``[out, in]``
matrix at a third to a half of the machine's memory bandwidth when the batch is 1–24 rows. Two packed
layouts do better (bench/RESULTS.md):

- fp32: ``chameleon_lm::panel_linear`` (``model/cpu_kernels.cpp``, built with the decoding kernels) on
  the weight repacked once into column panels: it prefetches the next panel while computing this one,
  1.1–1.5× oneDNN's inner product at 8–96 rows, at par at 1 row, within 10 % at prefill sizes;
- bf16 (where the CPU has bf16 instructions), and fp32 without the kernels: oneDNN's inner-product
  primitive on a weight reordered into its blocked layout (what ``torch.compile`` uses for frozen CPU
  linears), 1.5–3× MKL at a few rows.

This module applies them to an eager model:

- :func:`pack_linears` swaps, once, every bias-free ``nn.Linear`` of the model for a
  :class:`PackedLinear` holding the same weight parameter and a packed copy (a non-persistent buffer);
  the layers a module lists as ``fusable`` (attention's q/k/v, the feed-forward's gate/up) get one
  packed copy of their stacked weights instead (:class:`PackedGroup`, a matmul wide enough to keep
  the cores busy at a few rows): names, parameters and checkpoints are unchanged, and since nothing is
  patched per call, any number of threads may run the model. The packed copy is used only under ``torch.no_grad``/``inference_mode``
  for CPU inputs of the weight's dtype and while the weight is unchanged (its version counter; a write through
  ``weight.data`` bypasses the counter and is not seen): anything else goes through ``F.linear``.
- In a compiled graph (the engine's compiled decode step) the packed copy is one opaque C++ op
  (``panel_linear``, or ``chameleon_lm::packed_linear`` for oneDNN's, see ``model/decode_attention.py``;
  without the kernels the graph takes ``F.linear``), and the version check is the caller's
  (:meth:`PackedLinear.stale` before each call).
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

from chameleon_lm.model.decode_attention import cpu_kernel
from chameleon_lm.model.decode_attention import loaded as cpu_kernels_loaded

BATCH_HINT = 8
"""Rows oneDNN's reorder is tuned for; measured as good as hint 1 at one row and better at 3–512 rows."""

_LOCK = threading.Lock()


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """The packed copy: panels ``[P, in, NR]`` for our kernel (fp32 with the CPU kernels), else
    oneDNN's reordered ``[out, in]`` (an MKL-DNN tensor); the number of dims tells them apart."""
    w = weight.detach().contiguous()
    if w.dtype == torch.float32 and cpu_kernel() and torch.ops.chameleon_lm.panel_width() > 0:
        return torch.ops.chameleon_lm.pack_panels(w)
    return torch.ops.mkldnn._reorder_linear_weight(w, BATCH_HINT)


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


def _packed_matmul(x: torch.Tensor, packed: torch.Tensor, weights: list[torch.Tensor],
                   versions: list[int | None], out_features: int) -> torch.Tensor | None:
    """``x @ W.T`` on the packed copy (:func:`_pack`) of the (row-stacked) ``weights``, or None where
    the copy is not valid (the caller then runs the plain layers)."""
    compiling = torch.compiler.is_compiling()
    if (torch.is_grad_enabled() or x.dtype != weights[0].dtype or x.device.type != "cpu"
            # a graph can't read the versions (its caller checks them), and inductor lowers the
            # primitive only for weights frozen into the graph: in a graph it takes the C++ operator
            or (compiling and not cpu_kernels_loaded())
            or (not compiling and any(_version(w) != v for w, v in zip(weights, versions)))):
        return None
    x_ND = x.reshape(-1, x.shape[-1])
    if packed.dim() == 3:  # panels
        y = torch.ops.chameleon_lm.panel_linear(x_ND, packed, out_features)
    else:
        y = (torch.ops.chameleon_lm.packed_linear(x_ND, packed, out_features) if compiling
             else _primitive(x_ND, packed))
    return y.view(*x.shape[:-1], out_features)


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
        y = _packed_matmul(x, self.packed, [self.weight], [self.version], self.out_features)
        return F.linear(x, self.weight) if y is None else y


class PackedGroup(nn.Module):
    """Bias-free linear layers of one input (a module's ``fusable`` group: attention's q, k and v
    projections, the feed-forward's gate and up projections) as one packed matmul, split after: one
    primitive call over the stacked weights instead of several narrow ones. The layers stay where
    they are (plain ``nn.Linear``, with their parameters); this module holds only the packed copy."""

    def __init__(self, parent: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.names = names
        self.layers = tuple(getattr(parent, n) for n in names)  # not submodules: they belong to the parent
        self.sizes = [layer.out_features for layer in self.layers]
        self.repack()

    def fuses(self, parent: nn.Module) -> bool:
        """Whether ``parent`` still holds exactly these layers (not, e.g., adapters put in their place
        since: then the parent must call its own layers)."""
        return all(parent._modules.get(n) is layer for n, layer in zip(self.names, self.layers))

    @property
    def stale(self) -> bool:
        return [_version(layer.weight) for layer in self.layers] != self.versions

    def repack(self) -> None:
        weights = [layer.weight.detach() for layer in self.layers]
        self.register_buffer("packed", _pack(torch.cat(weights)), persistent=False)
        self.versions = [_version(w) for w in weights]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = _packed_matmul(x, self.packed, [layer.weight for layer in self.layers], self.versions,
                           sum(self.sizes))
        return tuple(layer(x) for layer in self.layers) if y is None else y.split(self.sizes, -1)


def _plain_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, name, layer) of every bias-free linear layer that is exactly ``nn.Linear`` or packed."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child) in (nn.Linear, PackedLinear) and child.bias is None]


def _groups(model: nn.Module) -> list[tuple[nn.Module, str, tuple[str, ...], list[nn.Linear]]]:
    """(parent, name, member names, layers) of each ``fusable`` group whose layers are plain,
    supported, bias-free linears of one input, dtype and device."""
    out = []
    for parent in model.modules():
        for name, members in getattr(parent, "fusable", ()):
            layers = [getattr(parent, m, None) for m in members]
            if (all(type(x) is nn.Linear and x.bias is None and supported(x.weight) for x in layers)
                    and len({(x.in_features, x.weight.dtype, x.weight.device) for x in layers}) == 1):
                out.append((parent, name, tuple(members), layers))
    return out


def _held(parent: nn.Module, name: str) -> PackedGroup | None:
    """The parent's group ``name`` if it still fuses the parent's layers."""
    group = parent._modules.get(name)
    return group if isinstance(group, PackedGroup) and group.fuses(parent) else None


def _drop_groups(model: nn.Module, keep: set[tuple[int, str]] = frozenset()) -> None:
    """Remove the model's packed groups, but those at (id(parent), name) in ``keep``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PackedGroup) and (id(parent), name) not in keep:
                delattr(parent, name)


def pack_linears(model: nn.Module) -> int:
    """Pack the model's bias-free ``nn.Linear`` layers (stale packed copies are refreshed): each
    ``fusable`` group as one :class:`PackedGroup`, the others swapped for :class:`PackedLinear`.

    Only CPU weights in fp32 (or bf16, see :func:`supported`) are packed, and only when the copies fit
    in half the free memory. Returns the number of linear layers running on packed copies afterwards.
    """
    with _LOCK:
        groups = _groups(model)
        _drop_groups(model, keep={(id(parent), name) for parent, name, *_ in groups})  # layers replaced
        grouped = {id(x) for *_, layers in groups for x in layers}
        layers = [x for x in _plain_linears(model) if supported(x[2].weight) and id(x[2]) not in grouped]
        new_groups = [g for g in groups if _held(g[0], g[1]) is None]
        todo = [x for x in layers if type(x[2]) is nn.Linear or x[2].stale]
        nbytes = (sum(x[2].weight.nbytes for x in todo if type(x[2]) is nn.Linear)
                  + sum(w.weight.nbytes for *_, g in new_groups for w in g))
        if (todo or new_groups) and not fits(nbytes):
            return _count(model)
        for parent, name, layer in todo:
            if isinstance(layer, PackedLinear):
                layer.repack()
            else:
                setattr(parent, name, PackedLinear(layer))
        for parent, name, members, _ in groups:
            if (group := _held(parent, name)) is None:
                parent.add_module(name, PackedGroup(parent, members))
            elif group.stale:
                group.repack()
        return _count(model)


def _count(model: nn.Module) -> int:
    return sum(isinstance(m, PackedLinear) or len(getattr(m, "layers", ())) * isinstance(m, PackedGroup)
               for m in model.modules())


def packed_modules(model: nn.Module) -> list[PackedLinear | PackedGroup]:
    """The model's packed layers and groups (their ``stale`` says when a weight changed)."""
    return [m for m in model.modules() if isinstance(m, (PackedLinear, PackedGroup))]


def unpack_linears(model: nn.Module) -> None:
    """Undo :func:`pack_linears`: plain ``nn.Linear`` layers with the same weight parameters."""
    with _LOCK:
        for parent, name, layer in _plain_linears(model):
            if isinstance(layer, PackedLinear):
                plain = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
                plain.weight = layer.weight
                setattr(parent, name, plain)
        _drop_groups(model)


class PackedMatrix:
    """``x @ w.T`` for a fixed matrix ``w`` ``[N, D]``, on a packed copy where supported."""

    def __init__(self, w: torch.Tensor, pack: bool = True):
        self.w = w.detach()
        self.packed = _pack(self.w) if pack and supported(self.w) and fits(self.w.nbytes) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = None if self.packed is None else _packed_matmul(x, self.packed, [self.w], [_version(self.w)],
                                                            self.w.shape[0])
        return F.linear(x, self.w) if y is None else y
