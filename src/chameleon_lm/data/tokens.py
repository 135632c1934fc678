"""Tokenized documents in one safetensors file, and deterministic batches drawn from them.

File layout (all flat, concatenated over documents)::

    ids        int32 [total]    token ids
    loss_mask  bool  [total]    token is a training target
    modality   int8  [total]    TEXT / IMAGE / SPECIAL
    offsets    int64 [n + 1]    document i is [offsets[i], offsets[i+1])

Batches are a pure function of ``(seed, step)``: every epoch is a seeded permutation of the documents,
so a resumed run sees exactly the batches the uninterrupted run would have seen. Optionally the
documents of each window of ``group`` consecutive batches are sorted by length before being cut into
batches (and the batches of the window shuffled again), so a batch holds documents of similar length
and padding stays small when short and long documents are mixed (Hugging Face's ``group_by_length``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from chameleon_lm.data.packing import IGNORE_INDEX
from chameleon_lm.documents import EncodedDocument
from chameleon_lm.tokenizers.vocab import IMAGE


@dataclass
class Batch:
    input_ids: torch.Tensor
    """``[B, T]`` long; right-padded with the pad id."""
    targets: torch.Tensor
    """``[B, T]`` long; the next token, or ``IGNORE_INDEX`` where there is no loss."""
    image_targets: torch.Tensor
    """``[B, T]`` bool; the target is an image code."""

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


@lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


class TokenDocuments:
    """A list of tokenized documents backed by flat tensors."""

    def __init__(self, ids: torch.Tensor, loss_mask: torch.Tensor, modality: torch.Tensor,
                 offsets: torch.Tensor):
        if not (ids.shape == loss_mask.shape == modality.shape) or ids.ndim != 1:
            raise ValueError("ids, loss_mask and modality must be flat tensors of one length")
        if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != ids.numel() or (offsets.diff() < 0).any():
            raise ValueError("offsets must rise from 0 to the number of tokens")
        self.ids, self.loss_mask, self.modality, self.offsets = ids, loss_mask, modality, offsets
        self._windows: dict[tuple, list[list[int]]] = {}

    @classmethod
    def from_encoded(cls, docs: list[EncodedDocument]) -> TokenDocuments:
        if not docs:
            raise ValueError("no documents")
        lengths = torch.tensor([len(d) for d in docs])
        return cls(
            torch.cat([d.ids for d in docs]).int(),
            torch.cat([d.loss_mask for d in docs]),
            torch.cat([d.modality for d in docs]),
            torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        )

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def __getitem__(self, i: int) -> EncodedDocument:
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        return EncodedDocument(self.ids[s:e].long(), self.modality[s:e], self.loss_mask[s:e])

    @property
    def num_tokens(self) -> int:
        return self.ids.numel()

    def save(self, path: str | os.PathLike) -> None:
        save_file({"ids": self.ids.int(), "loss_mask": self.loss_mask, "modality": self.modality,
                   "offsets": self.offsets}, str(path), metadata={"format": "chameleon-lm-tokens"})

    @classmethod
    def load(cls, path: str | os.PathLike) -> TokenDocuments:
        try:
            t = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a readable token file ({e})") from e
        missing = {"ids", "loss_mask", "modality", "offsets"} - set(t)
        if missing:
            raise ValueError(f"{path}: not a token file (missing {sorted(missing)})")
        return cls(t["ids"], t["loss_mask"], t["modality"], t["offsets"])

    # ------------------------------------------------------------------ batches

    def sample_indices(self, step: int, batch_size: int, seed: int, group: int = 0) -> list[int]:
        """Document indices of batch ``step``: consecutive slices of per-epoch seeded permutations.

        With ``group > 1``, the stream of documents is cut into windows of ``group * batch_size``
        and each window is sorted by length, cut into batches and the batches shuffled: every
        document is still seen once per epoch, batch ``step`` is still a pure function of the
        arguments, but a batch holds documents of similar length.
        """
        n = len(self)
        if group <= 1:
            out = []
            for k in range(step * batch_size, (step + 1) * batch_size):
                epoch, pos = divmod(k, n)
                out.append(_epoch_permutation(n, seed, epoch)[pos])
            return out
        window, offset = divmod(step, group)
        key = (batch_size, seed, group, window)
        if key not in self._windows:
            docs = [i for j in range(group) for i in self.sample_indices(window * group + j, batch_size, seed)]
            lengths = self.offsets.diff()
            docs.sort(key=lambda i: int(lengths[i]))  # stable: ties keep the permutation's order
            batches = [docs[s : s + batch_size] for s in range(0, len(docs), batch_size)]
            order = torch.randperm(group, generator=torch.Generator().manual_seed(
                (seed * 1_000_003 + window) * 31 + 17)).tolist()
            self._windows = {key: [batches[b] for b in order]}  # keep only the current window
        return list(self._windows[key][offset])

    def batch(self, indices: list[int], seq_len: int, pad_id: int) -> Batch:
        """Right-padded inputs and next-token targets; documents longer than ``seq_len + 1`` are cut."""
        docs = [self[i] for i in indices]
        T = min(seq_len, max(len(d) for d in docs) - 1)
        B = len(docs)
        input_ids = torch.full((B, T), pad_id, dtype=torch.long)
        targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        image_targets = torch.zeros(B, T, dtype=torch.bool)
        for b, d in enumerate(docs):
            n = min(len(d) - 1, T)
            input_ids[b, :n] = d.ids[:n]
            tgt = d.ids[1 : n + 1]
            targets[b, :n] = torch.where(d.loss_mask[1 : n + 1], tgt, IGNORE_INDEX)
            image_targets[b, :n] = d.modality[1 : n + 1] == IMAGE
        return Batch(input_ids, targets, image_targets)
