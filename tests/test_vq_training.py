"""Image-tokenizer training: metrics, losses, dead-code restarts, discriminator, saving, streaming
from data sources, checkpoints and exact resume, CLI."""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from chameleon_lm.data.sources import open_source
from chameleon_lm.data.synth import ShapesWorld, write_dataset
from chameleon_lm.tokenizers import metrics
from chameleon_lm.tokenizers.image import load_image_tokenizer
from chameleon_lm.tokenizers.images import to_tensor
from chameleon_lm.tokenizers.vqgan import VQGAN, VQGANConfig
from chameleon_lm.training.checkpoint import latest_checkpoint
from chameleon_lm.training.vqgan import (
    LPIPS,
    METRICS_NAME,
    TRAIN_LOG_NAME,
    NLayerDiscriminator,
    VQTrainConfig,
    add_cli,
    vq_forward,
    load_lpips,
    restart_dead_codes,
    train_image_tokenizer,
)
from chameleon_lm.training.vqgan.stream import _Decoder, _plan_stream, _StreamBatches

# A small, fast architecture for the tests that do not look at quality.
SMALL = {"ch": 16, "z_channels": 16, "embed_dim": 16, "n_embed": 64}


def quiet(_: str) -> None:
    pass


def read_log(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / TRAIN_LOG_NAME).read_text().splitlines()]


def tensorboard_scalars(log_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def image_folder(path, n: int, bad: set[int] = frozenset()):
    """``n`` shapes-world PNGs ``000.png`` ...; the files numbered in ``bad`` hold no image."""
    path.mkdir(parents=True)
    for i, (img, _, _) in enumerate(ShapesWorld(seed=3, image_size=32).pairs("train", n)):
        if i in bad:
            (path / f"{i:03d}.png").write_bytes(b"\x89PNG but not really")
        else:
            img.save(path / f"{i:03d}.png")
    return path


@pytest.fixture(scope="module")
def shapes_images():
    return [img for img, _, _ in ShapesWorld(seed=0, image_size=32).pairs("train", 72)]


@pytest.fixture(scope="module")
def trained(shapes_images, tmp_path_factory):
    """A 40-step run of the tiny preset, given PIL images (so the preprocessing path is used)."""
    out = tmp_path_factory.mktemp("vq")
    config = VQTrainConfig(vq_preset="tiny", vq_overrides={}, steps=40, batch_size=8, lr=2e-3,
                           warmup_steps=5, disc_start=0, log_every=10, dead_code_every=20)
    tokenizer, result = train_image_tokenizer(shapes_images[:64], config, out_dir=out,
                                              eval_images=shapes_images[64:], progress=False,
                                              log=quiet)
    return tokenizer, result, out


# ------------------------------------------------------------------------------------- metrics


def test_psnr_known_values():
    a = torch.zeros(2, 3, 8, 8)
    # 0.2 in [-1, 1] is 0.1 on the [0, 1] scale: MSE 0.01, 20 dB.
    assert metrics.psnr(a, a + 0.2) == pytest.approx(20.0)
    assert metrics.psnr(a, a) == pytest.approx(100.0)
    unit = torch.full((1, 3, 8, 8), 0.5)
    assert metrics.psnr(unit, unit + 0.1, value_range=(0.0, 1.0)) == pytest.approx(20.0)
    # Out-of-range values are clamped, as when a reconstruction is saved.
    assert metrics.psnr(torch.ones(1, 3, 8, 8), torch.full((1, 3, 8, 8), 3.0)) == 100.0


def test_ssim_identical_and_constant_images():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert metrics.ssim(x, x) == pytest.approx(1.0)
    # Two flat images: no variance, so SSIM is the luminance term (2ab + C1) / (a² + b² + C1).
    a, b = torch.full((1, 1, 12, 12), 0.5), torch.full((1, 1, 12, 12), 0.25)
    c1 = 0.01**2
    expected = (2 * 0.5 * 0.25 + c1) / (0.5**2 + 0.25**2 + c1)
    assert metrics.ssim(a, b, value_range=(0.0, 1.0)) == pytest.approx(expected)


def test_ssim_matches_a_hand_computed_window():
    """11x11 images have one window position: compute it with plain numpy and the formula."""
    rng = np.random.default_rng(0)
    a, b = rng.random((11, 11)), rng.random((11, 11))
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    mu_a, mu_b = (w * a).sum(), (w * b).sum()
    var_a = (w * (a - mu_a) ** 2).sum()
    var_b = (w * (b - mu_b) ** 2).sum()
    cov = (w * (a - mu_a) * (b - mu_b)).sum()
    c1, c2 = 0.01**2, 0.03**2
    expected = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    ta, tb = (torch.from_numpy(v).float()[None, None] for v in (a, b))
    assert metrics.ssim(ta, tb, value_range=(0.0, 1.0)) == pytest.approx(expected, rel=1e-5)


def test_ssim_symmetric_and_decreasing_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    noise = torch.randn(2, 3, 32, 32, generator=g)
    y = x + 0.1 * noise
    assert metrics.ssim(x, y) == pytest.approx(metrics.ssim(y, x))
    values = [metrics.ssim(x, x + s * noise) for s in (0.0, 0.05, 0.1, 0.3)]
    assert values[0] == pytest.approx(1.0)
    assert all(u > v for u, v in zip(values, values[1:]))
    with pytest.raises(ValueError):
        metrics.ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))  # smaller than the window


