"""The losses of VQGAN training beyond reconstruction.

The PatchGAN discriminator (:class:`NLayerDiscriminator`) with taming's hinge loss and adaptive
weight, and the perceptual loss (:class:`LPIPS`), whose weights come from a local file
(:func:`load_lpips`; nothing is downloaded).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

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
