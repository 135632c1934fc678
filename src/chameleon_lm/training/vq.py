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

Training images are a tensor held in memory, or a data source (``chameleon_lm.data.sources``: tar
shards, folders of image files, parquet, JSONL) streamed epoch after epoch: decoded and preprocessed
on the fly, shuffled through a seeded buffer, bad images skipped and counted. Checkpoints
(``out_dir/checkpoints/step_NNNNNNN/``) hold the tokenizer files and the training state of
:mod:`chameleon_lm.training.checkpoint`, and a resumed run takes exactly the steps the uninterrupted
run would have taken.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from chameleon_lm.data.sources import (
    ImageRef,
    Sample,
    Source,
    SourceConfig,
    iter_images,
    load_image,
    open_source,
)
from chameleon_lm.tokenizers.image import WEIGHTS_NAME, ImageTokenizer
from chameleon_lm.tokenizers.images import ImageError, ImageSource, preprocess
from chameleon_lm.tokenizers.vqgan import ENCODERS, VQGAN, VQGANConfig
from chameleon_lm.training.checkpoint import (
    begin_checkpoint,
    checkpoint_path,
    latest_checkpoint,
    load_training_state,
    read_state,
    save_training_state,
)
from chameleon_lm.training.logger import MetricsLogger
from chameleon_lm.training.metrics import (
    code_histogram,
    codebook_perplexity,
    codebook_usage,
    psnr,
    ssim,
)
from chameleon_lm.training.schedule import warmup_cosine
from chameleon_lm.utils.config import Config, read_config_file

