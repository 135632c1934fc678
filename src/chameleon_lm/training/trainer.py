"""Single-process training of a Chameleon model on tokenized documents, with exact resume.

The loop follows the paper's pre-training recipe by default: AdamW (β 0.9/0.95, ε 1e-5, weight decay
0.1 off norms/embeddings), linear warm-up then exponential decay, gradient clipping at 1.0, z-loss
1e-5·logsumexp², loss = summed CE over target tokens ÷ their count. Distribution (FSDP2), activation
checkpointing and compilation are applied to the model from outside; the seams are ``Trainer.model``
(wrap it before training) and the per-step token count (the global normaliser).

Checkpoints are model folders (``chameleon_lm.load_model`` reads them) plus the training state of
:mod:`chameleon_lm.training.checkpoint` (``trainer.pt``: optimizer, schedule and RNG state;
``trainer_state.json``: step, config, data state). Batches are a function of ``(seed, step)``, so a
resumed run continues the same loss curve. Metrics go to ``train_log.jsonl`` and TensorBoard
(:class:`~chameleon_lm.training.logger.MetricsLogger`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from chameleon_lm.checkpoints import save_model
from chameleon_lm.data.tokens import TokenDocuments
from chameleon_lm.model import Chameleon, ChameleonConfig
from chameleon_lm.tokenizers.image import ImageTokenizer
from chameleon_lm.tokenizers.text import TextTokenizer
from chameleon_lm.training.checkpoint import (
    STATE_NAME,
    TENSORS_NAME,
    begin_checkpoint,
    checkpoint_path,
    latest_checkpoint,  # noqa: F401  (re-exported: its home before checkpoint.py)
    load_training_state,
    save_training_state,
)
from chameleon_lm.training.logger import MetricsLogger
from chameleon_lm.training.loss import lm_loss_sums
from chameleon_lm.training.optim import build_adamw
from chameleon_lm.training.schedule import SCHEDULES
from chameleon_lm.utils.config import Config


@dataclass
class TrainConfig(Config):
    """A training run. Paper defaults where the paper gives one."""

    model: str = "tiny"
    """Model preset name (``ChameleonConfig.preset``)."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """Fields of the model config to change (e.g. ``{"n_layers": 4}``)."""
    data: str = ""
    """Token file written by ``TokenDocuments.save``."""
    tokenizers: str = ""
    """Folder with ``tokenizer.json`` (and ``vqgan.*``), bundled into every checkpoint."""
    out_dir: str = "runs/train"
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 4096
    group_by_length: int = 0
    """Sort the documents of each window of this many batches by length before batching, so short
    and long documents do not share (padded) batches; 0 or 1: plain shuffled batches."""
    lr: float = 1e-4
    warmup_steps: int = 4000
    schedule: str = "exp"
    """``exp`` (linear warm-up, exponential decay) or ``cosine``."""
    final_lr_ratio: float = 0.01
    """LR at the last step as a fraction of the peak."""
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-5
    grad_clip: float = 1.0
    z_loss: float = 1e-5
    loss_chunk: int = 2048
    """Tokens per chunk of the output head + loss."""
    precision: str = "auto"
    """``auto`` (bf16 autocast where the hardware has bf16 matrix units), ``bf16`` or ``fp32``."""
    device: str = "auto"
    seed: int = 0
    compile: bool = False
    """``torch.compile`` each transformer block (``compile_blocks``): fuses the norms, RoPE and SwiGLU
    around the matmuls. Pays off on big models and GPUs; on the ``small`` preset on 2 CPU cores it cut
    the trunk's forward + backward by ~12 % after ~20 s of compilation (bench/RESULTS.md), and it did
    not speed up the quickstart's model at all."""
    log_every: int = 10
    ckpt_every: int = 0
    """Save a checkpoint every N steps (0: only at the end)."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        for name in ("steps", "batch_size", "seq_len", "loss_chunk", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    def model_config(self, vocab_size: int | None = None) -> ChameleonConfig:
        overrides = dict(self.model_overrides)
        if vocab_size is not None:
            overrides.setdefault("vocab_size", vocab_size)
        return ChameleonConfig.preset(self.model, **overrides)


@TrainConfig.register_preset("tiny")
def _tiny() -> TrainConfig:
    return TrainConfig(model="tiny", steps=200, batch_size=8, seq_len=256, lr=1e-3, warmup_steps=20)


@TrainConfig.register_preset("7b")
def _7b() -> TrainConfig:
    return TrainConfig(model="7b", steps=500_000, batch_size=4, seq_len=4096, lr=1e-4,
                       warmup_steps=4000, model_overrides={"dropout": 0.1})


@TrainConfig.register_preset("30b")
def _30b() -> TrainConfig:
    return TrainConfig(model="30b", steps=500_000, batch_size=4, seq_len=4096, lr=1e-4,
                       warmup_steps=4000)



def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 matrix maths is fast here (CUDA with bf16, or a CPU with AMX/AVX512-BF16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def compile_blocks(model: Chameleon) -> None:
    """``torch.compile`` every transformer block in place, as torchtitan does: parameter names, hence
    checkpoints, are unchanged, and the blocks share one compiled graph. Sequence lengths that vary
    between batches compile a dynamic-shape graph after the first change (dynamo's default)."""
    for block in model.layers:
        block.compile()


class Trainer:
    """Owns the optimizer, schedule and step counter of one model."""

    def __init__(
        self,
        config: TrainConfig,
        model: Chameleon,
        data: TokenDocuments,
        pad_id: int,
        text_tokenizer: TextTokenizer | None = None,
        image_tokenizer: ImageTokenizer | None = None,
    ):
        self.config = config
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        if config.compile:
            compile_blocks(self.model)
        self.data, self.pad_id = data, pad_id
        self.text_tokenizer, self.image_tokenizer = text_tokenizer, image_tokenizer
        use_bf16 = config.precision == "bf16" or (
            config.precision == "auto" and bf16_supported(self.device))
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.optimizer = build_adamw(model, config.lr, config.weight_decay, config.betas, config.eps)
        schedule = SCHEDULES[config.schedule]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: schedule(s, config.warmup_steps, config.steps, config.final_lr_ratio),
        )
        self.step = 0
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ one step

    def train_step(self) -> dict[str, float]:
        cfg = self.config
        self.model.train()
        idx = self.data.sample_indices(self.step, cfg.batch_size, cfg.seed, cfg.group_by_length)
        batch = self.data.batch(idx, cfg.seq_len, self.pad_id)
        ids, targets = batch.input_ids.to(self.device), batch.targets.to(self.device)
        image_targets = batch.image_targets.to(self.device)
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            hidden = self.model.hidden_states(ids)
            sums = lm_loss_sums(hidden, self.model.output.weight, targets, image_targets,
                                chunk_size=cfg.loss_chunk, z_loss_weight=cfg.z_loss)
        n = sums.n.clamp(min=1)
        loss = sums.loss / n
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        dt = time.perf_counter() - t0
        metrics = {
            "step": self.step, "loss": loss.item(), "ce": (sums.ce / n).item(),
            "z_loss": (sums.z / n).item(),
            "ce_text": (sums.ce_text / sums.n_text).item() if sums.n_text else math.nan,
            "ce_image": (sums.ce_image / sums.n_image).item() if sums.n_image else math.nan,
            "grad_norm": grad_norm.item(), "lr": lr, "tokens": int(sums.n),
            "tokens_per_s": int((ids != self.pad_id).sum()) / dt,
        }
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"non-finite loss at step {self.step}: {metrics}")
        self.history.append(metrics)
        return metrics

    def fit(
        self, steps: int | None = None, progress: bool = True,
        log: Callable[[str], None] | None = print,
    ) -> list[dict[str, float]]:
        """Train up to ``steps`` (default: the config's), logging and checkpointing as configured."""
        cfg = self.config
        end = steps if steps is not None else cfg.steps
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=end, initial=self.step, disable=not progress, desc="train", unit="step")
        # Past step 0, lines of later steps are from a run that died after this checkpoint.
        purge = self.step + 1 if self.step else None
        with MetricsLogger(out, "train", purge_step=purge) as logger:
            while self.step < end:
                m = self.train_step()
                logger.log(self.step, m)
                bar.update(1)
                bar.set_postfix(loss=f"{m['ce']:.3f}", img=f"{m['ce_image']:.3f}",
                                txt=f"{m['ce_text']:.3f}")
                if log and (self.step % cfg.log_every == 0 or self.step == end):
                    log(f"step {self.step}: ce {m['ce']:.4f} (text {m['ce_text']:.4f}, image "
                        f"{m['ce_image']:.4f}) z {m['z_loss']:.2f} grad {m['grad_norm']:.3f} "
                        f"lr {m['lr']:.2e} {m['tokens_per_s']:.0f} tok/s")
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                    self.save_checkpoint()
        bar.close()
        return self.history

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_dir(self, step: int | None = None) -> Path:
        return checkpoint_path(self.config.out_dir, self.step if step is None else step)

    def data_state(self) -> dict[str, Any]:
        """JSON-able position of the data stream, saved in checkpoints (batches are a function of
        ``(seed, step)`` today, so there is nothing to save)."""
        return {}

    def load_data_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`data_state` returned (nothing to restore today)."""

    def save_checkpoint(self, directory: str | os.PathLike | None = None) -> Path:
        """A model folder (loadable by ``load_model`` when tokenizers are known) + training state."""
        directory = begin_checkpoint(directory if directory is not None else self.checkpoint_dir())
        save_model(directory, self.model, self.text_tokenizer, self.image_tokenizer)
        return save_training_state(
            directory, step=self.step, optimizers={"optimizer": self.optimizer},
            schedulers={"scheduler": self.scheduler}, extra={"data": self.data_state()},
            config=self.config.to_dict())

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        """Restore weights, optimizer, schedule, RNG, data state and step from
        :meth:`save_checkpoint`'s folder."""
        directory = Path(directory)
        for name in ("model.safetensors", TENSORS_NAME, STATE_NAME):  # before anything changes
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name}: missing (not a complete training "
                                        "checkpoint)")
        self.model.load_state_dict(load_file(directory / "model.safetensors", device=str(self.device)))
        self.step, extra = load_training_state(directory, {"optimizer": self.optimizer},
                                               {"scheduler": self.scheduler})
        self.load_data_state(extra.get("data", {}))
