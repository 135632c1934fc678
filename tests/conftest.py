import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def write_tiny_tokenizers(folder, corpus):
    """A tiny VQGAN (seeded random weights) and a BPE trained on ``corpus``, saved in ``folder``."""
    from chameleon_lm import VQGAN, VQGANConfig
    from chameleon_lm.tokenizers.image import ImageTokenizer
    from chameleon_lm.tokenizers.text import train_text_tokenizer

    vq = VQGANConfig.preset("tiny")
    torch.manual_seed(0)
    ImageTokenizer(VQGAN(vq)).save(folder)
    train_text_tokenizer(corpus, 600, codebook_size=vq.n_embed).save(folder)
    return folder
