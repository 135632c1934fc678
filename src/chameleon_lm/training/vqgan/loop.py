"""The VQGAN training loop: the training pass, dead-code restarts, evaluation, checkpoints and
:func:`train_image_tokenizer`."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from chameleon_lm.tokenizers.image import WEIGHTS_NAME, ImageTokenizer
from chameleon_lm.tokenizers.metrics import code_histogram, score_reconstruction
from chameleon_lm.tokenizers.vqgan import VQGAN
from chameleon_lm.training.checkpoint import (
    begin_checkpoint,
    checkpoint_path,
    latest_checkpoint,
    load_training_state,
    read_state,
    save_training_state,
)
from chameleon_lm.training.logger import MetricsLogger
from chameleon_lm.training.schedule import warmup_cosine
from chameleon_lm.training.vqgan.config import VQTrainConfig
from chameleon_lm.training.vqgan.losses import (
    LPIPS,
    NLayerDiscriminator,
    adaptive_weight,
    hinge_d_loss,
    load_lpips,
)
from chameleon_lm.training.vqgan.stream import (
    Images,
    _Decoder,
    _StreamBatches,
    _TensorBatches,
    _training_data,
)

LOG_NAME = "vq_train"
TRAIN_LOG_NAME = f"{LOG_NAME}_log.jsonl"
METRICS_NAME = "vq_metrics.json"
TRAIN_CONFIG_NAME = "vq_train.json"
DISC_NAME = "discriminator.safetensors"
RESUMABLE_CHANGES = ("steps", "log_every", "eval_every", "ckpt_every", "num_workers", "device")
"""Config fields a resumed run may change; any other change is refused."""


def evaluate_reconstruction(
    vqgan: VQGAN, pixels: torch.Tensor, batch_size: int = 256
) -> dict[str, float]:
    """Reconstruction quality of ``vqgan`` on pixels ``[M, 3, R, R]`` in [-1, 1].

    Returns:
        ``psnr`` (dB) and ``ssim`` (per-image means, see :mod:`chameleon_lm.tokenizers.metrics`),
        ``l1`` (mean absolute error in [-1, 1] units), and ``codebook_usage`` / ``perplexity`` of
        all the codes of these images: ``chameleon eval reconstruction``'s scores
        (:func:`chameleon_lm.tokenizers.metrics.score_reconstruction`).
    """
    metrics = score_reconstruction(vqgan, pixels, batch_size)
    metrics["perplexity"] = metrics.pop("codebook_perplexity")  # the name of the training logs
    return metrics


def restart_dead_codes(
    vqgan: VQGAN,
    counts: torch.Tensor,
    latents: torch.Tensor,
    threshold: int,
    generator: torch.Generator,
) -> int:
    """Re-initialise codebook rows chosen fewer than ``threshold`` times to random latents.

    Args:
        vqgan: The model whose ``quantize.embedding`` is changed in place.
        counts: How often each code was chosen in the last window, ``[n_embed]``.
        latents: Encoder outputs ``[B, embed_dim, g, g]`` (the current batch), one per dead
            code, drawn without replacement when there are enough of them.
        threshold: Minimum count of a live code.
        generator: Source of the sampling (CPU).

    Returns:
        The number of codes re-initialised.
    """
    dead = (counts < threshold).nonzero().squeeze(1)  # [n_dead]
    if dead.numel() == 0:
        return 0
    flat = latents.detach().float().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # [B*g*g, D]
    if flat.shape[0] >= dead.numel():
        pick = torch.randperm(flat.shape[0], generator=generator)[: dead.numel()]
    else:
        pick = torch.randint(flat.shape[0], (dead.numel(),), generator=generator)
    with torch.no_grad():
        weight = vqgan.quantize.embedding.weight
        weight[dead.to(weight.device)] = flat[pick.to(flat.device)].to(weight.dtype)
    return int(dead.numel())


def vq_forward(
    vqgan: VQGAN,
    pixels: torch.Tensor,
    codebook_weight: float,
    commitment_weight: float,
    bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training pass: ``VQGAN.forward`` with the VQ loss weights chosen by the caller.

    ``codebook_weight * |z_q - sg(z)|² + commitment_weight * |z - sg(z_q)|²`` (means), with a
    straight-through gradient from the decoder to the encoder. With ``bf16``, the encoder and
    decoder run under bf16 autocast but the nearest-code search stays in fp32, so bf16 never
    changes which code a latent gets.

    Returns:
        ``(recon [B, 3, R, R] fp32, codes [B, N], VQ loss, latents [B, D, g, g])``.
    """
    device_type = pixels.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        latents = vqgan.encode_latents(pixels)
    with torch.autocast(device_type, enabled=False):
        z = latents.float()
        codes = vqgan.quantize.nearest_codes(z)  # [B, g*g]
        z_q = vqgan.quantize.lookup(codes, z.shape[2], z.shape[3])  # [B, D, g, g]
        vq_loss = (codebook_weight * F.mse_loss(z_q, z.detach())
                   + commitment_weight * F.mse_loss(z, z_q.detach()))
        z_q = z + (z_q - z).detach()  # straight-through estimator
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        recon = vqgan.decode_latents(z_q)
    return recon.float(), codes, vq_loss, latents


