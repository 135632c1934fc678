"""AdamW with the paper's defaults and weight decay only on matrices that are not embeddings."""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed (the matrices of linear and convolution layers: their weights, and the LoRA
    factors or trained head rows of the adapters, which subclass ``nn.Linear``) and not decayed
    (everything else: norms and QK-norms, biases, embeddings, codebooks). Frozen parameters are left out."""
    decay_ids = {
        id(p) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
        for p in m.parameters(recurse=False) if p.ndim >= 2
    }
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if id(p) in decay_ids else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-5,
) -> torch.optim.AdamW:
    """AdamW(β1 0.9, β2 0.95, ε 1e-5, weight decay 0.1): the Chameleon pre-training settings."""
    # The fused kernel (one pass over each parameter's p, grad, m, v) exists for CPU and CUDA; on CPU it
    # took the optimizer step of the `small` preset from 0.63 s to 0.09 s (bench/RESULTS.md).
    groups = param_groups(model, weight_decay)
    # Only the trained parameters reach the kernel: frozen ones (adapters) have no say in it.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                for g in groups for p in g["params"]) or None
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
