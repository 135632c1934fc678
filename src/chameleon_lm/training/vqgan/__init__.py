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

One module per concern: ``config`` (:class:`VQTrainConfig`), ``losses`` (the PatchGAN
discriminator, its hinge loss, the adaptive weight and LPIPS), ``stream`` (the training and
evaluation images: a tensor or a streamed source, its shuffle buffer and resumable batches),
``loop`` (the training pass, dead-code restarts, evaluation, checkpoints and
:func:`train_image_tokenizer`) and ``cli`` (``chameleon tokenizer train-image``).
"""

from chameleon_lm.training.vqgan.cli import add_cli, run_cli
from chameleon_lm.training.vqgan.config import VQTrainConfig
from chameleon_lm.training.vqgan.loop import (
    DISC_NAME,
    LOG_NAME,
    METRICS_NAME,
    RESUMABLE_CHANGES,
    TRAIN_CONFIG_NAME,
    TRAIN_LOG_NAME,
    evaluate_reconstruction,
    restart_dead_codes,
    train_image_tokenizer,
    vq_forward,
)
from chameleon_lm.training.vqgan.losses import (
    LPIPS,
    NLayerDiscriminator,
    adaptive_weight,
    hinge_d_loss,
    load_lpips,
)
from chameleon_lm.training.vqgan.stream import MAX_SKIP_NOTES, Images, images_to_pixels

__all__ = [
    "DISC_NAME", "LOG_NAME", "LPIPS", "MAX_SKIP_NOTES", "METRICS_NAME", "RESUMABLE_CHANGES",
    "TRAIN_CONFIG_NAME", "TRAIN_LOG_NAME", "Images", "NLayerDiscriminator", "VQTrainConfig",
    "adaptive_weight", "add_cli", "evaluate_reconstruction", "hinge_d_loss", "images_to_pixels",
    "load_lpips", "restart_dead_codes", "run_cli", "train_image_tokenizer", "vq_forward",
]