def _perceptual(config: VQTrainConfig, log: Callable[[str], None]) -> LPIPS | None:
    """The LPIPS model, or ``None`` (with one logged note) when the term is off or unavailable."""
    if config.perceptual_weight <= 0:
        return None
    if config.lpips_path is None:
        log("note: perceptual (LPIPS) loss skipped: no lpips_path given (nothing is downloaded)")
        return None
    if not Path(config.lpips_path).is_file():
        log(f"note: perceptual (LPIPS) loss skipped: {config.lpips_path} not found")
        return None
    return load_lpips(config.lpips_path)


class _VQTraining:
    """The models and optimizers of one run, and its training step."""

    def __init__(self, config: VQTrainConfig, log: Callable[[str], None]) -> None:
        self.config = config
        self.vq_config = config.vq_config()
        self.device = torch.device(config.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.vqgan = VQGAN(self.vq_config).to(self.device).train()
            self.disc = (
                NLayerDiscriminator(self.vq_config.out_ch, config.disc_channels,
                                    config.disc_layers).to(self.device).train()
                if config.disc_enabled else None
            )
        self.lpips = _perceptual(config, log)
        if self.lpips is not None:
            self.lpips = self.lpips.to(self.device)
        self.opt = torch.optim.Adam(self.vqgan.parameters(), lr=config.lr, betas=config.betas)
        self.opt_disc = (torch.optim.Adam(self.disc.parameters(), lr=config.lr, betas=config.betas)
                         if self.disc is not None else None)

    def set_lr(self, lr: float) -> None:
        for optimizer in (self.opt, self.opt_disc):
            if optimizer is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr

    @property
    def init_size(self) -> int:
        """Images the codebook's data init encodes: a batch, or enough for one latent per code."""
        return max(self.config.batch_size, -(-self.vq_config.n_embed // self.vq_config.num_tokens))

    def init_codebook(self, pixels: torch.Tensor, generator: torch.Generator) -> None:
        """Set every code to a distinct random encoder output of ``init_size`` random images."""
        n_embed = self.vq_config.n_embed
        n_images = min(pixels.shape[0], self.init_size)
        images = pixels[torch.randperm(pixels.shape[0], generator=generator)[:n_images]]
        with torch.no_grad():
            latents = self.vqgan.encode_latents(images.to(self.device))
        restart_dead_codes(self.vqgan, torch.zeros(n_embed, dtype=torch.long), latents, 1,
                           generator)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def step(
        self, x: torch.Tensor, use_disc: bool
    ) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        """One autoencoder update (and one discriminator update when ``use_disc``).

        Args:
            x: Images ``[B, 3, R, R]`` on the training device.
            use_disc: Add the adversarial loss and train the discriminator.

        Returns:
            The step's loss values, the codes ``[B, N]`` and the latents ``[B, D, g, g]``.
        """
        cfg = self.config
        recon, codes, q_loss, latents = vq_forward(self.vqgan, x, cfg.codebook_weight,
                                                   cfg.commitment_weight, cfg.bf16)
        l1 = (recon - x).abs().mean()
        l2 = ((recon - x) ** 2).mean()
        nll = cfg.l1_weight * l1 + cfg.l2_weight * l2
        stats = {"rec": nll.item(), "l1": l1.item(), "l2": l2.item(), "quant": q_loss.item()}
        if self.lpips is not None:
            with self._autocast():
                p_loss = self.lpips(x, recon).float().mean()
            nll = nll + cfg.perceptual_weight * p_loss
            stats["perceptual"] = p_loss.item()
        loss = nll + q_loss
        if use_disc:
            self.disc.requires_grad_(False)  # no discriminator gradients from the generator loss
            with self._autocast():
                g_loss = -self.disc(recon).float().mean()
            last_layer = self.vqgan.decoder.conv_out.weight
            d_weight = adaptive_weight(nll, g_loss, last_layer) * cfg.disc_weight
            loss = loss + d_weight * g_loss
            stats.update(g_loss=g_loss.item(), d_weight=d_weight.item())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

        if use_disc:  # on the same images
            self.disc.requires_grad_(True)
            with self._autocast():
                logits = self.disc(torch.cat([x, recon.detach()])).float()
            logits_real, logits_fake = logits.chunk(2)
            d_loss = hinge_d_loss(logits_real, logits_fake)
            self.opt_disc.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_disc.step()
            stats.update(d_loss=d_loss.item(), logits_real=logits_real.mean().item(),
                         logits_fake=logits_fake.mean().item())
        return stats, codes, latents


@dataclass
class _Window:
    """The training loop's running counters: saved in checkpoints, so a resumed run logs and
    restarts codes exactly as the uninterrupted run."""

    restart_counts: torch.Tensor
    """How often each code was chosen since the last dead-code restart, ``[n_embed]``."""
    log_counts: torch.Tensor
    """How often each code was chosen since the last log line, ``[n_embed]``."""
    sums: dict[str, float] = field(default_factory=dict)
    """Sums of the step statistics since the last log line."""
    restarted: int = 0
    """Codes restarted since the last log line."""
    last_log: int = 0
    """Step of the last log line."""

    @classmethod
    def start(cls, n_embed: int) -> _Window:
        return cls(torch.zeros(n_embed, dtype=torch.long), torch.zeros(n_embed, dtype=torch.long))

    def state_dict(self) -> dict[str, Any]:
        return {"restart_counts": self.restart_counts.tolist(),
                "log_counts": self.log_counts.tolist(), "sums": dict(self.sums),
                "restarted": self.restarted, "last_log": self.last_log}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _Window:
        return cls(torch.tensor(state["restart_counts"], dtype=torch.long),
                   torch.tensor(state["log_counts"], dtype=torch.long), dict(state["sums"]),
                   state["restarted"], state["last_log"])


def _save_checkpoint(directory: Path, run: _VQTraining, generator: torch.Generator,
                     batches: _TensorBatches | _StreamBatches, window: _Window, step: int) -> Path:
    """The tokenizer files, the discriminator and the training state of ``step``."""
    begin_checkpoint(directory)
    ImageTokenizer(run.vqgan).save(directory)
    run.vqgan.train()  # ImageTokenizer put it in eval mode
    optimizers = {"vqgan": run.opt}
    if run.disc is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in run.disc.state_dict().items()},
                  str(directory / DISC_NAME))
        optimizers["disc"] = run.opt_disc
    return save_training_state(
        directory, step=step, optimizers=optimizers, generators={"vq": generator},
        extra={"data": batches.state_dict(), "window": window.state_dict()},
        config=run.config.to_dict())


def _load_checkpoint(directory: Path, run: _VQTraining, generator: torch.Generator,
                     batches: _TensorBatches | _StreamBatches) -> tuple[int, _Window]:
    """Restore a :func:`_save_checkpoint` folder into this run; its step and counters.

    Raises:
        ValueError: The checkpoint was made with another config (beyond ``RESUMABLE_CHANGES``),
            other data, or for more steps than this run has.
    """
    state = read_state(directory)
    saved, now = state["config"], json.loads(json.dumps(run.config.to_dict()))
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed:
        raise ValueError(f"{directory}: saved by a run with other {', '.join(changed)} "
                         f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed)}); resume with "
                         "the same config, or train afresh in another out_dir")
    if state["step"] > run.config.steps:
        raise ValueError(f"{directory}: is at step {state['step']}, beyond this run's "
                         f"{run.config.steps} steps")
    batches.load_state_dict(state["extra"]["data"])  # refuses other data before anything changes
    device = str(run.device)
    run.vqgan.load_state_dict(load_file(directory / WEIGHTS_NAME, device=device))
    optimizers = {"vqgan": run.opt}
    if run.disc is not None:
        run.disc.load_state_dict(load_file(directory / DISC_NAME, device=device))
        optimizers["disc"] = run.opt_disc
    step, extra = load_training_state(directory, optimizers, generators={"vq": generator})
    return step, _Window.from_state(extra["window"])


