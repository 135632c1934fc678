"""Image loading and Meta's pre/post-processing, checked pixel for pixel against a restatement."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from chameleon_lm.tokenizers.images import (
    ImageError,
    open_image,
    preprocess,
    resize_and_pad,
    to_pil,
    to_tensor,
    whiten_transparency,
)

SIZE = 32
RNG = np.random.default_rng(0)


def meta_pipeline(img: Image.Image, size: int = SIZE) -> torch.Tensor:
    """Meta's ``ImageTokenizer._whiten_transparency`` and ``_vqgan_input_from``, written out."""
    if img.mode != "RGB":
        vals = np.array(img.convert("RGBA"))
        if (vals[:, :, 3] < 255).any():
            alpha = vals[:, :, 3] / 255.0
            blended = (1 - alpha[:, :, np.newaxis]) * 255 + alpha[:, :, np.newaxis] * vals[:, :, :3]
            img = Image.fromarray(blended.astype("uint8"), "RGB")
        else:
            img = img.convert("RGB")
    scale = size / min(img.size)
    img = img.resize((round(scale * img.size[0]), round(scale * img.size[1])), Image.LANCZOS)
    x0 = (img.width - size) // 2
    y0 = (img.height - size) // 2
    img = img.crop((x0, y0, x0 + size, y0 + size))
    np_img = np.array(img) / 255.0
    np_img = np_img * 2 - 1
    return torch.from_numpy(np_img).permute(2, 0, 1).float()


def random_image(mode: str, width: int, height: int) -> Image.Image:
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    data = RNG.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(data[:, :, 0] if channels == 1 else data, mode)


def encoded(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def palette_with_transparency() -> Image.Image:
    img = Image.fromarray(RNG.integers(0, 4, (21, 34), dtype=np.uint8), "P")
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30])
    img.info["transparency"] = 2
    return img


def partial_alpha_rgba() -> Image.Image:
    img = random_image("RGBA", 30, 41)
    alpha = np.array(img)[:, :, 3]
    alpha[:5] = 255  # some opaque rows, some fully transparent ones, the rest random
    alpha[5:8] = 0
    return Image.fromarray(np.dstack([np.array(img)[:, :, :3], alpha]), "RGBA")


CASES = {
    "landscape": lambda: random_image("RGB", 37, 23),
    "portrait": lambda: random_image("RGB", 19, 50),
    "large": lambda: random_image("RGB", 71, 64),
    "rgba_partial_alpha": partial_alpha_rgba,
    "rgba_opaque": lambda: Image.fromarray(
        np.dstack([np.array(random_image("RGB", 33, 33)), np.full((33, 33), 255, np.uint8)]), "RGBA"
    ),
    "la": lambda: random_image("LA", 25, 26),
    "l": lambda: random_image("L", 40, 32),
    "p_transparency": palette_with_transparency,
    "one_bit": lambda: random_image("L", 27, 35).convert("1"),
    "cmyk": lambda: random_image("CMYK", 36, 29),
    "one_by_n": lambda: random_image("RGB", 1, 40),
    "n_by_one": lambda: random_image("RGB", 45, 1),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_preprocess_matches_meta_pipeline(name: str) -> None:
    img = CASES[name]()
    expected = meta_pipeline(img)
    assert torch.equal(preprocess(img, SIZE), expected)
    fmt = "TIFF" if img.mode == "CMYK" else "PNG"
    assert torch.equal(preprocess(encoded(img, fmt), SIZE), expected)


def test_sources_path_bytes_file_object(tmp_path) -> None:
    img = random_image("RGB", 37, 23)
    path = tmp_path / "x.png"
    img.save(path)
    expected = meta_pipeline(img)
    with open(path, "rb") as f:
        from_file = preprocess(f, SIZE)
    for src in (path, str(path), path.read_bytes(), bytearray(path.read_bytes()), from_file):
        result = src if isinstance(src, torch.Tensor) else preprocess(src, SIZE)
        assert torch.equal(result, expected)


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 514, 1000, 32768, 65535]], dtype=np.uint16)
    expected = [[0, 1, 2, 4, 128, 255]]
    img16 = Image.fromarray(values)
    assert img16.mode == "I;16"
    for img in (
        img16,
        Image.open(io.BytesIO(encoded(img16))),
        Image.fromarray(values.astype(np.int32)),
    ):
        out = open_image(img)
        assert out.mode == "L" and np.array(out).tolist() == expected
    big = Image.fromarray((RNG.integers(0, 65536, (30, 20))).astype(np.uint16))
    as_8bit = Image.fromarray(np.round(np.array(big) / 257).astype(np.uint8), "L")
    assert torch.equal(preprocess(encoded(big), SIZE), meta_pipeline(as_8bit))


def test_float_mode() -> None:
    img = Image.fromarray(np.array([[-3.0, 0.4, 0.6, 100.2, 300.0]], dtype=np.float32))
    assert np.array(open_image(img)).tolist() == [[0, 0, 1, 100, 255]]


def test_exif_orientation_is_applied() -> None:
    img = random_image("RGB", 40, 24)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    data = encoded(img, "JPEG", exif=exif.tobytes(), quality=95)
    opened = open_image(data)
    assert opened.size == (24, 40)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert np.array_equal(np.array(opened), np.array(upright))
    assert torch.equal(preprocess(data, SIZE), meta_pipeline(upright))


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (10, 12), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = whiten_transparency(open_image(buf.getvalue()))
    assert out.getpixel((5, 5)) == (255, 0, 0)


def test_open_image_does_not_modify_input() -> None:
    img = palette_with_transparency()
    before = np.array(img).copy()
    assert open_image(img).mode == "RGBA"
    assert img.mode == "P" and np.array_equal(np.array(img), before)


