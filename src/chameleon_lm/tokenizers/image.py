"""The image tokenizer: images <-> VQGAN codes, and loading from chameleon-lm's or Meta's files.

Layouts understood by :func:`load_image_tokenizer`:

* chameleon-lm (written by :meth:`ImageTokenizer.save`): ``DIR/vqgan.json`` (a :class:`VQGANConfig`)
  and ``DIR/vqgan.safetensors`` (the state dict).
* Meta's release: ``DIR/vqgan.yaml`` (taming-transformers config) and ``DIR/vqgan.ckpt`` (a
  Lightning-style checkpoint with the weights under ``"state_dict"``), or the same two files in
  ``DIR/tokenizer/`` (pass Meta's ``data/`` root).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from chameleon_lm.tokenizers.images import ImageSource, preprocess, to_pil
from chameleon_lm.tokenizers.vqgan import VQGAN, VQGANConfig

CONFIG_NAME = "vqgan.json"
WEIGHTS_NAME = "vqgan.safetensors"
META_CONFIG_NAME = "vqgan.yaml"
META_WEIGHTS_NAME = "vqgan.ckpt"

# taming ddconfig options this implementation fixes; a YAML asking for anything else is refused.
_TAMING_FIXED_OPTIONS = {
    "resamp_with_conv": True,
    "tanh_out": False,
    "give_pre_end": False,
    "use_linear_attn": False,
    "attn_type": "vanilla",
}
# ddconfig keys that map one to one onto VQGANConfig fields.
_TAMING_FIELDS = (
    "resolution",
    "in_channels",
    "out_ch",
    "ch",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "dropout",
    "z_channels",
    "double_z",
)


class ImageTokenizer:
    """Turns images into VQGAN codes and back, with Meta's pre/post-processing.

    The VQGAN is put in eval mode and kept in float32, as in Meta's code (bf16 changes codes).

    Args:
        vqgan: The model; it stays on whatever device it is on.
        mode: ``"crop"`` (official: short side to the resolution, centre crop) or ``"pad"``
            (long side to the resolution, white letterbox).
    """

    def __init__(self, vqgan: VQGAN, mode: Literal["crop", "pad"] = "crop") -> None:
        if mode not in ("crop", "pad"):
            raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")
        self.vqgan = vqgan.float().eval()
        self.mode = mode

    @property
    def config(self) -> VQGANConfig:
        return self.vqgan.config

    @property
    def codebook_size(self) -> int:
        """Number of distinct codes (8192 for Chameleon)."""
        return self.config.n_embed

    @property
    def num_tokens(self) -> int:
        """Codes per image (1024 for Chameleon)."""
        return self.config.num_tokens

    @property
    def resolution(self) -> int:
        """Side of the images the VQGAN sees, in pixels (512 for Chameleon)."""
        return self.config.resolution

    @property
    def device(self) -> torch.device:
        return self.vqgan.quantize.embedding.weight.device

    def preprocess(
        self, images: Sequence[ImageSource], mode: Literal["crop", "pad"] | None = None
    ) -> torch.Tensor:
        """Pixels ``[B, 3, R, R]`` in [-1, 1] (float32, CPU) of a list of images.

        ``mode`` overrides the tokenizer's own mode for this call (e.g. ``"pad"`` for SFT prompts).
        """
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"images must be a list of images, got {type(images).__name__}")
        if len(images) == 0:
            raise ValueError("no images given")
        mode = mode or self.mode
        return torch.stack([preprocess(img, self.resolution, mode) for img in images])

    @torch.no_grad()
    def encode(
        self, images: Sequence[ImageSource], mode: Literal["crop", "pad"] | None = None
    ) -> torch.Tensor:
        """Codes ``[B, num_tokens]`` (long, raster order, on the VQGAN's device) of images.

        Each item may be a PIL image, a path, encoded bytes or a binary file object.
        """
        return self.vqgan.encode(self.preprocess(images, mode).to(self.device))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor | Sequence[int]) -> list[Image.Image]:
        """RGB images, one per row of ``codes`` ``[B, num_tokens]`` (or ``[num_tokens]``)."""
        codes = torch.as_tensor(codes, device=self.device)
        if codes.ndim == 1:
            codes = codes.unsqueeze(0)  # [1, N]
        return to_pil(self.vqgan.decode(codes))

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``vqgan.json`` and ``vqgan.safetensors`` into ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory / CONFIG_NAME)
        state = {k: v.detach().cpu().contiguous() for k, v in self.vqgan.state_dict().items()}
        save_file(state, directory / WEIGHTS_NAME, metadata={"format": "pt"})


def load_image_tokenizer(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    mode: Literal["crop", "pad"] = "crop",
) -> ImageTokenizer:
    """Load an image tokenizer from chameleon-lm's layout or Meta's (see the module docstring).

    Args:
        path: The directory holding the files (for Meta's release, the ``tokenizer/`` folder or its
            parent ``data/``).
        device: Where to put the VQGAN (default CPU).
        mode: Preprocessing mode, as in :class:`ImageTokenizer`.

    Raises:
        FileNotFoundError: ``path`` does not exist or holds neither layout.
        ValueError: A config or checkpoint is malformed or does not match the architecture.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root}: not a directory (expected a folder holding the image tokenizer)"
        )
    ours = (root / CONFIG_NAME, root / WEIGHTS_NAME)
    if any(p.exists() for p in ours):
        _require_files(*ours)
        try:
            config = VQGANConfig.load(ours[0])
        except (ValueError, TypeError) as e:
            raise ValueError(f"{ours[0]}: not a valid VQGAN config: {e}") from e
        try:
            state = load_file(ours[1], device="cpu")
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{ours[1]}: cannot read safetensors file: {e}") from e
        vqgan = _build(config, state, ours[1])
    else:
        folder = _meta_folder(root)
        if folder is None:
            raise FileNotFoundError(
                f"{root}: no image tokenizer found; expected {CONFIG_NAME} + {WEIGHTS_NAME} "
                f"(chameleon-lm) or {META_CONFIG_NAME} + {META_WEIGHTS_NAME} (Meta), the latter "
                f"possibly in a tokenizer/ subfolder"
            )
        yaml_path, ckpt_path = folder / META_CONFIG_NAME, folder / META_WEIGHTS_NAME
        _require_files(yaml_path, ckpt_path)
        vqgan = _build(
            config_from_taming_yaml(yaml_path), _load_meta_state_dict(ckpt_path), ckpt_path
        )
    return ImageTokenizer(vqgan.to(device or "cpu"), mode=mode)


