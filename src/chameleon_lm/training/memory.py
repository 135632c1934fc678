"""GPU memory estimate of FSDP2 training, per device, and the ``chameleon memory`` command.

The set-up estimated is that of :mod:`chameleon_lm.training.parallel` (torchtitan's): ``fully_shard`` on
each transformer block, on the output head (not resharded after its forward) and on the root (which holds
the embedding), over ``gpus`` devices (full sharding, no replication), with
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``, fp32 master parameters and gradients,
AdamW (two fp32 moments), the chunked fused head loss of :mod:`chameleon_lm.model.head`, and optionally
activation checkpointing (AC) of every block. Not counted: the CUDA context, NCCL buffers and allocator
fragmentation (plan a few GiB per device on top).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from chameleon_lm.model.config import ChameleonConfig

GIB = 2**30
COLUMNS = {"params": "params", "grads": "grads", "optimizer": "AdamW", "gathered": "gathered",
           "grad_reduce": "grad reduce", "activations": "activations", "recompute": "recompute",
           "head_loss": "head loss", "total": "total"}


def estimate_memory(
    config: ChameleonConfig,
    *,
    gpus: int,
    micro_batch: int,
    seq_len: int,
    activation_checkpointing: bool,
    param_dtype: torch.dtype = torch.bfloat16,
    memory_efficient_attention: bool = True,
    loss_chunk: int = 2048,
) -> dict[str, float]:
    """Memory of one device, in GiB, per component and in total.

    - ``params``, ``grads``, ``optimizer``: fp32 master weights, gradients and AdamW's m and v, each
      sharded over ``gpus`` (16 bytes per parameter in all).
    - ``gathered``: parameters all-gathered in ``param_dtype``: the embedding and the head, which stay
      unsharded from their forward to their backward, and two blocks (the one running and the next one,
      prefetched).
    - ``grad_reduce``: the largest unit's unsharded gradient in ``param_dtype`` and its fp32 copy that is
      reduce-scattered.
    - ``activations``: what the forward keeps for the backward. Per layer, Korthikanti et al. 2022
      give ``s·b·h·(34 + 5·a·s/h)`` bytes for 2-byte activations; the ``5·a·s/h`` term is the
      ``s × s`` attention scores, which memory-efficient attention (SDPA's flash/efficient kernels,
      FlexAttention: what this model runs on CUDA) never stores, so by default a layer is ``34·s·b·h``.
      With AC only each block's input (``s·b·h`` elements) is kept.
    - ``recompute``: with AC, one block's full activations, rebuilt during its backward.
    - ``head_loss``: the fused head loss: one chunk of fp32 logits and its gradient in ``param_dtype``,
      the head weight's full fp32 gradient, and the final hidden states with their gradient.

    ``total`` adds to the always-present state and the kept activations the larger of ``head_loss``
    (alive from the end of the forward to the head's backward) and ``recompute + grad_reduce`` (alive
    during a block's backward).
    """
    if min(gpus, micro_batch, seq_len, loss_chunk) < 1:
        raise ValueError("gpus, micro_batch, seq_len and loss_chunk must be positive")
    itemsize = torch.empty((), dtype=param_dtype).element_size()
    n, vd = config.num_params(), config.vocab_size * config.dim
    block = (n - 2 * vd - config.dim) // config.n_layers
    largest = max(block, vd)
    s, b, h, a = seq_len, micro_batch, config.dim, config.n_heads
    per_layer = s * b * h * (34 + (0 if memory_efficient_attention else 5 * a * s / h)) * itemsize / 2
    if activation_checkpointing:
        activations, recompute = config.n_layers * s * b * h * itemsize, per_layer
    else:
        activations, recompute = config.n_layers * per_layer, 0.0
    chunk = min(loss_chunk, s * b)
    out = {
        "params": 4 * n / gpus,
        "grads": 4 * n / gpus,
        "optimizer": 8 * n / gpus,
        "gathered": 2 * (block + vd) * itemsize,
        "grad_reduce": largest * (itemsize + 4),
        "activations": activations,
        "recompute": recompute,
        "head_loss": chunk * config.vocab_size * (4 + itemsize) + 4 * vd + 2 * s * b * h * itemsize,
    }
    out["total"] = (sum(out[k] for k in ("params", "grads", "optimizer", "gathered", "activations"))
                    + max(out["head_loss"], out["recompute"] + out["grad_reduce"]))
    return {k: v / GIB for k, v in out.items()}


def memory_table(preset: str | ChameleonConfig, gpus_list: list[int] | tuple[int, ...], **kwargs) -> str:
    """A Markdown table of :func:`estimate_memory` (GiB per device), one row per GPU count; ``kwargs``
    are those of :func:`estimate_memory` (``micro_batch``, ``seq_len``, ``activation_checkpointing``…)."""
    config = ChameleonConfig.preset(preset) if isinstance(preset, str) else preset
    lines = ["| GPUs | " + " | ".join(COLUMNS.values()) + " |",
             "|---:|" + "---:|" * len(COLUMNS)]
    for gpus in gpus_list:
        est = estimate_memory(config, gpus=gpus, **kwargs)
        lines.append(f"| {gpus} | " + " | ".join(f"{est[k]:.2f}" for k in COLUMNS) + " |")
    return "\n".join(lines)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``memory``."""
    p = subparsers.add_parser(
        "memory", help="estimate per-GPU memory of FSDP2 training",
        description="GiB per device for fully sharded training (bf16 compute, fp32 master weights, "
                    "gradients and AdamW state), per component, for several GPU counts.",
    )
    p.add_argument("model", metavar="MODEL",
                   help=f"a preset ({', '.join(ChameleonConfig.preset_names())}), a config.json "
                        "or a model folder")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64, 128], metavar="N")
    p.add_argument("--micro-batch", type=int, default=1, metavar="B", help="rows per device and step")
    p.add_argument("--seq-len", type=int, default=4096, metavar="T")
    p.add_argument("--loss-chunk", type=int, default=2048, metavar="N", help="tokens per head chunk")
    p.add_argument("--no-ac", dest="ac", action="store_false", help="without activation checkpointing")
    p.add_argument("--no-flash", dest="flash", action="store_false",
                   help="count the s×s attention scores (an attention kernel that stores them)")
    p.set_defaults(func=_cmd_memory)


def _load_config(spec: str) -> ChameleonConfig:
    if spec in ChameleonConfig.preset_names():
        return ChameleonConfig.preset(spec)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: neither a preset ({', '.join(ChameleonConfig.preset_names())}) "
                                "nor a config file or model folder")
    return ChameleonConfig.load(path)


def _cmd_memory(args: argparse.Namespace) -> int:
    config = _load_config(args.model)
    print(f"{args.model}: {config.num_params() / 1e9:.2f}B parameters, micro-batch {args.micro_batch} × "
          f"{args.seq_len} tokens, activation checkpointing {'on' if args.ac else 'off'} (GiB per GPU)\n")
    print(memory_table(config, args.gpus, micro_batch=args.micro_batch, seq_len=args.seq_len,
                       activation_checkpointing=args.ac, memory_efficient_attention=args.flash,
                       loss_chunk=args.loss_chunk))
    return 0