def test_ssim_matches_scikit_image():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 24, 24, generator=g)
    y = (x + 0.2 * torch.randn(2, 3, 24, 24, generator=g)).clamp(0, 1)
    expected = np.mean([
        skimage_metrics.structural_similarity(
            x[i].permute(1, 2, 0).double().numpy(), y[i].permute(1, 2, 0).double().numpy(),
            channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            data_range=1.0)
        for i in range(2)])
    assert metrics.ssim(x, y, value_range=(0.0, 1.0)) == pytest.approx(expected, rel=1e-6)


def test_codebook_usage_and_perplexity():
    codes = torch.tensor([[0, 1, 1, 3]])
    assert metrics.codebook_usage(codes, 8) == pytest.approx(3 / 8)
    assert metrics.codebook_perplexity(torch.tensor([0, 0, 1, 1]), 8) == pytest.approx(2.0)
    assert metrics.codebook_perplexity(torch.full((10,), 5), 8) == pytest.approx(1.0)
    assert metrics.codebook_perplexity(torch.arange(8), 8) == pytest.approx(8.0)
    # Frequencies 1/4, 2/4, 1/4.
    assert metrics.codebook_perplexity(codes, 8) == pytest.approx(
        math.exp(-(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))))


# ------------------------------------------------------------------------------- building blocks


def test_config_round_trip_and_disc_start(tmp_path):
    config = VQTrainConfig(vq_overrides={"ch": 32}, betas=[0.9, 0.99], steps=100)
    config.save(tmp_path / "c.json")
    assert VQTrainConfig.load(tmp_path / "c.json") == config
    assert not config.disc_enabled  # off by default
    assert config.replace(disc_start=10).disc_enabled
    for off in (0, -1, 100, 500):
        assert not config.replace(disc_start=off).disc_enabled
    with pytest.raises(ValueError, match="preset"):
        VQTrainConfig(vq_preset="nope")


def test_discriminator_patch_logits():
    disc = NLayerDiscriminator(3, channels=8, n_layers=2)
    assert disc(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 6, 6)


def test_restart_dead_codes_replaces_exactly_the_unused_rows():
    vqgan = VQGAN(VQGANConfig.preset("tiny", **SMALL))
    before = vqgan.quantize.embedding.weight.detach().clone()
    counts = torch.zeros(64, dtype=torch.long)
    live = torch.tensor([0, 5, 7, 63])
    counts[live] = torch.tensor([3, 1, 9, 2])
    latents = torch.randn(2, 16, 8, 8)  # [B, D, g, g]
    n = restart_dead_codes(vqgan, counts, latents, threshold=1,
                           generator=torch.Generator().manual_seed(0))
    after = vqgan.quantize.embedding.weight.detach()
    assert n == 60
    assert torch.equal(after[live], before[live])
    dead = torch.ones(64, dtype=torch.bool)
    dead[live] = False
    flat = latents.permute(0, 2, 3, 1).reshape(-1, 16)  # [128, D]
    # Every restarted row is one of the batch's latent vectors.
    assert (after[dead][:, None] == flat[None]).all(dim=2).any(dim=1).all()
    # A higher threshold also restarts rarely used codes.
    assert restart_dead_codes(vqgan, counts, latents, 3, torch.Generator()) == 62


