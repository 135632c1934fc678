"""VQGAN image tokenizer: official key layout, HF parity, checkpoint loading, shapes, quantizer."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from chameleon_lm.tokenizers.image import ImageTokenizer, load_image_tokenizer
from chameleon_lm.tokenizers.vqgan import VQGAN, Downsample, Upsample, VQGANConfig


def official_vqgan_shapes() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of Meta's ``vqgan.ckpt`` state dict, written out from the spec's tables
    (§4.2, §4.5) without using the module under test."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, c_in: int, c_out: int, k: int) -> None:
        shapes[f"{name}.weight"] = (c_out, c_in, k, k)
        shapes[f"{name}.bias"] = (c_out,)

    def norm(name: str, c: int) -> None:
        shapes[f"{name}.weight"] = (c,)
        shapes[f"{name}.bias"] = (c,)

    def resnet(name: str, c_in: int, c_out: int) -> None:
        norm(f"{name}.norm1", c_in)
        conv(f"{name}.conv1", c_in, c_out, 3)
        norm(f"{name}.norm2", c_out)
        conv(f"{name}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_in, c_out, 1)

    def attn(name: str, c: int) -> None:
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    def mid(prefix: str, c: int) -> None:
        resnet(f"{prefix}.mid.block_1", c, c)
        attn(f"{prefix}.mid.attn_1", c)
        resnet(f"{prefix}.mid.block_2", c, c)

    # Encoder (table in §4.2): level -> (in, out); 2 blocks each; downsample after levels 0..3.
    conv("encoder.conv_in", 3, 128, 3)
    encoder_levels = {0: (128, 128), 1: (128, 128), 2: (128, 256), 3: (256, 256), 4: (256, 512)}
    for level, (c_in, c_out) in encoder_levels.items():
        resnet(f"encoder.down.{level}.block.0", c_in, c_out)
        resnet(f"encoder.down.{level}.block.1", c_out, c_out)
        if level < 4:
            conv(f"encoder.down.{level}.downsample.conv", c_out, c_out, 3)
    mid("encoder", 512)
    norm("encoder.norm_out", 512)
    conv("encoder.conv_out", 512, 256, 3)
    conv("quant_conv", 256, 256, 1)
    shapes["quantize.embedding.weight"] = (8192, 256)
    conv("post_quant_conv", 256, 256, 1)
    # Decoder: conv_in 256->512, mid at 512, levels 4..0 with 3 blocks; upsample at levels 4..1.
    conv("decoder.conv_in", 256, 512, 3)
    mid("decoder", 512)
    decoder_levels = {4: (512, 512), 3: (512, 256), 2: (256, 256), 1: (256, 128), 0: (128, 128)}
    for level, (c_in, c_out) in decoder_levels.items():
        resnet(f"decoder.up.{level}.block.0", c_in, c_out)
        resnet(f"decoder.up.{level}.block.1", c_out, c_out)
        resnet(f"decoder.up.{level}.block.2", c_out, c_out)
        if level > 0:
            conv(f"decoder.up.{level}.upsample.conv", c_out, c_out, 3)
    norm("decoder.norm_out", 128)
    conv("decoder.conv_out", 128, 3, 3)
    return shapes


def meta_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_official_state_dict_layout() -> None:
    with torch.device("meta"):
        model = VQGAN(VQGANConfig.preset("chameleon"))
    assert meta_shapes(model) == official_vqgan_shapes()


def test_official_encoder_keys_match_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        hf = transformers.ChameleonVQVAE(transformers.ChameleonVQVAEConfig())
        ours = VQGAN(VQGANConfig.preset("chameleon"))
    hf_shapes, our_shapes = meta_shapes(hf), meta_shapes(ours)
    assert hf_shapes and all(our_shapes.get(k) == shape for k, shape in hf_shapes.items())
    assert set(our_shapes) - set(hf_shapes) == {k for k in our_shapes if k.startswith("decoder.")}


def test_presets() -> None:
    grid = {
        "chameleon": (32, 1024, 8192),
        "tiny": (8, 64, 256),
        "shapes-32": (8, 64, 512),
        "shapes-64": (8, 64, 1024),
    }
    for name, (grid_size, num_tokens, n_embed) in grid.items():
        cfg = VQGANConfig.preset(name)
        assert (cfg.grid_size, cfg.num_tokens, cfg.n_embed) == (grid_size, num_tokens, n_embed)
    official = VQGANConfig.preset("chameleon")
    assert official.ch_mult == (1, 1, 2, 2, 4) and official.attn_resolutions == ()
    assert (official.ch, official.z_channels, official.embed_dim) == (128, 256, 256)


def test_config_json_round_trip(tmp_path) -> None:
    cfg = VQGANConfig.preset("tiny", attn_resolutions=(8,))
    cfg.save(tmp_path / "vqgan.json")
    assert VQGANConfig.load(tmp_path / "vqgan.json") == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(norm_groups=7), "norm_groups"),
        (dict(resolution=34), "divisible by the downsampling factor"),
        (dict(double_z=True), "double_z"),
        (dict(ch_mult=()), "ch_mult"),
        (dict(n_embed=0), "n_embed"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_config_validation(overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        VQGANConfig.preset("tiny", **overrides)


def test_encode_decode_shapes() -> None:
    torch.manual_seed(0)
    cfg = VQGANConfig.preset("tiny")
    model = VQGAN(cfg).eval()
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    codes = model.encode(pixels)
    assert codes.shape == (3, 64) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < cfg.n_embed
    assert model.decode(codes).shape == (3, 3, 32, 32)
    assert model.codebook_lookup(codes).shape == (3, cfg.embed_dim, 8, 8)


def test_codes_are_raster_order() -> None:
    model = VQGAN(VQGANConfig.preset("tiny"))
    z = torch.randn(2, 32, 8, 8)
    codes = model.quantize.nearest_codes(z)
    single = model.quantize.nearest_codes(z[1:2, :, 3:4, 5:6])  # position (h=3, w=5) of image 1
    assert codes[1, 3 * 8 + 5] == single[0, 0]


def test_forward_straight_through_and_loss() -> None:
    torch.manual_seed(0)
    cfg = VQGANConfig.preset("tiny", attn_resolutions=(8,))
    model = VQGAN(cfg)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    reconstruction, codes, loss = model(pixels)
    assert reconstruction.shape == pixels.shape and codes.shape == (2, 64) and loss.ndim == 0
    assert torch.equal(codes, model.encode(pixels))
    ((reconstruction - pixels) ** 2).mean().backward()
    # The reconstruction loss reaches the encoder only through the straight-through estimator.
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.encoder.down[2].attn[0].q.weight.grad.abs().sum() > 0


def test_quantizer_legacy_loss_weights() -> None:
    """taming legacy: the commitment term (grad to z) weighs 1, the codebook term beta."""
    cfg = VQGANConfig.preset("tiny", beta=0.25)
    quantizer = VQGAN(cfg).quantize
    z = torch.randn(1, cfg.embed_dim, 2, 2, requires_grad=True)
    z_q, codes, loss = quantizer(z)
    e = quantizer.embedding.weight.detach()[codes[0]].T.reshape(1, cfg.embed_dim, 2, 2)
    torch.testing.assert_close(loss, 1.25 * ((e - z.detach()) ** 2).mean())
    loss.backward()
    torch.testing.assert_close(z.grad, 2 * (z - e).detach() / z.numel())
    emb_grad = quantizer.embedding.weight.grad[
        codes[0]
    ]  # rows used (distinct with high probability)
    expected = 0.25 * 2 * (e - z.detach()) / z.numel()
    torch.testing.assert_close(emb_grad, expected.reshape(cfg.embed_dim, 4).T)
    torch.testing.assert_close(z_q, e)


def test_quantizer_ties_pick_first_index() -> None:
    cfg = VQGANConfig.preset("tiny")
    quantizer = VQGAN(cfg).quantize
    with torch.no_grad():
        weight = quantizer.embedding.weight
        weight.copy_(torch.randn_like(weight) * 10)
        weight[7] = weight[3]
        weight[200] = weight[3]
    z = weight[3].detach().reshape(1, -1, 1, 1).repeat(1, 1, 2, 2)
    assert quantizer.nearest_codes(z).tolist() == [[3, 3, 3, 3]]
    with torch.no_grad():
        weight.zero_()
    assert quantizer.nearest_codes(torch.randn(1, cfg.embed_dim, 2, 2)).tolist() == [[0, 0, 0, 0]]


def test_resampling_blocks() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 4, 6, 6)
    down, up = Downsample(4), Upsample(4)
    padded = torch.zeros(1, 4, 7, 7)
    padded[..., :6, :6] = x
    torch.testing.assert_close(
        down(x), F.conv2d(padded, down.conv.weight, down.conv.bias, stride=2)
    )
    assert down(x).shape == (1, 4, 3, 3)
    nearest = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(up(x), F.conv2d(nearest, up.conv.weight, up.conv.bias, padding=1))


def test_input_validation() -> None:
    model = VQGAN(VQGANConfig.preset("tiny"))
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        model.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        model.encode(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        model.encode(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="floating-point"):
        model.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        model.decode(torch.full((1, 64), 256))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        model.decode(torch.full((1, 64), -1))
    with pytest.raises(ValueError, match=r"\[B, 64\]"):
        model.decode(torch.zeros(1, 63, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model.decode(torch.zeros(1, 64))


# HF GroupNorm is hard-coded to 32 groups, so the parity config uses multiples of 32 channels.
# Attention at resolution 16 also exercises the per-level attention blocks.
PARITY_CONFIG = VQGANConfig(
    resolution=32,
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(16,),
    z_channels=32,
    embed_dim=32,
    n_embed=64,
)


def test_encoder_parity_with_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = PARITY_CONFIG
    ours = VQGAN(cfg).eval()
    with torch.no_grad():  # random weights with a spread-out codebook so codes vary
        for p in ours.parameters():
            p.normal_(0, 0.2)
        ours.quantize.embedding.weight.normal_()
    hf_config = transformers.ChameleonVQVAEConfig(
        embed_dim=cfg.embed_dim,
        num_embeddings=cfg.n_embed,
        double_latent=False,
        latent_channels=cfg.z_channels,
        resolution=cfg.resolution,
        in_channels=cfg.in_channels,
        base_channels=cfg.ch,
        channel_multiplier=list(cfg.ch_mult),
        num_res_blocks=cfg.num_res_blocks,
        attn_resolutions=list(cfg.attn_resolutions),
        dropout=0.0,
    )
    hf = transformers.ChameleonVQVAE(hf_config).eval()
    hf.load_state_dict(
        {k: v for k, v in ours.state_dict().items() if not k.startswith("decoder.")}, strict=True
    )
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out = hf.encode(pixels)
        codes = ours.encode(pixels)
        torch.testing.assert_close(ours.encoder(pixels), out.last_hidden_state)
        torch.testing.assert_close(ours.codebook_lookup(codes), out.quantized_last_hidden_state)
    assert len(codes.unique()) > 5
    assert torch.equal(codes, out.image_tokens.view(3, -1))


def write_meta_layout(directory, cfg: VQGANConfig, state: dict[str, torch.Tensor]) -> None:
    """A taming-style ``vqgan.yaml`` and a Lightning-style ``vqgan.ckpt`` (with training keys)."""
    directory.mkdir(parents=True, exist_ok=True)
    ddconfig = dict(
        double_z=False,
        z_channels=cfg.z_channels,
        resolution=cfg.resolution,
        in_channels=cfg.in_channels,
        out_ch=cfg.out_ch,
        ch=cfg.ch,
        ch_mult=list(cfg.ch_mult),
        num_res_blocks=cfg.num_res_blocks,
        attn_resolutions=list(cfg.attn_resolutions),
        dropout=cfg.dropout,
    )
    taming = {
        "model": {
            "base_learning_rate": 4.5e-6,
            "target": "taming.models.vqgan.VQModel",
            "params": {
                "embed_dim": cfg.embed_dim,
                "n_embed": cfg.n_embed,
                "ddconfig": ddconfig,
                "lossconfig": {
                    "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                    "params": {"disc_start": 0, "codebook_weight": 1.0},
                },
            },
        }
    }
    (directory / "vqgan.yaml").write_text(yaml.safe_dump(taming))
    lightning_state = dict(state)
    lightning_state["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)
    lightning_state["loss.perceptual_loss.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)
    torch.save(
        {"epoch": 3, "global_step": 1234, "state_dict": lightning_state}, directory / "vqgan.ckpt"
    )


def test_load_meta_layout(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = VQGANConfig.preset("tiny", norm_groups=32, attn_resolutions=(8,))
    state = VQGAN(cfg).state_dict()
    write_meta_layout(tmp_path / "data" / "tokenizer", cfg, state)
    for path in (tmp_path / "data" / "tokenizer", tmp_path / "data"):
        tokenizer = load_image_tokenizer(path)
        assert tokenizer.config == cfg
        loaded = tokenizer.vqgan.state_dict()
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_load_meta_layout_errors(tmp_path) -> None:
    cfg = VQGANConfig.preset("tiny", norm_groups=32)
    state = VQGAN(cfg).state_dict()
    broken = {k: v for k, v in state.items() if k != "decoder.conv_out.bias"}
    write_meta_layout(tmp_path / "missing", cfg, broken)
    with pytest.raises(ValueError, match=r"vqgan\.ckpt.*decoder\.conv_out\.bias"):
        load_image_tokenizer(tmp_path / "missing")
    write_meta_layout(tmp_path / "extra", cfg, {**state, "decoder.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"vqgan\.ckpt.*unexpected.*decoder\.extra\.weight"):
        load_image_tokenizer(tmp_path / "extra")
    write_meta_layout(tmp_path / "shape", cfg, state)
    yaml_path = tmp_path / "shape" / "vqgan.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("n_embed: 256", "n_embed: 128"))
    with pytest.raises(ValueError, match=r"(?s)vqgan\.ckpt.*size mismatch"):
        load_image_tokenizer(tmp_path / "shape")
    yaml_path.write_text(yaml_path.read_text().replace("n_embed: 128", "n_embed: 256"))
    yaml_path.write_text(
        yaml_path.read_text().replace("ddconfig:", "ddconfig:\n      tanh_out: true")
    )
    with pytest.raises(ValueError, match=r"vqgan\.yaml.*tanh_out"):
        load_image_tokenizer(tmp_path / "shape")
    # A checkpoint that needs arbitrary unpickling is refused, not executed.
    write_meta_layout(tmp_path / "pickled", cfg, state)
    torch.save({"state_dict": state, "callback": io.BytesIO()}, tmp_path / "pickled" / "vqgan.ckpt")
    with pytest.raises(ValueError, match=r"vqgan\.ckpt.*weights-only"):
        load_image_tokenizer(tmp_path / "pickled")
    (tmp_path / "noyaml").mkdir()
    torch.save({"state_dict": state}, tmp_path / "noyaml" / "vqgan.ckpt")
    with pytest.raises(FileNotFoundError, match=r"vqgan\.yaml"):
        load_image_tokenizer(tmp_path / "noyaml")
    (tmp_path / "ours").mkdir()
    VQGANConfig.preset("tiny").save(tmp_path / "ours" / "vqgan.json")
    (tmp_path / "ours" / "vqgan.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"vqgan\.safetensors"):
        load_image_tokenizer(tmp_path / "ours")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image tokenizer found"):
        load_image_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_image_tokenizer(tmp_path / "nowhere")


def test_tokenizer_save_load_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    tokenizer = ImageTokenizer(VQGAN(VQGANConfig.preset("tiny")))
    assert (tokenizer.codebook_size, tokenizer.num_tokens, tokenizer.resolution) == (256, 64, 32)
    rng = torch.Generator().manual_seed(1)
    img = Image.fromarray(
        torch.randint(0, 256, (40, 30, 3), generator=rng, dtype=torch.uint8).numpy()
    )
    path = tmp_path / "img.png"
    img.save(path)
    codes = tokenizer.encode([img, path, path.read_bytes()])
    assert (
        codes.shape == (3, 64)
        and torch.equal(codes[0], codes[1])
        and torch.equal(codes[0], codes[2])
    )

    tokenizer.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        "vqgan.json",
        "vqgan.safetensors",
    ]
    reloaded = load_image_tokenizer(tmp_path / "tok")
    assert reloaded.config == tokenizer.config
    assert torch.equal(reloaded.encode([img]), codes[:1])

    images = reloaded.decode(codes)
    assert len(images) == 3 and images[0].size == (32, 32) and images[0].mode == "RGB"
    assert len(reloaded.decode(codes[0].tolist())) == 1
    with pytest.raises(TypeError, match="list"):
        reloaded.encode(img)


def test_patch_encoder_codes_depend_on_their_own_patch_only(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = VQGANConfig.preset("tiny", encoder="patch")
    model = VQGAN(cfg).eval()
    f, g = cfg.downsample_factor, cfg.grid_size
    base = torch.rand(1, 3, 32, 32) * 2 - 1
    changed = base.clone()
    changed[:, :, 8:12, 20:24] = torch.rand(1, 3, 4, 4) * 2 - 1  # patch (row 2, column 5)
    with torch.no_grad():
        a, b = model.encode_latents(base), model.encode_latents(changed)
    differs = (a - b).abs().amax(dim=1)[0] > 0  # [g, g]
    expected = torch.zeros(g, g, dtype=torch.bool)
    expected[8 // f, 20 // f] = True
    assert torch.equal(differs, expected)
    # a plain image is one code everywhere; a patch-aligned shift moves the codes with it
    plain = torch.full((1, 3, 32, 32), 0.3)
    assert model.encode(plain).unique().numel() == 1
    shifted = torch.roll(changed, shifts=(f, 2 * f), dims=(2, 3))
    grid = model.encode(changed).view(g, g)
    assert torch.equal(model.encode(shifted).view(g, g)[3, 7], grid[2, 5])
    # the taming encoder is not local: the same edit moves latents far from the patch
    taming = VQGAN(VQGANConfig.preset("tiny")).eval()
    with torch.no_grad():
        far = (taming.encode_latents(base) - taming.encode_latents(changed)).abs().amax(dim=1)[0]
    assert far[7, 0] > 0
    # saved and reloaded natively; refused by the official layouts
    tokenizer = ImageTokenizer(model)
    tokenizer.save(tmp_path / "tok")
    reloaded = load_image_tokenizer(tmp_path / "tok")
    assert reloaded.config.encoder == "patch"
    assert torch.equal(reloaded.vqgan.encode(base), model.encode(base))


def test_patch_encoder_is_refused_by_official_layouts() -> None:
    from chameleon_lm.tokenizers.image import hf_vq_config, taming_yaml

    cfg = VQGANConfig.preset("tiny", encoder="patch", norm_groups=32)
    for export in (hf_vq_config, taming_yaml):
        with pytest.raises(ValueError, match="taming encoders only"):
            export(cfg)
    with pytest.raises(ValueError, match="encoder must be one of"):
        VQGANConfig.preset("tiny", encoder="vit")
