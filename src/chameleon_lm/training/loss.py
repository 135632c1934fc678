"""Language-model loss: cross-entropy + z-loss, computed in chunks from the final hidden states.

The output head is applied one chunk of tokens at a time, so a 65,536-word vocabulary never
materialises ``[tokens, V]`` fp32 logits for the whole batch. When gradients are wanted, each chunk's
gradient is computed in the forward pass, right after its loss (``softmax·(1 + 2·w_z·lse) − one-hot``
for ``ce + w_z·lse²``), and kept as the gradients of the hidden states and of the head weight: no
logits are kept or recomputed, so the head costs the minimum 6·N·V·D FLOPs (forward, input gradient,
weight gradient) and one chunk of memory.

Reductions follow torchtitan: the per-token losses are *summed* and the caller divides by the number of
valid target tokens of the whole optimizer step (so gradient accumulation and data parallelism give the
same gradient as one big batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chameleon_lm.data.packing import IGNORE_INDEX


@dataclass
class LossSums:
    """Sums over valid target tokens; divide by the counts to get means.

    ``loss`` (``ce + z_loss_weight · z``, summed) is the only tensor with a gradient; the others are
    for logging.
    """

    loss: torch.Tensor
    ce: torch.Tensor
    z: torch.Tensor
    n: torch.Tensor
    ce_text: torch.Tensor
    n_text: torch.Tensor
    ce_image: torch.Tensor
    n_image: torch.Tensor


class _FusedHeadLoss(torch.autograd.Function):
    """``sum(ce + w_z·lse²)`` over valid targets of ``h @ w.T``, with gradients computed in the forward."""

    @staticmethod
    def forward(ctx, h_ND, w_VD, t_N, z_weight: float, chunk_size: int, need_h: bool, need_w: bool):
        grad_h = torch.zeros_like(h_ND) if need_h else None
        grad_w = torch.zeros_like(w_VD, dtype=torch.float32) if need_w else None
        ce = torch.zeros(t_N.numel(), dtype=torch.float32, device=h_ND.device)
        z = torch.zeros_like(ce)
        for s in range(0, t_N.numel(), chunk_size):
            h, t = h_ND[s : s + chunk_size], t_N[s : s + chunk_size]
            logits = (h @ w_VD.t()).float()  # [n, V], fp32 for the softmax
            valid = t != IGNORE_INDEX
            safe_t = t.clamp(min=0)[:, None]
            target = logits.gather(1, safe_t)[:, 0]
            # logsumexp by hand, in place: torch.logsumexp allocates a second [n, V] temporary, and
            # on CPU its page faults cost more than the head's matmul (profiled: 1.9 s of a 9.5 s step).
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
        ctx.mark_non_differentiable(ce, z)
        return (ce + z_weight * z).sum(), ce, z

    @staticmethod
    def backward(ctx, g_loss, _g_ce, _g_z):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * g_loss.to(grad_h.dtype),
                None if grad_w is None else (grad_w * g_loss).to(ctx.w_dtype),
                None, None, None, None, None)


def lm_loss_sums(
    hidden_BTD: torch.Tensor,
    head_weight_VD: torch.Tensor,
    targets_BT: torch.Tensor,
    image_mask_BT: torch.Tensor | None = None,
    chunk_size: int = 2048,
    z_loss_weight: float = 0.0,
) -> LossSums:
    """Summed CE and z-loss (``logsumexp(logits)²``) over targets that are not ``IGNORE_INDEX``.

    Args:
        hidden_BTD: final-normed hidden states (``Chameleon.hidden_states``).
        head_weight_VD: the output head's weight (``model.output.weight``).
        targets_BT: next-token targets, ``IGNORE_INDEX`` where no loss is wanted.
        image_mask_BT: True where the *target* is an image code, for the per-modality CE; other valid
            targets count as text (structural tokens such as ``<eoss>`` included).
        chunk_size: tokens per head application.
        z_loss_weight: weight of the z-loss in ``LossSums.loss`` (the paper's 1e-5).
    """
    h = hidden_BTD.reshape(-1, hidden_BTD.shape[-1])
    t = targets_BT.reshape(-1)
    grad = torch.is_grad_enabled()
    loss, ce, z = _FusedHeadLoss.apply(h, head_weight_VD, t, float(z_loss_weight), chunk_size,
                                       grad and h.requires_grad, grad and head_weight_VD.requires_grad)
    valid = t != IGNORE_INDEX
    image = valid & (image_mask_BT.reshape(-1) if image_mask_BT is not None else torch.zeros_like(valid))
    text = valid & ~image
    return LossSums(
        loss=loss, ce=ce.sum(), z=z.sum(), n=valid.sum(),
        ce_text=ce[text].sum(), n_text=text.sum(), ce_image=ce[image].sum(), n_image=image.sum(),
    )
