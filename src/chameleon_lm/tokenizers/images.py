"""Image loading and the official Chameleon pre/post-processing (pure PIL, numpy and torch).

The pipeline of Meta's ``ImageTokenizer`` is reproduced step for step, so the pixels (and hence the
image tokens) are bit-identical to the reference:

1. :func:`whiten_transparency`: composite anything with an alpha channel over white.
2. :func:`resize_and_crop`: short side to ``size`` with LANCZOS, centre crop
   (or the letterbox variant :func:`resize_and_pad`).
3. :func:`to_tensor`: ``np.array(img) / 255.0 * 2 - 1`` -> float32 ``[3, size, size]``.

and back with :func:`to_pil`. :func:`open_image` is this package's addition in front of step 1: it
reads paths, bytes and file objects safely and brings every PIL mode into one that step 1 handles
correctly.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from typing import BinaryIO, Literal, Union

import numpy as np
import torch
from PIL import Image, ImageOps

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image]
"""What :func:`open_image` accepts: a path, encoded bytes, a binary file object or a PIL image."""

WHITE = (255, 255, 255)

HF_RESCALE_FACTOR = 0.0078
"""Hugging Face's ``ChameleonImageProcessor`` rescales by 0.0078, not 2/255 (:func:`to_tensor`)."""

# Modes that whiten_transparency handles correctly as they are (via convert("RGBA")).
_PASSTHROUGH_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA"}
# Modes without transparency that PIL converts to RGB correctly.
_RGB_MODES = {"CMYK", "YCbCr", "RGBX"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageError(ValueError):
    """An input that is not a usable image: unreadable, truncated, empty, too large, odd mode."""


def _describe(src: ImageSource) -> str:
    """A short name for ``src`` in error messages."""
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    if isinstance(src, Image.Image):
        return f"<PIL image {src.mode} {src.width}x{src.height}>"
    return str(getattr(src, "name", None) or f"<{type(src).__name__}>")


def open_image(src: ImageSource) -> Image.Image:
    """Read an image and bring it to a mode that :func:`whiten_transparency` handles correctly.

    Decoding is done eagerly, so broken inputs fail here with an :class:`ImageError` naming the
    source instead of deep inside preprocessing. The EXIF orientation is applied
    (``ImageOps.exif_transpose``), so photos come out the way viewers show them; Meta's code does
    not do this, which only matters for images that carry a rotation tag. Animated images give
    their first frame.

    Mode handling: 16-bit greyscale (``I;16*``, and ``I`` read as 16-bit) is scaled to 8 bits by
    dividing by 257 (so 65535 -> 255 rather than clipping at 255); ``F`` is taken on PIL's 0-255
    scale, rounded and clipped; any image with a ``transparency`` entry (palette or colour key) is
    converted to RGBA so it is honoured; ``RGBa``/``La`` are un-premultiplied; CMYK, YCbCr and RGBX
    become RGB. ``1``, ``L``, ``LA``, ``P``, ``PA``, ``RGB`` and ``RGBA`` are returned as they are.

    Args:
        src: A path, encoded image bytes, a binary file object or a PIL image.

    Returns:
        A new PIL image (the input is never modified) of non-zero size.

    Raises:
        ImageError: The source is not a decodable image, is truncated, has zero width or height,
            exceeds ``PIL.Image.MAX_IMAGE_PIXELS`` (decompression bomb), or has an unsupported mode.
        FileNotFoundError: ``src`` is a path that does not exist.
    """
    name = _describe(src)
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(src, Image.Image):
                img = ImageOps.exif_transpose(src)  # loads lazily opened images; returns a copy
            else:
                fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src
                with Image.open(fp) as opened:
                    img = ImageOps.exif_transpose(opened)  # decodes the first frame; returns a copy
    except FileNotFoundError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: image too large, possibly a decompression bomb ({e})") from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ImageError(f"{name}: not a readable image ({type(e).__name__}: {e})") from e
    if img.width == 0 or img.height == 0:
        raise ImageError(f"{name}: image has zero size {img.width}x{img.height}")
    return _normalize_mode(img, name)


def _normalize_mode(img: Image.Image, name: str) -> Image.Image:
    """Convert modes that ``convert("RGBA")`` would mishandle (see :func:`open_image`)."""
    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.round(np.clip(values, 0, 65535) / 257).astype(np.uint8), "L")
    if img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.round(np.clip(values, 0, 255)).astype(np.uint8), "L")
    if "transparency" in img.info:
        return img.convert("RGBA")
    if img.mode == "La":
        return img.convert("LA")
    if img.mode == "RGBa":
        return img.convert("RGBA")
    if img.mode in _RGB_MODES:
        return img.convert("RGB")
    if img.mode in _PASSTHROUGH_MODES:
        return img
    raise ImageError(f"{name}: unsupported image mode {img.mode!r}")


