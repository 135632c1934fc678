"""The VQGAN image tokenizer of Chameleon (the Make-A-Scene / taming-transformers ``VQModel``).

An image of ``resolution``² pixels in [-1, 1] goes through a convolutional encoder to a
``grid_size``² grid of latent vectors; each is replaced by its nearest entry of a learned codebook,
and the codebook indices, read row by row, are the image's tokens. The decoder maps codebook entries
back to pixels.

Module and parameter names follow taming-transformers exactly
(``encoder.down.0.block.1.conv2.weight``, ``quantize.embedding.weight``, ...), so the state dict of
Meta's ``vqgan.ckpt`` loads with ``load_state_dict(strict=True)`` without any renaming, and the
encoder half matches the keys of Hugging Face's ``ChameleonVQVAE``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from chameleon_lm.utils.config import Config


ENCODERS = ("taming", "patch")


@dataclass
class VQGANConfig(Config):
    """Architecture of a VQGAN, with taming's field names.

    Presets: ``chameleon`` (official), ``tiny`` (tests), ``shapes-32`` and ``shapes-64`` (CPU demo).
    """

    resolution: int = 512
    """Side of the square input images, in pixels."""
    in_channels: int = 3
    """Channels of the input images (RGB)."""
    out_ch: int = 3
    """Channels of the decoded images."""
    ch: int = 128
    """Base channel count: resolution level ``l`` has ``ch * ch_mult[l]`` channels."""
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    """Channel multiplier per resolution level; each level after the first halves the resolution."""
    num_res_blocks: int = 2
    """Residual blocks per encoder level (each decoder level has one more)."""
    attn_resolutions: tuple[int, ...] = ()
    """Feature-map sides at which every residual block of a level is followed by self-attention.
    The middle blocks of encoder and decoder always have one attention block. Values that match no
    level are ignored, as in taming."""
    dropout: float = 0.0
    """Dropout inside the residual blocks."""
    z_channels: int = 256
    """Channels of the encoder output and of the decoder input."""
    double_z: bool = False
    """taming's switch for KL autoencoders (mean and log-variance); a VQGAN needs ``False``."""
    embed_dim: int = 256
    """Dimension of each codebook vector."""
    n_embed: int = 8192
    """Codebook size: the number of distinct image tokens."""
    norm_groups: int = 32
    """GroupNorm groups (32 in the official model and in HF; small models may need fewer)."""
    beta: float = 0.25
    """Weight of the codebook term of taming's legacy VQ loss (:meth:`VectorQuantizer.forward`)."""
    encoder: str = "taming"
    """``"taming"`` (official; every code sees the whole image through 3x3 convolutions and the
    middle attention) or ``"patch"`` (:class:`PatchEncoder`: every code is a function of its own
    ``f x f`` pixel patch only). Not part of the official design: Meta and Hugging Face layouts
    hold ``"taming"`` encoders only."""

    def __post_init__(self) -> None:
        # YAML and JSON give lists; keep tuples so a loaded config compares equal to the original.
        self.ch_mult = tuple(self.ch_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)
        for name in (
            "resolution",
            "in_channels",
            "out_ch",
            "ch",
            "num_res_blocks",
            "z_channels",
            "embed_dim",
            "n_embed",
            "norm_groups",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            raise ValueError(
                f"ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}"
            )
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"resolution {self.resolution} is not divisible by the downsampling factor "
                f"{self.downsample_factor} (2**(len(ch_mult)-1) with ch_mult={self.ch_mult})"
            )
        for channels in sorted({self.ch * m for m in (1, *self.ch_mult)}):
            if channels % self.norm_groups:
                raise ValueError(
                    f"{channels} channels (ch={self.ch} times a ch_mult entry) are not divisible "
                    f"by "
                    f"norm_groups={self.norm_groups}"
                )
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.double_z:
            raise ValueError("double_z=True is for KL autoencoders; a VQGAN needs double_z=False")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.beta < 0:
            raise ValueError(f"beta must be non-negative, got {self.beta}")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side: ``2**(len(ch_mult) - 1)``."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        """Side of the latent grid (32 for the official model)."""
        return self.resolution // self.downsample_factor

    @property
    def num_tokens(self) -> int:
        """Image tokens per image: ``grid_size**2`` (1024 for the official model)."""
        return self.grid_size**2


@VQGANConfig.register_preset("chameleon")
def _chameleon() -> VQGANConfig:
    """The official tokenizer: 512 px -> 32x32 = 1024 codes from a codebook of 8192."""
    return VQGANConfig()


@VQGANConfig.register_preset("tiny")
def _tiny() -> VQGANConfig:
    """For unit tests: 32 px -> 8x8 = 64 codes from 256."""
    return VQGANConfig(
        resolution=32,
        ch=32,
        ch_mult=(1, 1, 2),
        num_res_blocks=1,
        z_channels=32,
        embed_dim=32,
        n_embed=256,
        norm_groups=8,
    )


@VQGANConfig.register_preset("shapes-32")
def _shapes_32() -> VQGANConfig:
    """CPU demo, 32 px: 4x down -> 8x8 = 64 codes of 512 (32 groups, so HF-compatible)."""
    return VQGANConfig(
        resolution=32,
        ch=64,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        z_channels=64,
        embed_dim=64,
        n_embed=512,
    )


@VQGANConfig.register_preset("shapes-64")
def _shapes_64() -> VQGANConfig:
    """CPU demo, 64 px: 8x down -> 8x8 = 64 codes of 1024 (32 groups, so HF-compatible)."""
    return VQGANConfig(
        resolution=64,
        ch=64,
        ch_mult=(1, 1, 2, 2),
        num_res_blocks=1,
        z_channels=64,
        embed_dim=64,
        n_embed=1024,
    )


def swish(x: torch.Tensor) -> torch.Tensor:
    """taming's nonlinearity, ``x * sigmoid(x)``."""
    return x * torch.sigmoid(x)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """taming's ``Normalize``: affine GroupNorm with eps 1e-6."""
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm, swish, conv3x3, norm, swish, dropout, conv3x3; plus a shortcut (1x1 conv if needed)."""

    def __init__(self, in_channels: int, out_channels: int, config: VQGANConfig) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, config.norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels, config.norm_groups)
        self.dropout = nn.Dropout(config.dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # Identity has no parameters: the state dict holds nin_shortcut only where taming has one.
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map, plus a residual."""

    def __init__(self, channels: int, config: VQGANConfig) -> None:
        super().__init__()
        self.norm = group_norm(channels, config.norm_groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_norm = self.norm(x)
        # Written as in taming (two bmm's) rather than with scaled_dot_product_attention, so that
        # codes are bit-identical to the reference implementations.
        q = self.q(x_norm).reshape(b, c, h * w).transpose(1, 2)  # [B, HW, C]
        k = self.k(x_norm).reshape(b, c, h * w)  # [B, C, HW]
        v = self.v(x_norm).reshape(b, c, h * w)  # [B, C, HW]
        weights = F.softmax(torch.bmm(q, k) * c**-0.5, dim=2)  # [B, HW (queries), HW (keys)]
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w)  # [B, C, H, W]
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve the resolution: zero-pad right and bottom by one, then a stride-2 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """Residual blocks at one resolution, each followed by attention when ``attention`` is set."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        attention: bool,
        config: VQGANConfig,
    ) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, config)
            for i in range(num_blocks)
        )
        self.attn = nn.ModuleList(
            AttnBlock(out_channels, config) for _ in range(num_blocks if attention else 0)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[i](x)
        return x


class EncoderLevel(Level):
    """A :class:`Level` followed by a :class:`Downsample` (except at the last level)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        attention: bool,
        downsample: bool,
        config: VQGANConfig,
    ) -> None:
        super().__init__(in_channels, out_channels, num_blocks, attention, config)
        self.downsample = Downsample(out_channels) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(super().forward(x))