def test_bf16_autocast_keeps_the_code_search_in_fp32():
    vqgan = VQGAN(VQGANConfig.preset("tiny", **SMALL))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    recon, codes, q_loss, latents = vq_forward(vqgan, x, 1.0, 0.25, bf16=True)
    assert latents.dtype == torch.bfloat16 and recon.dtype == torch.float32
    assert q_loss.dtype == torch.float32
    assert torch.equal(codes, vqgan.quantize.nearest_codes(latents.float()))


def test_lpips_loads_one_file_in_either_naming(tmp_path):
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LPIPS().state_dict().items()}
    g = torch.Generator().manual_seed(0)
    # Random VGG weights; non-negative heads, as in the real LPIPS.
    state = {k: (torch.randn(shape, generator=g) * 0.05).abs() for k, shape in shapes.items()}
    torch.save(state, tmp_path / "ours.pt")
    # taming / lpips naming: net.slice{k}.{i}.* and lin{k}.model.1.weight.
    slices = [(1, 4), (5, 9), (10, 16), (17, 23), (24, 30)]
    taming = {"scaling_layer.shift": torch.zeros(1, 3, 1, 1)}
    for key, value in state.items():
        if key.startswith("features."):
            index = int(key.split(".")[1])
            k = next(n for n, (lo, hi) in enumerate(slices, 1) if index < hi)
            taming[f"net.slice{k}.{index}.{key.split('.')[2]}"] = value
        else:
            taming[f"lin{key.split('.')[1]}.model.1.weight"] = value
    torch.save(taming, tmp_path / "taming.pth")
    a = torch.rand(2, 3, 32, 32) * 2 - 1
    b = torch.rand(2, 3, 32, 32) * 2 - 1
    values = [load_lpips(tmp_path / name)(a, b) for name in ("ours.pt", "taming.pth")]
    assert values[0].shape == (2,) and torch.all(values[0] > 0)
    torch.testing.assert_close(values[0], values[1])
    assert torch.allclose(load_lpips(tmp_path / "ours.pt")(a, a), torch.zeros(2))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_lpips(tmp_path / "absent.pth")
    del state["lins.2.weight"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="lins.2.weight"):
        load_lpips(tmp_path / "partial.pt")


# -------------------------------------------------------------------------------------- training


def test_training_lowers_the_reconstruction_loss(trained):
    _, result, out = trained
    records = read_log(out)
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    assert records[-1]["rec"] < 0.85 * records[0]["rec"]
    assert all("g_loss" not in r for r in records)  # disc_start=0: no discriminator
    assert set(result) >= {"psnr", "ssim", "codebook_usage", "perplexity", "l1"}
    assert result["psnr"] > 12 and 0 < result["codebook_usage"] <= 1
    assert json.loads((out / METRICS_NAME).read_text()) == result
    # The same numbers in TensorBoard; the end checkpoint is there too.
    rec = tensorboard_scalars(out / "tensorboard", "vq_train/rec")
    assert rec == [(r["step"], pytest.approx(r["rec"])) for r in records]
    assert latest_checkpoint(out) == out / "checkpoints" / "step_0000040"


def test_saved_tokenizer_loads_back_with_the_same_codes(trained, shapes_images):
    tokenizer, _, out = trained
    loaded = load_image_tokenizer(out)
    images = shapes_images[64:]
    assert torch.equal(loaded.encode(images), tokenizer.encode(images))
    assert VQTrainConfig.load(out / "vq_train.json").steps == 40


