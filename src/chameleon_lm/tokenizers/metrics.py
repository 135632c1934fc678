"""Image-reconstruction metrics for the image tokenizer: PSNR, SSIM, codebook usage and perplexity,
and the Fréchet distance of Inception features (FID / rFID).

Images are batches ``[B, C, H, W]``. :func:`psnr` and :func:`ssim` take them in the VQGAN's pixel
range [-1, 1] by default (pass ``value_range=(0.0, 1.0)`` for [0, 1] images); both clamp to that
range first, as :func:`chameleon_lm.tokenizers.images.to_pil` does before saving a decoded image,
and then work on the [0, 1] scale.

:func:`inception_features` runs torch-fidelity's port of the TensorFlow Inception network of the
reference FID code (an optional dependency, ``pip install torch-fidelity``) on weights from a local
file: nothing is ever downloaded.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from chameleon_lm.tokenizers.vqgan import VQGAN

SSIM_WINDOW = 11
"""Side of the Gaussian window of :func:`ssim` (Wang et al. 2004)."""
SSIM_SIGMA = 1.5
"""Standard deviation of the Gaussian window, in pixels."""
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _to_unit(
    a: torch.Tensor, b: torch.Tensor, value_range: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both batches clamped to ``value_range`` and mapped to [0, 1] in float64."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"expected two image batches [B, C, H, W] of the same shape, got {list(a.shape)} "
            f"and {list(b.shape)}"
        )
    low, high = value_range
    if not high > low:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")

    def unit(x: torch.Tensor) -> torch.Tensor:
        return (x.detach().double().clamp(low, high) - low) / (high - low)

    return unit(a), unit(b)


def psnr(
    a: torch.Tensor, b: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)
) -> float:
    """Peak signal-to-noise ratio in dB, computed per image on the [0, 1] scale and averaged.

    ``10 * log10(1 / MSE)`` per image (the MSE is floored at 1e-10, so identical images give
    100 dB rather than infinity), then the mean over the batch.

    Args:
        a: Images ``[B, C, H, W]`` (e.g. the originals).
        b: Images of the same shape (e.g. the reconstructions).
        value_range: The range the pixels are given in; values outside are clamped to it.
    """
    a, b = _to_unit(a, b, value_range)
    mse = ((a - b) ** 2).flatten(1).mean(dim=1).clamp_min(1e-10)  # [B]
    return float((10.0 * torch.log10(1.0 / mse)).mean())


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised 1-D Gaussian ``[size]`` (float64, sums to 1); the 2-D window is its outer
    product with itself."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _valid_filter_matrix(n: int, g: torch.Tensor) -> torch.Tensor:
    """``[n - k + 1, n]`` banded matrix ``M[i, i + j] = g[j]``: ``M @ x`` is the valid
    cross-correlation of ``x`` (along its first axis) with the length-``k`` filter ``g``."""
    eye = torch.eye(n, dtype=g.dtype)[:, None, :]  # [n, 1, n]: one basis vector per row
    return F.conv1d(eye, g.view(1, 1, -1)).squeeze(1).T  # [n - k + 1, n]


def ssim(
    a: torch.Tensor, b: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)
) -> float:
    """Structural similarity (Wang et al. 2004), averaged over pixels, channels and images.

    The standard definition: an 11x11 Gaussian window with sigma 1.5, ``K1 = 0.01``,
    ``K2 = 0.03``, on the [0, 1] scale (data range 1), population (not sample) statistics, and only
    the positions where the window lies inside the image ("valid" filtering). This equals
    scikit-image's ``structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1)`` per image and channel, averaged.

    Each channel is filtered on its own, in float64, with the separable window applied as two
    banded matrix products (``Mh @ x @ Mw.T``): the same numbers as a per-channel ``conv2d`` with
    the 11x11 window, but tens of times faster than float64 ``conv2d`` on a CPU.

    Args:
        a: Images ``[B, C, H, W]`` with ``H, W >= 11``.
        b: Images of the same shape.
        value_range: The range the pixels are given in; values outside are clamped to it.
    """
    a, b = _to_unit(a, b, value_range)
    height, width = a.shape[2:]
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels")
    g = gaussian_window()
    filter_h, filter_w = _valid_filter_matrix(height, g), _valid_filter_matrix(width, g)

    def filt(x: torch.Tensor) -> torch.Tensor:  # local weighted mean, [B, C, H-10, W-10]
        return filter_h @ x @ filter_w.T

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a**2
    var_b = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return float(ssim_map.mean())


def code_histogram(codes: torch.Tensor, n_embed: int) -> torch.Tensor:
    """How often each code occurs in ``codes`` (any shape, values in ``[0, n_embed)``).

    Returns:
        The counts, ``[n_embed]`` (long, CPU).
    """
    return torch.bincount(codes.reshape(-1).long().cpu(), minlength=n_embed)


def codebook_usage(codes: torch.Tensor, n_embed: int) -> float:
    """Fraction of the ``n_embed`` codebook entries that occur at least once in ``codes``."""
    return float((code_histogram(codes, n_embed) > 0).sum()) / n_embed


def codebook_perplexity(codes: torch.Tensor, n_embed: int) -> float:
    """``exp(entropy)`` of the code frequencies in ``codes``: the effective number of codes used.

    It ranges from 1 (one code everywhere) to ``n_embed`` (all codes equally often); 0 for no codes.
    """
    counts = code_histogram(codes, n_embed).double()
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


# ------------------------------------------------------------------------------ Fréchet distance

INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
"""torch-fidelity's file of the reference FID Inception (TensorFlow's 2015-12-05 graph)."""
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_NAME
)
INCEPTION_DIM = 2048
"""Width of the pool features FID compares."""


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of features ``[N, D]``, ``N >= 2``,
    as the reference FID code computes them (``np.cov(features, rowvar=False)``)."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {list(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError("features hold NaN or infinite values")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _gaussian(mu: np.ndarray, sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: need a mean [D] and a covariance [D, D], got {list(mu.shape)} "
                         f"and {list(sigma.shape)}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: the statistics hold NaN or infinite values")
    if not np.allclose(sigma, sigma.T, rtol=1e-6, atol=1e-9 * max(np.abs(sigma).max(), 1.0)):
        raise ValueError(f"{name}: the covariance is not symmetric")
    return mu, sigma


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance, its (rounding-)negative eigenvalues taken as 0."""
    eigenvalues, vectors = np.linalg.eigh(sigma)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ vectors.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance of two Gaussians: ``|mu1 - mu2|² + Tr(S1 + S2 - 2 (S1 S2)^½)`` (FID).

    Args:
        mu1: Mean ``[D]`` of the first set (e.g. the originals' features).
        sigma1: Its covariance ``[D, D]`` (symmetric, positive semi-definite).
        mu2: Mean ``[D]`` of the second set.
        sigma2: Its covariance ``[D, D]``.
    """
    mu1, sigma1 = _gaussian(mu1, sigma1, "first")
    mu2, sigma2 = _gaussian(mu2, sigma2, "second")
    if mu1.shape != mu2.shape:
        raise ValueError(f"the statistics have {mu1.shape[0]} and {mu2.shape[0]} dimensions")
    root1 = _psd_sqrt(sigma1)
    # sqrt(S1) S2 sqrt(S1) has the eigenvalues of S1 S2 but is symmetric: eigvalsh stays real and
    # stable on the singular covariances of few samples, where sqrtm of S1 S2 goes complex
    inner = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    diff = mu1 - mu2
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    return max(distance, 0.0)  # rounding can leave equal statistics a hair below 0


# ----------------------------------------------------------------------------- Inception features


def inception_extractor(
    weights: str | os.PathLike, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """torch-fidelity's FID Inception (``inception-v3-compat``, 2048-d pool features) with the
    weights of a local file, in eval mode on ``device``.

    Raises:
        FileNotFoundError: ``weights`` is not a file (nothing is downloaded).
        ImportError: torch-fidelity cannot be imported.
        ValueError: The file does not hold the Inception's weights.
    """
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no Inception weights there. FID needs torch-fidelity's "
            f"{INCEPTION_WEIGHTS_NAME} (the reference FID Inception in PyTorch); nothing is "
            f"downloaded: fetch it from {INCEPTION_WEIGHTS_URL} and pass its path"
        )
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except (ImportError, RuntimeError) as e:  # a mismatched torchvision fails with RuntimeError
        raise ImportError(
            f"Inception features need torch-fidelity: pip install torch-fidelity (it imports "
            f"torchvision, which must be the build matching the installed torch) ({e})"
        ) from e
    try:
        # torch-fidelity unpickles the file unrestricted: refuse one that holds more than tensors
        torch.load(path, map_location="cpu", weights_only=True)
        extractor = FeatureExtractorInceptionV3(
            name="inception-v3-compat", features_list=[str(INCEPTION_DIM)],
            feature_extractor_weights_path=str(path),
        )
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise ValueError(
            f"{path}: not the FID Inception's weights ({INCEPTION_WEIGHTS_NAME}): {e}"
        ) from e
    return extractor.to(device).eval()


@torch.no_grad()
def extract_inception_features(extractor: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    """Pool features ``[N, 2048]`` (float32) of images ``[N, 3, H, W]`` (uint8, any size: the
    extractor resizes them to 299 as the reference code does)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} "
                         f"{list(images.shape)}")
    device = next(extractor.parameters()).device
    (features,) = extractor(images.to(device))
    return features.float().cpu().numpy()


