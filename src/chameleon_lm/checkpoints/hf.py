"""The Hugging Face layout of ``ChameleonForConditionalGeneration``: load it and write it.

Layout (what ``save_pretrained`` writes and ``from_pretrained`` reads)::

    DIR/config.json                     model_type "chameleon", sizes, vq_config, vocabulary_map
    DIR/model.safetensors               or model-0000K-of-0000N.safetensors + model.safetensors.index.json
    DIR/tokenizer.json (+ tokenizer_config.json)

HF weights already use the rotate-half RoPE row order and per-head QK-norm rows, which is our internal
convention, so the decoder mapping is a pure renaming of keys (no tensor is changed). The VQ encoder
lives under ``model.vqmodel.*``; HF has no VQ decoder. HF's conversion renamed the tokenizer's
``<reserved08707>`` (id 8711) to ``<image>``; we name it back on load and again on export.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from chameleon_lm.checkpoints.native import LoadedModel, assemble, bundle
from chameleon_lm.model import Chameleon, ChameleonConfig
from chameleon_lm.tokenizers.image import HF_PREFIX, ImageTokenizer, hf_vq_config, load_image_tokenizer
from chameleon_lm.tokenizers.text import TextTokenizer, load_text_tokenizer
from chameleon_lm.tokenizers.vocab import HF_IMAGE_PLACEHOLDER
from chameleon_lm.utils.weights import SAFETENSORS, SAFETENSORS_INDEX, load_safetensors_folder, read_json

META_IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER_ID = "<reserved08707>", 8711

# (native pattern, HF pattern); ``{i}`` stands for the layer index.
_RENAMES = [
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.attention.q_normalization.weight", "model.layers.{i}.self_attn.q_norm.weight"),
    ("layers.{i}.attention.q_normalization.bias", "model.layers.{i}.self_attn.q_norm.bias"),
    ("layers.{i}.attention.k_normalization.weight", "model.layers.{i}.self_attn.k_norm.weight"),
    ("layers.{i}.attention.k_normalization.bias", "model.layers.{i}.self_attn.k_norm.bias"),
    ("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
]


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(\d+)") + "$")


_TO_HF = [(_compile(n), h) for n, h in _RENAMES]
_FROM_HF = [(_compile(h), n) for n, h in _RENAMES]


def _rename(key: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, target in table:
        m = pattern.match(key)
        if m:
            return target.replace("{i}", m.group(1)) if m.groups() else target
    return None


def hf_to_native(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoder weights of an HF state dict under our names (``model.vqmodel.*`` is left out)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("model.vqmodel."):
            continue
        name = _rename(key, _FROM_HF)
        if name is None:
            raise KeyError(f"unexpected key in a Hugging Face Chameleon state dict: {key!r}")
        out[name] = value
    return out


def native_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our decoder state dict under HF's names."""
    out = {}
    for key, value in state_dict.items():
        name = _rename(key, _TO_HF)
        if name is None:
            raise KeyError(f"unexpected key in a chameleon-lm state dict: {key!r}")
        out[name] = value
    return out


# ------------------------------------------------------------------------------------------- config


def config_from_hf(cfg: dict, source: Path) -> ChameleonConfig:
    """Our config from an HF ``config.json`` (refusing options our model does not have)."""
    unsupported = {"attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
                   "hidden_act": "silu"}
    for name, value in unsupported.items():
        if cfg.get(name, value) != value:
            raise ValueError(f"{source}: {name}={cfg[name]!r} is not supported (only {value!r})")
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
        raise ValueError(f"{source}: only plain RoPE is supported, not {rope or cfg['rope_scaling']}")
    try:
        heads = cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads") or heads
        return ChameleonConfig(
            dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=heads,
            n_kv_heads=None if kv == heads else kv, ffn_dim=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"], norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            max_seq_len=cfg.get("max_position_embeddings", 4096), swin_norm=cfg.get("swin_norm", False),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source}: not a usable Chameleon config ({type(e).__name__}: {e})") from e


