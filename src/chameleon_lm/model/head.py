"""The output head, and its fused chunked cross-entropy for training.

``OutputHead`` is an ``nn.Linear`` (weight ``output.weight``, ``[V, D]``) whose ``forward`` gives logits, or,
given targets, the summed loss computed in chunks of tokens: the 65,536-word vocabulary never
materialises ``[tokens, V]`` fp32 logits for the whole batch. Each chunk's gradient is computed in the
forward pass, right after its loss (``softmax·(1 + 2·w_z·lse) − one-hot`` for ``ce + w_z·lse²``), and kept as
the gradients of the hidden states and of the head weight: no logits are kept or recomputed, so the head
costs the minimum 6·N·V·D FLOPs and one chunk of memory.

The loss is computed inside ``forward`` so that wrappers of the module see it as one call: FSDP2
(``fully_shard(model.output)``) unshards the weight before it and reduce-scatters the weight's gradient
after the backward, exactly as for a plain linear layer. Subclasses change the weight the head applies
through :meth:`OutputHead.effective_weight` (LoRA-style adapters, image-rows-only training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class _FusedHeadLoss(torch.autograd.Function):
    """``sum(ce + w_z·lse²)`` over valid targets of ``h @ w.T``, with gradients computed in the forward."""

    @staticmethod
    def forward(ctx, h_ND, w_VD, t_N, z_weight: float, chunk_size: int, ignore_index: int,
                need_h: bool, need_w: bool):
        grad_h = torch.zeros_like(h_ND) if need_h else None
        grad_w = torch.zeros_like(w_VD, dtype=torch.float32) if need_w else None
        ce = torch.zeros(t_N.numel(), dtype=torch.float32, device=h_ND.device)
        z = torch.zeros_like(ce)
        logit_norm = torch.zeros_like(ce)
        for s in range(0, t_N.numel(), chunk_size):
            h, t = h_ND[s : s + chunk_size], t_N[s : s + chunk_size]
            logits = (h @ w_VD.t()).float()  # [n, V], fp32 for the softmax
            valid = t != ignore_index
            safe_t = t.clamp(min=0)[:, None]
            target = logits.gather(1, safe_t)[:, 0]
            logit_norm[s : s + chunk_size] = torch.where(valid, torch.linalg.vector_norm(logits, dim=-1), 0.0)
            # logsumexp by hand, in place: torch.logsumexp allocates a second [n, V] temporary, and
            # on CPU its page faults cost more than the head's matmul.
            top = logits.amax(dim=-1)
            exp = logits.sub_(top[:, None]).exp_()  # exp(logits − max), in place of the logits
            sum_exp = exp.sum(dim=-1)
            lse = top + sum_exp.log()
            ce[s : s + chunk_size] = torch.where(valid, lse - target, 0.0)
            z[s : s + chunk_size] = torch.where(valid, lse.square(), 0.0)
            if need_h or need_w:
                # softmax · (1 + 2·w_z·lse) − one-hot, still in place
                grad = exp.mul_(torch.where(valid, (1 + 2 * z_weight * lse) / sum_exp, 0.0)[:, None])
                grad.scatter_add_(1, safe_t, -valid.float()[:, None])
                grad = grad.to(torch.promote_types(h.dtype, w_VD.dtype))  # bf16 under bf16 autocast
                if need_h:
                    grad_h[s : s + chunk_size] = grad @ w_VD.to(grad.dtype)
                if need_w:
                    if grad.dtype == grad_w.dtype and not torch.is_autocast_enabled(h.device.type):
                        grad_w.addmm_(grad.t(), h.to(grad.dtype))  # no [V, D] temporary
                    else:
                        grad_w += grad.t() @ h.to(grad.dtype)  # a low-precision matmul under autocast
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w_VD.dtype
        ctx.mark_non_differentiable(ce, z, logit_norm)
        return (ce + z_weight * z).sum(), ce, z, logit_norm

    @staticmethod
    def backward(ctx, g_loss, _g_ce, _g_z, _g_norm):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * g_loss.to(grad_h.dtype),
                None if grad_w is None else (grad_w * g_loss).to(ctx.w_dtype),
                None, None, None, None, None, None)


class OutputHead(nn.Linear):
    """The vocabulary projection ``[V, D]``, without bias; ``forward(h)`` gives logits.

    ``forward(h, targets, ...)`` gives ``(loss, ce, z, logit_norm)``: the summed ``ce + z_loss_weight·z``
    over targets that are not ``ignore_index`` (the only output with a gradient), and per token (0 where
    ignored) the cross-entropy, ``logsumexp(logits)²`` and the L2 norm of the logits.
    """

    def __init__(self, dim: int, vocab_size: int, **kwargs):
        super().__init__(dim, vocab_size, bias=False, **kwargs)

    def effective_weight(self) -> torch.Tensor:
        """The ``[V, D]`` matrix the head applies."""
        return self.weight

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None, *, chunk_size: int = 2048,
                z_loss_weight: float = 0.0, ignore_index: int = -100):
        w = self.effective_weight()
        if targets is None:
            return F.linear(h, w)
        return head_loss(h, w, targets, chunk_size=chunk_size, z_loss_weight=z_loss_weight,
                         ignore_index=ignore_index)


def head_loss(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, *, chunk_size: int = 2048,
              z_loss_weight: float = 0.0, ignore_index: int = -100):
    """``(loss, ce, z, logit_norm)`` of the head ``w`` ``[V, D]`` on hidden states ``h`` ``[..., D]``
    (see :class:`OutputHead`); gradients are computed for whichever of ``h`` and ``w`` need them."""
    h_ND = h.reshape(-1, h.shape[-1])
    grad = torch.is_grad_enabled()
    return _FusedHeadLoss.apply(h_ND, w, targets.reshape(-1), float(z_loss_weight), int(chunk_size),
                                int(ignore_index), grad and h_ND.requires_grad, grad and w.requires_grad)


@dataclass
class LossSums:
    """Sums over valid target tokens; divide by the counts to get means.

    ``loss`` (``ce + z_loss_weight · z``, summed) is the only tensor with a gradient; the others are
    for logging (``logit_norm``: the summed L2 norms of the targets' logit vectors).
    """

    loss: torch.Tensor
    ce: torch.Tensor
    z: torch.Tensor
    n: torch.Tensor
    ce_text: torch.Tensor
    n_text: torch.Tensor
    ce_image: torch.Tensor
    n_image: torch.Tensor
    logit_norm: torch.Tensor


def modality_sums(head_out: tuple[torch.Tensor, ...], targets_BT: torch.Tensor,
                  image_mask_BT: torch.Tensor | None = None, ignore_index: int = -100) -> LossSums:
    """:class:`LossSums` from what the head's loss returns (``OutputHead.forward`` with targets, or
    ``Chameleon.forward`` with ``targets``): the per-token values summed by modality."""
    loss, ce, z, logit_norm = head_out
    t = targets_BT.reshape(-1)
    valid = t != ignore_index
    image = valid & (image_mask_BT.reshape(-1) if image_mask_BT is not None else torch.zeros_like(valid))
    text = valid & ~image
    return LossSums(
        loss=loss, ce=ce.sum(), z=z.sum(), n=valid.sum(),
        ce_text=ce[text].sum(), n_text=text.sum(), ce_image=ce[image].sum(), n_image=image.sum(),
        logit_norm=logit_norm.sum(),
    )
