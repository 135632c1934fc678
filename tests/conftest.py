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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, which crawl (spin-waiting) on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shapes_codec(codebook_size: int = 64, image_seq_len: int = 16):
    """A DocumentCodec with a BPE trained on two shapes sentences and no image tokenizer."""
    from chameleon_lm import DocumentCodec, train_text_tokenizer

    corpus = ["a red circle turns blue and moves to the left", "Describe the picture:"] * 100
    return DocumentCodec(train_text_tokenizer(corpus, 600, codebook_size=codebook_size),
                         image_seq_len=image_seq_len)


def tiny_model(codec, seed: int = 0):
    """The ``tiny`` preset sized to the codec's vocabulary, seeded, in eval mode."""
    from chameleon_lm import Chameleon, ChameleonConfig

    torch.manual_seed(seed)
    return Chameleon(ChameleonConfig.preset("tiny", vocab_size=len(codec.text))).eval()


def toy_quickstart_config():
    """The quickstart at toy scale (seconds): every stage runs, nothing learns much."""
    from chameleon_lm.quickstart import QuickstartConfig

    return QuickstartConfig(train_pairs=48, test_pairs=4, stories=6, text_docs=6, vq_steps=2,
                            model_steps=2, workers=1,
                            train_overrides=["model_overrides.dim=64", "model_overrides.n_layers=1",
                                             "model_overrides.n_heads=2", "model_overrides.n_kv_heads=2",
                                             "model_overrides.ffn_dim=128", "batch_size=2",
                                             "val_batches=1"])


def write_token_dataset(folder, docs, vocab_size) -> str:
    """Encoded documents as a one-shard token dataset in ``folder`` (what ``data tokenize`` writes)."""
    from chameleon_lm.data.shards import ShardWriter, write_index

    w = ShardWriter(folder, 0, "unit", vocab_size)
    for i, d in enumerate(docs):
        w.add(d, f"k{i}", str(i))
    write_index(folder, [w.close()], vocab_size=vocab_size, info={})
    return str(folder)
