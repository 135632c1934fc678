"""The transformer stage: config presets and the single-device Chameleon decoder."""

from chameleon_lm.model.config import ChameleonConfig
from chameleon_lm.model.transformer import Chameleon, KVCache

__all__ = ["Chameleon", "ChameleonConfig", "KVCache"]