def test_whiten_transparency_formula() -> None:
    img = Image.fromarray(
        np.array([[[100, 50, 0, 128], [10, 20, 30, 0], [1, 2, 3, 255]]], np.uint8)
    )
    a = 128 / 255
    first = [int((1 - a) * 255 + a * v) for v in (100, 50, 0)]
    assert np.array(whiten_transparency(img)).tolist() == [[first, [255, 255, 255], [1, 2, 3]]]


def test_hf_rescale() -> None:
    img = random_image("RGB", SIZE, SIZE)
    hf = to_tensor(img, hf_rescale=True)
    expected = (np.array(img).astype(np.float64) * 0.0078).astype(np.float32) - 1
    assert torch.equal(hf, torch.from_numpy(expected).permute(2, 0, 1))
    assert hf.max() <= 0.9891
    assert torch.equal(preprocess(img, SIZE, hf_rescale=True), hf)


def test_hf_rescale_matches_transformers() -> None:
    pil_processor = pytest.importorskip(
        "transformers.models.chameleon.image_processing_pil_chameleon"
    )
    processor = pil_processor.ChameleonImageProcessorPil(do_resize=False, do_center_crop=False)
    img = random_image("RGB", SIZE, SIZE)
    reference = processor(img, return_tensors="pt").pixel_values[0]
    assert torch.equal(to_tensor(img, hf_rescale=True), reference)


def test_to_tensor_range_and_dtype() -> None:
    img = Image.fromarray(np.array([[[0, 255, 128]]], np.uint8))
    x = to_tensor(img)
    assert x.dtype == torch.float32 and x.shape == (3, 1, 1)
    assert x.flatten().tolist() == [-1.0, 1.0, float(np.float32(128 / 255.0 * 2 - 1))]


@pytest.mark.parametrize("width, height", [(40, 20), (20, 40), (32, 32), (1, 50)])
def test_pad_mode(width: int, height: int) -> None:
    img = random_image("RGB", width, height)
    out = preprocess(img, SIZE, mode="pad")
    assert out.shape == (3, SIZE, SIZE)
    scale = SIZE / max(width, height)
    new_w, new_h = max(1, round(scale * width)), max(1, round(scale * height))
    x0, y0 = (SIZE - new_w) // 2, (SIZE - new_h) // 2
    inner = to_tensor(img.resize((new_w, new_h), Image.LANCZOS))
    assert torch.equal(out[:, y0 : y0 + new_h, x0 : x0 + new_w], inner)
    mask = torch.ones(SIZE, SIZE, dtype=torch.bool)
    mask[y0 : y0 + new_h, x0 : x0 + new_w] = False
    assert (out[:, mask] == 1.0).all()  # white letterbox
    assert resize_and_pad(img, SIZE, fill=(0, 0, 0)).getpixel((0, 0)) in (
        (0, 0, 0),
        img.getpixel((0, 0)),
    )


def test_to_pil() -> None:
    pixels = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0]).reshape(1, 1, 6).repeat(3, 1, 1)
    assert np.array(to_pil(pixels))[0, :, 0].tolist() == [
        0,
        0,
        127,
        254,
        255,
        255,
    ]  # floor, clamped
    batch = to_pil(pixels.unsqueeze(0).repeat(2, 1, 1, 1))
    assert isinstance(batch, list) and len(batch) == 2 and batch[1].mode == "RGB"
    # Meta's round trip through float32 is not lossless: some values come back one lower.
    img = Image.fromarray(
        np.arange(256, dtype=np.uint8).reshape(16, 16).repeat(3).reshape(16, 16, 3)
    )
    diff = np.array(img).astype(int) - np.array(to_pil(to_tensor(img))).astype(int)
    assert set(np.unique(diff)) <= {0, 1}
    with pytest.raises(ValueError, match="3, H, W"):
        to_pil(torch.zeros(4, 2, 2))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_bad_inputs(tmp_path) -> None:
    png = encoded(random_image("RGB", 64, 64))
    jpeg = encoded(random_image("RGB", 64, 64), "JPEG")
    bad = {
        "corrupt": b"\x89PNG\r\n\x1a\n" + bytes(RNG.integers(0, 256, 200, dtype=np.uint8)),
        "truncated_png": png[: len(png) // 2],
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "empty": b"",
        "text": b"hello, I am not an image\n",
    }
    for name, data in bad.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(data)
        with pytest.raises(ImageError, match=name):
            open_image(path)
        with pytest.raises(ImageError, match=f"<{len(data)} bytes>"):
            preprocess(data, SIZE)
    with pytest.raises(ImageError, match="PIL image"):  # a lazily opened PIL image fails on load
        open_image(Image.open(io.BytesIO(bad["truncated_png"])))
    with pytest.raises(FileNotFoundError):
        open_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="zero size"):
        open_image(Image.new("RGB", (0, 4)))
    with pytest.raises(ImageError, match="unsupported image mode"):
        open_image(Image.new("HSV", (4, 4)))


def test_decompression_bombs(monkeypatch) -> None:
    with pytest.raises(ImageError, match="too large"):
        open_image(png_claiming(100_000, 100_000))
    small = encoded(random_image("RGB", 40, 30))  # 1200 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL only warns below 2x the limit
    with pytest.raises(ImageError, match="too large"):
        open_image(small)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # PIL raises above 2x the limit
    with pytest.raises(ImageError, match="too large"):
        open_image(small)


def test_preprocess_mode_validation() -> None:
    with pytest.raises(ValueError, match="mode"):
        preprocess(random_image("RGB", 8, 8), SIZE, mode="stretch")
