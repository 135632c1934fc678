"""Parameter-efficient fine-tuning: LoRA on the blocks' projections, or only the image rows of the head.

``apply_adapters(model, AdapterConfig(mode=...))`` freezes the model and swaps in modules that hold the few
trained parameters next to the frozen base ones (in place); ``merge_adapters`` folds them back, leaving a
plain :class:`~chameleon_lm.model.Chameleon` whose state dict has exactly the keys and shapes of an
un-adapted model, so the native, Hugging Face and Meta writers work unchanged.

- ``lora``: every target ``nn.Linear`` of every block becomes a :class:`LoRALinear`, ``W x + s·B A x``
  (Hu et al., 2021); everything else (embeddings, norms, head) is frozen.
- ``image-head``: only the rows of ``output.weight`` of the image codes and ``<eoss>`` are trained
  (:class:`ImageRowsHead`), as Anole taught Chameleon to generate images: the transformer and the
  other rows of the head (so every text logit) stay bit-identical.

The swapped modules keep their base weight under its own name (``layers.0.attention.wq.weight``,
``output.weight``) and register every parameter on themselves, read through ``self`` in ``forward``, so
``fully_shard`` can wrap the blocks and the head from outside as for the plain model. Merge an unsharded
model (after gathering the full state dict), and apply adapters after the weights are loaded:
``Chameleon.init_weights`` would re-draw the LoRA factors as if they were projections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from chameleon_lm.model.head import OutputHead
from chameleon_lm.tokenizers.vocab import Vocab
from chameleon_lm.utils.config import Config

MODES = ("full", "lora", "image-head")
ATTENTION_TARGETS, FFN_TARGETS = ("wq", "wk", "wv", "wo"), ("w1", "w2", "w3")


@dataclass
class AdapterConfig(Config):
    """Which parameters a fine-tuning run trains, and the LoRA hyper-parameters."""

    mode: str = "full"
    """``full`` (every parameter), ``lora`` (low-rank updates of the block projections) or ``image-head``
    (only the head's rows of the image codes and ``<eoss>``)."""
    lora_rank: int = 16
    """Rank r of each update ``B A`` (``A`` is ``[r, in]``, ``B`` is ``[out, r]``)."""
    lora_alpha: float = 32.0
    """The update is scaled by ``lora_alpha / lora_rank``, so changing the rank keeps its size."""
    lora_dropout: float = 0.0
    """Dropout on the input of the update (training only)."""
    lora_targets: list[str] = field(default_factory=lambda: [*ATTENTION_TARGETS, *FFN_TARGETS])
    """Projections of each block that get an update: ``wq wk wv wo`` (attention), ``w1 w2 w3`` (FFN)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown adapter mode {self.mode!r}; known: {', '.join(MODES)}")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise ValueError(f"lora_rank must be an integer >= 1, got {self.lora_rank!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        known = (*ATTENTION_TARGETS, *FFN_TARGETS)
        unknown = [t for t in self.lora_targets if t not in known]
        if unknown:
            raise ValueError(f"unknown lora_targets {unknown}; known: {', '.join(known)}")
        if not self.lora_targets or len(set(self.lora_targets)) != len(self.lora_targets):
            raise ValueError(f"lora_targets must be non-empty and without repeats, got {self.lora_targets}")


class LoRALinear(nn.Linear):
    """A frozen ``nn.Linear`` (no bias) plus a trained low-rank update: ``W x + scale · B (A dropout(x))``.

    ``A`` starts kaiming-uniform and ``B`` at zero (as in the LoRA paper and peft), so the adapted model
    starts exactly as the base model.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.weight.requires_grad_(False)
        self.rank, self.scale, self.dropout = rank, alpha / rank, dropout
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        self.reset_lora()

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> LoRALinear:
        """An adapter around ``linear``'s weight (the tensor itself, not a copy), on its device and dtype."""
        if linear.bias is not None:
            raise ValueError("LoRALinear wraps linear layers without bias")
        w = linear.weight
        lora = cls(linear.in_features, linear.out_features, rank, alpha, dropout, device="meta",
                   dtype=w.dtype)
        lora.weight = nn.Parameter(w.detach(), requires_grad=False)
        lora.lora_a = nn.Parameter(torch.empty(rank, linear.in_features, device=w.device, dtype=w.dtype))
        lora.lora_b = nn.Parameter(torch.empty(linear.out_features, rank, device=w.device, dtype=w.dtype))
        lora.reset_lora()
        return lora

    @torch.no_grad()
    def reset_lora(self) -> None:
        """``A`` kaiming-uniform (``a = sqrt(5)``, nn.Linear's and peft's), ``B`` zero: a zero update."""
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(F.dropout(x, self.dropout, self.training), self.lora_a), self.lora_b)
        return F.linear(x, self.weight) + self.scale * update

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + scale · B A``, computed in fp32 and returned in ``W``'s dtype."""
        delta = self.lora_b.float() @ self.lora_a.float()
        return (self.weight.float() + self.scale * delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}, dropout={self.dropout:g}"