def _same_size_batches(
    images: Sequence[Image.Image], batch_size: int
) -> Iterator[list[Image.Image]]:
    """Consecutive runs of at most ``batch_size`` images of one size (a batch is one tensor)."""
    batch: list[Image.Image] = []
    for img in images:
        if batch and (len(batch) == batch_size or img.size != batch[0].size):
            yield batch
            batch = []
        batch.append(img)
    if batch:
        yield batch


def inception_features(
    images: Sequence[Image.Image],
    weights: str | os.PathLike,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """FID Inception pool features ``[N, 2048]`` (float32) of PIL images (as RGB, any sizes).

    Args:
        images: The images.
        weights: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (see
            :func:`inception_extractor`).
        batch_size: Images per forward pass.
        device: Where the network runs.
    """
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("images must be a non-empty list of PIL images")
    if not all(isinstance(img, Image.Image) for img in images):
        raise TypeError("images must be PIL images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    extractor = inception_extractor(weights, device)
    out = []
    for batch in _same_size_batches(images, batch_size):
        pixels = torch.stack([torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
                              for img in batch])  # [B, 3, H, W] uint8
        out.append(extract_inception_features(extractor, pixels))
    return np.concatenate(out)


# ------------------------------------------------------------------ a VQGAN's reconstructions


@contextmanager
def eval_mode(vqgan: VQGAN) -> Iterator[None]:
    was_training = vqgan.training
    vqgan.eval()
    try:
        yield
    finally:
        vqgan.train(was_training)


@torch.no_grad()
def reconstruct(vqgan: VQGAN, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch through the VQGAN: reconstructions clamped to [-1, 1] (float32, CPU) and codes
    ``[B, N]`` (CPU) of pixels ``[B, 3, R, R]`` in [-1, 1].

    The codes are ``encode``'s; the reconstruction is ``decode``'s up to the float rounding of the
    straight-through sum ``z + (z_q - z)``.
    """
    # the training pass rather than encode + decode, so training's evaluation keeps its numbers
    recon, codes, _ = vqgan(pixels.to(vqgan.quantize.embedding.weight.device))
    return recon.float().cpu().clamp(-1.0, 1.0), codes.cpu()


def _mean(parts: list[tuple[float, int]]) -> float:
    """Image-weighted mean of per-batch means."""
    if len(parts) == 1:  # one batch: its value untouched, as the metric gave it for all images
        return parts[0][0]
    return math.fsum(value * n for value, n in parts) / sum(n for _, n in parts)


class ReconstructionScores:
    """PSNR, SSIM, L1 and codebook statistics accumulated over batches of reconstructions.

    PSNR and SSIM are per-image means (images share one size), so averaging batch values weighted
    by their image counts gives the metric of the whole set.
    """

    def __init__(self, n_embed: int) -> None:
        self.n_embed = n_embed
        self.n_images = 0
        self._psnr: list[tuple[float, int]] = []
        self._ssim: list[tuple[float, int]] = []
        self._l1: list[tuple[float, int]] = []
        self._codes: list[torch.Tensor] = []

    def add(self, pixels: torch.Tensor, recon: torch.Tensor, codes: torch.Tensor) -> None:
        """One batch: originals, reconstructions ``[B, 3, R, R]`` in [-1, 1], codes ``[B, N]``."""
        if codes.shape[0] != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images but {codes.shape[0]} rows of codes")
        pixels, recon = pixels.detach().cpu(), recon.detach().cpu()
        n = pixels.shape[0]
        self._psnr.append((psnr(pixels, recon), n))
        self._ssim.append((ssim(pixels, recon), n))
        self._l1.append((float((pixels - recon).abs().mean()), n))
        self._codes.append(codes.detach().cpu())
        self.n_images += n

    def result(self) -> dict[str, float]:
        """``psnr`` (dB), ``ssim``, ``l1`` (in [-1, 1] units), ``codebook_usage`` and
        ``codebook_perplexity``."""
        if self.n_images == 0:
            raise ValueError("no reconstructions were scored")
        codes = torch.cat(self._codes)
        return {
            "psnr": _mean(self._psnr),
            "ssim": _mean(self._ssim),
            "l1": _mean(self._l1),
            "codebook_usage": codebook_usage(codes, self.n_embed),
            "codebook_perplexity": codebook_perplexity(codes, self.n_embed),
        }


def score_reconstruction(
    vqgan: VQGAN, pixels: torch.Tensor, batch_size: int = 256
) -> dict[str, float]:
    """:meth:`ReconstructionScores.result` of ``vqgan`` on pixels ``[M, 3, R, R]`` in [-1, 1]
    (the VQGAN is put in eval mode meanwhile)."""
    if pixels.ndim != 4 or pixels.shape[0] == 0:
        raise ValueError(f"expected pixels [M, 3, R, R] with M >= 1, got {list(pixels.shape)}")
    scores = ReconstructionScores(vqgan.config.n_embed)
    with eval_mode(vqgan):
        for chunk in pixels.split(batch_size):
            scores.add(chunk, *reconstruct(vqgan, chunk))
    return scores.result()
