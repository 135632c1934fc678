"""Training metrics to disk: one JSON line per logged step, and the same numbers for TensorBoard.

Both trainers log through :class:`MetricsLogger`: a JSONL file in ``out_dir`` is the record that
scripts and tests read, ``out_dir/tensorboard/`` the one people look at
(``tensorboard --logdir out_dir/tensorboard``).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends metrics to ``out_dir/<name>_log.jsonl`` and writes them as TensorBoard scalars.

    Every finite real number of a record (not ``step``, not booleans) becomes the scalar
    ``<name>/<key>`` at that step; strings, NaNs and infinities go to the JSON line only.

    Args:
        out_dir: The run's folder (created if needed).
        name: Prefix of the log file and of the TensorBoard tags.
        filename: The JSONL file's name, instead of ``<name>_log.jsonl``.
        purge_step: When a run resumes at step ``k``, pass ``k + 1``: JSON lines and TensorBoard
            events of steps ``>= purge_step`` (written after the checkpoint by the run that was
            interrupted) are dropped, so the log reads as one uninterrupted run. ``0`` starts the
            log afresh; ``None`` keeps everything and appends.
    """

    def __init__(self, out_dir: str | os.PathLike, name: str = "train",
                 purge_step: int | None = None, filename: str | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # deferred: importing tensorboard is slow

        self.out_dir, self.name = Path(out_dir), name
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / (filename or f"{name}_log.jsonl")
        if purge_step is not None and self.path.exists():
            _drop_records_from(self.path, purge_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Write one record: ``{"step": step, **metrics}`` as a JSON line, its numbers as scalars."""
        record = {"step": step, **{k: v for k, v in metrics.items() if k != "step"}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a killed run keeps every line it logged
        for key, value in record.items():
            if (key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool)
                    and math.isfinite(value)):
                self._writer.add_scalar(f"{self.name}/{key}", float(value), step)

    def close(self) -> None:
        """Flush and close the JSONL file and the TensorBoard writer (idempotent)."""
        if not self._file.closed:
            self._file.close()
            self._writer.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drop_records_from(path: Path, purge_step: int) -> None:
    """Rewrite a JSONL log without its records of steps ``>= purge_step`` (atomically)."""
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                step = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):
                continue  # a line cut short by a kill, or not a record
            if isinstance(step, int) and step < purge_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)