def _meta_folder(root: Path) -> Path | None:
    """``root`` or ``root/tokenizer``, whichever holds Meta's files (``None`` if neither)."""
    for folder in (root, root / "tokenizer"):
        if (folder / META_CONFIG_NAME).exists() or (folder / META_WEIGHTS_NAME).exists():
            return folder
    return None


def _require_files(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"missing {', '.join(missing)} (needed with {', '.join(map(str, paths))})"
        )


def config_from_taming_yaml(path: str | os.PathLike) -> VQGANConfig:
    """A :class:`VQGANConfig` from a taming-transformers ``VQModel`` YAML (``model.params``).

    Training-only entries (``lossconfig``, ``base_learning_rate``, ...) are ignored; architecture
    options this implementation does not support raise a ValueError.
    """
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
        params = raw["model"]["params"]
        ddconfig = params["ddconfig"]
        fields = {name: ddconfig[name] for name in _TAMING_FIELDS if name in ddconfig}
        fields.update(embed_dim=params["embed_dim"], n_embed=params["n_embed"])
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path}: not a taming VQModel config (need model.params.{{embed_dim, n_embed, "
            f"ddconfig}}): {e!r}"
        ) from e
    for option, supported in _TAMING_FIXED_OPTIONS.items():
        if ddconfig.get(option, supported) != supported:
            raise ValueError(
                f"{path}: ddconfig.{option}={ddconfig[option]!r} is not supported "
                f"(only {supported!r})"
            )
    if params.get("remap") is not None:
        raise ValueError(f"{path}: codebook remapping (params.remap) is not supported")
    try:
        return VQGANConfig(**fields)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from e


def _load_meta_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The model weights of a Lightning-style ``vqgan.ckpt``, minus the training-only ``loss.*``."""
    try:
        # weights_only: never unpickle code from a downloaded file. mmap (only possible for the zip
        # format of torch >= 1.6): don't read the whole file into memory.
        ckpt: Any = torch.load(
            path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise ValueError(
            f"{path}: cannot load as a weights-only PyTorch checkpoint ({type(e).__name__}: {e})"
        ) from e
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of tensors (optionally under 'state_dict')")
    return {k: v for k, v in state.items() if not k.startswith("loss.")}


def _build(config: VQGANConfig, state: dict[str, torch.Tensor], source: Path) -> VQGAN:
    """A VQGAN with exactly the weights in ``state`` (every key present, no extra key)."""
    with torch.device("meta"):  # no time wasted on random init; load_state_dict assigns the tensors
        vqgan = VQGAN(config)
    expected = set(vqgan.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not match the config: {len(missing)} missing key(s) "
            f"{_preview(missing)}, {len(unexpected)} unexpected key(s) {_preview(unexpected)}"
        )
    try:
        vqgan.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{source}: weights do not match the config: {e}") from e
    return vqgan


def _preview(keys: list[str], limit: int = 5) -> str:
    return str(keys[:limit])[:-1] + (", ...]" if len(keys) > limit else "]")
