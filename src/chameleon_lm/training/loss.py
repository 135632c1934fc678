"""Language-model loss: cross-entropy + z-loss, computed in chunks from the final hidden states.

The work is done by the model's output head (:class:`chameleon_lm.model.head.OutputHead`), called as a
module so that FSDP2 sees the head's weight used and its gradient produced; this module sums what it
returns by modality.

Reductions follow torchtitan: the per-token losses are *summed* and the caller divides by the number of
valid target tokens of the whole optimizer step, over every micro-batch and rank (so gradient
accumulation and data parallelism give the same gradient as one big batch).
"""

from __future__ import annotations

import torch
from torch import nn

from chameleon_lm.data.packing import IGNORE_INDEX
from chameleon_lm.model.head import LossSums, OutputHead, head_loss, modality_sums


def lm_loss_sums(
    hidden_BTD: torch.Tensor,
    head: nn.Module | torch.Tensor,
    targets_BT: torch.Tensor,
    image_mask_BT: torch.Tensor | None = None,
    chunk_size: int = 2048,
    z_loss_weight: float = 0.0,
) -> LossSums:
    """Summed CE and z-loss (``logsumexp(logits)²``) over targets that are not ``IGNORE_INDEX``.

    Args:
        hidden_BTD: final-normed hidden states (``Chameleon.hidden_states``).
        head: the output head module (``model.output``, however it is wrapped), or a bare ``[V, D]``
            weight.
        targets_BT: next-token targets, ``IGNORE_INDEX`` where no loss is wanted.
        image_mask_BT: True where the *target* is an image code, for the per-modality CE; other valid
            targets count as text (structural tokens such as ``<eoss>`` included).
        chunk_size: tokens per head application.
        z_loss_weight: weight of the z-loss in ``LossSums.loss`` (the paper's 1e-5).
    """
    options = {"chunk_size": chunk_size, "z_loss_weight": z_loss_weight, "ignore_index": IGNORE_INDEX}
    out = (head_loss(hidden_BTD, head, targets_BT, **options) if isinstance(head, torch.Tensor)
           else head(hidden_BTD, targets_BT, **options))
    return modality_sums(out, targets_BT, image_mask_BT, IGNORE_INDEX)


__all__ = ["IGNORE_INDEX", "LossSums", "OutputHead", "lm_loss_sums", "modality_sums"]