def test_dead_codes_are_restarted_during_training(trained):
    _, _, out = trained
    records = read_log(out)
    # Restarts happen at step 20 (reported in the window ending at 20); none at the final step.
    assert records[1]["restarted"] > 0
    assert records[3]["restarted"] == 0


def test_same_seed_same_model(shapes_images):
    config = VQTrainConfig(vq_preset="tiny", vq_overrides=SMALL, steps=4, batch_size=4,
                           disc_start=2, log_every=2, dead_code_every=2)
    pixels = torch.stack([to_tensor(img) for img in shapes_images[:16]])  # tensor input
    runs = [train_image_tokenizer(pixels, config.replace(seed=s), progress=False, log=quiet)
            for s in (0, 0, 1)]
    states = [tok.vqgan.state_dict() for tok, _ in runs]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])
    assert runs[0][1]["psnr"] == runs[1][1]["psnr"]


def test_discriminator_starts_at_disc_start(shapes_images, tmp_path):
    lines: list[str] = []
    config = VQTrainConfig(vq_preset="tiny", vq_overrides=SMALL, steps=6, batch_size=4,
                           disc_start=3, log_every=1, lpips_path=str(tmp_path / "none.pth"))
    train_image_tokenizer(shapes_images[:16], config, out_dir=tmp_path, progress=False,
                          log=lines.append)
    records = read_log(tmp_path)
    for record in records:
        active = record["step"] > 3
        for key in ("g_loss", "d_loss", "d_weight"):
            assert (key in record) == active, (record["step"], key)
    assert all(math.isfinite(r["d_weight"]) and r["d_weight"] >= 0 for r in records[3:])
    # The missing LPIPS file is noted once, and training goes on without the term.
    assert sum("perceptual (LPIPS) loss skipped" in line for line in lines) == 1
    assert all("perceptual" not in r for r in records)


# ------------------------------------------------------------------------------------------- CLI


def test_cli_trains_from_shards_and_folders_and_resumes(tmp_path):
    write_dataset(tmp_path / "data", n_train_pairs=40, n_test_pairs=8, n_interleaved=4,
                  n_interleaved_test=2, n_text=4, shard_size=16)
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    base = ["--preset", "tiny", "--batch-size", "4", "--no-progress"]
    shards = ["--data", str(tmp_path / "data/pairs/train-{000000..000002}.tar"),
              "--eval-data", str(tmp_path / "data/pairs/test_seen-000000.tar"),
              "--out", str(tmp_path / "vq"), "--max-images", "32", "--shuffle-buffer", "8",
              "--ckpt-every", "1", *base]
    args = parser.parse_args(["train-image", *shards, "--steps", "2"])
    assert args.func(args) == 0
    metrics_file = json.loads((tmp_path / "vq" / METRICS_NAME).read_text())
    assert metrics_file["train_images"] == 32 and metrics_file["steps"] == 2
    assert metrics_file["skipped_images"] == 0
    assert load_image_tokenizer(tmp_path / "vq").num_tokens == 64
    assert latest_checkpoint(tmp_path / "vq").name == "step_0000002"
    # --resume with more steps continues that run.
    args = parser.parse_args(["train-image", *shards, "--steps", "3", "--resume"])
    assert args.func(args) == 0
    assert json.loads((tmp_path / "vq" / METRICS_NAME).read_text())["steps"] == 3
    assert [r["step"] for r in read_log(tmp_path / "vq")] == [2, 3]
    assert latest_checkpoint(tmp_path / "vq").name == "step_0000003"

    folder = tmp_path / "folder"
    folder.mkdir()
    for i, (img, _, _) in enumerate(ShapesWorld(seed=1).pairs("train", 12)):
        img.save(folder / f"{i:02d}.{'png' if i % 2 else 'webp'}")
    args = parser.parse_args(["train-image", "--data", str(folder), "--out",
                              str(tmp_path / "vq2"), "--encoder", "patch", "--steps", "2", *base])
    assert args.func(args) == 0
    metrics_file = json.loads((tmp_path / "vq2" / METRICS_NAME).read_text())
    assert metrics_file["train_images"] == 11  # one of the 12 held out for evaluation
    assert (tmp_path / "vq2" / "vqgan.safetensors").is_file()
    assert load_image_tokenizer(tmp_path / "vq2").config.encoder == "patch"
    args = parser.parse_args(["train-image", "--data", str(tmp_path / "missing.tar"), "--out",
                              str(tmp_path / "vq3"), *base])
    with pytest.raises(FileNotFoundError):
        args.func(args)
    assert not (tmp_path / "vq3").exists()
    args = parser.parse_args(["train-image", "--data", str(folder), "--out",
                              str(tmp_path / "vq3"), "--resume", *base])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        args.func(args)