def hf_config(
    config: ChameleonConfig, text_tokenizer: TextTokenizer, image_tokenizer: ImageTokenizer | None,
    dtype: torch.dtype,
) -> dict:
    """An HF ``config.json`` for our model and the tokenizer as written (with ``<image>``). Without an
    image tokenizer, ``vq_config`` describes a tiny VQ model that HF initialises at random."""
    if config.qk_norm_eps != 1e-5:
        raise ValueError(f"HF's QK LayerNorm has eps 1e-5; this model has {config.qk_norm_eps}")
    v = text_tokenizer.vocab
    vocab = text_tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    if image_tokenizer is not None:
        vq = hf_vq_config(image_tokenizer.config)
    else:
        vq = {"model_type": "chameleon_vqgan", "embed_dim": 32, "num_embeddings": v.codebook_size,
              "latent_channels": 32, "base_channels": 32, "channel_multiplier": [1], "resolution": 32,
              "num_res_blocks": 1}
    return {
        "architectures": ["ChameleonForConditionalGeneration"], "model_type": "chameleon",
        "hidden_size": config.dim, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.kv_heads,
        "intermediate_size": config.ffn_dim, "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm_eps, "max_position_embeddings": config.max_seq_len,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_theta": config.rope_theta,  # where transformers 4.x reads it
        "swin_norm": config.swin_norm, "model_parallel_size": 1, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "bos_token_id": v.bos_id, "eos_token_id": v.eos_id, "pad_token_id": v.pad_id,
        "image_token_id": vocab.get(HF_IMAGE_PLACEHOLDER), "dtype": str(dtype).removeprefix("torch."),
        "vq_config": vq, "vocabulary_map": vocab,
    }


def renamed(tokenizer: TextTokenizer, old: str, new: str) -> TextTokenizer:
    """``tokenizer`` with token ``old`` renamed ``new`` if ``old`` is id 8711 (HF's ``<image>`` slot)."""
    data = json.loads(tokenizer.tokenizer.to_str())
    vocab = data["model"]["vocab"]
    if vocab.get(old) != IMAGE_PLACEHOLDER_ID or new in vocab:
        return tokenizer
    vocab[new] = vocab.pop(old)
    for token in data.get("added_tokens", []):
        if token["content"] == old:
            token["content"] = new
    return TextTokenizer(Tokenizer.from_str(json.dumps(data)))


# ------------------------------------------------------------------------------------------ reading


def load_hf_model(
    directory: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    vqgan: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load an HF folder; ``vqgan``: Meta's ``vqgan.ckpt`` (or its folder) to take the VQ decoder from."""
    directory = Path(directory)
    config = config_from_hf(read_json(directory / "config.json"), directory / "config.json")
    tensors, sources = load_safetensors_folder(directory)
    state, files = {}, {}
    for key, value in tensors.items():
        if key.startswith(HF_PREFIX):
            continue
        name = _rename(key, _FROM_HF)
        if name is None:
            raise ValueError(f"{sources[key]}: unexpected key {key!r} in a Chameleon checkpoint")
        state[name], files[name] = value, sources[key]
    model = assemble(config, state, files, dtype, device)
    del tensors
    text_tok = renamed(load_text_tokenizer(directory / "tokenizer.json"), HF_IMAGE_PLACEHOLDER,
                       META_IMAGE_PLACEHOLDER)
    has_vq = any(k.startswith(HF_PREFIX) for k in sources)
    image_tok = None
    if has_vq or vqgan is not None:
        image_tok = load_image_tokenizer(directory, device=device, decoder=vqgan)
    return bundle(model, text_tok, image_tok, directory)


# ------------------------------------------------------------------------------------------ writing


def save_hf_model(
    directory: str | os.PathLike,
    model: Chameleon,
    text_tokenizer: TextTokenizer,
    image_tokenizer: ImageTokenizer | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write a folder that ``transformers.ChameleonForConditionalGeneration.from_pretrained`` loads.

    Weights go in safetensors shards of at most ``max_shard_bytes`` (one tensor may exceed it), with
    ``model.safetensors.index.json`` when there are several. The VQ encoder (not the decoder, which HF
    lacks) goes under ``model.vqmodel.*``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = native_to_hf({k: v.detach().cpu() for k, v in model.state_dict().items()})
    if image_tokenizer is not None:
        vq = image_tokenizer.vqgan.state_dict()
        state |= {HF_PREFIX + k: v.detach().cpu() for k, v in vq.items() if not k.startswith("decoder.")}
    tok = renamed(text_tokenizer, META_IMAGE_PLACEHOLDER, HF_IMAGE_PLACEHOLDER)
    cfg = hf_config(model.config, tok, image_tokenizer, model.output.weight.dtype)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_shards(state, directory, max_shard_bytes)
    tok.save(directory / "tokenizer.json")
    v = tok.vocab
    names = {"bos_token": v.bos_id, "eos_token": v.eos_id, "pad_token": v.pad_id, "unk_token": v.unk_id,
             "sep_token": v.eot_id}
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False,
                  **{k: tok.id_to_token(i) for k, i in names.items() if i is not None}}
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    return directory


def save_shards(state: dict[str, torch.Tensor], directory: Path, max_bytes: int) -> None:
    """``state`` in safetensors files of at most ``max_bytes`` (HF's shard names and index)."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        t = state[key]
        if groups[-1] and size + t.nbytes > max_bytes:
            groups.append({})
            size = 0
        groups[-1][key] = t.contiguous()
        size += t.nbytes
    if len(groups) == 1:
        save_file(groups[0], directory / SAFETENSORS, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, directory / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(group, name)
    index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())}, "weight_map": weight_map}
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
