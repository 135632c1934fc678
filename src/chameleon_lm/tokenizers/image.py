"""The image tokenizer: images <-> VQGAN codes, and loading from chameleon-lm's, Meta's or HF's files.

Layouts understood by :func:`load_image_tokenizer`:

* chameleon-lm (written by :meth:`ImageTokenizer.save`): ``DIR/vqgan.json`` (a :class:`VQGANConfig`)
  and ``DIR/vqgan.safetensors`` (the state dict).
* Meta's release: ``DIR/vqgan.yaml`` (taming-transformers config) and ``DIR/vqgan.ckpt`` (a
  Lightning-style checkpoint with the weights under ``"state_dict"``), or the same two files in
  ``DIR/tokenizer/`` (pass Meta's ``data/`` root), or in ``DIR/../../tokenizer/`` when ``DIR`` is a
  ``data/models/<size>/`` folder.
* Hugging Face's ``ChameleonForConditionalGeneration`` folder: ``config.json`` (``vq_config``) and the
  ``model.vqmodel.*`` tensors of its safetensors. These hold the encoder and quantizer only; the decoder
  can be taken from Meta's ``vqgan.ckpt`` (``decoder=``), otherwise decoding raises a ValueError.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from chameleon_lm.tokenizers.images import ImageSource, preprocess, to_pil
from chameleon_lm.tokenizers.vqgan import VQGAN, VQGANConfig
from chameleon_lm.utils.weights import (
    load_safetensors, load_safetensors_folder, load_torch_file, read_json,
)

CONFIG_NAME = "vqgan.json"
WEIGHTS_NAME = "vqgan.safetensors"
META_CONFIG_NAME = "vqgan.yaml"
META_WEIGHTS_NAME = "vqgan.ckpt"
HF_CONFIG_NAME = "config.json"
HF_PREFIX = "model.vqmodel."

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
# VQGANConfig field -> Hugging Face ChameleonVQVAEConfig field (their defaults are the same).
_HF_FIELDS = {
    "resolution": "resolution",
    "in_channels": "in_channels",
    "out_ch": "out_channels",
    "ch": "base_channels",
    "ch_mult": "channel_multiplier",
    "num_res_blocks": "num_res_blocks",
    "attn_resolutions": "attn_resolutions",
    "dropout": "dropout",
    "z_channels": "latent_channels",
    "double_z": "double_latent",
    "embed_dim": "embed_dim",
    "n_embed": "num_embeddings",
}


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
    def can_decode(self) -> bool:
        """False for an encoder-only tokenizer (from a Hugging Face checkpoint without Meta's decoder)."""
        return self.vqgan.decoder is not None

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
    decoder: str | os.PathLike | None = None,
) -> ImageTokenizer:
    """Load an image tokenizer from chameleon-lm's, Meta's or HF's layout (see the module docstring).

    Args:
        path: The directory holding the files (for Meta's release, the ``tokenizer/`` folder, its
            parent ``data/`` or a ``data/models/<size>/`` folder; for HF, the model folder).
        device: Where to put the VQGAN (default CPU).
        mode: Preprocessing mode, as in :class:`ImageTokenizer`.
        decoder: Where to take the decoder from, for a checkpoint that has none (Hugging Face's):
            Meta's ``vqgan.ckpt``, our ``vqgan.safetensors``, or a folder holding either.

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no layout.
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
        state, source = load_safetensors(ours[1]), str(ours[1])
    elif is_hf_folder(root):
        config, state, source = _hf_parts(root)
    else:
        folder = _meta_folder(root)
        if folder is None:
            raise FileNotFoundError(
                f"{root}: no image tokenizer found; expected {CONFIG_NAME} + {WEIGHTS_NAME} "
                f"(chameleon-lm), {META_CONFIG_NAME} + {META_WEIGHTS_NAME} (Meta, possibly in a "
                f"tokenizer/ subfolder) or a Hugging Face Chameleon {HF_CONFIG_NAME}"
            )
        yaml_path, ckpt_path = folder / META_CONFIG_NAME, folder / META_WEIGHTS_NAME
        _require_files(yaml_path, ckpt_path)
        config, state = config_from_taming_yaml(yaml_path), _load_meta_state_dict(ckpt_path)
        source = str(ckpt_path)
    if decoder is not None:
        if any(k.startswith("decoder.") for k in state):
            raise ValueError(f"{source}: already holds a VQ decoder (decoder= is for checkpoints "
                             f"without one, such as Hugging Face's)")
        ckpt = Path(decoder)
        if ckpt.is_dir():
            ours = ckpt / WEIGHTS_NAME
            ckpt = ours if ours.is_file() else (_meta_folder(ckpt) or ckpt) / META_WEIGHTS_NAME
        weights = load_safetensors(ckpt) if ckpt.suffix == ".safetensors" else _load_meta_state_dict(ckpt)
        extra = {k: v for k, v in weights.items() if k.startswith("decoder.")}
        if not extra:
            raise ValueError(f"{ckpt}: holds no decoder.* weights")
        state, source = {**state, **extra}, f"{source} + {ckpt}"
    return ImageTokenizer(_build(config, state, source).to(device or "cpu"), mode=mode)


def is_hf_folder(root: Path) -> bool:
    """Whether ``root`` holds a Hugging Face Chameleon ``config.json``."""
    path = root / HF_CONFIG_NAME
    if not path.is_file():
        return False
    data = read_json(path)
    return isinstance(data, dict) and data.get("model_type") == "chameleon"


def _hf_parts(root: Path) -> tuple[VQGANConfig, dict[str, torch.Tensor], str]:
    config = vq_config_from_hf(read_json(root / HF_CONFIG_NAME).get("vq_config"), root / HF_CONFIG_NAME)
    tensors, sources = load_safetensors_folder(root, HF_PREFIX)
    if not tensors:
        raise FileNotFoundError(f"{root}: the Hugging Face checkpoint holds no {HF_PREFIX}* weights")
    state = {k[len(HF_PREFIX) :]: v for k, v in tensors.items()}
    return config, state, ", ".join(sorted({str(p) for p in sources.values()}))


def _meta_folder(root: Path) -> Path | None:
    """The folder holding Meta's files: ``root``, ``root/tokenizer``, or ``root/../../tokenizer`` for a
    ``data/models/<size>/`` folder (``None`` if none)."""
    candidates = [root, root / "tokenizer"]
    if (root / "params.json").is_file():
        candidates.append(root.parent.parent / "tokenizer")
    for folder in candidates:
        if (folder / META_CONFIG_NAME).exists() or (folder / META_WEIGHTS_NAME).exists():
            return folder
    return None


def vq_config_from_hf(vq_config: Any, source: str | os.PathLike) -> VQGANConfig:
    """A :class:`VQGANConfig` from the ``vq_config`` of a Hugging Face ``ChameleonConfig``."""
    if not isinstance(vq_config, dict):
        raise ValueError(f"{source}: no vq_config object")
    if vq_config.get("attn_type", "vanilla") != "vanilla":
        raise ValueError(f"{source}: vq_config.attn_type={vq_config['attn_type']!r} is not supported")
    fields = {ours: vq_config[theirs] for ours, theirs in _HF_FIELDS.items()
              if vq_config.get(theirs) is not None}
    try:
        return VQGANConfig(**fields)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: vq_config: {e}") from e


def _check_portable(config: VQGANConfig, layout: str) -> None:
    """Meta's and HF's VQGAN code fix 32 GroupNorm groups, β = 0.25 and taming's encoder; refuse what
    they cannot hold."""
    if config.encoder != "taming":
        raise ValueError(f"the {layout} layout holds taming encoders only; this VQGAN has a "
                         f"{config.encoder!r} encoder (save it in the native layout instead)")
    if config.norm_groups != 32 or config.beta != 0.25:
        raise ValueError(f"the {layout} VQGAN has 32 GroupNorm groups and beta 0.25; this one has "
                         f"{config.norm_groups} and {config.beta}")


def hf_vq_config(config: VQGANConfig) -> dict[str, Any]:
    """The ``vq_config`` of a Hugging Face ``ChameleonConfig`` for this VQGAN."""
    _check_portable(config, "Hugging Face")
    out = {theirs: getattr(config, ours) for ours, theirs in _HF_FIELDS.items()}
    out.update(channel_multiplier=list(config.ch_mult), attn_resolutions=list(config.attn_resolutions))
    return {"model_type": "chameleon_vqgan", "attn_type": "vanilla", **out}


def taming_yaml(config: VQGANConfig) -> str:
    """Meta's ``vqgan.yaml`` (taming-transformers format) for this VQGAN.

    ``ckpt_path`` and ``lossconfig`` are there because Hugging Face's conversion script deletes both;
    Meta's loader drops ``lossconfig`` and sets ``ckpt_path`` itself.
    """
    _check_portable(config, "Meta")
    ddconfig = {name: getattr(config, name) for name in _TAMING_FIELDS}
    ddconfig.update(ch_mult=list(config.ch_mult), attn_resolutions=list(config.attn_resolutions))
    params = {
        "embed_dim": config.embed_dim,
        "n_embed": config.n_embed,
        "ddconfig": ddconfig,
        "ckpt_path": None,
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"},
    }
    return yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel", "params": params}},
                          sort_keys=False)


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
    ckpt = load_torch_file(path)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of tensors (optionally under 'state_dict')")
    return {k: v for k, v in state.items() if not k.startswith("loss.")}


def _build(config: VQGANConfig, state: dict[str, torch.Tensor], source: str) -> VQGAN:
    """A VQGAN with exactly the weights in ``state`` (every key present, no extra key); without any
    ``decoder.*`` key, an encoder-only one."""
    with_decoder = any(k.startswith("decoder.") for k in state)
    with torch.device("meta"):  # no time wasted on random init; load_state_dict assigns the tensors
        vqgan = VQGAN(config, with_decoder=with_decoder)
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