# ------------------------------------------------------------------------------------ streaming


def test_stream_order_epochs_bad_images_and_replay(tmp_path):
    source = open_source(image_folder(tmp_path / "imgs", 10, bad={3}))
    plan = _plan_stream(source, VQTrainConfig(vq_preset="tiny", eval_size=0), hold_out=False)
    assert plan.train_images is None and plan.eval_items == []  # nothing was read ahead

    def stream(lines=None):
        decoder = _Decoder(32, 0, (lines if lines is not None else []).append)
        return _StreamBatches(source, plan.spans, 3, 4, 0, decoder)

    first = stream()
    keys = [first._draw()[0].rsplit("/", 1)[1] for _ in range(30)]
    epochs = [keys[i : i + 10] for i in range(0, 30, 10)]
    assert all(sorted(e) == [f"{i:03d}" for i in range(10)] for e in epochs)  # each image once
    assert len({tuple(e) for e in epochs}) == 3  # a new order every epoch
    assert epochs[0] != sorted(epochs[0])  # shuffled
    assert (first.epoch, first.drawn, first.epoch_size) == (2, 10, 10)
    again = stream()
    assert [again._draw()[0] for _ in range(5)] == [f"{source.units()[0]}/{k}"
                                                     for k in keys[:5]]  # seeded

    lines: list[str] = []
    good = stream(lines).take(9)  # every usable image, bad one skipped
    reference = [to_tensor(img) for img, _, _ in ShapesWorld(seed=3, image_size=32).pairs("train", 10)]
    found = Counter(next(i for i, r in enumerate(reference) if torch.equal(r, g)) for g in good)
    assert sorted(found) == [0, 1, 2, 4, 5, 6, 7, 8, 9] and set(found.values()) == {1}
    assert len(lines) == 1 and "003" in lines[0] and "skipped bad image" in lines[0]

    # A stream restored from a state continues with exactly the same images.
    a = stream()
    a.next(), a.next(), a.next(), a.next()  # 12+ draws: into the second epoch
    b = stream()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.state_dict() == a.state_dict() and b.decoder.skipped == a.decoder.skipped > 0
    for _ in range(4):
        assert torch.equal(a.next(), b.next())


def test_stream_plan_holds_out_the_first_images(tmp_path):
    source = open_source(image_folder(tmp_path / "imgs", 30))
    unit = source.units()[0]
    config = VQTrainConfig(vq_preset="tiny", eval_size=2, shuffle_buffer=0)
    plan = _plan_stream(source, config, hold_out=True)  # reads 21 images ahead: 30 is >= 20
    assert [k for k, _ in plan.eval_items] == [f"{unit}/000", f"{unit}/001"]
    assert plan.spans == [(unit, 2, None)] and plan.train_images is None
    whole = _plan_stream(source, config.replace(eval_size=4), hold_out=True)  # 30 < 40: all read
    assert len(whole.eval_items) == 3 and whole.train_images == 27  # a tenth held out
    capped = _plan_stream(source, config.replace(max_images=20), hold_out=True)
    assert capped.spans == [(unit, 2, 20)] and capped.train_images == 18
    epoch = [_StreamBatches(source, capped.spans, 2, 0, 0, _Decoder(32, 0, quiet))
             for _ in range(1)][0]
    keys = [epoch._draw()[0] for _ in range(18)]
    assert keys == [f"{unit}/{i:03d}" for i in range(2, 20)]  # no shuffle buffer: unit order
    few = _plan_stream(open_source(image_folder(tmp_path / "few", 6)), config, hold_out=True)
    assert len(few.eval_items) == 2 and few.spans[0][1:] == (0, 6)  # under 10: evaluate on them


