"""Saving and restoring a training state: the one implementation both trainers use.

A checkpoint is a folder ``out_dir/checkpoints/step_NNNNNNN/`` holding the model files (written by
the caller: a model folder for :class:`~chameleon_lm.training.trainer.Trainer`, the tokenizer files
for VQGAN training) and two files written here:

* ``trainer.pt``: optimizer and scheduler state dicts, the torch RNG state (CPU, and CUDA when in
  use) and the states of named ``torch.Generator``\\ s; loadable with ``weights_only=True``;
* ``trainer_state.json``: ``{"step", "config", "extra"}``, ``extra`` being JSON the caller needs to
  continue exactly (e.g. where its data stream stands).

The language-model trainer saves through :func:`save_distributed` instead: model and optimizer go
through ``torch.distributed.checkpoint`` (one ``*.distcp`` file per rank, resharded on load, so a run
resumes at another world size), each rank's RNG states to ``rng/rank_NNNNN.pt``, and the rest (step,
schedule, data position, monitor, config) to ``trainer_state.json``.

A folder is complete iff ``trainer_state.json`` exists. Each file is written under a temporary name
and renamed into place, ``trainer_state.json`` last, and :func:`begin_checkpoint` removes a stale
one before anything is rewritten, so a save that is killed never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

STATE_NAME = "trainer_state.json"
TENSORS_NAME = "trainer.pt"
_STEP_DIR = re.compile(r"step_(\d+)")


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    """``out_dir/checkpoints/step_NNNNNNN``: where the checkpoint of ``step`` goes."""
    return Path(out_dir) / "checkpoints" / f"step_{step:07d}"


def begin_checkpoint(directory: str | os.PathLike) -> Path:
    """Create ``directory`` and mark it incomplete, before the caller writes model files into it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / STATE_NAME).unlink(missing_ok=True)
    return directory


