"""Training a Chameleon model on a mixture of token datasets: one process or many, with exact resume.

The loop follows the paper's pre-training recipe by default: AdamW (β 0.9/0.95, ε 1e-5, weight decay
0.1 off norms/embeddings), linear warm-up then exponential decay, gradient clipping at 1.0, z-loss
1e-5·logsumexp², loss = summed CE over target tokens ÷ their count over the whole step (every
micro-batch of every rank). Under ``torchrun`` each rank takes its rows of every batch
(:class:`~chameleon_lm.data.loader.TrainLoader`) and the model is sharded with FSDP2; activation
checkpointing, compilation and sharding are applied by :func:`chameleon_lm.training.parallel.parallelize`
before the optimizer is built.

Checkpoints (:func:`chameleon_lm.training.checkpoint.save_distributed`) hold the model and optimizer as a
DCP checkpoint (loadable at another world size, and by ``chameleon_lm.load_model``), every rank's RNG,
and the schedule, data position and spike-detector state: a resumed run continues the same loss curve.
Metrics (CE per modality, z-loss, logit and block-output norms, grad norm, tokens/s and MFU per
device), and validation CE on held-out token datasets, go to ``metrics.jsonl`` and TensorBoard.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from chameleon_lm.checkpoints import load_model, save_as, save_model
from chameleon_lm.data.loader import TrainLoader, validation_batches
from chameleon_lm.data.mixture import MixtureConfig, MixtureSource
from chameleon_lm.data.packing import IGNORE_INDEX, MODES, Batch
from chameleon_lm.data.shards import TokenDataset
from chameleon_lm.model import Chameleon, ChameleonConfig
from chameleon_lm.tokenizers.image import ImageTokenizer, load_image_tokenizer
from chameleon_lm.tokenizers.text import TextTokenizer, load_text_tokenizer
from chameleon_lm.training.adapters import AdapterConfig, apply_adapters, merge_adapters, trainable_parameters
from chameleon_lm.training.checkpoint import (
    checkpoint_path,
    latest_checkpoint,  # noqa: F401  (re-exported: its home before checkpoint.py)
    load_distributed,
    prune_checkpoints,
    save_distributed,
)
from chameleon_lm.training.logger import MetricsLogger
from chameleon_lm.training.loss import modality_sums
from chameleon_lm.training.monitor import SPIKE_POLICIES, BlockNorms, SpikeDetector, peak_flops
from chameleon_lm.training.optim import build_adamw
from chameleon_lm.training.parallel import (
    DistInfo,
    all_reduce_sum,
    barrier,
    init_distributed,
    on_meta,
    parallelize,
    resolve_device,
)
from chameleon_lm.training.schedule import SCHEDULES
from chameleon_lm.utils.config import Config

EXPORT_FORMATS = ("native", "hf", "meta")


@dataclass
class TrainConfig(Config):
    """A training run. Paper defaults where the paper gives one."""

    model: str = "tiny"
    """Model preset name (``ChameleonConfig.preset``)."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """Fields of the model config to change (e.g. ``{"n_layers": 4}``)."""
    data: MixtureConfig | str | None = None
    """The training mixture: token datasets (``chameleon data tokenize``) with weights and stages, or
    the path of one token dataset."""
    val: dict[str, str] = field(default_factory=dict)
    """Held-out token datasets by name: their CE (text and image apart) is logged every ``val_every``
    steps and at the end."""
    val_every: int = 0
    """Steps between validations (0: at the end only, when ``val`` names datasets)."""
    val_batches: int = 8
    """Batches of each held-out dataset per validation (the same ones every time)."""
    tokenizers: str = ""
    """Folder with ``tokenizer.json`` (and ``vqgan.*``), bundled into every checkpoint; default: the
    tokenizers of ``init_from``."""
    init_from: str = ""
    """Start from the weights (and architecture) of a model folder in any layout ``load_model``
    reads: ours, Hugging Face's or Meta's; ``model`` is then ignored and ``model_overrides`` may change
    non-shape fields such as ``dropout``."""
    out_dir: str = "runs/train"
    export_dir: str = ""
    """Also save the final model folder here (weights and tokenizers, no optimizer state)."""
    steps: int = 1000
    batch_size: int = 16
    """Rows per optimizer step, all ranks together (a multiple of the number of ranks)."""
    micro_batch_size: int = 0
    """Rows per forward pass on each rank; the rank's rows of a step are accumulated in micro-batches
    of this size (0: all of them at once)."""
    seq_len: int = 4096
    """Tokens per row."""
    packing: str = "packed"
    """``packed``: rows filled with consecutive documents, attention and positions kept within each
    document; ``padded``: one document (piece) per row, right-padded to the longest row."""
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
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward instead of keeping them."""
    init_device: str = "auto"
    """How the ranks of a distributed run get their first weights. ``auto``: rank 0 builds (or loads,
    for ``init_from``) the whole model on CPU, the other ranks build an empty one, and rank 0's
    weights are broadcast into everyone's shards (the same start as one process, one host copy);
    ``cpu``: every rank builds the whole model; ``meta``: every rank initialises only its own shards
    (no whole copy anywhere; a fresh model only, and not the same numbers as one process)."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """Which parameters train: all (``full``), LoRA adapters, or the image rows of the output head."""
    compile: bool = False
    """``torch.compile`` each transformer block: fuses the norms, RoPE and SwiGLU
    around the matmuls. Pays off on big models and GPUs; CPU figures are in bench/RESULTS.md."""
    log_every: int = 10
    """Steps between console lines and block-output-norm measurements."""
    ckpt_every: int = 0
    """Save a checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 0
    """Keep only the newest N checkpoints (0: all)."""
    export_format: str = "native"
    """Layout of ``export_dir``: ``native`` (ours), ``hf`` (Hugging Face) or ``meta``."""
    spike_policy: str = "warn"
    """On a loss spike (over ``spike_threshold`` standard deviations above the last ``spike_window``
    steps): ``warn``, ``skip`` the update, or ``rollback`` to the last checkpoint and go on with the
    data after the spike."""
    spike_window: int = 128
    spike_threshold: float = 6.0
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device for MFU (0: a table for known GPUs, else measured)."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        for name in ("steps", "batch_size", "seq_len", "loss_chunk", "log_every", "val_batches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.micro_batch_size < 0 or self.keep_checkpoints < 0 or self.peak_tflops < 0:
            raise ValueError("micro_batch_size, keep_checkpoints and peak_tflops must be >= 0")
        if self.init_device not in ("auto", "cpu", "meta"):
            raise ValueError(f"init_device must be auto, cpu or meta, got {self.init_device!r}")
        if self.spike_policy not in SPIKE_POLICIES:
            raise ValueError(f"spike_policy must be one of {SPIKE_POLICIES}, got {self.spike_policy!r}")
        if self.export_format not in EXPORT_FORMATS:
            raise ValueError(f"export_format must be one of {EXPORT_FORMATS}, got {self.export_format!r}")
        if self.packing not in MODES:
            raise ValueError(f"packing must be one of {MODES}, got {self.packing!r}")
        if self.val_every < 0 or self.ckpt_every < 0:
            raise ValueError("val_every and ckpt_every must be >= 0")
        if isinstance(self.data, str):  # one token dataset
            self.data = MixtureConfig(sources=[MixtureSource(name=Path(self.data).name or "data",
                                                             path=self.data)])

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



