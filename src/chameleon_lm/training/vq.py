"""Training the image tokenizer (VQGAN), taming-transformers style, sized for a CPU.

The loss of the autoencoder, per step::

    l1_weight * |x - x̂| + l2_weight * (x - x̂)²            reconstruction (means over pixels)
    + perceptual_weight * LPIPS(x, x̂)                     only when LPIPS weights are on disk
    + quantizer loss                                      codebook + beta (0.25) commitment terms
    + adaptive_weight * disc_weight * (-D(x̂))             after ``disc_start`` steps

with the quantizer loss as :class:`chameleon_lm.tokenizers.vqgan.VectorQuantizer` computes it
(taming's legacy form, which Meta's model was trained with). The PatchGAN discriminator ``D``
(:class:`NLayerDiscriminator`) is trained with the hinge loss on the same steps. The adaptive weight
is taming's ``calculate_adaptive_weight``: the ratio of the gradient norms of the reconstruction
(+ perceptual) loss and of the generator loss at the decoder's last convolution, so the adversarial
term can never swamp reconstruction whatever the scale of the discriminator's logits.

Codebook entries that the encoder has not chosen for ``dead_code_every`` steps are re-initialised to
randomly picked encoder outputs of the current batch (the "dead code restart" of Jukebox /
ViT-VQGAN), which keeps the codebook in use without changing the quantizer.

Nothing is downloaded: the perceptual term needs a local LPIPS file (:func:`load_lpips`); without
one it is skipped with one logged note.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from chameleon_lm.tokenizers.image import ImageTokenizer
from chameleon_lm.tokenizers.images import ImageSource, preprocess
from chameleon_lm.tokenizers.vqgan import ENCODERS, VQGAN, VQGANConfig
from chameleon_lm.training.metrics import (
    code_histogram,
    codebook_perplexity,
    codebook_usage,
    psnr,
    ssim,
)
from chameleon_lm.training.schedule import warmup_cosine
from chameleon_lm.utils.config import Config

TRAIN_LOG_NAME = "vq_train_log.jsonl"
METRICS_NAME = "vq_metrics.json"
TRAIN_CONFIG_NAME = "vq_train.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class VQTrainConfig(Config):
    """Hyper-parameters of :func:`train_image_tokenizer`.

    The defaults are the CPU quickstart setting: the ``shapes-32`` VQGAN with ``vq_overrides``,
    trained for about two minutes on two cores.
    """

    vq_preset: str = "shapes-32"
    """:class:`VQGANConfig` preset of the model to train."""
    vq_overrides: dict[str, Any] = field(default_factory=dict)
    """Fields of the preset to change (e.g. ``{"ch": 32}``)."""
    steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 32
    """Images per step."""
    lr: float = 1e-3
    """Peak Adam learning rate (warm-up, then cosine decay to ``min_lr_ratio * lr``). taming uses
    4.5e-6 x batch size, tuned for long GAN runs; a small model trained for minutes wants more."""
    betas: tuple[float, float] = (0.5, 0.9)
    """Adam betas (taming's, for both the autoencoder and the discriminator)."""
    warmup_steps: int = 50
    """Linear learning-rate warm-up."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr``."""
    codebook_weight: float = 1.0
    """Weight of ``|z_q - sg(z)|²``, which moves the codebook towards the encoder outputs."""
    commitment_weight: float = 0.25
    """Weight of ``|z - sg(z_q)|²``, which keeps the encoder near its codes: the VQ-VAE paper's
    beta. (Meta's model was trained with taming's legacy weights, codebook 0.25 and
    commitment 1.0, the formula of ``VectorQuantizer.forward``.)"""
    l1_weight: float = 1.0
    """Weight of the mean absolute pixel error."""
    l2_weight: float = 1.0
    """Weight of the mean squared pixel error."""
    perceptual_weight: float = 1.0
    """Weight of LPIPS (only used when ``lpips_path`` holds the weights)."""
    lpips_path: str | None = None
    """Local LPIPS file (see :func:`load_lpips`); ``None`` or a missing file skips the term."""
    disc_start: int = 0
    """Steps before the discriminator starts (its loss is used from step ``disc_start + 1`` on);
    0, negative or ``>= steps`` means no discriminator. Off by default: the adversarial loss
    sharpens textures late in long runs (taming starts it after tens of thousands of steps), but
    in a run of minutes it costs PSNR and colour/shape fidelity (measured on the shapes world:
    19.8 dB with it from step 500 of 1000, 25.6 dB without)."""
    disc_weight: float = 0.8
    """Factor on the adaptive weight of the generator loss (taming's ``disc_weight``)."""
    disc_channels: int = 32
    """Channels of the discriminator's first layer."""
    disc_layers: int = 2
    """Stride-2 layers of the discriminator (2 gives 6x6 patches of 32 px images)."""
    codebook_data_init: bool = True
    """Start the codebook as randomly drawn encoder outputs of the (initial) model instead of the
    quantizer's tiny uniform init, which otherwise collapses the first steps onto a few codes."""
    dead_code_every: int = 100
    """Re-initialise dead codes every this many steps (0 turns restarts off)."""
    dead_code_threshold: int = 1
    """A code chosen fewer times than this in the last ``dead_code_every`` steps is dead."""
    eval_size: int = 256
    """Images held out of ``images`` for evaluation when no ``eval_images`` are given (at most a
    tenth of them)."""
    seed: int = 0
    """Seed of the initialisation, the batch order and the code restarts."""
    log_every: int = 50
    """Log training statistics every this many steps."""
    eval_every: int = 0
    """Evaluate every this many steps as well as at the end (0: only at the end)."""
    num_workers: int = 0
    """Threads that preprocess images given as files or PIL images (0: the calling thread)."""
    device: str = "cpu"
    """Torch device to train on."""
    bf16: bool = False
    """bf16 autocast for the encoder, decoder, discriminator and LPIPS (the quantizer's distances
    stay fp32). Off by default: without bf16 matrix units (AMX) it is far slower on a CPU."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.vq_overrides = dict(self.vq_overrides)
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "dead_code_every", "dead_code_threshold", "eval_every",
                     "num_workers", "eval_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 < self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in (0, 1], got {self.min_lr_ratio}")
        if self.vq_preset not in VQGANConfig.preset_names():
            raise ValueError(
                f"unknown VQGAN preset {self.vq_preset!r}; known: "
                f"{', '.join(VQGANConfig.preset_names())}"
            )

    def vq_config(self) -> VQGANConfig:
        """The architecture to train: ``vq_preset`` with ``vq_overrides`` applied."""
        return VQGANConfig.preset(self.vq_preset, **self.vq_overrides)

    @property
    def disc_enabled(self) -> bool:
        """Whether the discriminator trains at all (``0 < disc_start < steps``)."""
        return 0 < self.disc_start < self.steps


# ------------------------------------------------------------------------------- discriminator


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming): a real-vs-fake logit per overlapping patch.

    ``conv4x4/2 -> LeakyReLU``, then ``n_layers - 1`` times ``conv4x4/2 -> norm -> LeakyReLU``
    (channels doubling up to 8x), then ``conv4x4/1 -> norm -> LeakyReLU -> conv4x4/1 -> 1``. A
    32 px image gives a 6x6 logit map with ``n_layers=2``.

    The norm is GroupNorm rather than taming's BatchNorm: it does not depend on the batch, so real
    and fake images go through one forward pass and evaluation matches training.

    Args:
        in_channels: Image channels.
        channels: Channels of the first layer.
        n_layers: Stride-2 convolutions (each halves the patch grid).
    """

    def __init__(self, in_channels: int = 3, channels: int = 32, n_layers: int = 2) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(channels * prev, channels * mult, kernel_size=4, stride=stride,
                          padding=1, bias=False),
                nn.GroupNorm(min(32, channels * mult // 4), channels * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # taming's weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch logits ``[B, 1, h, w]`` of images ``[B, C, H, W]``."""
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """taming's discriminator loss: ``(mean(relu(1 - real)) + mean(relu(1 + fake))) / 2``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor
) -> torch.Tensor:
    """taming's ``calculate_adaptive_weight`` (without ``disc_weight``), a detached scalar.

    ``||∇ nll|| / (||∇ g|| + 1e-4)`` at ``last_layer`` (the weight of the decoder's output
    convolution), clamped to [0, 1e4]. Both losses keep their graphs.
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


# ----------------------------------------------------------------------------------------- LPIPS

# torchvision's vgg16().features up to relu5_3: ints are 3x3 conv widths, "M" 2x2 max-pools.
_VGG16_LAYERS: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
)
_LPIPS_TAPS = (3, 8, 15, 22, 29)
"""Indices in ``features`` of relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3."""
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# taming's / lpips' ScalingLayer: images in [-1, 1] to the ImageNet statistics VGG was trained on.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018, VGG16 variant) as in taming-transformers, without torchvision.

    The VGG16 feature extractor keeps torchvision's module indices (``features.0`` ...
    ``features.28``); ``lins.k`` are the five learned 1x1 heads. Load weights with
    :func:`load_lpips`; the module is frozen and in eval mode.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for spec in _VGG16_LAYERS:
            if spec == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_ch, int(spec), kernel_size=3, padding=1), nn.ReLU()]
                in_ch = int(spec)
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False)
                                  for c in _LPIPS_CHANNELS)
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        h = (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _LPIPS_TAPS:
                taps.append(h)
        return taps

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distance ``[B]`` between image batches ``[B, 3, H, W]`` in [-1, 1] (H, W >= 16)."""
        taps = self._taps(torch.cat([a, b]))
        total = a.new_zeros(a.shape[0])
        for feats, lin in zip(taps, self.lins):
            # Unit-normalise every feature vector along channels, as lpips' normalize_tensor.
            feats = feats / (feats.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            fa, fb = feats.chunk(2)
            total = total + lin((fa - fb) ** 2).mean(dim=(1, 2, 3))
        return total


def load_lpips(path: str | os.PathLike) -> LPIPS:
    """An :class:`LPIPS` from ONE local file holding the VGG16 features and the LPIPS heads.

    The file is a safetensors file (``.safetensors``) or a PyTorch state dict (anything else,
    loaded with ``weights_only=True``) with:

    * the 13 convolutions of VGG16 under torchvision's names ``features.{0,2,5,7,10,12,14,17,19,21,
      24,26,28}.{weight,bias}`` (the ``features.*`` entries of ``torchvision.models.vgg16``'s
      ImageNet state dict), or under taming's / lpips' names ``net.slice{1-5}.{i}.{weight,bias}``
      (same indices ``i``);
    * the heads ``lin{0-4}.model.1.weight`` ``[1, C, 1, 1]`` of lpips' ``vgg.pth`` / taming's
      ``vgg_lpips.pth`` (``lins.{k}.weight`` is accepted too).

    Merging torchvision's VGG16 weights with ``vgg.pth`` into one dict gives such a file. Other
    keys (``scaling_layer.*``) are ignored.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is unreadable or lacks weights.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: LPIPS weights not found (one file with VGG16 'features.*' and LPIPS "
            f"'lin*.model.1.weight' tensors; nothing is downloaded)"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(path)
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any reader error means the same thing to the caller
        raise ValueError(f"{path}: cannot read LPIPS weights ({type(e).__name__}: {e})") from e
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict of tensors")
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        parts = key.split(".")
        if key.startswith("net.slice") and len(parts) == 4:  # net.slice1.0.weight
            state[f"features.{parts[2]}.{parts[3]}"] = value
        elif key.startswith("features."):
            state[key] = value
        elif key.startswith("lins.") and len(parts) == 3:  # lins.0.weight
            state[key] = value
        elif re.fullmatch(r"lin\d\.model\.1\.weight", key):  # lin0.model.1.weight
            state[f"lins.{key[3]}.weight"] = value
    with torch.device("meta"):  # no time spent on a random init that is overwritten
        model = LPIPS()
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        more = " ..." if len(missing) > 6 else ""
        raise ValueError(f"{path}: missing LPIPS weights {missing[:6]}{more}")
    try:
        model.load_state_dict({k: state[k].float() for k in model.state_dict()}, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: LPIPS weights have the wrong shapes: {e}") from e
    model.shift, model.scale = (torch.tensor(v).view(1, 3, 1, 1)
                                for v in (_LPIPS_SHIFT, _LPIPS_SCALE))
    return model.requires_grad_(False)


# ------------------------------------------------------------------------------------------ data


def images_to_pixels(
    images: torch.Tensor | Iterable[ImageSource], resolution: int, num_workers: int = 0
) -> torch.Tensor:
    """Pixels ``[M, 3, R, R]`` (float32, [-1, 1]) of a tensor of pixels or an iterable of images.

    Images (PIL images, paths, bytes) are preprocessed once with ``preprocess(img, R, "crop")``.

    Raises:
        ValueError: A tensor of the wrong shape, or no images.
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, resolution, resolution):
            raise ValueError(
                f"pixels must have shape [M, 3, {resolution}, {resolution}], "
                f"got {list(images.shape)}"
            )
        pixels = images.float()
    else:
        def prep(img: ImageSource) -> torch.Tensor:
            return preprocess(img, resolution, "crop")

        if num_workers > 0:
            with ThreadPoolExecutor(num_workers) as pool:
                tensors = list(pool.map(prep, images))
        else:
            tensors = [prep(img) for img in images]
        if not tensors:
            raise ValueError("no images given")
        pixels = torch.stack(tensors)
    if pixels.shape[0] == 0:
        raise ValueError("no images given")
    return pixels


def iter_data_images(data: str | os.PathLike) -> Iterator[ImageSource]:
    """The images of a folder (sorted ``*.png/jpg/jpeg/webp`` paths) or of WebDataset tar shards.

    Args:
        data: A folder, a ``.tar`` shard, or a brace pattern such as
            ``DIR/pairs/train-{000000..000003}.tar``. Of each tar sample the first member with an
            image extension is used.

    Raises:
        FileNotFoundError: ``data`` is neither a folder nor existing shards.
    """
    path = Path(data)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: no {'/'.join(IMAGE_SUFFIXES)} files in this folder")
        yield from files
        return
    data = str(data)
    if "{" not in data and not path.is_file():
        raise FileNotFoundError(f"{data}: neither a folder of images nor a tar shard")
    if "{" in data and not glob.glob(data.split("{")[0] + "*"):
        raise FileNotFoundError(f"{data}: no shards match this pattern")
    import webdataset as wds  # deferred: only the CLI reads shards

    for sample in wds.WebDataset(data, shardshuffle=False):
        key = next((k for k in sample if "." + k.lower() in IMAGE_SUFFIXES), None)
        if key is not None:
            yield bytes(sample[key])


# -------------------------------------------------------------------------------------- training


def evaluate_reconstruction(
    vqgan: VQGAN, pixels: torch.Tensor, batch_size: int = 256
) -> dict[str, float]:
    """Reconstruction quality of ``vqgan`` on pixels ``[M, 3, R, R]`` in [-1, 1].

    Returns:
        ``psnr`` (dB) and ``ssim`` (per-image means, see :mod:`chameleon_lm.training.metrics`),
        ``l1`` (mean absolute error in [-1, 1] units), and ``codebook_usage`` / ``perplexity`` of
        all the codes of these images.
    """
    was_training = vqgan.training
    vqgan.eval()
    device = vqgan.quantize.embedding.weight.device
    recons, codes = [], []
    with torch.no_grad():
        for chunk in pixels.split(batch_size):
            recon, chunk_codes, _ = vqgan(chunk.to(device))
            recons.append(recon.float().cpu().clamp(-1.0, 1.0))
            codes.append(chunk_codes.cpu())
    vqgan.train(was_training)
    recon, all_codes = torch.cat(recons), torch.cat(codes)
    n_embed = vqgan.config.n_embed
    return {
        "psnr": psnr(pixels, recon),
        "ssim": ssim(pixels, recon),
        "l1": float((pixels - recon).abs().mean()),
        "codebook_usage": codebook_usage(all_codes, n_embed),
        "perplexity": codebook_perplexity(all_codes, n_embed),
    }


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


class _Batches:
    """Endless random mini-batches of a tensor: a fresh permutation per epoch, seeded."""

    def __init__(self, pixels: torch.Tensor, batch_size: int, generator: torch.Generator) -> None:
        self.pixels, self.batch_size, self.generator = pixels, batch_size, generator
        self.order = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        if self.order.numel() < self.batch_size:
            fresh = torch.randperm(self.pixels.shape[0], generator=self.generator)
            self.order = torch.cat([self.order, fresh])
        index, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return self.pixels[index]


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

    def init_codebook(self, pixels: torch.Tensor, generator: torch.Generator) -> None:
        """Set every code to a distinct random encoder output of randomly drawn images."""
        n_embed, per_image = self.vq_config.n_embed, self.vq_config.num_tokens
        n_images = min(pixels.shape[0], max(self.config.batch_size, -(-n_embed // per_image)))
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


def train_image_tokenizer(
    images: torch.Tensor | Iterable[ImageSource],
    config: VQTrainConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    eval_images: torch.Tensor | Iterable[ImageSource] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[ImageTokenizer, dict[str, float]]:
    """Train a VQGAN image tokenizer from scratch.

    Args:
        images: Training pixels ``[M, 3, R, R]`` in [-1, 1], or an iterable of images (PIL
            images, paths, bytes) that is preprocessed once (``"crop"``) and held in memory.
        config: Hyper-parameters (default :class:`VQTrainConfig`).
        out_dir: If given, receives the tokenizer (:meth:`ImageTokenizer.save`),
            ``vq_train_log.jsonl`` (one JSON object per logged step), ``vq_metrics.json`` (the
            returned metrics) and ``vq_train.json`` (the config).
        eval_images: Images to evaluate on, like ``images``; if ``None``, the last
            ``min(config.eval_size, M // 10)`` training images are held out instead (with fewer
            than 10 images, the training images themselves are evaluated).
        progress: Show a tqdm progress bar.
        log: Receives the log lines.

    Returns:
        The trained tokenizer (fp32, on the CPU, eval mode) and its metrics on the evaluation
        images: ``psnr``, ``ssim``, ``l1``, ``codebook_usage``, ``perplexity``, plus ``steps``,
        ``seconds`` (training time) and ``train_images``.

    Raises:
        ValueError: No images, or images that do not match the resolution.
    """
    config = config or VQTrainConfig()
    resolution = config.vq_config().resolution
    pixels = images_to_pixels(images, resolution, config.num_workers)
    if eval_images is not None:
        eval_pixels = images_to_pixels(eval_images, resolution, config.num_workers)
    else:
        n_train = pixels.shape[0] - min(config.eval_size, pixels.shape[0] // 10)
        pixels, eval_pixels = pixels[:n_train], pixels[n_train:]
        if eval_pixels.shape[0] == 0:  # under 10 images: evaluate on the training images
            eval_pixels = pixels
    if progress and log is print:
        log = tqdm.write  # keep the log lines off the progress bar

    run = _VQTraining(config, log)
    vqgan, n_embed = run.vqgan, run.vq_config.n_embed
    generator = torch.Generator().manual_seed(config.seed)
    batches = _Batches(pixels, config.batch_size, generator)
    overrides = f" with {config.vq_overrides}" if config.vq_overrides else ""
    log(f"training a {config.vq_preset} VQGAN{overrides} "
        f"({sum(p.numel() for p in vqgan.parameters()):,} parameters, "
        f"{run.vq_config.num_tokens} codes of {n_embed}) on {pixels.shape[0]} images for "
        f"{config.steps} steps of {config.batch_size}; discriminator "
        f"{f'from step {config.disc_start + 1}' if config.disc_enabled else 'off'}")
    if config.codebook_data_init:
        run.init_codebook(pixels, generator)

    restart_counts = torch.zeros(n_embed, dtype=torch.long)  # codes chosen since the last restart
    log_counts = torch.zeros(n_embed, dtype=torch.long)  # codes chosen since the last log line
    sums: dict[str, float] = {}
    restarted = 0
    records: list[dict[str, Any]] = []
    t_start = t_window = time.perf_counter()
    bar = tqdm(total=config.steps, disable=not progress, desc="vq", unit="step")
    for step in range(1, config.steps + 1):
        lr = config.lr * warmup_cosine(step - 1, config.warmup_steps, config.steps,
                                       config.min_lr_ratio)
        run.set_lr(lr)
        use_disc = config.disc_enabled and step > config.disc_start
        stats, codes, latents = run.step(batches.next().to(run.device), use_disc)
        step_counts = code_histogram(codes, n_embed)
        restart_counts += step_counts
        log_counts += step_counts
        if config.dead_code_every and step % config.dead_code_every == 0 and step < config.steps:
            restarted += restart_dead_codes(vqgan, restart_counts, latents,
                                            config.dead_code_threshold, generator)
            restart_counts.zero_()
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + value
        bar.update(1)

        if step % config.log_every == 0 or step == config.steps:
            n = step - (records[-1]["step"] if records else 0)
            record: dict[str, Any] = {"step": step, "lr": lr}
            record.update({k: v / n for k, v in sums.items()})
            record.update(usage=float((log_counts > 0).sum()) / n_embed, restarted=restarted,
                          it_per_s=n / (time.perf_counter() - t_window))
            if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                record.update({f"eval_{k}": v for k, v in
                               evaluate_reconstruction(vqgan, eval_pixels).items()})
            records.append(record)
            bar.set_postfix(rec=f"{record['rec']:.4f}", usage=f"{record['usage']:.2f}")
            log(_format_record(record, config.steps))
            sums, restarted = {}, 0
            log_counts.zero_()
            t_window = time.perf_counter()
    bar.close()
    seconds = time.perf_counter() - t_start

    vqgan = vqgan.cpu()
    metrics: dict[str, float] = evaluate_reconstruction(vqgan, eval_pixels)
    metrics.update(steps=config.steps, seconds=round(seconds, 2), train_images=pixels.shape[0])
    log("eval: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in metrics.items()))
    tokenizer = ImageTokenizer(vqgan)
    if out_dir is not None:
        out = Path(out_dir)
        tokenizer.save(out)
        config.save(out / TRAIN_CONFIG_NAME)
        with open(out / TRAIN_LOG_NAME, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
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


# ------------------------------------------------------------------------------------------- CLI


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train-image`` (``chameleon tokenizer train-image``) on argparse subparsers."""
    defaults = VQTrainConfig()
    parser = subparsers.add_parser(
        "train-image", help="train the VQGAN image tokenizer",
        description="Train a VQGAN image tokenizer on a folder of images or WebDataset shards and "
                    "save it (vqgan.json + vqgan.safetensors) with its training log and metrics.")
    parser.add_argument("--data", required=True,
                        help="a folder of png/jpg/webp images, a .tar shard or a brace pattern "
                             "like DIR/pairs/train-{000000..000003}.tar")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--eval-data", help="images to evaluate on, like --data (default: a "
                                            "held-out slice of --data)")
    parser.add_argument("--preset", choices=VQGANConfig.preset_names(), default=None,
                        help=f"VQGAN architecture preset (default {defaults.vq_preset} with the "
                             f"recommended overrides {defaults.vq_overrides})")
    parser.add_argument("--encoder", choices=ENCODERS, default=None,
                        help="taming (official) or patch (each code sees only its own patch: easier "
                             "codes for a small model; native layout only)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--disc-start", type=int, default=defaults.disc_start,
                        help="steps before the PatchGAN discriminator starts (default "
                             f"{defaults.disc_start}: no discriminator)")
    parser.add_argument("--max-images", type=int, default=None, help="use at most this many")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--lpips", default=None,
                        help="local LPIPS weights file (perceptual loss; skipped without one)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_cli)
    return parser


def run_cli(args: argparse.Namespace) -> int:
    """Train with the options of :func:`add_cli` and print the final metrics."""
    if args.max_images is not None and args.max_images <= 0:
        raise ValueError(f"--max-images must be positive, got {args.max_images}")
    changes: dict[str, Any] = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                   seed=args.seed, lpips_path=args.lpips,
                                   disc_start=args.disc_start)
    if args.preset is not None:  # the default overrides are for the default preset only
        changes.update(vq_preset=args.preset, vq_overrides={})
    defaults = VQTrainConfig()
    if args.encoder is not None:
        changes["vq_overrides"] = {**changes.get("vq_overrides", defaults.vq_overrides),
                                   "encoder": args.encoder}
    config = defaults.replace(**changes)
    resolution = config.vq_config().resolution
    images = images_to_pixels(itertools.islice(iter_data_images(args.data), args.max_images),
                              resolution, config.num_workers)
    eval_images = (images_to_pixels(iter_data_images(args.eval_data), resolution,
                                    config.num_workers)
                   if args.eval_data else None)
    _, metrics = train_image_tokenizer(images, config, out_dir=args.out, eval_images=eval_images,
                                       progress=not args.no_progress)
    print(json.dumps(metrics))
    return 0
