"""Generation: Meta's text and image decoders over one KV cache, batched, guided and streaming."""

from chameleon_lm.generation.engine import (
    Done, Event, ImageComplete, ImageProgress, TextDelta, generate_images, generate_text, stream,
)
from chameleon_lm.generation.sampling import MODES, GenerationConfig, ImageSampling, TextSampling

__all__ = [
    "MODES", "Done", "Event", "GenerationConfig", "ImageComplete", "ImageProgress", "ImageSampling",
    "TextDelta", "TextSampling", "generate_images", "generate_text", "stream",
]