class DecoderLevel(Level):
    """A :class:`Level` followed by an :class:`Upsample` (except at the full-resolution level)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        attention: bool,
        upsample: bool,
        config: VQGANConfig,
    ) -> None:
        super().__init__(in_channels, out_channels, num_blocks, attention, config)
        self.upsample = Upsample(out_channels) if upsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(super().forward(x))


class MidBlock(nn.Module):
    """ResnetBlock -> AttnBlock -> ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, config: VQGANConfig) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, config)
        self.attn_1 = AttnBlock(channels, config)
        self.block_2 = ResnetBlock(channels, channels, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Pixels ``[B, in_channels, R, R]`` -> latents ``[B, z_channels, R/f, R/f]``."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        num_levels = len(config.ch_mult)
        # channels[l] -> channels[l + 1] is the channel change of level l (taming's in_ch_mult).
        channels = [config.ch * m for m in (1, *config.ch_mult)]
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        resolution = config.resolution
        for level in range(num_levels):
            self.down.append(
                EncoderLevel(
                    channels[level],
                    channels[level + 1],
                    config.num_res_blocks,
                    resolution in config.attn_resolutions,
                    level < num_levels - 1,
                    config,
                )
            )
            resolution //= 2
        self.mid = MidBlock(channels[-1], config)
        self.norm_out = group_norm(channels[-1], config.norm_groups)
        self.conv_out = nn.Conv2d(channels[-1], config.z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class PatchEncoder(nn.Module):
    """Pixels -> latents where each latent depends on its own ``f x f`` patch and nothing else.

    A stride-``f`` ``f x f`` convolution cuts the image into patches, then ``num_res_blocks + 1``
    per-patch residual blocks (LayerNorm over channels, swish, linear) of ``4 * ch`` channels and a
    linear output layer; no GroupNorm, whose statistics span the whole image. Equal patches get equal
    codes wherever they are: a plain background is one code, and an object moved by whole patches
    gets the same codes, moved. A small language model learns such codes far faster than taming's,
    whose receptive field spans the whole image (on the quickstart world, pure-background patches
    took 496 distinct taming codes; see the README). The decoder stays taming's, so reconstruction
    still uses context.
    """

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        f, width = config.downsample_factor, 4 * config.ch
        self.conv_in = nn.Conv2d(config.in_channels, width, kernel_size=f, stride=f)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, width))
            for _ in range(config.num_res_blocks + 1)
        )
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, config.z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x).permute(0, 2, 3, 1)  # [B, R/f, R/f, 4ch]: one vector per patch
        for block in self.blocks:
            h = h + block(h)
        return self.proj_out(swish(self.norm_out(h))).permute(0, 3, 1, 2)  # [B, z, R/f, R/f]


