"""The Hugging Face ``ChameleonForConditionalGeneration`` state-dict layout.

HF weights already use the rotate-half RoPE row order and per-head QK-norm rows, which is our internal
convention, so the mapping is a pure renaming of keys (no tensor is changed).
"""

from __future__ import annotations

import re

import torch

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