class ImageRowsHead(OutputHead):
    """An output head whose ``weight`` is frozen except for some rows, held in ``trained_rows``.

    ``trained_rows`` (``[R, D]``) holds the trained rows; ``rows`` (a buffer, saved with training
    checkpoints so that they restore onto a meta-built model) says which they are. The head applies ``weight`` with those rows replaced, so the loss's gradient reaches only
    them, and weight decay only touches them.
    """

    def __init__(self, dim: int, vocab_size: int, rows: torch.Tensor, device=None, dtype=None):
        super().__init__(dim, vocab_size, device=device, dtype=dtype)
        self.weight.requires_grad_(False)
        rows = _check_rows(rows, vocab_size).to(device=self.weight.device)
        self.register_buffer("rows", rows)
        self.trained_rows = nn.Parameter(self.weight.detach()[rows].clone())

    @classmethod
    def from_head(cls, head: OutputHead, rows: torch.Tensor) -> ImageRowsHead:
        """A head around ``head``'s weight (the tensor itself) training ``rows``, from their values."""
        w, rows = head.weight, _check_rows(rows, head.out_features)
        new = cls(head.in_features, head.out_features, rows, device="meta", dtype=w.dtype)
        new.weight = nn.Parameter(w.detach(), requires_grad=False)
        new.rows = rows.to(w.device)
        new.trained_rows = nn.Parameter(w.detach()[new.rows].clone())
        return new

    def effective_weight(self) -> torch.Tensor:
        return self.weight.index_copy(0, self.rows, self.trained_rows)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, trained_rows={self.rows.numel()}"


def _check_rows(rows: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``rows`` as sorted unique int64 ids in ``[0, vocab_size)``."""
    rows = torch.as_tensor(rows)
    if rows.ndim != 1 or rows.numel() == 0 or rows.is_floating_point():
        raise ValueError(f"rows must be a non-empty 1-D tensor of ids, got {rows.dtype} {tuple(rows.shape)}")
    if rows.min() < 0 or rows.max() >= vocab_size:
        raise ValueError(f"rows must be ids in [0, {vocab_size}), got [{int(rows.min())}, {int(rows.max())}]")
    return rows.long().unique()  # sorted; index_copy with repeated ids would be ill-defined


def image_head_rows(vocab: Vocab) -> torch.Tensor:
    """The head rows ``image-head`` trains: the image code ids and ``<eoss>``.

    Anole trained exactly the image-code rows; ``<eoss>`` is added so the model learns where an image ends.
    """
    return torch.cat([torch.arange(vocab.image_start, vocab.image_end), torch.tensor([vocab.eoi_id])])


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _check_plain(model: nn.Module) -> None:
    if any(isinstance(m, (LoRALinear, ImageRowsHead)) for m in model.modules()):
        raise ValueError("the model already has adapters; merge_adapters first")


def apply_lora(model: nn.Module, targets, rank: int, alpha: float, dropout: float = 0.0) -> nn.Module:
    """Freeze ``model`` and swap the ``targets`` projections of every block for :class:`LoRALinear`."""
    _check_plain(model)
    _freeze(model)
    for block in model.layers:
        for name in targets:
            parent = block.attention if name in ATTENTION_TARGETS else block.feed_forward
            setattr(parent, name, LoRALinear.from_linear(getattr(parent, name), rank, alpha, dropout))
    return model


def apply_image_head_only(model: nn.Module, rows: torch.Tensor) -> nn.Module:
    """Freeze ``model`` and train only ``rows`` of the output head (any ids, e.g. ``image_head_rows``)."""
    _check_plain(model)
    _freeze(model)
    model.output = ImageRowsHead.from_head(model.output, rows)
    return model


def apply_adapters(model: nn.Module, config: AdapterConfig, vocab: Vocab | None = None) -> nn.Module:
    """Set ``model`` up, in place, to train what ``config.mode`` says; returns it.

    ``full`` changes nothing; ``lora`` and ``image-head`` freeze the model and swap in adapter modules
    (``image-head`` needs the ``vocab`` to know which ids are image codes).
    """
    if config.mode == "lora":
        return apply_lora(model, config.lora_targets, config.lora_rank, config.lora_alpha,
                          config.lora_dropout)
    if config.mode == "image-head":
        if vocab is None:
            raise ValueError("adapter mode 'image-head' needs the vocabulary (which ids are image codes)")
        return apply_image_head_only(model, image_head_rows(vocab))
    return model


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and swap back plain modules, in place; returns ``model``.

    Afterwards every parameter is trainable again and ``model.state_dict()`` has the keys and shapes of
    an un-adapted model.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=False, device="meta")
                plain.weight = nn.Parameter(child.merged_weight())
            elif isinstance(child, ImageRowsHead):
                plain = OutputHead(child.in_features, child.out_features, device="meta")
                plain.weight = nn.Parameter(child.effective_weight().detach())
            else:
                continue
            plain.train(child.training)
            setattr(parent, name, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trained, total)`` parameter counts, for logging."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
