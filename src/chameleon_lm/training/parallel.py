"""Everything distributed, applied to a single-device model from outside, in one place.

``init_distributed`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, set for one
machine or several) and starts the process group: NCCL for CUDA tensors with gloo beside it for CPU
collectives, gloo alone on CPU. ``parallelize`` then applies, in torchtitan's order and before any
optimizer exists: activation checkpointing of each block (the composable ``checkpoint``, which keeps
parameter names), per-block ``torch.compile``, and FSDP2 (``fully_shard`` of each block, of the output head,
then of the root; bf16 parameters with fp32 gradient reduction when bf16 is on). Gradients are summed,
not averaged, over ranks: the loss is already divided by the step's global count of target tokens.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size and device (``mesh`` None when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object | None = None

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this process's CUDA device when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun job this process belongs to (a single process when ``WORLD_SIZE`` is unset or 1).

    Calling it again returns the same answer without starting a second group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world == 1 and not dist.is_initialized():
        return DistInfo(device=dev)
    from torch.distributed.device_mesh import init_device_mesh

    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "cuda:nccl,cpu:gloo" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    # An explicit CPU mesh: with a gloo group on a machine with GPUs, FSDP2 would otherwise pick CUDA.
    mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, mesh=mesh)


def parallelize(model: nn.Module, info: DistInfo, *, activation_checkpointing: bool = False,
                compile: bool = False, param_dtype: torch.dtype | None = None) -> nn.Module:
    """AC → compile → FSDP2 on ``model`` (a ``Chameleon``), in place; returns it.

    Args:
        model: The model, on CPU or ``meta`` (then call ``model.to_empty`` and initialise it after).
        info: From :func:`init_distributed`; without a mesh only AC and compile are applied.
        activation_checkpointing: Recompute each block's activations in the backward.
        compile: ``torch.compile`` each block (one graph shared by all).
        param_dtype: FSDP2's compute dtype of the parameters (e.g. bf16); gradients are reduced in fp32.
    """
    if activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for block in model.layers:
            checkpoint(block)
    if compile:
        for block in model.layers:
            block.compile()
    if not info.distributed:
        return model.to(info.device) if not on_meta(model) else model
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=info.mesh, mp_policy=mp)
    # The root (embeddings, final norm) is gathered by ``model.forward``, which training calls.
    # The head is used once per step, right at the end: no point resharding it before its backward.
    fully_shard(model.output, mesh=info.mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mesh=info.mesh, mp_policy=mp)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            if info.device.type == "cpu":  # gloo has no PREMUL_SUM: plain sums, scaled apart
                module.set_force_sum_reduction_for_comms(True)
    return model


def on_meta(model: nn.Module) -> bool:
    """Whether the model's parameters are still on the meta device (not materialised)."""
    return any(p.is_meta for p in model.parameters())


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``t`` over ranks (``t`` itself when not distributed)."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