def whiten_transparency(img: Image.Image) -> Image.Image:
    """Meta's ``_whiten_transparency``: an RGB image, with any transparency composited over white.

    ``rgb = (1 - a) * 255 + a * rgb`` with ``a = alpha / 255``, computed in float64 and truncated to
    uint8. Images whose alpha is 255 everywhere are just converted to RGB; RGB images are returned
    as they are.
    """
    if img.mode == "RGB":
        return img
    rgba = np.array(img.convert("RGBA"))  # [H, W, 4] uint8
    if not (rgba[:, :, 3] < 255).any():
        return img.convert("RGB")
    alpha = rgba[:, :, 3:] / 255.0  # [H, W, 1] float64
    rgb = (1 - alpha) * 255 + alpha * rgba[:, :, :3]  # [H, W, 3] float64
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def resize_and_crop(img: Image.Image, size: int) -> Image.Image:
    """Meta's resize: short side to ``size`` (LANCZOS, sides rounded), centre crop ``size``²."""
    scale = size / min(img.size)
    img = img.resize((round(scale * img.width), round(scale * img.height)), Image.LANCZOS)
    x0 = (img.width - size) // 2
    y0 = (img.height - size) // 2
    return img.crop((x0, y0, x0 + size, y0 + size))


def resize_and_pad(img: Image.Image, size: int, fill: tuple[int, int, int] = WHITE) -> Image.Image:
    """Letterbox variant (for SFT data): long side to ``size`` (LANCZOS, sides rounded, at least
    1 px), pasted at the centre of a ``size``² RGB canvas of colour ``fill``.

    The default fill is white, the colour :func:`whiten_transparency` composites onto, so padding
    and transparent regions look alike to the tokenizer.
    """
    scale = size / max(img.size)
    new_size = (max(1, round(scale * img.width)), max(1, round(scale * img.height)))
    img = img.resize(new_size, Image.LANCZOS)
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return canvas


def to_tensor(img: Image.Image, hf_rescale: bool = False) -> torch.Tensor:
    """An RGB image as a float32 tensor ``[3, H, W]`` in [-1, 1], exactly as Meta computes it.

    Meta: ``np.array(img) / 255.0 * 2 - 1`` in float64, then cast to float32. With
    ``hf_rescale=True`` this reproduces Hugging Face's ``ChameleonImageProcessor`` instead:
    ``x * 0.0078`` cast to float32, minus 1, which spans [-1, 0.989] rather than [-1, 1] (a known HF
    difference that can change tokens).
    """
    if img.mode != "RGB":
        raise ValueError(f"to_tensor expects an RGB image, got mode {img.mode!r}")
    values = np.array(img)  # [H, W, 3] uint8
    if hf_rescale:
        scaled = (values.astype(np.float64) * HF_RESCALE_FACTOR).astype(np.float32) - np.float32(1)
    else:
        scaled = values / 255.0 * 2 - 1  # float64, Meta's order of operations
    return torch.from_numpy(scaled).permute(2, 0, 1).float().contiguous()  # [3, H, W]


def to_pil(pixels: torch.Tensor) -> Image.Image | list[Image.Image]:
    """Meta's ``_pil_from_chw_tensor``: clamp to [-1, 1], to [0, 1], ``(x * 255).astype(uint8)``.

    Args:
        pixels: ``[3, H, W]`` or ``[B, 3, H, W]`` in [-1, 1] (decoder output).

    Returns:
        An RGB image, or a list of them for a batch.
    """
    if pixels.ndim == 4:
        return [to_pil(p) for p in pixels]
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ValueError(f"to_pil expects [3, H, W] or [B, 3, H, W], got {list(pixels.shape)}")
    unit = (
        torch.clamp(pixels.detach().float().cpu(), -1.0, 1.0) + 1.0
    ) / 2.0  # [3, H, W] in [0, 1]
    hwc = unit.permute(1, 2, 0).numpy()  # [H, W, 3] float32
    return Image.fromarray((hwc * 255).astype(np.uint8), "RGB")  # truncates, as Meta does


def preprocess(
    src: ImageSource, size: int, mode: Literal["crop", "pad"] = "crop", hf_rescale: bool = False
) -> torch.Tensor:
    """The whole input pipeline: open, whiten, resize (crop or pad), convert to ``[3, size, size]``.

    Args:
        src: Anything :func:`open_image` accepts.
        size: Output side in pixels (the VQGAN resolution, 512 for Chameleon).
        mode: ``"crop"`` (official: short side to ``size``, centre crop) or ``"pad"`` (long side to
            ``size``, white letterbox).
        hf_rescale: Use Hugging Face's ``x * 0.0078 - 1`` instead of Meta's ``x / 255 * 2 - 1``.
    """
    img = whiten_transparency(open_image(src))
    if mode == "crop":
        img = resize_and_crop(img, size)
    elif mode == "pad":
        img = resize_and_pad(img, size)
    else:
        raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")
    return to_tensor(img, hf_rescale=hf_rescale)