def test_streamed_training_skips_bad_images(tmp_path):
    folder = image_folder(tmp_path / "imgs", 12, bad={5})
    lines: list[str] = []
    config = VQTrainConfig(vq_preset="tiny", vq_overrides=SMALL, steps=4, batch_size=4,
                           log_every=2, shuffle_buffer=4, eval_size=8)
    _, result = train_image_tokenizer(folder, config, out_dir=tmp_path / "vq", progress=False,
                                      log=lines.append)
    records = read_log(tmp_path / "vq")
    assert result["train_images"] == 11  # 12 less the one held out (the bad one counted in)
    assert result["skipped_images"] >= 1 and records[-1]["skipped_images"] == result["skipped_images"]
    assert records[-1]["epoch"] == 1  # 16 draws of 11: into the second epoch
    assert any("skipped bad image" in line and "005" in line for line in lines)
    assert math.isfinite(result["psnr"])
    with pytest.raises(ValueError, match="none of its images is usable"):
        train_image_tokenizer(image_folder(tmp_path / "bad", 3, bad={0, 1, 2}), config,
                              eval_images=folder, progress=False, log=quiet)


class Killed(Exception):
    pass


@pytest.mark.parametrize("streamed", [True, False], ids=["stream", "tensor"])
def test_resume_takes_exactly_the_same_steps(tmp_path, streamed):
    folder = image_folder(tmp_path / "imgs", 10, bad={4} if streamed else set())
    images = folder if streamed else torch.stack(
        [to_tensor(img) for img, _, _ in ShapesWorld(seed=3, image_size=32).pairs("train", 10)])
    # The discriminator, the code-restart window (3) and the log window (3) all span the
    # checkpoint of step 2.
    config = VQTrainConfig(vq_preset="tiny", vq_overrides=SMALL, steps=4, batch_size=3,
                           log_every=3, dead_code_every=3, dead_code_threshold=3, disc_start=1,
                           shuffle_buffer=3, ckpt_every=2, eval_size=4)
    full, full_metrics = train_image_tokenizer(images, config, out_dir=tmp_path / "full",
                                               progress=False, log=quiet)

    def kill_at_step_3(line: str) -> None:
        if line.startswith("step 3/"):
            raise Killed

    with pytest.raises(Killed):
        train_image_tokenizer(images, config, out_dir=tmp_path / "part", progress=False,
                              log=kill_at_step_3)
    assert latest_checkpoint(tmp_path / "part").name == "step_0000002"
    lines: list[str] = []
    resumed, metrics = train_image_tokenizer(images, config, out_dir=tmp_path / "part",
                                             progress=False, log=lines.append, resume=True)
    assert any(line.startswith("resumed from") and "step 2" in line for line in lines)
    assert [line.split(" |")[0] for line in lines if line.startswith("step ")] == [
        "step 3/4", "step 4/4"]  # only the remaining steps ran
    a, b = full.vqgan.state_dict(), resumed.vqgan.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [[{k: v for k, v in r.items() if k != "it_per_s"} for r in read_log(tmp_path / d)]
            for d in ("full", "part")]
    assert [r["step"] for r in logs[1]] == [3, 4] and logs[0] == logs[1]
    assert "d_loss" in logs[1][0] and logs[1][0]["restarted"] > 0
    assert {k: v for k, v in metrics.items() if k != "seconds"} == {
        k: v for k, v in full_metrics.items() if k != "seconds"}

    with pytest.raises(ValueError, match="batch_size"):
        train_image_tokenizer(images, config.replace(batch_size=2), out_dir=tmp_path / "part",
                              progress=False, log=quiet, resume=True)
    other = image_folder(tmp_path / "other", 10) if streamed else images[:8]
    with pytest.raises(ValueError, match="other data"):
        train_image_tokenizer(other, config, out_dir=tmp_path / "part", progress=False,
                              log=quiet, resume=True)
    assert latest_checkpoint(tmp_path / "part").name == "step_0000004"  # refused: nothing changed
