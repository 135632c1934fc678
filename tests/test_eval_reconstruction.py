"""Image-tokenizer reconstruction benchmark: Fréchet distance, feature statistics, the task on a
tiny VQGAN, its CLI, and the Inception feature extractor (where torch-fidelity imports)."""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from chameleon_lm.tokenizers.metrics import (
    INCEPTION_WEIGHTS_NAME,
    INCEPTION_WEIGHTS_URL,
    feature_statistics,
    frechet_distance,
    inception_extractor,
    inception_features,
)
from chameleon_lm.eval.tasks.reconstruction import (
    _to_uint8,
    add_cli,
    iter_images,
    reconstruct,
    reconstruction,
    run_reconstruction,
)
from chameleon_lm.tokenizers.image import ImageTokenizer
from chameleon_lm.tokenizers.images import resize_and_crop, to_pil
from chameleon_lm.tokenizers.vqgan import VQGAN, VQGANConfig
from chameleon_lm.training.vqgan import evaluate_reconstruction


def _random_statistics(rng: np.random.Generator, dim: int, n: int) -> tuple[np.ndarray, ...]:
    mixing, shift = rng.normal(size=(dim, dim)), rng.normal(size=dim)
    return feature_statistics(rng.normal(size=(n, dim)) @ mixing + shift)


def _scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """The reference FID code's formula (pytorch-fid / the TTUR repository)."""
    from scipy import linalg

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def test_frechet_distance_matches_scipy_and_closed_forms():
    rng = np.random.default_rng(0)
    for dim in (1, 5, 32):
        mu1, sigma1 = _random_statistics(rng, dim, 200)
        mu2, sigma2 = _random_statistics(rng, dim, 200)
        assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(
            _scipy_frechet(mu1, sigma1, mu2, sigma2), rel=1e-6)
        same = frechet_distance(mu1, sigma1, mu1, sigma1)
        assert same == pytest.approx(0.0, abs=1e-8 * np.trace(sigma1))
    # diagonal Gaussians: |mu1 - mu2|² + sum (sqrt(a_i) - sqrt(b_i))² = 25 + (1 - 3)² + (2 - 4)²
    assert frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.array([3.0, 4.0]),
                            np.diag([9.0, 16.0])) == pytest.approx(33.0, rel=1e-12)
    # singular covariances (fewer samples than dimensions) stay real and finite
    mu, sigma = feature_statistics(rng.normal(size=(4, 16)))
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    assert math.isfinite(frechet_distance(mu, sigma, *feature_statistics(rng.normal(size=(4, 16)))))


def test_frechet_distance_refuses_bad_statistics():
    eye = np.eye(3)
    with pytest.raises(ValueError, match="dimensions"):
        frechet_distance(np.zeros(3), eye, np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="covariance"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), eye)
    with pytest.raises(ValueError, match="not symmetric"):
        frechet_distance(np.zeros(3), np.triu(np.ones((3, 3))), np.zeros(3), eye)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full(3, np.nan), eye, np.zeros(3), eye)


def test_feature_statistics_match_numpy():
    x = np.random.default_rng(1).normal(size=(50, 7)).astype(np.float32)
    mu, sigma = feature_statistics(x)
    assert mu.dtype == np.float64 and sigma.shape == (7, 7)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)
    torch_mu, torch_sigma = feature_statistics(torch.from_numpy(x))
    np.testing.assert_array_equal(torch_mu, mu)
    np.testing.assert_array_equal(torch_sigma, sigma)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(x[:1])
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        feature_statistics(x[0])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[str, list[Image.Image]]:
    """A synth pairs shard and its images (32x32, the tiny VQGAN's resolution)."""
    from chameleon_lm.data.sources import open_source
    from chameleon_lm.data.synth import write_dataset

    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, n_train_pairs=8, n_test_pairs=5, n_interleaved=0, n_interleaved_test=0,
                  n_text=0)
    shard = str(root / "pairs" / "test_seen-000000.tar")
    return shard, list(iter_images(open_source(shard)))


@pytest.fixture()
def tokenizer() -> ImageTokenizer:
    torch.manual_seed(0)
    return ImageTokenizer(VQGAN(VQGANConfig.preset("tiny")))


def test_reconstruction_on_a_tiny_vqgan_equals_training_evaluation(shapes, tokenizer, one_thread):
    _, images = shapes
    images = [*images, images[0].resize((64, 48))]  # other sizes go through the preprocessing
    m = reconstruction(tokenizer, images, batch_size=2)
    assert m["n_images"] == len(images) and "rfid" not in m
    assert INCEPTION_WEIGHTS_NAME in m["rfid_skipped"]
    assert math.isfinite(m["psnr"]) and -1 <= m["ssim"] <= 1 and m["l1"] > 0
    assert 0 < m["codebook_usage"] <= 1 and 1 <= m["codebook_perplexity"] <= tokenizer.codebook_size
    # compared with the tokenizer's preprocessed pixels, as VQGAN training evaluates
    pixels = tokenizer.preprocess(images)
    ref = evaluate_reconstruction(tokenizer.vqgan, pixels)
    ref["codebook_perplexity"] = ref.pop("perplexity")
    assert {k: m[k] for k in ref} == pytest.approx(ref, rel=1e-9)
    one_batch = reconstruction(tokenizer, iter(images), batch_size=len(images))  # any iterable
    assert {k: one_batch[k] for k in ref} == ref  # one batch: the very same numbers
    assert not tokenizer.vqgan.training


