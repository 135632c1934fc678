"""Configuration of the Chameleon transformer, with the official presets.

Field names follow Meta's ``params.json`` / ``ModelArgs`` (``dim``, ``n_layers``, ``swin_norm``, …) so an
official checkpoint's parameters map onto this config one to one.
"""

from __future__ import annotations

from dataclasses import dataclass

from chameleon_lm.utils.config import Config


def ffn_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """LLaMA's SwiGLU width rule: ``2/3·4·dim``, times an optional multiplier, rounded up."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ChameleonConfig(Config):
    """Architecture of one Chameleon decoder. Presets: ``tiny``, ``small``, ``7b``, ``30b``."""

    dim: int = 4096
    """Hidden size (``hidden_size`` in Hugging Face configs)."""
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; ``None`` means as many as ``n_heads`` (MHA)."""
    ffn_dim: int = 11008
    """SwiGLU hidden width (``intermediate_size``)."""
    vocab_size: int = 65536
    norm_eps: float = 1e-5
    """RMSNorm epsilon. The QK LayerNorm always uses 1e-5, as in the official code."""
    qk_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    """Longest sequence the model is used with (the KV cache default size); RoPE itself has no limit."""
    swin_norm: bool = False
    """Block order: ``False`` = pre-norm (7B); ``True`` = norm re-ordering of 34B (norm after each sub-layer)."""
    dropout: float = 0.0
    """Residual dropout after attention and after the FFN (training only; the paper's 7B used 0.1)."""
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.kv_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("dim", "n_layers", "ffn_dim", "vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    def num_params(self) -> int:
        """Exact parameter count, from the shapes alone (embedding and output head counted separately)."""
        hd, kvd = self.head_dim, self.kv_heads * self.head_dim
        attn = self.dim * self.dim * 2 + self.dim * kvd * 2  # wq, wo, wk, wv
        qk_norm = 2 * (self.n_heads + self.kv_heads) * hd  # LayerNorm weight + bias per head
        ffn = 3 * self.dim * self.ffn_dim
        layer = attn + qk_norm + ffn + 2 * self.dim
        return self.n_layers * layer + 2 * self.vocab_size * self.dim + self.dim

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6·N for the matmuls plus the attention scores."""
        n_matmul = self.num_params() - self.vocab_size * self.dim  # the embedding lookup is no matmul
        return 6 * n_matmul + 12 * self.n_layers * self.dim * seq_len


@ChameleonConfig.register_preset("tiny")
def _tiny() -> ChameleonConfig:
    return ChameleonConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=512, max_seq_len=256
    )


@ChameleonConfig.register_preset("small")
def _small() -> ChameleonConfig:
    return ChameleonConfig(dim=512, n_layers=8, n_heads=8, ffn_dim=1408, vocab_size=65536)


@ChameleonConfig.register_preset("7b")
def _7b() -> ChameleonConfig:
    return ChameleonConfig(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=None, ffn_dim=ffn_hidden_dim(4096),
        swin_norm=False,
    )


@ChameleonConfig.register_preset("30b")
def _30b() -> ChameleonConfig:
    # The paper's "34B"; released as "30b". GQA with 8 KV heads and norm re-ordering.
    return ChameleonConfig(
        dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, ffn_dim=ffn_hidden_dim(8192),
        swin_norm=True,
    )
