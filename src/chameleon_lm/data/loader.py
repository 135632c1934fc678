"""Training and validation batches: a mixture's document stream through the packer."""

from __future__ import annotations

from chameleon_lm.data.mixture import DocumentStream, MixtureConfig
from chameleon_lm.data.packing import MODES, Batch, Packer
from chameleon_lm.data.shards import TokenDataset


def _check_positive(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_pad(pad_id: object, vocab_size: int, where: str) -> None:
    # Pad slots are fed to the embedding, so the pad id must be a real row of it.
    if isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < vocab_size:
        raise ValueError(f"pad_id must be an id of the vocabulary of {where} (0 .. {vocab_size - 1}), "
                         f"got {pad_id!r}")


class TrainLoader:
    """Mixture -> packed (or padded) batches; state_dict for exact resume.

    Batches are a function of ``(seed, step)`` given the same sequence of calls, and a loader that loads
    another's ``state_dict`` gives the batches the other would have given next.

    Args:
        mixture: The token datasets and their weights in stages.
        seq_len: (input, target) pairs per row.
        batch_size: Rows per batch.
        pad_id: Input id of pad slots.
        seed: Seed of the document stream.
        mode: ``"packed"`` (rows filled with consecutive documents) or ``"padded"`` (one a row).
        rank, world_size: This data-parallel rank's share: rows ``rank·b … (rank+1)·b`` of every batch,
            ``b = batch_size / world_size``. Every rank follows the whole stream (document lengths only)
            but reads the tokens of its own rows alone, so the batches, and the state, do not depend on
            the number of ranks.
    """

    def __init__(self, mixture: MixtureConfig, *, seq_len: int, batch_size: int, pad_id: int, seed: int,
                 mode: str = "packed", rank: int = 0, world_size: int = 1):
        _check_positive(batch_size, "batch_size")
        _check_positive(world_size, "world_size")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} (rows per step, all ranks) must be a multiple of "
                             f"the number of ranks {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        share = batch_size // world_size
        self.rows = slice(rank * share, (rank + 1) * share)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.stream = DocumentStream(mixture, seed)
        _check_pad(pad_id, self.stream.vocab_size, "the mixture")
        self.packer = Packer(seq_len, pad_id, mode)
        self.batch_size = batch_size
        self._settings = {"seq_len": seq_len, "batch_size": batch_size, "pad_id": pad_id, "mode": mode}

    def next_batch(self, step: int) -> Batch:
        """This rank's rows of the batch of training step ``step`` (documents drawn with that step's
        weights)."""
        return self.packer.next_batch(self.batch_size, lambda: self.stream.next(step), self.rows)

    def state_dict(self) -> dict:
        """JSON-able: the stream's position, the packer's unfinished document and the loader's settings."""
        return {"settings": dict(self._settings), "stream": self.stream.state_dict(),
                "packer": self.packer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``; refused (nothing changed) if it belongs to another loader."""
        if not isinstance(state, dict) or set(state) != {"settings", "stream", "packer"}:
            raise ValueError("not a TrainLoader state (expected the keys 'settings', 'stream', "
                             f"'packer'): {state!r}")
        if state["settings"] != self._settings:
            raise ValueError(f"the loader state was saved with {state['settings']!r}, this loader has "
                             f"{self._settings}: it would not continue with the same batches")
        before = self.stream.state_dict()
        self.stream.load_state_dict(state["stream"])
        try:
            self.packer.load_state_dict(state["packer"], self.stream.fetch)
        except Exception:
            self.stream.load_state_dict(before)
            raise


def validation_batches(dataset: TokenDataset, *, seq_len: int, batch_size: int, pad_id: int,
                       max_batches: int) -> list[Batch]:
    """The first documents of a held-out dataset in order, packed: the same batches at every evaluation.

    Args:
        dataset: The held-out token dataset.
        seq_len: (input, target) pairs per row.
        batch_size: Rows per batch.
        pad_id: Input id of pad slots.
        max_batches: At most this many batches (fewer when the dataset runs out; the last may be short).
    """
    _check_positive(batch_size, "batch_size")
    _check_positive(max_batches, "max_batches")
    _check_pad(pad_id, dataset.vocab_size, str(dataset.path))
    if len(dataset) == 0:
        raise ValueError(f"validation dataset {dataset.path}: no documents")
    packer = Packer(seq_len, pad_id, "packed")
    docs = ((i, dataset[i]) for i in range(len(dataset)))
    batches: list[Batch] = []
    while len(batches) < max_batches:
        try:
            batches.append(packer.next_batch(batch_size, lambda: next(docs)))
        except StopIteration:
            break
    if not batches:
        raise ValueError(f"validation dataset {dataset.path}: no document has 2 or more tokens")
    return batches