def test_uint8_images_for_inception_are_the_preprocessed_and_decoded_bytes(shapes, tokenizer):
    _, images = shapes
    pixels = tokenizer.preprocess(images[:2])
    originals = _to_uint8(pixels, exact=True)
    for img, row in zip(images, originals):
        expected = np.array(resize_and_crop(img, 32))
        np.testing.assert_array_equal(row.permute(1, 2, 0).numpy(), expected)
    recon, _ = reconstruct(tokenizer.vqgan, pixels)
    for row, pil in zip(_to_uint8(recon, exact=False), to_pil(recon)):
        np.testing.assert_array_equal(row.permute(1, 2, 0).numpy(), np.array(pil))


def test_reconstruction_refuses_bad_input(tokenizer):
    with pytest.raises(ValueError, match="no images"):
        reconstruction(tokenizer, [])
    with pytest.raises(ValueError, match="batch_size"):
        reconstruction(tokenizer, [Image.new("RGB", (32, 32))], batch_size=0)
    encoder_only = ImageTokenizer(VQGAN(VQGANConfig.preset("tiny"), with_decoder=False))
    with pytest.raises(ValueError, match="no decoder"):
        reconstruction(encoder_only, [Image.new("RGB", (32, 32))])


def test_missing_inception_weights_name_the_file(tmp_path, tokenizer):
    missing = tmp_path / INCEPTION_WEIGHTS_NAME
    img = [Image.new("RGB", (32, 32))]
    for call in (lambda: inception_extractor(missing), lambda: inception_features(img, missing),
                 lambda: reconstruction(tokenizer, img, inception_weights=missing)):
        with pytest.raises(FileNotFoundError) as e:
            call()
        assert INCEPTION_WEIGHTS_NAME in str(e.value) and INCEPTION_WEIGHTS_URL in str(e.value)


def test_inception_without_torch_fidelity_says_how_to_install(tmp_path, monkeypatch):
    weights = tmp_path / INCEPTION_WEIGHTS_NAME
    torch.save({}, weights)
    for name in ("torch_fidelity", "torch_fidelity.feature_extractor_inceptionv3"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as where it is not installed
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        inception_extractor(weights)


def test_run_reconstruction_and_cli_write_metrics(shapes, tmp_path, one_thread, capsys):
    from chameleon_lm import Chameleon, ChameleonConfig
    from chameleon_lm.checkpoints import save_model
    from chameleon_lm.tokenizers.text import train_text_tokenizer

    shard, _ = shapes
    torch.manual_seed(0)
    vq = ImageTokenizer(VQGAN(VQGANConfig.preset("tiny")))
    vq.save(tmp_path / "vq")
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="eval_command"))
    args = parser.parse_args(["reconstruction", "--tokenizer", str(tmp_path / "vq"), "--data",
                              shard, "--limit", "3", "--batch-size", "2",
                              "--out", str(tmp_path / "eval")])
    assert args.func(args) == 0
    assert "3 images: PSNR" in capsys.readouterr().out
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["task"] == "reconstruction" and written["n_images"] == 3
    assert written["settings"]["limit"] == 3 and written["settings"]["resolution"] == 32
    keys = {"psnr", "ssim", "l1", "codebook_usage", "codebook_perplexity", "rfid_skipped"}
    assert keys <= set(written)

    # a model folder: its image tokenizer, the same numbers
    tok = train_text_tokenizer(["a red circle", "a blue square"] * 20, 600,
                               codebook_size=vq.codebook_size)
    model = Chameleon(ChameleonConfig.preset("tiny", vocab_size=len(tok), n_layers=1))
    save_model(tmp_path / "model", model, tok, vq)
    from_model = run_reconstruction(tmp_path / "model", shard, limit=3, batch_size=2)
    assert {k: from_model[k] for k in ("psnr", "ssim", "codebook_usage")} == {
        k: written[k] for k in ("psnr", "ssim", "codebook_usage")}
    with pytest.raises(SystemExit):  # --model and --tokenizer are exclusive
        parser.parse_args(["reconstruction", "--model", "a", "--tokenizer", "b", "--data", shard])
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_NAME):
        run_reconstruction(tmp_path / "vq", shard, inception_weights=tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="limit"):
        run_reconstruction(tmp_path / "vq", shard, limit=0)


def _random_inception_weights(path) -> torch.nn.Module:
    """torch-fidelity's Inception with its random initial weights, saved to ``path``."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    with pytest.MonkeyPatch.context() as mp:  # build the network without fetching its weights
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in net.modules():  # He init keeps the activations O(1) through the ReLU stack
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return net


def test_inception_features_and_rfid_with_random_weights(shapes, tokenizer, tmp_path):
    pytest.importorskip("torch_fidelity")
    weights = tmp_path / INCEPTION_WEIGHTS_NAME
    net = _random_inception_weights(weights)
    _, images = shapes
    images = images[:3] + [images[0].resize((40, 24))]
    features = inception_features(images, weights, batch_size=2)
    assert features.shape == (4, 2048) and features.dtype == np.float32
    assert np.isfinite(features).all()
    direct = net(torch.from_numpy(np.array(images[1])).permute(2, 0, 1)[None])[0]
    np.testing.assert_allclose(features[1], direct[0].numpy(), rtol=1e-4, atol=1e-6)

    m = reconstruction(tokenizer, images, inception_weights=weights, batch_size=2)
    assert "rfid_skipped" not in m and math.isfinite(m["rfid"]) and m["rfid"] > 1e-3
    # the same as FID of the preprocessed originals against the 8-bit reconstructions
    pixels = tokenizer.preprocess(images)
    recon, _ = reconstruct(tokenizer.vqgan, pixels)
    real = inception_features([resize_and_crop(img, 32) for img in images], weights)
    fake = inception_features(to_pil(recon), weights)
    expected = frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    assert m["rfid"] == pytest.approx(expected, rel=1e-4, abs=1e-9)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not the FID Inception"):
        inception_extractor(tmp_path / "other.pth")
