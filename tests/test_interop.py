"""Official and Hugging Face checkpoints: load, convert, export, against transformers' implementation.

No weights can be downloaded, so every test writes tiny random checkpoints in each layout. The Meta
layout is written here from the spec's tables (§6.1, §6.2), and Hugging Face's conversion script
(§6.4) is written out below as ``hf_state_from_meta``, independently of the loader under test: a Meta
checkpoint must give our model the logits that HF's model gives on the converted weights.
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from test_text_tokenizer import CORPUS, _official_style_json
from test_vqgan import PARITY_CONFIG, write_meta_layout

from chameleon_lm import Chameleon, ChameleonConfig, load_model
from chameleon_lm.checkpoints import detect_layout, save_model
from chameleon_lm.checkpoints.convert import convert
from chameleon_lm.cli import main
from chameleon_lm.tokenizers.image import ImageTokenizer, load_image_tokenizer
from chameleon_lm.tokenizers.text import load_text_tokenizer, train_text_tokenizer
from chameleon_lm.tokenizers.vocab import IMAGE
from chameleon_lm.tokenizers.vqgan import VQGAN

transformers = pytest.importorskip("transformers")

PARITY_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. Ça coûte 5€.",
    "東京は日本の首都です。 서울은 한국의 수도입니다. Москва — столица России. القاهرة عاصمة مصر",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\n# TODO: vectorise\n",
    "Emoji 🦎🤖🎨 with ZWJ 👩‍🔬 and flags 🇫🇷🇯🇵, skin tone 👋🏽!",
    "  leading  and trailing spaces \n\n\t mixed\twhitespace   ",
    "numbers 0 7 42 3.14159 1e-5 -17 1,000,000 and IMGIMG lookalikes IMGIMGZ",
]
V = 768  # model vocabulary (the trained tokenizer has <= 700 ids)


@pytest.fixture(scope="module")
def tok():
    return train_text_tokenizer(CORPUS, 700, codebook_size=PARITY_CONFIG.n_embed)


def tiny(swin: bool = False, kv: int | None = None) -> ChameleonConfig:
    # ffn_dim 192 follows Meta's rule with multiple_of 32: int(8 * 64 / 3) = 170, rounded up to 192.
    return ChameleonConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=kv, ffn_dim=192, vocab_size=V,
                           max_seq_len=128, swin_norm=swin)


def image_ids(tok) -> torch.Tensor:
    return torch.nonzero(tok.vocab.classes == IMAGE).flatten()


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Weights with spread-out logits (so argmax has no near-ties) and non-trivial norms."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "norm" in name:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1] if p.ndim > 1 else 1))


def hf_config(cfg: ChameleonConfig, tok) -> transformers.ChameleonConfig:
    vq = PARITY_CONFIG
    return transformers.ChameleonConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        swin_norm=cfg.swin_norm, rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
        vq_config=dict(embed_dim=vq.embed_dim, num_embeddings=vq.n_embed, latent_channels=vq.z_channels,
                       base_channels=vq.ch, channel_multiplier=list(vq.ch_mult), resolution=vq.resolution,
                       num_res_blocks=vq.num_res_blocks, attn_resolutions=list(vq.attn_resolutions)),
        vocabulary_map=tok.tokenizer.get_vocab(with_added_tokens=True),
    )


def hf_model(cfg: ChameleonConfig, tok, seed: int = 0):
    model = transformers.ChameleonForConditionalGeneration(hf_config(cfg, tok)).eval()
    randomize(model, seed)
    return model


def assert_same_logits(ours: Chameleon, hf, tok, seed: int = 0) -> None:
    """Our logits equal HF's to 1e-5 on every non-image id, and exactly match HF's once its image mask
    (dtype minimum on the IMGIMG ids, spec §2.6) is applied to ours."""
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a, b = ours(ids), hf(input_ids=ids).logits
    img = image_ids(tok)
    text = torch.ones(V, dtype=torch.bool)
    text[img] = False
    torch.testing.assert_close(a[..., text], b[..., text], atol=1e-5, rtol=1e-5)
    assert (b[..., img] == torch.finfo(b.dtype).min).all() and torch.isfinite(a).all()
    masked = a.clone()
    masked[..., img] = torch.finfo(a.dtype).min
    torch.testing.assert_close(masked, b, atol=1e-5, rtol=1e-5)


def assert_same_greedy(ours: Chameleon, hf, tok, steps: int = 32) -> None:
    """Greedy decoding with our KV cache (HF's image mask applied) gives HF generate's ids."""
    prompt = torch.tensor([[0, *tok.encode("A red circle on a")]])
    hf.generation_config.eos_token_id = None  # run all the steps
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=steps, do_sample=False)[0, prompt.shape[1]:].tolist()
        cache = ours.new_cache(1, prompt.shape[1] + steps)
        logits, mine = ours(prompt, cache)[:, -1], []
        for _ in range(steps):
            logits[:, image_ids(tok)] = torch.finfo(logits.dtype).min
            nxt = logits.argmax(-1)
            mine.append(int(nxt))
            logits = ours(nxt[:, None], cache)[:, -1]
    assert len(theirs) == steps and mine == theirs
    assert len(set(mine)) > 3  # not a degenerate repetition


def assert_same_everything(loaded, hf, tok) -> None:
    """Logits, greedy ids, and the VQ encoder's image tokens equal HF's ``get_image_tokens``."""
    assert_same_logits(loaded.model, hf, tok)
    assert_same_greedy(loaded.model, hf, tok)
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        codes = loaded.image_tokenizer.vqgan.encode(pixels)
        assert torch.equal(codes + tok.vocab.image_start, hf.model.get_image_tokens(pixels))
    assert len(codes.unique()) > 5


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------- Meta's layout


def meta_shard_shapes(cfg: ChameleonConfig, mp: int) -> dict[str, tuple[int, ...]]:
    """Keys and per-shard shapes of Meta's checkpoint, from the spec's table (§6.2)."""
    H, K, hd, D, F = cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.dim, cfg.ffn_dim
    shapes = {"tok_embeddings.weight": (V, D // mp), "norm.weight": (D,), "output.weight": (V // mp, D)}
    for i in range(cfg.n_layers):
        a, f = f"layers.{i}.attention.", f"layers.{i}.feed_forward."
        shapes |= {a + "wq.weight": (H * hd // mp, D), a + "wk.weight": (K * hd // mp, D),
                   a + "wv.weight": (K * hd // mp, D), a + "wo.weight": (D, H * hd // mp),
                   f + "w1.weight": (F // mp, D), f + "w3.weight": (F // mp, D),
                   f + "w2.weight": (D, F // mp),
                   f"layers.{i}.attention_norm.weight": (D,), f"layers.{i}.ffn_norm.weight": (D,)}
        for n in ("q_normalization", "k_normalization"):
            shapes |= {a + n + ".weight": (hd,), a + n + ".bias": (hd,)}
    return shapes


def random_meta_shards(cfg: ChameleonConfig, mp: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Meta's shards: independent random tensors per shard (one QK-norm vector each), the RMSNorm
    weights replicated, and the unused ``rope.freqs``."""
    gen = torch.Generator().manual_seed(seed)
    shapes = meta_shard_shapes(cfg, mp)

    def rand(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        noise = torch.randn(shape, generator=gen)
        if len(shape) == 2:
            return noise / math.sqrt(shape[1])
        return 0.1 * noise + (0.0 if key.endswith("bias") else 1.0)

    replicated = {k: rand(k, s) for k, s in shapes.items() if k.endswith("norm.weight")}
    freqs = {"rope.freqs": torch.zeros(cfg.head_dim // 2)}
    return [{k: replicated[k] if k in replicated else rand(k, s) for k, s in shapes.items()} | freqs
            for _ in range(mp)]


def hf_state_from_meta(shards: list[dict], cfg: ChameleonConfig) -> dict[str, torch.Tensor]:
    """Hugging Face's ``convert_chameleon_weights_to_hf.py`` (spec §6.4), with ``key_value_dim`` taken as
    n_kv_heads · head_dim (the script's ``dim // n_kv_heads`` agrees only when n_heads = n_kv_heads²)."""
    mp, H, K, hd = len(shards), cfg.n_heads, cfg.kv_heads, cfg.head_dim

    def permute(w: torch.Tensor, n: int) -> torch.Tensor:
        return w.view(n, w.shape[0] // n // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    def cat(key: str, dim: int) -> torch.Tensor:
        return torch.cat([s[key] for s in shards], dim)

    def mean(key: str) -> torch.Tensor:
        return torch.stack([s[key] for s in shards]).mean(0)

    def qk(key: str, heads: int) -> torch.Tensor:
        rows = torch.stack([s[key] for s in shards]).view(mp, hd // 2, 2).transpose(1, 2).reshape(mp, hd)
        return rows.repeat_interleave(heads // mp, 0)

    out = {"model.embed_tokens.weight": cat("tok_embeddings.weight", 1),
           "model.norm.weight": mean("norm.weight"), "lm_head.weight": cat("output.weight", 0)}
    for i in range(cfg.n_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        out |= {
            h + "self_attn.q_proj.weight": permute(cat(m + "attention.wq.weight", 0), H),
            h + "self_attn.k_proj.weight": permute(cat(m + "attention.wk.weight", 0), K),
            h + "self_attn.v_proj.weight": cat(m + "attention.wv.weight", 0),
            h + "self_attn.o_proj.weight": cat(m + "attention.wo.weight", 1),
            h + "mlp.gate_proj.weight": cat(m + "feed_forward.w1.weight", 0),
            h + "mlp.up_proj.weight": cat(m + "feed_forward.w3.weight", 0),
            h + "mlp.down_proj.weight": cat(m + "feed_forward.w2.weight", 1),
            h + "input_layernorm.weight": mean(m + "attention_norm.weight"),
            h + "post_attention_layernorm.weight": mean(m + "ffn_norm.weight"),
        }
        for p in ("weight", "bias"):
            out[h + f"self_attn.q_norm.{p}"] = qk(m + f"attention.q_normalization.{p}", H)
            out[h + f"self_attn.k_norm.{p}"] = qk(m + f"attention.k_normalization.{p}", K)
    return out


def write_meta(root, cfg: ChameleonConfig, shards: list[dict], tok, with_vocab_size: bool = True):
    """Meta's ``data/`` layout (spec §6.1); the shard count goes in consolidate_params.json."""
    model_dir = root / "models" / "7b"
    model_dir.mkdir(parents=True)
    model = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "multiple_of": 32,
             "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "qk_normalization": True,
             "swin_norm": cfg.swin_norm}
    if cfg.n_kv_heads is not None:
        model["n_kv_heads"] = cfg.n_kv_heads
    if with_vocab_size:
        model["vocab_size"] = cfg.vocab_size
    (model_dir / "params.json").write_text(json.dumps({"model": model}))
    (model_dir / "consolidate_params.json").write_text(json.dumps({"model_parallel_size": len(shards)}))
    for i, shard in enumerate(shards):
        name = "consolidated.pth" if len(shards) == 1 else f"consolidated.{i:02d}.pth"
        torch.save(shard, model_dir / name)
    vqgan = VQGAN(PARITY_CONFIG)
    randomize(vqgan, 7)
    write_meta_layout(root / "tokenizer", PARITY_CONFIG, vqgan.state_dict())
    tok.save(root / "tokenizer" / "text_tokenizer.json")
    return model_dir, vqgan


@pytest.mark.parametrize(("mp", "swin", "kv"),
                         [(1, False, None), (1, True, 2), (2, True, 2), (2, False, None)])
def test_meta_layout_logits_match_hf(tmp_path, tok, mp, swin, kv):
    cfg = tiny(swin, kv)
    shards = random_meta_shards(cfg, mp, seed=mp + 2 * swin)
    model_dir, vqgan = write_meta(tmp_path / "data", cfg, shards, tok, with_vocab_size=mp == 1)
    hf = hf_model(cfg, tok)
    hf.load_state_dict(hf_state_from_meta(shards, cfg), strict=False)
    for path in (tmp_path / "data", model_dir):  # the data/ root or the models/7b folder
        assert detect_layout(path) == ("meta", model_dir)
        loaded = load_model(path)
        # Meta's params.json has no sequence length: the official 4096.
        assert loaded.config == cfg.replace(max_seq_len=4096) and loaded.text_tokenizer.vocab == tok.vocab
        assert_same_logits(loaded.model, hf, tok)
    if mp == 2:  # the two shards' QK-norm vectors stay distinct: each is shared by its shard's heads
        q = loaded.model.layers[0].attention.q_normalization.weight
        assert torch.equal(q[0], q[1]) and not torch.equal(q[1], q[2])
    assert_same_state(loaded.image_tokenizer.vqgan.state_dict(), vqgan.state_dict())
    for path in (model_dir, tmp_path / "data"):  # the tokenizers load from the same folders
        assert load_text_tokenizer(path).vocab == tok.vocab
        assert load_image_tokenizer(path).config == PARITY_CONFIG


def mapped_file(address: int) -> str | None:
    """The file mapped at ``address`` in this process (Linux), or None."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5].strip() if len(fields) == 6 else None
    return None


def test_meta_weights_are_bf16_memory_mapped(tmp_path, tok):
    cfg = tiny()
    shards = [{k: v.bfloat16() for k, v in random_meta_shards(cfg, 1, seed=3)[0].items()}]
    model_dir, _ = write_meta(tmp_path, cfg, shards, tok)
    model = load_model(model_dir).model
    assert model.output.weight.dtype == torch.bfloat16
    # Unpermuted tensors are the file's memory-mapped pages, not copies.
    wv = model.layers[0].attention.wv.weight
    assert mapped_file(wv.data_ptr()) == str(model_dir / "consolidated.pth")
    assert load_model(model_dir, dtype=torch.float32).model.output.weight.dtype == torch.float32


def test_meta_shard_norm_copies_that_differ_are_averaged(tmp_path, tok):
    cfg = tiny()
    shards = random_meta_shards(cfg, 2, seed=5)
    shards[1]["norm.weight"] = shards[1]["norm.weight"] + 0.5
    model_dir, _ = write_meta(tmp_path, cfg, shards, tok)
    with pytest.warns(UserWarning, match="different copies of norm.weight"):
        model = load_model(model_dir).model
    torch.testing.assert_close(model.norm.weight, (shards[0]["norm.weight"] + shards[1]["norm.weight"]) / 2)


def test_meta_layout_errors(tmp_path, tok):
    cfg = tiny()
    model_dir, _ = write_meta(tmp_path / "a", cfg, random_meta_shards(cfg, 2, seed=1), tok)
    (model_dir / "consolidated.01.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"consolidated\.01\.pth: missing"):
        load_model(model_dir)

    model_dir, _ = write_meta(tmp_path / "b", cfg, random_meta_shards(cfg, 1, seed=1), tok)
    path = model_dir / "consolidated.pth"
    shard = torch.load(path, weights_only=True)
    shard["layers.1.attention.wk.weight"] = shard["layers.1.attention.wk.weight"][:-2]
    torch.save(shard, path)
    with pytest.raises(ValueError, match=r"consolidated\.pth: layers\.1\.attention\.wk\.weight has shape"):
        load_model(model_dir)
    del shard["layers.1.attention.wk.weight"]
    torch.save(shard, path)
    with pytest.raises(ValueError, match=r"consolidated\.pth: missing layers\.1\.attention\.wk\.weight"):
        load_model(model_dir)
    torch.save({**random_meta_shards(cfg, 1, seed=1)[0], "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"consolidated\.pth: unexpected keys \['extra\.weight'\]"):
        load_model(model_dir)
    torch.save(random_meta_shards(cfg, 1, seed=1)[0], path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated download
    with pytest.raises(ValueError, match=r"consolidated\.pth: cannot load"):
        load_model(model_dir)
    torch.save({"tok_embeddings.weight": torch.zeros(V, 64), "hook": functools.partial(print, "!")}, path)
    with pytest.raises(ValueError, match=r"consolidated\.pth: cannot load as a weights-only"):
        load_model(model_dir)  # pickled objects are refused, never executed
    torch.save(random_meta_shards(cfg, 1, seed=1)[0], path)
    (model_dir / "params.json").write_text(json.dumps({"model": {"dim": 64}}))
    with pytest.raises(ValueError, match=r"params\.json: not a usable"):
        load_model(model_dir)

    two = tmp_path / "two"
    for name in ("7b", "30b"):
        (two / "models" / name).mkdir(parents=True)
        (two / "models" / name / "params.json").write_text("{}")
    with pytest.raises(ValueError, match="several Meta models"):
        load_model(two)


# ----------------------------------------------------------------------------- Hugging Face's layout


@pytest.mark.parametrize(("swin", "kv"), [(False, None), (True, 2), (False, 2), (True, None)])
def test_hf_layout_logits_and_greedy_match_hf(tmp_path, tok, swin, kv):
    cfg = tiny(swin, kv)
    hf = hf_model(cfg, tok, seed=int(swin) + 2 * (kv or 0))
    hf.save_pretrained(tmp_path, max_shard_size="200KB")  # several shards + index
    tok.save(tmp_path / "tokenizer.json")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = load_model(tmp_path)
    assert loaded.config == cfg
    assert_same_everything(loaded, hf, tok)  # the VQ encoder coming from model.vqmodel.*


def test_hf_vq_decoder_comes_from_meta_ckpt(tmp_path, tok):
    hf = hf_model(tiny(), tok)
    hf.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf" / "tokenizer.json")
    image_tok = load_image_tokenizer(tmp_path / "hf")  # the HF layout, directly
    assert load_text_tokenizer(tmp_path / "hf").vocab == tok.vocab
    assert not image_tok.can_decode and load_model(tmp_path / "hf").image_tokenizer.config == PARITY_CONFIG
    codes = torch.randint(0, 64, (1, PARITY_CONFIG.num_tokens))
    with pytest.raises(ValueError, match="no decoder"):
        image_tok.decode(codes)
    full = VQGAN(PARITY_CONFIG)
    randomize(full, 3)
    write_meta_layout(tmp_path / "meta", PARITY_CONFIG, full.state_dict())
    for vqgan in (tmp_path / "meta" / "vqgan.ckpt", tmp_path / "meta"):
        image_tok = load_model(tmp_path / "hf", vqgan=vqgan).image_tokenizer
        state = image_tok.vqgan.state_dict()
        assert_same_state({k: v for k, v in state.items() if k.startswith("decoder.")},
                          {k: v for k, v in full.state_dict().items() if k.startswith("decoder.")})
        assert image_tok.decode(codes)[0].size == (32, 32)
    with pytest.raises(ValueError, match="already holds a VQ decoder"):
        load_image_tokenizer(tmp_path / "meta", decoder=tmp_path / "meta")


def test_hf_layout_errors(tmp_path, tok):
    hf = hf_model(tiny(), tok)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    tok.save(tmp_path / "sharded" / "tokenizer.json")
    victim = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=victim.name + ": not a readable safetensors"):
        load_model(tmp_path / "sharded")
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name + ": missing"):
        load_model(tmp_path / "sharded")

    hf.save_pretrained(tmp_path / "shape")
    tok.save(tmp_path / "shape" / "tokenizer.json")
    cfg = json.loads((tmp_path / "shape" / "config.json").read_text())
    (tmp_path / "shape" / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 256}))
    with pytest.raises(ValueError, match=r"model\.safetensors: layers\.0\.feed_forward\.w1\.weight has"):
        load_model(tmp_path / "shape")
    (tmp_path / "shape" / "config.json").write_text(json.dumps(cfg | {"tie_word_embeddings": True}))
    with pytest.raises(ValueError, match=r"config\.json: tie_word_embeddings=True is not supported"):
        load_model(tmp_path / "shape")


def test_unknown_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="not a recognised model folder"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="not a recognised model folder"):
        load_model(tmp_path)


# ---------------------------------------------------------------------------------------- exports


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory, tok):
    """A native model folder: GQA + swin, QK-norm rows shared by pairs of heads (as in a 2-shard Meta
    model), and a full VQGAN."""
    cfg = tiny(swin=True, kv=2)
    model = Chameleon(cfg).eval()
    randomize(model, 11)
    with torch.no_grad():
        for layer in model.layers:
            for norm in (layer.attention.q_normalization, layer.attention.k_normalization):
                for p in (norm.weight, norm.bias):
                    p.copy_(p[:: p.shape[0] // 2].repeat_interleave(p.shape[0] // 2, 0))
    vqgan = VQGAN(PARITY_CONFIG)
    randomize(vqgan, 12)
    return save_model(tmp_path_factory.mktemp("native"), model, tok, ImageTokenizer(vqgan))


def files_equal(a, b, names) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_hf_export_loads_in_transformers(tmp_path, native_dir, tok):
    ours = load_model(native_dir)
    convert(native_dir, tmp_path / "hf", "hf", max_shard_bytes=100_000)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    hf, info = transformers.ChameleonForConditionalGeneration.from_pretrained(
        tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info  # every weight came from the files (VQ encoder included)
    hf.eval()
    assert_same_everything(ours, hf, tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in PARITY_TEXTS:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def test_round_trips_are_bit_exact(tmp_path, native_dir):
    ref = load_model(native_dir)
    ref_state, ref_vq = ref.model.state_dict(), ref.image_tokenizer.vqgan.state_dict()
    # native -> Meta -> native: two shards (the QK-norm rows come in two groups), everything equal.
    convert(native_dir, tmp_path / "meta", "meta")
    assert sorted(p.name for p in (tmp_path / "meta" / "models" / "30b").glob("*.pth")) == [
        "consolidated.00.pth", "consolidated.01.pth"]
    convert(tmp_path / "meta", tmp_path / "back_meta", "native")
    # native -> HF -> native, with the VQ decoder given back from the native folder.
    convert(native_dir, tmp_path / "hf", "hf")
    convert(tmp_path / "hf", tmp_path / "back_hf", "native", vqgan=native_dir)
    for back in ("back_meta", "back_hf"):
        again = load_model(tmp_path / back)
        assert again.config == ref.config
        assert_same_state(again.model.state_dict(), ref_state)
        assert_same_state(again.image_tokenizer.vqgan.state_dict(), ref_vq)
        files_equal(native_dir, tmp_path / back, ["config.json", "tokenizer.json", "vqgan.json"])
    # Without the decoder the HF round trip keeps the encoder and says the decoder is missing.
    convert(tmp_path / "hf", tmp_path / "no_dec", "native")
    vq = load_model(tmp_path / "no_dec").image_tokenizer
    assert not vq.can_decode
    encoder_only = {k: v for k, v in ref_vq.items() if not k.startswith("decoder.")}
    assert_same_state(vq.vqgan.state_dict(), encoder_only)
    with pytest.raises(ValueError, match="no decoder"):
        convert(tmp_path / "no_dec", tmp_path / "meta2", "meta")


def test_meta_export_meets_official_loader(tmp_path, native_dir, tok):
    ref = load_model(native_dir)
    cfg = ref.config
    model_dir = convert(native_dir, tmp_path / "data", "meta")
    # Meta's loader: params = {**params, **params["model"], **consolidate_params}, ModelArgs fields only.
    params = json.loads((model_dir / "params.json").read_text())
    consolidate = json.loads((model_dir / "consolidate_params.json").read_text())
    merged = {**params, **params["model"], **consolidate}
    assert merged["model_parallel_size"] == 2 and merged["qk_normalization"] is True
    hidden = int(2 * (4 * merged["dim"]) / 3)  # Meta's FeedForward rule
    if merged.get("ffn_dim_multiplier") is not None:
        hidden = int(merged["ffn_dim_multiplier"] * hidden)
    m = merged["multiple_of"]
    assert m * ((hidden + m - 1) // m) == cfg.ffn_dim
    assert "ffn_dim_multiplier" not in params["model"]  # HF's converter cannot read a null
    expected = meta_shard_shapes(cfg, 2)
    shards = [torch.load(model_dir / f"consolidated.{i:02d}.pth", weights_only=True) for i in range(2)]
    for shard in shards:
        missing, unexpected = set(expected) - set(shard), sorted(set(shard) - set(expected))
        assert not missing and unexpected == ["rope.freqs"]
        assert {k: tuple(shard[k].shape) for k in expected} == expected
    # HF's converter on our export gives HF a model with our logits.
    hf = hf_model(cfg, tok)
    hf.load_state_dict(hf_state_from_meta(shards, cfg), strict=False)
    assert_same_logits(ref.model, hf, tok)
    tok_dir = tmp_path / "data" / "tokenizer"
    assert sorted(p.name for p in tok_dir.iterdir()) == ["text_tokenizer.json", "vqgan.ckpt", "vqgan.yaml"]
    assert (tok_dir / "text_tokenizer.json").read_bytes() == (native_dir / "tokenizer.json").read_bytes()


def test_official_vocabulary_image_placeholder(tmp_path):
    """HF's converter renames <reserved08707> (id 8711) to <image>: our HF export does the same, and
    loading HF's layout names it back, so a text-only model round-trips with identical files."""
    tok = load_text_tokenizer(_official_style_json(tmp_path))
    model = Chameleon(ChameleonConfig(dim=64, n_layers=1, n_heads=4, ffn_dim=192, vocab_size=9216))
    randomize(model, 4)
    save_model(tmp_path / "native", model, tok)
    convert(tmp_path / "native", tmp_path / "hf", "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["image_token_id"] == cfg["vocabulary_map"]["<image>"] == 8711
    assert "<reserved08707>" not in (tmp_path / "hf" / "tokenizer.json").read_text()
    hf = transformers.ChameleonForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 9216, (1, 12))
    with torch.no_grad():
        a, b = model(ids), hf(input_ids=ids).logits
    text = torch.ones(9216, dtype=torch.bool)
    text[4:8196] = False  # the official image ids
    torch.testing.assert_close(a[..., text], b[..., text], atol=1e-5, rtol=1e-5)
    assert (b[..., ~text] == torch.finfo(b.dtype).min).all()
    convert(tmp_path / "hf", tmp_path / "back", "native")
    files_equal(tmp_path / "native", tmp_path / "back", ["config.json", "tokenizer.json"])
    assert load_model(tmp_path / "back").image_tokenizer is None


def test_meta_export_refuses_per_head_qk_norm(tmp_path, tok):
    model = Chameleon(tiny(kv=2))
    randomize(model, 1)  # independent rows per head: no Meta shard layout holds them
    save_model(tmp_path / "native", model, tok)
    with pytest.raises(ValueError, match="QK-norm rows differ"):
        convert(tmp_path / "native", tmp_path / "meta", "meta")


def test_exports_refuse_a_patch_encoder_before_writing(tmp_path, tok):
    model = Chameleon(tiny())
    vqgan = VQGAN(PARITY_CONFIG.replace(encoder="patch"))
    save_model(tmp_path / "native", model, tok, ImageTokenizer(vqgan))
    for layout in ("meta", "hf"):
        with pytest.raises(ValueError, match="taming encoders only"):
            convert(tmp_path / "native", tmp_path / layout, layout)
        assert not (tmp_path / layout).exists() or not any((tmp_path / layout).rglob("*.*")), layout


def test_convert_cli(tmp_path, native_dir, capsys):
    assert main(["convert", str(native_dir), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert detect_layout(tmp_path / "hf") == ("hf", tmp_path / "hf")
    assert main(["convert", str(native_dir), str(tmp_path / "hf"), "--to", "meta"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["convert", str(native_dir), str(tmp_path / "m"), "--to", "meta", "--shards", "3"]) == 2
    assert "not divisible by 3" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- tokenizer


def test_text_tokenizer_ids_equal_hf(tmp_path, tok):
    """The same tokenizer.json through transformers gives the same ids (multilingual, code, emoji)."""
    path = tok.save(tmp_path / "tokenizer.json")
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in PARITY_TEXTS + CORPUS[:4]:
        ids = tok.encode(text)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
        assert hf_tok.decode(ids) == tok.decode(ids) == text
    # The one deliberate difference: special-token names typed in text stay text with us.
    assert hf_tok("<s>", add_special_tokens=False)["input_ids"] == [0]
    assert 0 not in tok.encode("<s>")
