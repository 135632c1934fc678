"""The hyper-parameters of VQGAN training: :class:`VQTrainConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chameleon_lm.tokenizers.vqgan import VQGANConfig
from chameleon_lm.utils.config import Config


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