class Decoder(nn.Module):
    """Latents ``[B, z_channels, R/f, R/f]`` -> pixels ``[B, out_ch, R, R]`` (no final tanh)."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        num_levels = len(config.ch_mult)
        in_channels = config.ch * config.ch_mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, in_channels, kernel_size=3, padding=1)
        self.mid = MidBlock(in_channels, config)
        # Built from the lowest resolution up, but stored in level order (taming inserts at 0), so
        # up[0] is the full-resolution level and up[-1] the first one applied.
        levels: list[DecoderLevel] = []
        resolution = config.grid_size
        for level in reversed(range(num_levels)):
            out_channels = config.ch * config.ch_mult[level]
            levels.insert(
                0,
                DecoderLevel(
                    in_channels,
                    out_channels,
                    config.num_res_blocks + 1,
                    resolution in config.attn_resolutions,
                    level > 0,
                    config,
                ),
            )
            in_channels = out_channels
            resolution *= 2
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(in_channels, config.norm_groups)
        self.conv_out = nn.Conv2d(in_channels, config.out_ch, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup (taming's ``VectorQuantizer2``: no l2-norm/EMA/remap)."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        self.beta = config.beta
        self.embedding = nn.Embedding(config.n_embed, config.embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / config.n_embed, 1.0 / config.n_embed)

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the closest codebook vector for every latent, ``[B, H*W]`` in raster order.

        Args:
            z: Latents ``[B, embed_dim, H, W]``.
        """
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(b * h * w, d)  # [B*H*W, D], (b, h, w) row-major
        codebook = self.embedding.weight  # [n_embed, D]
        # ||z - e||² expanded as ||z||² + ||e||² - 2 z·e, exactly as taming computes it.
        distances = (
            torch.sum(flat**2, dim=1, keepdim=True)
            + torch.sum(codebook**2, dim=1)
            - 2 * flat @ codebook.t()
        )  # [B*H*W, n_embed]
        return distances.argmin(dim=1).view(b, h * w)  # argmin returns the first index on ties

    def lookup(self, codes: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Codebook vectors of ``codes`` ``[B, H*W]`` as a feature map ``[B, embed_dim, H, W]``."""
        z_q = self.embedding(codes)  # [B, H*W, D]
        return z_q.view(codes.shape[0], height, width, -1).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize for training.

        Args:
            z: Latents ``[B, embed_dim, H, W]``.

        Returns:
            ``(z_q, codes, loss)``: the quantized latents ``[B, embed_dim, H, W]`` with a
            straight-through gradient to ``z``, the codes ``[B, H*W]`` (count them outside for
            codebook usage), and the scalar VQ loss.
        """
        codes = self.nearest_codes(z)
        z_q = self.lookup(codes, z.shape[2], z.shape[3])
        # taming's legacy formula (Meta hard-codes legacy=True). The first term pulls the encoder
        # towards its codes (commitment, weight 1); the second pulls the codes towards the encoder
        # outputs (codebook, weight beta). The VQ-VAE paper puts beta on the commitment term.
        loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        z_q = z + (z_q - z).detach()  # straight-through estimator
        return z_q, codes, loss


class VQGAN(nn.Module):
    """Encoder, quantizer and decoder of the image tokenizer, with taming's parameter names.

    ``with_decoder=False`` builds the encoder half only (Hugging Face checkpoints carry no decoder);
    decoding then raises a ValueError.
    """

    def __init__(self, config: VQGANConfig, with_decoder: bool = True) -> None:
        super().__init__()
        self.config = config
        self.encoder = PatchEncoder(config) if config.encoder == "patch" else Encoder(config)
        self.decoder = Decoder(config) if with_decoder else None
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        cfg = self.config
        expected = (cfg.in_channels, cfg.resolution, cfg.resolution)
        if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point():
            raise ValueError("pixels must be a floating-point tensor [B, C, H, W] in [-1, 1]")
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(
                f"pixels must have shape [B, {cfg.in_channels}, {cfg.resolution}, "
                f"{cfg.resolution}], got {list(pixels.shape)}"
            )

    def _check_codes(self, codes: torch.Tensor) -> None:
        cfg = self.config
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex():
            raise ValueError("codes must be an integer tensor [B, N]")
        if codes.ndim != 2 or codes.shape[1] != cfg.num_tokens:
            raise ValueError(
                f"codes must have shape [B, {cfg.num_tokens}] "
                f"({cfg.grid_size}x{cfg.grid_size} grid), got {list(codes.shape)}"
            )
        if codes.numel() and (codes.min() < 0 or codes.max() >= cfg.n_embed):
            raise ValueError(
                f"codes must lie in [0, {cfg.n_embed}), got values in "
                f"[{int(codes.min())}, {int(codes.max())}]"
            )

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pre-quantization latents ``quant_conv(encoder(pixels))``, ``[B, embed_dim, g, g]``.

        Args:
            pixels: Images ``[B, in_channels, resolution, resolution]``, values in [-1, 1].
        """
        self._check_pixels(pixels)
        return self.quant_conv(self.encoder(pixels))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image tokens ``[B, grid_size**2]`` (long, raster order) of images in [-1, 1]."""
        return self.quantize.nearest_codes(self.encode_latents(pixels))

    def codebook_lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Quantized latents ``[B, embed_dim, g, g]`` of codes ``[B, grid_size**2]``."""
        self._check_codes(codes)
        g = self.config.grid_size
        return self.quantize.lookup(codes.long(), g, g)

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """Unclamped pixels ``[B, out_ch, R, R]`` of quantized latents ``[B, embed_dim, g, g]``."""
        if self.decoder is None:
            raise ValueError(
                "this VQGAN has no decoder (Hugging Face checkpoints carry only the encoder): load the "
                "decoder from Meta's vqgan.ckpt, e.g. load_model(path, vqgan='data/tokenizer/vqgan.ckpt')"
            )
        return self.decoder(self.post_quant_conv(z_q))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, out_ch, R, R]`` of codes (raw decoder output, about [-1, 1], unclamped)."""
        return self.decode_latents(self.codebook_lookup(codes))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: ``(reconstruction [B, out_ch, R, R], codes [B, N], quantizer loss)``.

        Gradients reach the encoder through the straight-through estimator and the codebook through
        the quantizer loss.
        """
        z_q, codes, loss = self.quantize(self.encode_latents(pixels))
        return self.decode_latents(z_q), codes, loss