LOG_NAME = "vq_train"
TRAIN_LOG_NAME = f"{LOG_NAME}_log.jsonl"
METRICS_NAME = "vq_metrics.json"
TRAIN_CONFIG_NAME = "vq_train.json"
DISC_NAME = "discriminator.safetensors"
MAX_SKIP_NOTES = 5
"""Bad images named in the log; later ones are only counted."""
Images = Union[torch.Tensor, Iterable[ImageSource], str, os.PathLike, SourceConfig, Source]
"""What :func:`train_image_tokenizer` trains and evaluates on: pixels, images, or a data source."""
RESUMABLE_CHANGES = ("steps", "log_every", "eval_every", "ckpt_every", "num_workers", "device")
"""Config fields a resumed run may change; any other change is refused."""


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
    tenth of them; of a streamed source, its first ones), and the most images evaluated of a
    streamed ``eval_images`` source."""
    max_images: int = 0
    """Train on at most this many images of a streamed source, its first ones in order (0: all)."""
    shuffle_buffer: int = 1000
    """Images (still encoded) in the shuffle buffer of a streamed source; 0 or 1: the images of a
    unit in order (the units are shuffled every epoch either way)."""
    seed: int = 0
    """Seed of the initialisation, the batch order and the code restarts."""
    log_every: int = 50
    """Log training statistics every this many steps."""
    eval_every: int = 0
    """Evaluate every this many steps as well as at the end (0: only at the end)."""
    ckpt_every: int = 0
    """Save a checkpoint every this many steps as well as at the end (0: only at the end); only
    with an ``out_dir``."""
    num_workers: int = 0
    """Threads that decode and preprocess images given as files, PIL images or a source (0: the
    calling thread)."""
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
                     "num_workers", "eval_size", "max_images", "shuffle_buffer", "ckpt_every"):
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


def _is_stream(images: Images) -> bool:
    """Whether :func:`train_image_tokenizer` streams ``images``: a source spec, config or source."""
    return isinstance(images, (str, os.PathLike, SourceConfig)) or (
        hasattr(images, "units") and hasattr(images, "read"))


def _open(images: str | os.PathLike | SourceConfig | Source) -> Source:
    if isinstance(images, os.PathLike):
        images = os.fspath(images)
    return open_source(images) if isinstance(images, (str, SourceConfig)) else images


def _unit_images(source: Source, unit: str) -> Iterator[tuple[str, ImageRef]]:
    """``(key, image)`` of every image segment of one unit, in order (skipped samples left out)."""
    for item in source.read(unit):
        if isinstance(item, Sample):
            refs = [s for s in item.segments if isinstance(s, ImageRef)]
            for i, ref in enumerate(refs):
                yield (item.key if len(refs) == 1 else f"{item.key}#{i}"), ref


def _decode(ref: ImageRef, resolution: int, allow_remote: bool) -> torch.Tensor | ImageError:
    """Pixels ``[3, R, R]`` of one image (``"crop"``), or the error that makes it unusable."""
    try:
        return preprocess(load_image(ref, allow_remote=allow_remote), resolution, "crop")
    except ImageError as e:
        return e


class _Decoder:
    """Decodes images in order, on ``workers`` threads (0: the calling thread); skips bad ones."""

    def __init__(self, resolution: int, workers: int, log: Callable[[str], None]) -> None:
        self.resolution, self.log = resolution, log
        self.pool = ThreadPoolExecutor(workers) if workers > 0 else None
        self.skipped = 0

    def __call__(self, items: list[tuple[str, ImageRef]],
                 allow_remote: bool = False) -> list[torch.Tensor]:
        """The pixels of the usable images of ``(key, image)`` items, in order."""
        def one(ref: ImageRef) -> torch.Tensor | ImageError:
            return _decode(ref, self.resolution, allow_remote)

        refs = [ref for _, ref in items]
        results = list(self.pool.map(one, refs) if self.pool else map(one, refs))
        good = []
        for (key, _), result in zip(items, results):
            if isinstance(result, ImageError):
                self.skipped += 1
                if self.skipped <= MAX_SKIP_NOTES:
                    more = " (further bad images are only counted)" if (
                        self.skipped == MAX_SKIP_NOTES) else ""
                    self.log(f"skipped bad image {key}: {result}{more}")
            else:
                good.append(result)
        return good

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _shuffle_buffer(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """WebDataset-style shuffling: each item swaps with a random one of ``size`` held back."""
    if size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


@dataclass
class _StreamPlan:
    """How a source splits into evaluation images and training images (see :func:`_plan_stream`)."""

    spans: list[tuple[str, int, int | None]]
    """``(unit, first, end)``: the training images of a unit are its images ``first`` to ``end``
    (``None``: its last one)."""
    eval_items: list[tuple[str, ImageRef]]
    """The evaluation images (held out, or with under 10 images, the first training images)."""
    train_images: int | None
    """Training images per epoch, when the look-ahead saw all of them."""


def _plan_stream(source: Source, config: VQTrainConfig, hold_out: bool) -> _StreamPlan:
    """Split a source into held-out and training images, reading ahead only a bounded number.

    The first ``min(eval_size, M // 10)`` images (source order) are held out when ``hold_out``, and
    only the first ``max_images`` are used. Deciding both needs at most ``max(10 * eval_size,
    max_images) + 1`` images read ahead, still encoded.

    Raises:
        ValueError: The source has no images.
    """
    units = source.units()
    cap = config.max_images or None
    ahead = max(10 * config.eval_size if hold_out else 0, cap or 0)
    counts: list[int] = []  # images of the units read ahead (the last may be read in part)
    first: list[tuple[str, ImageRef]] = []
    seen, complete = 0, True
    if ahead:
        for unit in units:
            counts.append(0)
            for item in _unit_images(source, unit):
                if seen > ahead:
                    break
                if len(first) < config.eval_size:
                    first.append(item)
                counts[-1] += 1
                seen += 1
            if seen > ahead:
                complete = False
                break
    total = seen if ahead and complete else None
    known = [x for x in (cap, total) if x is not None]
    limit = min(known) if known else None  # images used in all, when bounded
    n_eval = min(config.eval_size, (limit if limit is not None else ahead) // 10) if hold_out else 0
    if limit == 0 or (ahead and not seen):
        raise ValueError(f"{source.config.path}: the source has no images")

    spans: list[tuple[str, int, int | None]] = []
    start = 0
    for i, unit in enumerate(units):
        if i < len(counts):
            lo, hi = max(n_eval - start, 0), None if limit is None else limit - start
            if lo < counts[i] and (hi is None or lo < hi):
                spans.append((unit, lo, hi))
            start += counts[i]
        elif limit is None:
            spans.append((unit, 0, None))
    eval_items = first[:n_eval] if n_eval else first[: min(config.eval_size, limit or seen)]
    return _StreamPlan(spans, eval_items, None if limit is None else limit - n_eval)


class _StreamBatches:
    """Endless shuffled batches of a source's images, decoded on the fly and resumable exactly.

    Epoch ``e`` visits the units of the plan in an order drawn from ``(seed, e)`` and passes their
    images, still encoded, through a shuffle buffer drawn from the same generator, so the stream is
    a function of the seed and its position is ``(epoch, images drawn in the epoch)``. Resuming
    replays the epoch's draws up to that position: it re-reads those images but decodes none.
    """

    def __init__(self, source: Source, spans: list[tuple[str, int, int | None]], batch_size: int,
                 shuffle_buffer: int, seed: int, decoder: _Decoder) -> None:
        self.source, self.spans, self.decoder = source, spans, decoder
        self.batch_size, self.buffer, self.seed = batch_size, shuffle_buffer, seed
        self.epoch = self.drawn = self.good = 0
        self.epoch_size: int | None = None  # images per epoch, bad ones included, once known
        self._items: Iterator[tuple[str, ImageRef]] | None = None
        units = "\n".join(f"{u}:{lo}:{hi}" for u, lo, hi in self.spans)
        self.fingerprint = hashlib.sha256(units.encode()).hexdigest()[:16]

    def _epoch_items(self, epoch: int) -> Iterator[tuple[str, ImageRef]]:
        rng = random.Random(f"{self.seed}/{epoch}")
        spans = list(self.spans)
        rng.shuffle(spans)

        def items() -> Iterator[tuple[str, ImageRef]]:
            for unit, lo, hi in spans:
                for i, item in enumerate(_unit_images(self.source, unit)):
                    if hi is not None and i >= hi:
                        break
                    if i >= lo:
                        yield item

        return _shuffle_buffer(items(), self.buffer, rng)

    def _draw(self) -> tuple[str, ImageRef]:
        if self._items is None:
            self._items = self._epoch_items(self.epoch)
            # Resuming costs re-reading (never decoding) the images this epoch had drawn.
            for n in range(self.drawn):
                if next(self._items, None) is None:
                    raise ValueError(f"{self.source.config.path}: holds fewer images than when "
                                     f"the checkpoint was saved (epoch {self.epoch}: {n} of "
                                     f"{self.drawn})")
        item = next(self._items, None)
        if item is None:
            if self.drawn == 0:
                raise ValueError(f"{self.source.config.path}: no training images")
            self.epoch_size = self.epoch_size or self.drawn
            self.epoch, self.drawn = self.epoch + 1, 0
            self._items = self._epoch_items(self.epoch)
            item = next(self._items)
        self.drawn += 1
        return item

    def take(self, n: int) -> list[torch.Tensor]:
        """The next ``n`` good images, ``[3, R, R]`` each."""
        images: list[torch.Tensor] = []
        while len(images) < n:
            good = self.decoder([self._draw() for _ in range(n - len(images))],
                                self.source.config.allow_remote)
            self.good += len(good)
            images += good
            if self.good == 0 and self.epoch > 0:
                raise ValueError(f"{self.source.config.path}: none of its images is usable "
                                 f"({self.decoder.skipped} bad)")
        return images

    def next(self) -> torch.Tensor:
        """The next batch ``[batch_size, 3, R, R]``."""
        return torch.stack(self.take(self.batch_size))

    def init_pixels(self, n: int) -> torch.Tensor:
        """``n`` images for the codebook's data init: the first of a fresh copy of this stream."""
        fresh = _StreamBatches(self.source, self.spans, self.batch_size, self.buffer, self.seed,
                               self.decoder)
        return torch.stack(fresh.take(n))

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "stream", "data": self.fingerprint, "epoch": self.epoch,
                "drawn": self.drawn, "good": self.good, "epoch_size": self.epoch_size,
                "skipped": self.decoder.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_data_state(state, "stream", self.fingerprint)
        self.epoch, self.drawn, self.good = state["epoch"], state["drawn"], state["good"]
        self.epoch_size, self.decoder.skipped = state["epoch_size"], state["skipped"]
        self._items = None


class _TensorBatches:
    """Endless random mini-batches of a tensor: a fresh permutation per epoch, seeded."""

    def __init__(self, pixels: torch.Tensor, batch_size: int, generator: torch.Generator) -> None:
        self.pixels, self.batch_size, self.generator = pixels, batch_size, generator
        self.order = torch.empty(0, dtype=torch.long)
        self.fingerprint = f"{pixels.shape[0]} images"

    def next(self) -> torch.Tensor:
        if self.order.numel() < self.batch_size:
            fresh = torch.randperm(self.pixels.shape[0], generator=self.generator)
            self.order = torch.cat([self.order, fresh])
        index, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return self.pixels[index]

    def init_pixels(self, n: int) -> torch.Tensor:
        return self.pixels  # init_codebook draws its images from all of them

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "tensor", "data": self.fingerprint, "order": self.order.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_data_state(state, "tensor", self.fingerprint)
        self.order = torch.tensor(state["order"], dtype=torch.long)


def _check_data_state(state: dict[str, Any], kind: str, fingerprint: str) -> None:
    if state.get("kind") != kind or state.get("data") != fingerprint:
        raise ValueError(f"the checkpoint was trained on other data ({state.get('kind')} "
                         f"{state.get('data')}, now {kind} {fingerprint}); resume with the same "
                         "images, or train afresh in another out_dir")


def _eval_pixels(images: Images, resolution: int, config: VQTrainConfig, decoder: _Decoder
                 ) -> torch.Tensor:
    """Evaluation pixels of ``eval_images``: a source's first ``eval_size`` usable images."""
    if not _is_stream(images):
        return images_to_pixels(images, resolution, config.num_workers)
    if config.eval_size == 0:
        raise ValueError("eval_size is 0: no images of the eval_images source to evaluate on")
    source = _open(images)
    pixels: list[torch.Tensor] = []
    items = iter_images(source)
    while len(pixels) < config.eval_size:
        chunk = [item for _, item in zip(range(config.eval_size - len(pixels)), items)]
        if not chunk:
            break
        pixels += decoder(chunk, source.config.allow_remote)
    if not pixels:
        raise ValueError(f"{source.config.path}: no usable evaluation images")
    return torch.stack(pixels)


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


def _training_data(
    images: Images, eval_images: Images | None, config: VQTrainConfig, generator: torch.Generator,
    decoder: _Decoder,
) -> tuple[_TensorBatches | _StreamBatches, torch.Tensor, int | None, str]:
    """The batches, the evaluation pixels, the training images per epoch (if known) and a phrase
    naming the data."""
    resolution = decoder.resolution
    if not _is_stream(images):
        if config.max_images:
            raise ValueError("max_images applies to a streamed source; slice the images instead")
        pixels = images_to_pixels(images, resolution, config.num_workers)
        if eval_images is not None:
            eval_pixels = _eval_pixels(eval_images, resolution, config, decoder)
        else:
            n_train = pixels.shape[0] - min(config.eval_size, pixels.shape[0] // 10)
            pixels, eval_pixels = pixels[:n_train], pixels[n_train:]
            if eval_pixels.shape[0] == 0:  # under 10 images: evaluate on the training images
                eval_pixels = pixels
        batches = _TensorBatches(pixels, config.batch_size, generator)
        return batches, eval_pixels, pixels.shape[0], f"{pixels.shape[0]} images"
    source = _open(images)
    if eval_images is None and config.eval_size == 0:
        raise ValueError("eval_size is 0: pass eval_images to evaluate a streamed source")
    plan = _plan_stream(source, config, hold_out=eval_images is None)
    stream = _StreamBatches(source, plan.spans, config.batch_size, config.shuffle_buffer,
                            config.seed, decoder)
    if eval_images is not None:
        eval_pixels = _eval_pixels(eval_images, resolution, config, decoder)
    else:
        good = decoder(plan.eval_items, source.config.allow_remote)
        if not good:
            raise ValueError(f"{source.config.path}: none of its first {len(plan.eval_items)} "
                             "images (held out for evaluation) is usable")
        eval_pixels = torch.stack(good)
    size = "" if plan.train_images is None else f", {plan.train_images} images"
    return stream, eval_pixels, plan.train_images, (
        f"a stream of {source.config.path} ({len(plan.spans)} units{size}, "
        f"{eval_pixels.shape[0]} evaluation images)")


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


# ------------------------------------------------------------------------------------------- CLI


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train-image`` (``chameleon tokenizer train-image``) on argparse subparsers."""
    defaults = VQTrainConfig()
    parser = subparsers.add_parser(
        "train-image", help="train the VQGAN image tokenizer",
        description="Train a VQGAN image tokenizer on images streamed from a data source (tar "
                    "shards, a folder of images, parquet or JSONL) and save it (vqgan.json + "
                    "vqgan.safetensors) with its training log, metrics and checkpoints.")
    parser.add_argument("--data", required=True,
                        help="the source: a folder of images, a .tar shard, a brace pattern like "
                             "DIR/pairs/train-{000000..000003}.tar, parquet or JSONL files")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--config", type=Path,
                        help="a .toml/.yaml/.json VQTrainConfig; the flags below override it")
    parser.add_argument("--eval-data", help="images to evaluate on, like --data (default: the "
                                            "first images of --data, held out)")
    parser.add_argument("--preset", choices=VQGANConfig.preset_names(), default=None,
                        help=f"VQGAN architecture preset (default {defaults.vq_preset} with the "
                             f"recommended overrides {defaults.vq_overrides})")
    parser.add_argument("--encoder", choices=ENCODERS, default=None,
                        help="taming (official) or patch (each code sees only its own patch: easier "
                             "codes for a small model; native layout only)")
    parser.add_argument("--steps", type=int, help=f"default {defaults.steps}")
    parser.add_argument("--batch-size", type=int, help=f"default {defaults.batch_size}")
    parser.add_argument("--lr", type=float, help=f"default {defaults.lr}")
    parser.add_argument("--disc-start", type=int,
                        help="steps before the PatchGAN discriminator starts (default "
                             f"{defaults.disc_start}: no discriminator)")
    parser.add_argument("--max-images", type=int,
                        help="train on at most this many images (the first ones of --data)")
    parser.add_argument("--shuffle-buffer", type=int,
                        help=f"images held in the shuffle buffer of the stream (default {defaults.shuffle_buffer})")
    parser.add_argument("--num-workers", type=int,
                        help="threads that decode images (default 0: the main thread)")
    parser.add_argument("--ckpt-every", type=int,
                        help="save a checkpoint every N steps (default 0: only at the end)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in --out")
    parser.add_argument("--seed", type=int, help=f"default {defaults.seed}")
    parser.add_argument("--lpips", default=None,
                        help="local LPIPS weights file (perceptual loss; skipped without one)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_cli)
    return parser


def run_cli(args: argparse.Namespace) -> int:
    """Train with the options of :func:`add_cli` and print the final metrics."""
    if args.max_images is not None and args.max_images <= 0:
        raise ValueError(f"--max-images must be positive, got {args.max_images}")
    config = VQTrainConfig.from_dict(read_config_file(args.config)) if args.config else VQTrainConfig()
    changes: dict[str, Any] = {k: v for k, v in dict(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        lpips_path=args.lpips, disc_start=args.disc_start, max_images=args.max_images,
        shuffle_buffer=args.shuffle_buffer, num_workers=args.num_workers,
        ckpt_every=args.ckpt_every).items() if v is not None}
    if args.preset is not None:  # the default overrides are for the default preset only
        changes.update(vq_preset=args.preset, vq_overrides={})
    if args.encoder is not None:
        changes["vq_overrides"] = {**changes.get("vq_overrides", config.vq_overrides),
                                   "encoder": args.encoder}
    config = config.replace(**changes)
    _, metrics = train_image_tokenizer(args.data, config, out_dir=args.out,
                                       eval_images=args.eval_data, progress=not args.no_progress,
                                       resume=args.resume)
    print(json.dumps(metrics))
    return 0
