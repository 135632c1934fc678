"""Documents into training rows of ``seq_len`` (input, target) pairs: packed, or one document a row.

A document of L tokens gives L-1 pairs: inputs ``ids[:-1]``, targets ``ids[1:]`` (``IGNORE_INDEX`` where
the loss mask is off). No pair is ever dropped: a document that does not fit the rest of a row continues
on the next row (the *carry*), and ``Packer.state_dict`` records the carry as the document's handle and
how far it was consumed, so a resumed run continues it exactly.

- ``"packed"``: rows are filled completely, one document after another. ``doc_ids`` (0, 1, … within a row)
  and ``positions`` (the token's index in its document) make the model attend within documents only.
- ``"padded"``: one piece of one document a row, right-padded to the batch's longest row.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from chameleon_lm.documents import EncodedDocument
from chameleon_lm.tokenizers.vocab import IMAGE

IGNORE_INDEX = -100

MODES = ("packed", "padded")


@dataclass
class Batch:
    input_ids: torch.Tensor
    """``[B, T]`` long; ``pad_id`` in pad slots."""
    targets: torch.Tensor
    """``[B, T]`` long; the next token, or ``IGNORE_INDEX`` where there is no loss."""
    image_targets: torch.Tensor
    """``[B, T]`` bool; the target is an image code."""
    positions: torch.Tensor
    """``[B, T]`` long; the index of the input token in its document (pad slots count on)."""
    doc_ids: torch.Tensor | None
    """``[B, T]`` int32 for packed rows: 0, 1, … per document within a row, -1 in pad slots. None for
    padded rows (one document piece a row, plain causal attention)."""
    lengths: torch.Tensor
    """``[B]`` long; slots at the start of each row holding document tokens (the rest is padding)."""

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    @property
    def num_pad(self) -> int:
        """Slots holding no document token."""
        return self.input_ids.numel() - int(self.lengths.sum())


class _DocPairs:
    """The (input, target) pairs of one document, and the handle it was fetched with.

    Token arrays are sliced only for the rows that are built (:meth:`pairs`), so a rank that takes a
    share of a batch reads only its share of memory-mapped shards.
    """

    def __init__(self, ref: Any, doc: EncodedDocument):
        if not isinstance(doc, EncodedDocument):
            raise TypeError(f"document {ref!r}: expected an EncodedDocument, got {type(doc).__name__}")
        ids, modality, loss_mask = doc.ids, doc.modality, doc.loss_mask
        same_length = ids.shape == modality.shape == loss_mask.shape
        if ids.ndim != 1 or ids.is_floating_point() or not same_length:
            raise ValueError(f"document {ref!r}: ids, modality and loss_mask must be flat and of one "
                             f"length, got {tuple(ids.shape)}, {tuple(modality.shape)}, "
                             f"{tuple(loss_mask.shape)}")
        self.ref, self.doc = ref, doc

    def __len__(self) -> int:
        return max(self.doc.ids.numel() - 1, 0)

    def pairs(self, s: int, e: int) -> tuple[torch.Tensor, ...]:
        """Inputs, targets, image targets and positions of pairs ``s:e``."""
        d = self.doc
        ids = d.ids[s : e + 1].long()
        targets = torch.where(d.loss_mask[s + 1 : e + 1].bool(), ids[1:], IGNORE_INDEX)
        return ids[:-1], targets, d.modality[s + 1 : e + 1] == IMAGE, torch.arange(s, e)


class Packer:
    """Documents -> rows of exactly ``seq_len`` (input, target) pairs (``"padded"``: at most ``seq_len``).

    Args:
        seq_len: pairs per row.
        pad_id: input id of pad slots.
        mode: ``"packed"`` (several documents a row, always full) or ``"padded"`` (one a row).
    """

    def __init__(self, seq_len: int, pad_id: int, mode: str = "packed"):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.seq_len, self.pad_id, self.mode = seq_len, int(pad_id), mode
        self._carry: _DocPairs | None = None  # the document whose pairs come next, if begun
        self._offset = 0  # its pairs already in rows

    def next_batch(
        self, batch_size: int, next_doc: Callable[[], tuple[Any, EncodedDocument]],
        rows: slice | None = None,
    ) -> Batch:
        """The next ``batch_size`` rows (of which ``rows`` are built and returned: a data-parallel rank's
        share; the state advances by all of them).

        Args:
            batch_size: rows.
            next_doc: returns the next ``(ref, document)`` of the stream, ``ref`` a small JSON-able
                handle that ``load_state_dict``'s ``fetch`` resolves to the same document. Documents
                under 2 tokens are skipped. It may raise ``StopIteration`` at the end of the stream:
                the last batch then holds what is left (fewer rows; packed: its last row padded) and
                the next call raises ``StopIteration``.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        before = self._carry, self._offset
        try:
            if self.mode == "packed":
                return self._packed(batch_size, next_doc, rows or slice(None))
            return self._padded(batch_size, next_doc, rows or slice(None))
        except Exception:
            self._carry, self._offset = before  # a failed batch consumes nothing already fetched
            raise

    def state_dict(self) -> dict:
        """``{"carry": None | {"ref": ref, "offset": pairs of it already in rows}}``, JSON-able."""
        if self._carry is None:
            return {"carry": None}
        try:
            ref = json.loads(json.dumps(self._carry.ref))  # what a saved and reloaded state holds
        except (TypeError, ValueError) as e:
            raise ValueError(f"document ref {self._carry.ref!r} is not JSON-able: {e}") from e
        return {"carry": {"ref": ref, "offset": self._offset}}

    def load_state_dict(self, state: dict, fetch: Callable[[Any], EncodedDocument]) -> None:
        """Restore ``state_dict()``'s carry, fetching its document again with ``fetch(ref)``."""
        if not isinstance(state, dict) or set(state) != {"carry"}:
            raise ValueError(f"not a Packer state (expected the key 'carry'): {state!r}")
        carry = state["carry"]
        if carry is None:
            self._carry, self._offset = None, 0
            return
        if not isinstance(carry, dict) or set(carry) != {"ref", "offset"} or \
                not isinstance(carry["offset"], int):
            raise ValueError(f"not a Packer carry (expected 'ref' and an integer 'offset'): {carry!r}")
        doc = _DocPairs(carry["ref"], fetch(carry["ref"]))
        if not 0 <= carry["offset"] < len(doc):
            raise ValueError(f"carry offset {carry['offset']} is outside document {carry['ref']!r} "
                             f"({len(doc)} pairs): has the data changed since the state was saved?")
        self._carry, self._offset = doc, carry["offset"]

    # ------------------------------------------------------------------ rows

    def _next_piece(self, max_len: int, next_doc) -> tuple[_DocPairs, int, int] | None:
        """Up to ``max_len`` pairs of the current document, as ``(document, start, end)``; None at the
        end of the stream."""
        while self._carry is None:
            try:
                ref, doc = next_doc()
            except StopIteration:
                return None
            pairs = _DocPairs(ref, doc)
            if len(pairs):
                self._carry, self._offset = pairs, 0
        d, s = self._carry, self._offset
        e = min(s + max_len, len(d))
        self._carry, self._offset = (d, e) if e < len(d) else (None, 0)
        return d, s, e

    def _packed(self, batch_size: int, next_doc, rows: slice) -> Batch:
        T, need = self.seq_len, batch_size * self.seq_len
        pieces, n = [], 0
        while n < need and (piece := self._next_piece(need - n, next_doc)) is not None:
            pieces.append(piece)
            n += piece[2] - piece[1]
        if not pieces:
            raise StopIteration
        chosen = range(-(-n // T))[rows]
        lo, hi = chosen.start * T, min(chosen.stop * T, n)  # the slots of the chosen rows
        parts, at = [], 0
        for k, (d, s, e) in enumerate(pieces):  # only the pieces in [lo, hi) are read
            a, b = at, at + e - s
            at = b
            if b > lo and a < hi:
                parts.append((k, d.pairs(s + max(a, lo) - a, s + min(b, hi) - a)))
        R, real = len(chosen), max(hi - lo, 0)
        pad = R * T - real  # only at the end of the stream
        if not parts:
            parts = [(0, tuple(torch.zeros(0, dtype=t) for t in (torch.long, torch.long, torch.bool,
                                                               torch.long)))]
        ks, pairs = zip(*parts)
        inputs, targets, images, positions = zip(*pairs)
        # numpy: torch's repeat_interleave wakes the intra-op thread pool, ms per call on a busy CPU
        doc = torch.from_numpy(np.repeat(np.asarray(ks), [p.numel() for p in inputs]))
        doc_RT = torch.cat([doc, torch.full((pad,), -1)]).view(R, T)
        # Each row numbers its documents from 0; a row never starts with a pad slot.
        doc_ids = torch.where(doc_RT >= 0, doc_RT - doc_RT[:, :1], -1).int()
        cat = lambda parts, fill, dtype: torch.cat(  # noqa: E731
            [*parts, torch.full((pad,), fill, dtype=dtype)]).view(R, T)
        return Batch(
            input_ids=cat(inputs, self.pad_id, torch.long),
            targets=cat(targets, IGNORE_INDEX, torch.long),
            image_targets=cat(images, False, torch.bool),
            positions=torch.cat([*positions, torch.arange(pad)]).view(R, T),
            doc_ids=doc_ids,
            lengths=(real - torch.arange(R) * T).clamp(min=0, max=T),
        )

    def _padded(self, batch_size: int, next_doc, rows: slice) -> Batch:
        pieces = []
        while len(pieces) < batch_size:
            piece = self._next_piece(self.seq_len, next_doc)
            if piece is None:
                break
            pieces.append(piece)
        if not pieces:
            raise StopIteration
        chosen = [d.pairs(s, e) for d, s, e in pieces[rows]] or [
            (torch.zeros(0, dtype=torch.long),) * 2 + (torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long))]
        inputs, targets, images, positions = zip(*chosen)
        lengths = torch.tensor([p.numel() for p in inputs])
        starts = torch.stack([p[0] if p.numel() else torch.tensor(0) for p in positions])
        return Batch(
            input_ids=pad_sequence(inputs, batch_first=True, padding_value=self.pad_id),
            targets=pad_sequence(targets, batch_first=True, padding_value=IGNORE_INDEX),
            image_targets=pad_sequence(images, batch_first=True, padding_value=False),
            positions=starts[:, None] + torch.arange(int(lengths.max())),
            doc_ids=None,
            lengths=lengths,
        )