def _remove_checkpoints(out: Path, log: Callable[[str], None]) -> None:
    """Delete the checkpoints of an earlier VQGAN run in ``out``: a fresh run replaces its outputs."""
    old = sorted(p for p in (out / "checkpoints").glob("step_*")
                 if p.is_dir() and not (p / "model.safetensors").exists())  # never a model's
    if old:
        log(f"note: removing {len(old)} checkpoint(s) of an earlier run in {out / 'checkpoints'} "
            "(resume=True / --resume continues a run instead)")
        for path in old:
            shutil.rmtree(path)


def train_image_tokenizer(
    images: Images,
    config: VQTrainConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    eval_images: Images | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    resume: bool = False,
) -> tuple[ImageTokenizer, dict[str, float]]:
    """Train a VQGAN image tokenizer from scratch, or continue a run from its latest checkpoint.

    Args:
        images: Training pixels ``[M, 3, R, R]`` in [-1, 1]; an iterable of images (PIL images,
            paths, bytes), preprocessed once (``"crop"``) and held in memory; or a data source (a
            spec such as ``'DIR/pairs/train-{000000..000019}.tar'`` or a folder of images, a
            ``SourceConfig`` or an open ``Source``) streamed epoch after epoch, never held whole.
        config: Hyper-parameters (default :class:`VQTrainConfig`).
        out_dir: If given, receives the tokenizer (:meth:`ImageTokenizer.save`),
            ``vq_train_log.jsonl`` (one JSON object per logged step) and ``tensorboard/``,
            ``vq_metrics.json`` (the returned metrics), ``vq_train.json`` (the config) and the
            checkpoints ``checkpoints/step_NNNNNNN/``. A fresh run removes earlier checkpoints.
        eval_images: Images to evaluate on, like ``images`` (of a source, the first
            ``config.eval_size`` usable ones); if ``None``, the last (of a stream: the first)
            ``min(config.eval_size, M // 10)`` training images are held out instead (with fewer
            than 10 images, the training images themselves are evaluated).
        progress: Show a tqdm progress bar.
        log: Receives the log lines.
        resume: Continue from the latest checkpoint in ``out_dir``; the run then takes exactly
            the steps the uninterrupted run would have taken.

    Returns:
        The trained tokenizer (fp32, on the CPU, eval mode) and its metrics on the evaluation
        images: ``psnr``, ``ssim``, ``l1``, ``codebook_usage``, ``perplexity``, plus ``steps``,
        ``seconds`` (training time of this call), ``train_images`` (images per epoch; of a stream,
        bad ones included, and only once known) and, for a stream, ``skipped_images`` (bad images
        met, counted each time they come round).

    Raises:
        ValueError: No (usable) images, images that do not match the resolution, or a checkpoint
            that does not fit this run.
        FileNotFoundError: ``resume`` without a checkpoint in ``out_dir``.
    """
    config = config or VQTrainConfig()
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise ValueError("resume=True needs the out_dir of the run to continue")
    ckpt = latest_checkpoint(out) if resume else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"{out}: no checkpoint to resume from (no "
                                "checkpoints/step_*/trainer_state.json)")
    if progress and log is print:
        log = tqdm.write  # keep the log lines off the progress bar
    decoder = _Decoder(config.vq_config().resolution, config.num_workers, log)
    try:
        return _train(images, eval_images, config, out, ckpt, progress, log, decoder)
    finally:
        decoder.close()