def save_training_state(
    directory: str | os.PathLike,
    *,
    step: int,
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Mapping[str, Any] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    extra: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``trainer.pt`` and then ``trainer_state.json`` into ``directory``.

    Call it after the model files are written (and :func:`begin_checkpoint` before them): the
    folder only counts as a checkpoint once this returns.

    Args:
        directory: The checkpoint folder (created if needed).
        step: Optimizer steps taken.
        optimizers: Optimizers by name (names must match at :func:`load_training_state`).
        schedulers: LR schedulers (anything with ``state_dict``) by name.
        generators: ``torch.Generator``\\ s whose state must resume, by name.
        extra: JSON-able state of the caller (e.g. its data stream's position).
        config: The run's config as a JSON-able dict (recorded, not used to restore).

    Returns:
        ``directory``.

    Raises:
        TypeError: ``extra`` or ``config`` is not JSON-able (nothing is written then).
    """
    directory = Path(directory)
    state_json = json.dumps({"step": int(step), "config": dict(config or {}),
                             "extra": dict(extra or {})}, indent=2) + "\n"
    tensors: dict[str, Any] = {
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "schedulers": {name: s.state_dict() for name, s in (schedulers or {}).items()},
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    rng = rng_state()
    tensors["rng"] = rng["cpu"]
    if "cuda" in rng:
        tensors["cuda_rng"] = rng["cuda"]
    directory.mkdir(parents=True, exist_ok=True)
    _replace_with(directory / TENSORS_NAME, lambda f: torch.save(tensors, f))
    _replace_with(directory / STATE_NAME, lambda f: f.write(state_json.encode()))
    return directory


def read_state(directory: str | os.PathLike) -> dict[str, Any]:
    """``trainer_state.json`` of a complete checkpoint: ``{"step", "config", "extra"}``.

    Raises:
        FileNotFoundError: ``directory`` is not a complete checkpoint.
    """
    path = Path(directory) / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (not a complete training checkpoint)")
    return json.loads(path.read_text())


def load_training_state(
    directory: str | os.PathLike,
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Mapping[str, Any] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Restore what :func:`save_training_state` wrote, in place; the model is the caller's.

    Args:
        directory: A complete checkpoint folder.
        optimizers: The optimizers to restore, by the names they were saved under.
        schedulers: The schedulers to restore, likewise.
        generators: The generators to restore, likewise.

    Returns:
        ``(step, extra)``.

    Raises:
        FileNotFoundError: ``directory`` is not a complete checkpoint.
        KeyError: A named optimizer, scheduler or generator is not in the checkpoint.
    """
    directory = Path(directory)
    for name in (TENSORS_NAME, STATE_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name}: missing (not a complete training "
                                    "checkpoint)")
    state = read_state(directory)
    tensors = torch.load(directory / TENSORS_NAME, map_location="cpu", weights_only=True)
    if "optimizers" not in tensors:  # the single-optimizer layout of earlier Trainer checkpoints
        tensors = {"optimizers": {"optimizer": tensors["optimizer"]},
                   "schedulers": {"scheduler": tensors["scheduler"]},
                   "generators": {}, "rng": tensors["rng"]}
    for kind, targets in (("optimizers", optimizers), ("schedulers", schedulers or {}),
                          ("generators", generators or {})):
        missing = sorted(set(targets) - set(tensors[kind]))
        if missing:
            raise KeyError(f"{directory / TENSORS_NAME}: no {kind} named {missing} (saved: "
                           f"{sorted(tensors[kind])})")
    for name, opt in optimizers.items():
        opt.load_state_dict(tensors["optimizers"][name])  # moves the state to the params' device
    for name, scheduler in (schedulers or {}).items():
        scheduler.load_state_dict(tensors["schedulers"][name])
    for name, generator in (generators or {}).items():
        generator.set_state(tensors["generators"][name])
    set_rng_state({"cpu": tensors["rng"], **({"cuda": tensors["cuda_rng"]} if "cuda_rng" in tensors else {})})
    return int(state["step"]), dict(state.get("extra", {}))


RNG_DIR = "rng"


def rng_state() -> dict[str, Any]:
    """This process's torch RNG states: CPU, and every CUDA device once CUDA is in use."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_distributed(
    directory: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rank: int,
    world_size: int,
    step: int,
    state: Mapping[str, Any],
    write_model_files: Any = None,
    barrier: Any = lambda: None,
) -> Path:
    """Save a training checkpoint from every rank (call it on all of them at once).

    Args:
        directory: The checkpoint folder.
        model, optimizer: Plain or FSDP2-sharded; saved with DCP (each rank writes its shards).
        rank, world_size: This process's place.
        step: Optimizer steps taken.
        state: JSON-able state of the run (schedule, data position, config, …), written by rank 0.
        write_model_files: ``f(directory)`` run on rank 0 before the state file (config, tokenizers).
        barrier: Waits for every rank (the group's barrier).

    Returns:
        ``directory``, complete on every rank when this returns.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    directory = Path(directory)
    if rank == 0:
        begin_checkpoint(directory)
        (directory / RNG_DIR).mkdir(exist_ok=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=directory, no_dist=world_size == 1)
    _replace_with(directory / RNG_DIR / f"rank_{rank:05d}.pt", lambda f: torch.save(rng_state(), f))
    state_json = json.dumps({"step": int(step), "world_size": world_size, **dict(state)}, indent=2) + "\n"
    barrier()
    if rank == 0:
        if write_model_files is not None:
            write_model_files(directory)
        _replace_with(directory / STATE_NAME, lambda f: f.write(state_json.encode()))
    barrier()
    return directory


def load_distributed(
    directory: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rank: int,
    world_size: int,
) -> dict[str, Any]:
    """Restore model, optimizer and (at the same world size) this rank's RNG from
    :func:`save_distributed`'s folder, on every rank; returns its JSON state (``step``, …).

    At another world size the shards are redistributed by DCP and the RNG is left to the caller
    (``state["world_size"]`` tells), since the saved streams belong to other ranks.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    directory = Path(directory)
    state = read_state(directory)
    if not (directory / ".metadata").is_file():
        raise FileNotFoundError(f"{directory / '.metadata'}: missing (not a distributed training checkpoint)")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    loaded = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.load(loaded, checkpoint_id=directory, no_dist=world_size == 1)
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    rng = directory / RNG_DIR / f"rank_{rank:05d}.pt"
    if state.get("world_size") == world_size and rng.is_file():
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=True))
    return state


def prune_checkpoints(out_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints (and every incomplete one older than
    the newest complete one); returns what was deleted."""
    import shutil

    root = Path(out_dir) / "checkpoints"
    steps = sorted((int(m.group(1)), p) for p in root.glob("step_*")
                   if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir())
    complete = [(s, p) for s, p in steps if (p / STATE_NAME).is_file()]
    if keep < 1 or not complete:
        return []
    kept = {p for _, p in complete[-keep:]}
    newest = complete[-1][0]
    gone = [p for s, p in steps if p not in kept and s < newest]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint of the highest step in ``out_dir/checkpoints``, or ``None``."""
    found = [(int(m.group(1)), p.parent)
             for p in (Path(out_dir) / "checkpoints").glob(f"step_*/{STATE_NAME}")
             if (m := _STEP_DIR.fullmatch(p.parent.name))]
    return max(found)[1] if found else None


def _replace_with(path: Path, write: Any) -> None:
    """Write ``path`` through ``write(file)`` on a temporary name, then rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
