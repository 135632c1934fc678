"""Single-process training of a Chameleon model on a mixture of token datasets, with exact resume.

The loop follows the paper's pre-training recipe by default: AdamW (β 0.9/0.95, ε 1e-5, weight decay
0.1 off norms/embeddings), linear warm-up then exponential decay, gradient clipping at 1.0, z-loss
1e-5·logsumexp², loss = summed CE over target tokens ÷ their count. Distribution (FSDP2), activation
checkpointing and compilation are applied to the model from outside; the seams are ``Trainer.model``
(wrap it before training) and the per-step token count (the global normaliser).

Checkpoints are model folders (``chameleon_lm.load_model`` reads them) plus the training state of
:mod:`chameleon_lm.training.checkpoint` (``trainer.pt``: optimizer, schedule and RNG state;
``trainer_state.json``: step, config, data state). Batches come from a
:class:`~chameleon_lm.data.loader.TrainLoader` (a mixture of token datasets, packed into rows with
document masks) whose position is saved with every checkpoint, so a resumed run continues the same
loss curve. Metrics, and validation CE per modality on held-out token datasets, go to
``train_log.jsonl`` and TensorBoard (:class:`~chameleon_lm.training.logger.MetricsLogger`).
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

from chameleon_lm.checkpoints import load_model, save_model
from chameleon_lm.data.loader import TrainLoader, validation_batches
from chameleon_lm.data.mixture import MixtureConfig, MixtureSource
from chameleon_lm.data.packing import MODES, Batch
from chameleon_lm.data.shards import TokenDataset
from chameleon_lm.model import Chameleon, ChameleonConfig
from chameleon_lm.tokenizers.image import ImageTokenizer, load_image_tokenizer
from chameleon_lm.tokenizers.text import TextTokenizer, load_text_tokenizer
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
    """Rows per step."""
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
    compile: bool = False
    """``torch.compile`` each transformer block (``compile_blocks``): fuses the norms, RoPE and SwiGLU
    around the matmuls. Pays off on big models and GPUs; CPU figures are in bench/RESULTS.md."""
    log_every: int = 10
    ckpt_every: int = 0
    """Save a checkpoint every N steps (0: only at the end)."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        for name in ("steps", "batch_size", "seq_len", "loss_chunk", "log_every", "val_batches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
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
    """Owns the model, optimizer, schedule, data loader and step counter of one run.

    Args:
        config: The run.
        model: The model (moved to the run's device).
        loader: Training batches (its state is saved with every checkpoint).
        text_tokenizer, image_tokenizer: Bundled into every checkpoint, so checkpoints load alone.
        val: Held-out batches by name (see :func:`validation_sets`).
    """

    def __init__(
        self,
        config: TrainConfig,
        model: Chameleon,
        loader: TrainLoader,
        text_tokenizer: TextTokenizer | None = None,
        image_tokenizer: ImageTokenizer | None = None,
        val: dict[str, list[Batch]] | None = None,
    ):
        self.config = config
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        if config.compile:
            compile_blocks(self.model)
        self.loader, self.val = loader, val or {}
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

    @classmethod
    def from_config(cls, config: TrainConfig) -> Trainer:
        """Tokenizers, model (fresh or ``init_from``), loader and held-out sets, as the config says.

        The global torch RNG is seeded with ``config.seed`` first, so the initial weights (and dropout)
        are a function of the config, whatever ran before in the process.
        """
        torch.manual_seed(config.seed)
        text_tok, image_tok, model = build_model(config)
        if config.data is None:
            raise ValueError("the config names no data (data = a token dataset, or [[data.sources]])")
        pad_id = text_tok.vocab.pad_id
        loader = TrainLoader(config.data, seq_len=config.seq_len, batch_size=config.batch_size,
                             pad_id=pad_id, seed=config.seed, mode=config.packing)
        if loader.stream.vocab_size != len(text_tok):
            raise ValueError(f"the data was tokenized with a vocabulary of {loader.stream.vocab_size} "
                             f"ids, the tokenizer has {len(text_tok)}")
        if len(text_tok) > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(text_tok)} ids, the model only "
                             f"{model.config.vocab_size}")
        return cls(config, model, loader, text_tok, image_tok, validation_sets(config, pad_id))

    # ------------------------------------------------------------------ one step

    def _losses(self, batch: Batch):
        ids = batch.input_ids.to(self.device)
        positions = batch.positions.to(self.device)
        doc_ids = batch.doc_ids.to(self.device) if batch.doc_ids is not None else None
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            hidden = self.model.hidden_states(ids, positions=positions, doc_ids=doc_ids)
            return lm_loss_sums(hidden, self.model.output, batch.targets.to(self.device),
                                batch.image_targets.to(self.device), chunk_size=self.config.loss_chunk,
                                z_loss_weight=self.config.z_loss)

    def train_step(self) -> dict[str, float]:
        cfg = self.config
        self.model.train()
        batch = self.loader.next_batch(self.step)
        t0 = time.perf_counter()
        sums = self._losses(batch)
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
        slots = batch.input_ids.numel()
        metrics = {
            "step": self.step, "loss": loss.item(), "ce": (sums.ce / n).item(),
            "z_loss": (sums.z / n).item(),
            "ce_text": (sums.ce_text / sums.n_text).item() if sums.n_text else math.nan,
            "ce_image": (sums.ce_image / sums.n_image).item() if sums.n_image else math.nan,
            "grad_norm": grad_norm.item(), "lr": lr, "tokens": int(sums.n),
            "tokens_per_s": (slots - batch.num_pad) / dt, "padding": batch.num_pad / slots,
        }
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"non-finite loss at step {self.step}: {metrics}")
        self.history.append(metrics)
        return metrics

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """CE (all, text, image targets) of every held-out set: ``val/<name>/ce`` …"""
        self.model.eval()
        out: dict[str, float] = {}
        for name, batches in self.val.items():
            ce = ce_text = ce_image = n = n_text = n_image = 0.0
            for batch in batches:
                s = self._losses(batch)
                ce, ce_text, ce_image = ce + float(s.ce), ce_text + float(s.ce_text), ce_image + float(s.ce_image)
                n, n_text, n_image = n + float(s.n), n_text + float(s.n_text), n_image + float(s.n_image)
            out[f"val/{name}/ce"] = ce / n if n else math.nan
            out[f"val/{name}/ce_text"] = ce_text / n_text if n_text else math.nan
            out[f"val/{name}/ce_image"] = ce_image / n_image if n_image else math.nan
        return out

    def fit(
        self, steps: int | None = None, progress: bool = True,
        log: Callable[[str], None] | None = print,
    ) -> list[dict[str, float]]:
        """Train up to ``steps`` (default: the config's), logging, validating and checkpointing as
        configured."""
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
                if self.val and ((cfg.val_every and self.step % cfg.val_every == 0) or self.step == end):
                    m.update(self.validate())
                logger.log(self.step, m)
                bar.update(1)
                bar.set_postfix(loss=f"{m['ce']:.3f}", img=f"{m['ce_image']:.3f}",
                                txt=f"{m['ce_text']:.3f}")
                if log and (self.step % cfg.log_every == 0 or self.step == end):
                    val = "".join(f", {k} {v:.4f}" for k, v in m.items() if k.startswith("val/"))
                    log(f"step {self.step}: ce {m['ce']:.4f} (text {m['ce_text']:.4f}, image "
                        f"{m['ce_image']:.4f}) z {m['z_loss']:.2f} grad {m['grad_norm']:.3f} "
                        f"lr {m['lr']:.2e} {m['tokens_per_s']:.0f} tok/s{val}")
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                    self.save_checkpoint()
        bar.close()
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

    def export(self, directory: str | os.PathLike) -> Path:
        """Save the model folder alone (weights and tokenizers): what ``load_model`` and
        ``chameleon generate --model`` take."""
        save_model(directory, self.model, self.text_tokenizer, self.image_tokenizer)
        return Path(directory)

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


def build_model(config: TrainConfig) -> tuple[TextTokenizer, ImageTokenizer | None, Chameleon]:
    """The run's tokenizers and model: a fresh ``model`` preset, or the weights of ``init_from``."""
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
        return text_tok, image_tok, Chameleon(config.model_config(len(text_tok)))
    model_config = loaded.config.replace(**config.model_overrides)
    model = Chameleon(model_config)
    try:
        model.load_state_dict(loaded.model.state_dict())
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