def _train(
    images: Images, eval_images: Images | None, config: VQTrainConfig, out: Path | None, ckpt: Path | None,
    progress: bool, log: Callable[[str], None], decoder: _Decoder,
) -> tuple[ImageTokenizer, dict[str, float]]:
    """The body of :func:`train_image_tokenizer`."""
    run = _VQTraining(config, log)
    vqgan, n_embed = run.vqgan, run.vq_config.n_embed
    generator = torch.Generator().manual_seed(config.seed)
    batches, eval_pixels, train_images, what = _training_data(images, eval_images, config,
                                                              generator, decoder)
    overrides = f" with {config.vq_overrides}" if config.vq_overrides else ""
    log(f"training a {config.vq_preset} VQGAN{overrides} "
        f"({sum(p.numel() for p in vqgan.parameters()):,} parameters, "
        f"{run.vq_config.num_tokens} codes of {n_embed}) on {what} for "
        f"{config.steps} steps of {config.batch_size}; discriminator "
        f"{f'from step {config.disc_start + 1}' if config.disc_enabled else 'off'}")
    if ckpt is not None:
        start, window = _load_checkpoint(ckpt, run, generator, batches)
        log(f"resumed from {ckpt} at step {start}")
    else:
        start, window = 0, _Window.start(n_embed)
        if out is not None:
            _remove_checkpoints(out, log)
        if config.codebook_data_init:
            run.init_codebook(batches.init_pixels(run.init_size), generator)

    streaming = isinstance(batches, _StreamBatches)
    # A resumed run drops the lines the interrupted one logged after its checkpoint.
    logger = (MetricsLogger(out, LOG_NAME, purge_step=start + 1 if ckpt else 0)
              if out is not None else None)
    t_start = t_window = time.perf_counter()
    bar = tqdm(total=config.steps, initial=start, disable=not progress, desc="vq", unit="step")
    try:
        for step in range(start + 1, config.steps + 1):
            lr = config.lr * warmup_cosine(step - 1, config.warmup_steps, config.steps,
                                           config.min_lr_ratio)
            run.set_lr(lr)
            use_disc = config.disc_enabled and step > config.disc_start
            stats, codes, latents = run.step(batches.next().to(run.device), use_disc)
            step_counts = code_histogram(codes, n_embed)
            window.restart_counts += step_counts
            window.log_counts += step_counts
            if (config.dead_code_every and step % config.dead_code_every == 0
                    and step < config.steps):
                window.restarted += restart_dead_codes(vqgan, window.restart_counts, latents,
                                                       config.dead_code_threshold, generator)
                window.restart_counts.zero_()
            for key, value in stats.items():
                window.sums[key] = window.sums.get(key, 0.0) + value
            bar.update(1)

            if step % config.log_every == 0 or step == config.steps:
                n = step - window.last_log
                record: dict[str, Any] = {"step": step, "lr": lr}
                record.update({k: v / n for k, v in window.sums.items()})
                record.update(usage=float((window.log_counts > 0).sum()) / n_embed,
                              restarted=window.restarted,
                              it_per_s=n / (time.perf_counter() - t_window))
                if streaming:
                    record.update(epoch=batches.epoch, skipped_images=decoder.skipped)
                if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                    record.update({f"eval_{k}": v for k, v in
                                   evaluate_reconstruction(vqgan, eval_pixels).items()})
                if logger is not None:
                    logger.log(step, record)
                bar.set_postfix(rec=f"{record['rec']:.4f}", usage=f"{record['usage']:.2f}")
                log(_format_record(record, config.steps))
                window.sums, window.restarted, window.last_log = {}, 0, step
                window.log_counts.zero_()
                t_window = time.perf_counter()
            if out is not None and (step == config.steps
                                    or (config.ckpt_every and step % config.ckpt_every == 0)):
                _save_checkpoint(checkpoint_path(out, step), run, generator, batches, window,
                                 step)
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    seconds = time.perf_counter() - t_start

    vqgan = vqgan.cpu()
    metrics: dict[str, float] = evaluate_reconstruction(vqgan, eval_pixels)
    metrics.update(steps=config.steps, seconds=round(seconds, 2))
    if train_images is None and streaming:
        train_images = batches.epoch_size
    if train_images is not None:
        metrics["train_images"] = train_images
    if streaming:
        metrics["skipped_images"] = decoder.skipped
    log("eval: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in metrics.items()))
    tokenizer = ImageTokenizer(vqgan)
    if out is not None:
        tokenizer.save(out)
        config.save(out / TRAIN_CONFIG_NAME)
        (out / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n")
        log(f"saved the image tokenizer and training log to {out}")
    return tokenizer, metrics


def _format_record(record: dict[str, Any], steps: int) -> str:
    """One log line: step, losses, window codebook usage, speed."""
    parts = [f"step {record['step']}/{steps}", f"rec {record['rec']:.4f}",
             f"quant {record['quant']:.4f}"]
    parts += [f"{k} {record[k]:.4f}" for k in ("perceptual", "g_loss", "d_loss") if k in record]
    parts += [f"usage {record['usage']:.3f}", f"restarted {record['restarted']}",
              f"{record['it_per_s']:.2f} it/s"]
    parts += [f"{k} {v:.4g}" for k, v in record.items() if k.startswith("eval_")]
    return " | ".join(parts)