def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 matrix maths is fast here (CUDA with bf16, or a CPU with AMX/AVX512-BF16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False



class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/inf; ``checkpoint`` holds the state before that step."""

    def __init__(self, message: str, checkpoint: Path):
        super().__init__(message)
        self.checkpoint = checkpoint


class Trainer:
    """Owns the model, optimizer, schedule, data loader and step counter of one run (on this rank).

    Args:
        config: The run.
        model: The model (plain, on CPU or ``meta``): adapters, activation checkpointing, compilation
            and FSDP2 are applied here, in that order, before the optimizer is built.
        loader: This rank's training batches (its state is saved with every checkpoint).
        text_tokenizer, image_tokenizer: Bundled into every checkpoint, so checkpoints load alone.
        val: Held-out batches by name (see :func:`validation_sets`), the same on every rank.
        dist: Where this process stands (default: a single process on ``config.device``).
    """

    def __init__(
        self,
        config: TrainConfig,
        model: Chameleon,
        loader: TrainLoader,
        text_tokenizer: TextTokenizer | None = None,
        image_tokenizer: ImageTokenizer | None = None,
        val: dict[str, list[Batch]] | None = None,
        dist: DistInfo | None = None,
    ):
        self.config = config
        self.dist = dist or DistInfo(device=resolve_device(config.device))
        self.device = self.dist.device
        self.model_config = model.config
        self.loader, self.val = loader, val or {}
        self.text_tokenizer, self.image_tokenizer = text_tokenizer, image_tokenizer
        use_bf16 = config.precision == "bf16" or (
            config.precision == "auto" and bf16_supported(self.device))
        # Sharded: FSDP2 holds bf16 copies of the fp32 parameters; one process: autocast.
        self.autocast_dtype = torch.bfloat16 if use_bf16 and not self.dist.distributed else None
        self.compute_dtype = torch.bfloat16 if use_bf16 else torch.float32
        if config.adapter.mode != "full":
            apply_adapters(model, config.adapter, text_tokenizer.vocab if text_tokenizer else None)
        self.block_norms = BlockNorms(model)  # hooks go on before compile and sharding wrap the blocks
        empty = on_meta(model)
        broadcast = self.dist.distributed and config.init_device == "auto"
        # Rank 0's whole model (adapters included) before sharding replaces its parameters.
        full = {k: v.detach().cpu() for k, v in model.state_dict().items()} if broadcast and not empty else {}
        self.model = parallelize(model, self.dist, activation_checkpointing=config.activation_checkpointing,
                                 compile=config.compile,
                                 param_dtype=torch.bfloat16 if use_bf16 and self.dist.distributed else None)
        if empty:
            self.model.to_empty(device=self.device)
        if broadcast:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, full, options=StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=True))
            del full
        elif empty:  # each rank initialises its own shards
            torch.manual_seed(config.seed)
            with torch.no_grad():
                self.model.init_weights()
        self.optimizer = build_adamw(self.model, config.lr, config.weight_decay, config.betas, config.eps)
        self._trained = [p for p in self.model.parameters() if p.requires_grad]
        schedule = SCHEDULES[config.schedule]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: schedule(s, config.warmup_steps, config.steps, config.final_lr_ratio),
        )
        self.spikes = SpikeDetector(config.spike_window, config.spike_threshold)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.events: list[str] = []
        self._flops_per_token = self.model_config.flops_per_token(config.seq_len)
        self._peak = config.peak_tflops * 1e12 or None
        if self.dist.distributed:  # dropout differs between ranks, as their rows do
            self._seed_rank()

    @classmethod
    def from_config(cls, config: TrainConfig, dist: DistInfo | None = None) -> Trainer:
        """Tokenizers, model (fresh or ``init_from``), this rank's loader and held-out sets, as the config
        says; joins the torchrun job when there is one.

        The global torch RNG is seeded with ``config.seed`` first, so the initial weights are a function
        of the config, whatever ran before in the process, and the same on every rank.
        """
        dist = dist or init_distributed(config.device)
        torch.manual_seed(config.seed)
        if config.init_device == "meta" and (config.init_from or config.adapter.mode != "full"):
            raise ValueError("init_device = 'meta' initialises a fresh model shard by shard; init_from and "
                             "adapters need rank 0's whole model (init_device = 'auto')")
        if dist.distributed and config.init_device == "auto" and not dist.is_main:
            text_tok, image_tok, model = _receive_model(config)  # rank 0 loads and broadcasts
        else:
            text_tok, image_tok, model = build_model(config, meta=config.init_device == "meta")
            if dist.distributed and config.init_device == "auto":
                _send_model(model, text_tok)
        if config.data is None:
            raise ValueError("the config names no data (data = a token dataset, or [[data.sources]])")
        pad_id = text_tok.vocab.pad_id
        loader = TrainLoader(config.data, seq_len=config.seq_len, batch_size=config.batch_size,
                             pad_id=pad_id, seed=config.seed, mode=config.packing, rank=dist.rank,
                             world_size=dist.world_size)
        if loader.stream.vocab_size != len(text_tok):
            raise ValueError(f"the data was tokenized with a vocabulary of {loader.stream.vocab_size} "
                             f"ids, the tokenizer has {len(text_tok)}")
        if len(text_tok) > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(text_tok)} ids, the model only "
                             f"{model.config.vocab_size}")
        return cls(config, model, loader, text_tok, image_tok, validation_sets(config, pad_id), dist)

    # ------------------------------------------------------------------ one step

    def _losses(self, batch: Batch):
        ids = batch.input_ids.to(self.device)
        positions = batch.positions.to(self.device)
        doc_ids = batch.doc_ids.to(self.device) if batch.doc_ids is not None else None
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            targets = batch.targets.to(self.device)
            out = self.model(ids, positions=positions, doc_ids=doc_ids, targets=targets,
                             chunk_size=self.config.loss_chunk, z_loss_weight=self.config.z_loss,
                             ignore_index=IGNORE_INDEX)
            return modality_sums(out, targets, batch.image_targets.to(self.device), IGNORE_INDEX)

    def _micro_batches(self, batch: Batch) -> list[Batch]:
        rows = batch.input_ids.shape[0]
        size = self.config.micro_batch_size or rows
        if rows == 0:
            return [_empty_row(batch, self.text_tokenizer)]  # a rank with no rows still joins the collectives
        return [_rows(batch, slice(s, s + size)) for s in range(0, rows, size)]

    def train_step(self) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; metrics are over all ranks."""
        cfg = self.config
        self.model.train()
        t0 = time.perf_counter()
        batch = self.loader.next_batch(self.step)
        micro = self._micro_batches(batch)
        # The step's normaliser: target tokens over every micro-batch of every rank.
        n_global = all_reduce_sum(torch.tensor(float(batch.num_targets), device=self.device), self.dist)
        n_global = n_global.clamp(min=1)
        measure = (self.step + 1) % cfg.log_every == 0 or self.step == 0
        self.optimizer.zero_grad(set_to_none=True)
        totals = torch.zeros(8, dtype=torch.float64, device=self.device)
        for i, mb in enumerate(micro):
            if self.dist.distributed:  # reduce-scatter the gradients once, after the last micro-batch
                self.model.set_requires_gradient_sync(i == len(micro) - 1)
            self.block_norms.recording = measure
            sums = self._losses(mb)
            self.block_norms.recording = False  # not while activation checkpointing recomputes
            (sums.loss / n_global).backward()
            totals += torch.stack([sums.ce, sums.z, sums.n, sums.ce_text, sums.n_text, sums.ce_image,
                                   sums.n_image, sums.logit_norm]).detach().double()
        totals = all_reduce_sum(torch.cat([totals, torch.tensor(  # this rank's real slots and all slots
            [batch.input_ids.numel() - batch.num_pad, batch.input_ids.numel()], dtype=torch.float64,
            device=self.device)]), self.dist)
        grad_norm = torch.nn.utils.clip_grad_norm_(self._trained, cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        ce, z, n, ce_text, n_text, ce_image, n_image, logit_norm, real, slots = totals.tolist()
        n = max(n, 1.0)
        loss = (ce + cfg.z_loss * z) / n
        lr = self.scheduler.get_last_lr()[0]
        metrics = {
            "step": self.step + 1, "loss": loss, "ce": ce / n, "z_loss": z / n,
            "ce_text": ce_text / n_text if n_text else math.nan,
            "ce_image": ce_image / n_image if n_image else math.nan,
            "logit_norm": logit_norm / n, "grad_norm": float(grad_norm), "lr": lr, "tokens": int(n),
        }
        if not (math.isfinite(loss) and math.isfinite(metrics["grad_norm"])):
            self.optimizer.zero_grad(set_to_none=True)
            ckpt = self.save_checkpoint()
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {self.step + 1} (loss {loss}, grad norm "
                f"{metrics['grad_norm']}); the state before it is saved in {ckpt}. Resume from it with a "
                "lower lr, a higher z_loss or more warm-up.", ckpt)
        spike = self.spikes.observe(loss)
        metrics["spike"] = float(spike)
        if spike and cfg.spike_policy == "skip":
            self.optimizer.zero_grad(set_to_none=True)  # no update from this batch
            self.events.append(f"step {self.step + 1}: loss spike {loss:.4f}, update skipped")
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        if measure:
            norms = self.block_norms.pop().to(self.device)
            norms = all_reduce_sum(norms.double(), self.dist) / self.dist.world_size
            metrics.update({f"block_norm/{i}": float(v) for i, v in enumerate(norms.tolist())})
        dt = time.perf_counter() - t0
        per_device = real / dt / self.dist.world_size
        metrics.update({"tokens_per_s": real / dt, "tokens_per_s_per_device": per_device,
                        "mfu": per_device * self._flops_per_token / self.peak_flops(),
                        "padding": 1 - real / max(slots, 1.0)})
        if self.device.type == "cuda":
            metrics["max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if spike and cfg.spike_policy == "warn":
            self.events.append(f"step {self.step}: loss spike {loss:.4f} (policy warn)")
        self.history.append(metrics)
        if spike and cfg.spike_policy == "rollback":
            self._rollback(loss)
        return metrics

    def _seed_rank(self) -> None:
        """This rank's RNG stream (dropout) as a function of (seed, rank, step)."""
        torch.manual_seed(self.config.seed * 1_000_003 + self.dist.rank + 7919 * self.step)

    def peak_flops(self) -> float:
        if self._peak is None:
            self._peak = peak_flops(self.device, self.compute_dtype)
        return self._peak

    def _rollback(self, loss: float) -> None:
        ckpt = latest_checkpoint(self.config.out_dir)
        if ckpt is None:
            self.events.append(f"step {self.step}: loss spike {loss:.4f}, no checkpoint to roll back to")
            return
        data, spikes = self.loader.state_dict(), self.spikes.state_dict()
        self.load_checkpoint(ckpt)
        self.loader.load_state_dict(data)  # go on with the data after the spike, as PaLM did
        self.spikes.load_state_dict(spikes)
        self.events.append(f"loss spike {loss:.4f}: rolled back to {ckpt.name}, data continues after it")

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """CE (all, text, image targets) of every held-out set: ``val/<name>/ce`` …"""
        self.model.eval()
        out: dict[str, float] = {}
        r, w = self.dist.rank, self.dist.world_size
        for name, batches in self.val.items():
            totals = torch.zeros(6, dtype=torch.float64, device=self.device)
            for batch in batches:
                rows = batch.input_ids.shape[0]
                share = -(-rows // w)
                for mb in self._micro_batches(_rows(batch, slice(r * share, (r + 1) * share))):
                    s = self._losses(mb)
                    totals += torch.stack([s.ce, s.ce_text, s.ce_image, s.n, s.n_text, s.n_image]).double()
            ce, ce_text, ce_image, n, n_text, n_image = all_reduce_sum(totals, self.dist).tolist()
            out[f"val/{name}/ce"] = ce / n if n else math.nan
            out[f"val/{name}/ce_text"] = ce_text / n_text if n_text else math.nan
            out[f"val/{name}/ce_image"] = ce_image / n_image if n_image else math.nan
        return out

    def fit(
        self, steps: int | None = None, progress: bool = True,
        log: Callable[[str], None] | None = print,
    ) -> list[dict[str, float]]:
        """Train up to ``steps`` (default: the config's), logging, validating and checkpointing as
        configured. Only rank 0 logs and prints."""
        cfg = self.config
        end = steps if steps is not None else cfg.steps
        main = self.dist.is_main
        out = Path(cfg.out_dir)
        if main:
            out.mkdir(parents=True, exist_ok=True)
        log = log if main else None
        bar = tqdm(total=end, initial=self.step, disable=not (progress and main), desc="train", unit="step")
        # Past step 0, lines of later steps are from a run that died after this checkpoint.
        purge = self.step + 1 if self.step else None
        logger = MetricsLogger(out, "train", purge_step=purge, filename="metrics.jsonl") if main else None
        try:
            while self.step < end:
                m = self.train_step()
                if self.val and ((cfg.val_every and self.step % cfg.val_every == 0) or self.step == end):
                    m.update(self.validate())
                if logger:
                    logger.log(self.step, m)
                for event in self.events:
                    if log:
                        log(event)
                self.events.clear()
                bar.update(1)
                bar.set_postfix(loss=f"{m['ce']:.3f}", img=f"{m['ce_image']:.3f}",
                                txt=f"{m['ce_text']:.3f}")
                if log and (self.step % cfg.log_every == 0 or self.step == end):
                    val = "".join(f", {k} {v:.4f}" for k, v in m.items() if k.startswith("val/"))
                    log(f"step {self.step}: ce {m['ce']:.4f} (text {m['ce_text']:.4f}, image "
                        f"{m['ce_image']:.4f}) z {m['z_loss']:.2f} grad {m['grad_norm']:.3f} "
                        f"lr {m['lr']:.2e} {m['tokens_per_s_per_device']:.0f} tok/s/device "
                        f"MFU {m['mfu']:.1%}{val}")
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
            if logger:
                logger.close()
        return self.history

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_dir(self, step: int | None = None) -> Path:
        return checkpoint_path(self.config.out_dir, self.step if step is None else step)

    def data_state(self) -> dict[str, Any]:
        """JSON-able position of the data stream, saved in checkpoints."""
        return self.loader.state_dict()

    def load_data_state(self, state: dict[str, Any]) -> None:
        """Continue the data stream where :meth:`data_state` left it."""
        self.loader.load_state_dict(state)

    def save_checkpoint(self, directory: str | os.PathLike | None = None) -> Path:
        """Model + optimizer (DCP), RNG of every rank, and the run's state; call it on every rank.

        The folder is also a model folder (config and tokenizers beside the DCP weights), so
        ``load_model`` and ``chameleon generate --model`` take it, in one process.
        """
        directory = Path(directory if directory is not None else self.checkpoint_dir())
        state = {"config": self.config.to_dict(), "scheduler": self.scheduler.state_dict(),
                 "extra": {"data": self.data_state()}, "spikes": self.spikes.state_dict()}
        plain = self.config.adapter.mode == "full"

        def model_files(d: Path) -> None:
            save_model(d, _config_only(self.model_config), self.text_tokenizer, self.image_tokenizer,
                       weights=False)
            if not plain:
                (d / "config.json").rename(d / "config.adapter.json")  # not a plain model's weights

        save_distributed(directory, model=self.model, optimizer=self.optimizer, rank=self.dist.rank,
                         world_size=self.dist.world_size, step=self.step, state=state,
                         write_model_files=model_files, barrier=lambda: barrier(self.dist))
        if self.dist.is_main and self.config.keep_checkpoints:
            prune_checkpoints(self.config.out_dir, self.config.keep_checkpoints)
        return directory

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        """Restore weights, optimizer, schedule, RNG, data state and step from
        :meth:`save_checkpoint`'s folder (saved at any world size); call it on every rank."""
        directory = Path(directory)
        state = load_distributed(directory, model=self.model, optimizer=self.optimizer,
                                 rank=self.dist.rank, world_size=self.dist.world_size)
        self.step = int(state["step"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.spikes.load_state_dict(state.get("spikes", self.spikes.state_dict()))
        self.load_data_state(state.get("extra", {}).get("data", {}))
        if state.get("world_size") != self.dist.world_size:  # the saved RNG streams were other ranks'
            self._seed_rank()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict on CPU on rank 0 (gathered from the shards), None elsewhere."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if not self.dist.distributed:
            return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                          cpu_offload=True))
        return state if self.dist.is_main else None

    def export(self, directory: str | os.PathLike, layout: str | None = None) -> Path:
        """Save the model alone (weights and tokenizers, adapters merged) in ``layout`` (default: the
        config's ``export_format``); call it on every rank, rank 0 writes."""
        state = self.full_state_dict()
        if state is not None:
            with torch.device("meta"):
                plain = Chameleon(self.model_config)
            if self.config.adapter.mode != "full":
                apply_adapters(plain, self.config.adapter, self.text_tokenizer.vocab if self.text_tokenizer
                               else None)
            plain.load_state_dict(state, assign=True)
            merge_adapters(plain)
            from chameleon_lm.checkpoints.native import bundle

            loaded = bundle(plain.float(), self.text_tokenizer, self.image_tokenizer, Path(directory))
            save_as(layout or self.config.export_format, directory, loaded)
        barrier(self.dist)
        return Path(directory)

    def describe(self) -> str:
        trainable, total = trainable_parameters(self.model)
        return (f"{total:,} parameters ({trainable:,} trained, adapter {self.config.adapter.mode}); "
                f"{self.dist.world_size} process(es) on {self.device.type}")


def _config_only(config: ChameleonConfig):
    """What ``save_model(..., weights=False)`` needs of a model: its config."""
    holder = torch.nn.Module()
    holder.config = config
    return holder


def _rows(batch: Batch, rows: slice) -> Batch:
    return Batch(input_ids=batch.input_ids[rows], targets=batch.targets[rows],
                 image_targets=batch.image_targets[rows], positions=batch.positions[rows],
                 doc_ids=None if batch.doc_ids is None else batch.doc_ids[rows], lengths=batch.lengths[rows])


def _empty_row(batch: Batch, tok: TextTokenizer | None) -> Batch:
    """One row of pad slots with no targets, shaped like ``batch``'s rows."""
    T = batch.input_ids.shape[1] or 1
    pad = tok.vocab.pad_id if tok is not None else 0
    return Batch(input_ids=torch.full((1, T), pad), targets=torch.full((1, T), IGNORE_INDEX),
                 image_targets=torch.zeros(1, T, dtype=torch.bool), positions=torch.arange(T)[None],
                 doc_ids=None if batch.doc_ids is None else torch.zeros(1, T, dtype=torch.int32),
                 lengths=torch.zeros(1, dtype=torch.long))


def _send_model(model: Chameleon, text_tok: TextTokenizer) -> None:
    import torch.distributed as tdist

    tdist.broadcast_object_list([model.config.to_dict(), text_tok], src=0)


def _receive_model(config: TrainConfig) -> tuple[TextTokenizer, None, Chameleon]:
    """The model's architecture and text tokenizer from rank 0; an empty (meta) model to shard. Only
    rank 0 writes model files, so the image tokenizer stays there."""
    import torch.distributed as tdist

    got: list[Any] = [None, None]
    tdist.broadcast_object_list(got, src=0)
    with torch.device("meta"):
        model = Chameleon(ChameleonConfig.from_dict(got[0]))
    return got[1], None, model


def build_model(config: TrainConfig, meta: bool = False
                ) -> tuple[TextTokenizer, ImageTokenizer | None, Chameleon]:
    """The run's tokenizers and model: a fresh ``model`` preset (on the meta device when ``meta``), or
    the weights of ``init_from``."""
    loaded = None
    if config.init_from:
        loaded = load_model(config.init_from, dtype=torch.float32)
    if config.tokenizers:
        text_tok = load_text_tokenizer(config.tokenizers)
        image_tok = (load_image_tokenizer(config.tokenizers)
                     if (Path(config.tokenizers) / "vqgan.json").is_file() else None)
    elif loaded is not None and loaded.text_tokenizer is not None:
        text_tok, image_tok = loaded.text_tokenizer, loaded.image_tokenizer
    else:
        raise ValueError("the config names no tokenizers (tokenizers = a folder with tokenizer.json)")
    if loaded is None:
        with torch.device("meta") if meta else contextlib.nullcontext():
            return text_tok, image_tok, Chameleon(config.model_config(len(text_tok)))
    model_config = loaded.config.replace(**config.model_overrides)
    with torch.device("meta"):
        model = Chameleon(model_config)
    try:
        model.load_state_dict(loaded.model.state_dict(), assign=True)
    except RuntimeError as e:
        raise ValueError(f"model_overrides {config.model_overrides} do not fit the weights of "
                         f"{config.init_from}: {e}") from e
    return text_tok, image_tok, model


def validation_sets(config: TrainConfig, pad_id: int) -> dict[str, list[Batch]]:
    """The fixed held-out batches of every dataset in ``config.val`` (packed like training)."""
    return {name: validation_batches(TokenDataset(path), seq_len=config.seq_len,
                                     batch_size=config.batch_size, pad_id=pad_id,
                                     max_batches=config.val_batches)
            for name, path in config.val.items()}
