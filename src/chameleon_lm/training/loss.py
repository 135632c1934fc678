"""Language-model loss: cross-entropy + z-loss, computed in chunks from the final hidden states.

The output head is applied one chunk of tokens at a time under activation checkpointing, so a
65,536-word vocabulary never materialises ``[tokens, V]`` fp32 logits for the whole batch: only one
chunk's logits exist at a time, in the forward and again in the backward.

Reductions follow torchtitan: the per-token losses are *summed* and the caller divides by the number of
valid target tokens of the whole optimizer step (so gradient accumulation and data parallelism give the
same gradient as one big batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from chameleon_lm.data.tokens import IGNORE_INDEX


@dataclass
class LossSums:
    """Sums over valid target tokens; divide by the counts to get means."""

    ce: torch.Tensor
    z: torch.Tensor
    n: torch.Tensor
    ce_text: torch.Tensor
    n_text: torch.Tensor
    ce_image: torch.Tensor
    n_image: torch.Tensor

    def total(self, z_loss_weight: float) -> torch.Tensor:
        """``ce + z_loss_weight · z`` (summed): the quantity to back-propagate after normalising."""
        return self.ce + z_loss_weight * self.z


def _chunk_losses(
    h_ND: torch.Tensor, w_VD: torch.Tensor, t_N: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = (h_ND @ w_VD.t()).float()  # [N, V], fp32 for the softmax
    lse = torch.logsumexp(logits, dim=-1)
    valid = t_N != IGNORE_INDEX
    target_logit = logits.gather(1, t_N.clamp(min=0)[:, None])[:, 0]
    ce = torch.where(valid, lse - target_logit, 0.0)
    z = torch.where(valid, lse.square(), 0.0)
    return ce, z


def lm_loss_sums(
    hidden_BTD: torch.Tensor,
    head_weight_VD: torch.Tensor,
    targets_BT: torch.Tensor,
    image_mask_BT: torch.Tensor | None = None,
    chunk_size: int = 2048,
) -> LossSums:
    """Summed CE and z-loss (``logsumexp(logits)²``) over targets that are not ``IGNORE_INDEX``.

    Args:
        hidden_BTD: final-normed hidden states (``Chameleon.hidden_states``).
        head_weight_VD: the output head's weight (``model.output.weight``).
        targets_BT: next-token targets, ``IGNORE_INDEX`` where no loss is wanted.
        image_mask_BT: True where the *target* is an image code, for the per-modality CE; other valid
            targets count as text (structural tokens such as ``<eoss>`` included).
        chunk_size: tokens per head application.
    """
    h = hidden_BTD.reshape(-1, hidden_BTD.shape[-1])
    t = targets_BT.reshape(-1)
    ce_parts, z_parts = [], []
    for s in range(0, t.numel(), chunk_size):
        h_c, t_c = h[s : s + chunk_size], t[s : s + chunk_size]
        if torch.is_grad_enabled() and (h_c.requires_grad or head_weight_VD.requires_grad):
            ce_c, z_c = checkpoint(_chunk_losses, h_c, head_weight_VD, t_c, use_reentrant=False)
        else:
            ce_c, z_c = _chunk_losses(h_c, head_weight_VD, t_c)
        ce_parts.append(ce_c)
        z_parts.append(z_c)
    ce, z = torch.cat(ce_parts), torch.cat(z_parts)
    valid = t != IGNORE_INDEX
    image = valid & (image_mask_BT.reshape(-1) if image_mask_BT is not None else torch.zeros_like(valid))
    text = valid & ~image
    return LossSums(
        ce=ce.sum(), z=z.sum(), n=valid.sum(),
        ce_text=ce[text].sum().detach(), n_text=text.sum(),
        ce_image=ce[image].sum().detach(), n_image=image.sum(),
    )
