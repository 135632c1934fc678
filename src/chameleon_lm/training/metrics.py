"""Image-reconstruction metrics for the image tokenizer: PSNR, SSIM, codebook usage and perplexity.

Images are batches ``[B, C, H, W]``. :func:`psnr` and :func:`ssim` take them in the VQGAN's pixel
range [-1, 1] by default (pass ``value_range=(0.0, 1.0)`` for [0, 1] images); both clamp to that
range first, as :func:`chameleon_lm.tokenizers.images.to_pil` does before saving a decoded image,
and then work on the [0, 1] scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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
