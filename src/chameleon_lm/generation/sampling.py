"""Sampling settings and the logit processors of Meta's decoders, as pure functions.

The processors follow Hugging Face's semantics (the ones Meta's decoder calls) and work on fp32 logits
``[B, V]`` of the last position, returning new tensors. Order in the official text decoder: allow-list →
repetition penalty → temperature → top-p; top-k (not in Meta's decoder) runs before top-p, as in
Hugging Face. Image decoding: classifier-free guidance on the raw logits → image ids only →
temperature → top-k → top-p.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from chameleon_lm.utils.config import Config

MODES = ("text", "image", "interleaved")
"""``text``: text until ``</s>``; ``image``: one image; ``interleaved``: text with image blocks."""


def _check_warpers(owner: str, temperature: float, top_p: float, top_k: int) -> None:
    if not temperature > 0:
        raise ValueError(f"{owner}.temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"{owner}.top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"{owner}.top_k must be >= 0 (0 = off), got {top_k}")


@dataclass
class TextSampling(Config):
    """How text tokens are chosen (Meta's ``Options.Text`` defaults)."""

    temperature: float = 0.7
    top_p: float = 0.9
    """Nucleus sampling; 1.0 = off."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 = off (Meta's decoder has no top-k)."""
    repetition_penalty: float = 1.2
    """Over the whole sequence, prompt included; 1.0 = off."""
    greedy: bool = False
    """Argmax after the allow-list and the repetition penalty (temperature, top-k, top-p skipped)."""

    def __post_init__(self) -> None:
        _check_warpers("text", self.temperature, self.top_p, self.top_k)
        if not self.repetition_penalty > 0:
            raise ValueError(f"text.repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass
class ImageSampling(Config):
    """How image codes are chosen (Meta's ``Options.Image`` defaults)."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    cfg_text: float = 3.0
    """Guidance scale of the full prompt over the image-only prompt."""
    cfg_image: float = 1.2
    """Guidance scale of the image-only prompt over the unconditioned row."""
    greedy: bool = False

    def __post_init__(self) -> None:
        _check_warpers("image", self.temperature, self.top_p, self.top_k)


@dataclass
class GenerationConfig(Config):
    """Everything a generation run needs besides the model and the prompt. Presets: ``meta``, ``anole``."""

    mode: str = "text"
    """One of :data:`MODES` (used by ``stream`` and the CLI; the batch functions are single-modality)."""
    text: TextSampling = field(default_factory=TextSampling)
    image: ImageSampling = field(default_factory=ImageSampling)
    max_new_tokens: int = 4096
    """Limit on generated tokens (text and interleaved modes; an image-mode run is always one block)."""
    min_new_tokens: int = 0
    """``</s>`` is not allowed before this many new tokens (fixed-length runs, e.g. benchmarks)."""
    max_seq_len: int | None = None
    """Limit on prompt + generated tokens; None = the model's ``max_seq_len``."""
    seed: int | None = None
    """Seed of the sampling generator; None = nondeterministic."""
    progress_every: int = 32
    """``stream`` reports image progress every this many codes (and at the last one)."""
    cpu_packed_weights: bool = True
    """On CPU (fp32, or bf16 with bf16 instructions), run the linear layers on oneDNN-prepacked weights
    (``generation/packed.py``; speed-ups in bench/RESULTS.md), for one extra copy of the weights in
    memory (skipped when that would not fit in half the free memory)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.progress_every < 1:
            raise ValueError(f"progress_every must be >= 1, got {self.progress_every}")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "text": self.text.to_dict(), "image": self.image.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationConfig:
        d = dict(d)
        nested: dict[str, Config] = {}
        for key, sub in (("text", TextSampling), ("image", ImageSampling)):
            if key in d:
                if not isinstance(d[key], dict):
                    raise ValueError(f"GenerationConfig.{key}: expected a mapping, got {d[key]!r}")
                nested[key] = sub.from_dict(d.pop(key))
        return super().from_dict(d).replace(**nested)


@GenerationConfig.register_preset("meta")
def _meta() -> GenerationConfig:
    return GenerationConfig()


@GenerationConfig.register_preset("anole")
def _anole() -> GenerationConfig:
    """Anole's interleaved settings: Meta's, with text temperature 1.0."""
    return GenerationConfig(mode="interleaved", text=TextSampling(temperature=1.0))


# ---------------------------------------------------------------------------------------- processors


def allow_only(logits_BV: torch.Tensor, allowed_V: torch.Tensor) -> torch.Tensor:
    """−inf everywhere ``allowed_V`` (bool ``[V]``) is False (finite logits assumed).

    Adds a 0/−inf row rather than ``masked_fill``, whose broadcast CPU kernel is ~15× slower here.
    """
    bias_V = torch.zeros((), dtype=logits_BV.dtype, device=logits_BV.device).where(allowed_V, float("-inf"))
    return logits_BV + bias_V


def repetition_penalty(logits_BV: torch.Tensor, ids_BS: torch.Tensor, penalty: float) -> torch.Tensor:
    """Each token of ``ids_BS`` (seen so far): score < 0 → score·penalty, else score/penalty."""
    return penalize(logits_BV, ids_BS, penalty)


def penalize(logits_BV: torch.Tensor, seen: torch.Tensor | list[list[int]], penalty: float,
             inplace: bool = False) -> torch.Tensor:
    """The repetition penalty on the columns ``seen`` (``[B, S]`` ids, or a list of them per row; a row
    may repeat ids). Touches only those columns: sequences are much shorter than the vocabulary.
    ``inplace``: written into ``logits_BV`` (no copy of the whole batch)."""
    if penalty == 1.0:
        return logits_BV
    keep = None
    if isinstance(seen, list):
        width = max(map(len, seen), default=0)
        if width == 0:
            return logits_BV
        keep = torch.tensor([not row for row in seen], device=logits_BV.device)[:, None]  # empty rows
        seen = torch.tensor([row + row[:1] * (width - len(row)) if row else [0] * width for row in seen],
                            dtype=torch.long, device=logits_BV.device)
    score = logits_BV.gather(1, seen)
    new = torch.where(score < 0, score * penalty, score / penalty)
    new = new if keep is None else torch.where(keep, score, new)
    return logits_BV.scatter_(1, seen, new) if inplace else logits_BV.scatter(1, seen, new)


def forbid(logits_BV: torch.Tensor, columns: list[list[int]], inplace: bool = False) -> torch.Tensor:
    """−inf at the given columns of each row (a few per row: cheaper than a ``[B, V]`` mask)."""
    rows = [r for r, cols in enumerate(columns) for _ in cols]
    if not rows:
        return logits_BV
    cols = [c for cols in columns for c in cols]
    out = logits_BV if inplace else logits_BV.clone()
    out[rows, cols] = float("-inf")
    return out


def temperature(logits_BV: torch.Tensor, t: float) -> torch.Tensor:
    # a temperature below 1e-30 is argmax in effect, and dividing by it would overflow to inf
    return logits_BV / max(t, 1e-30)


def top_k(logits_BV: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` highest scores (and ties with the k-th); 0 = off."""
    if k <= 0:
        return logits_BV
    kth = torch.topk(logits_BV, min(k, logits_BV.shape[-1])).values[:, -1:]  # [B, 1]
    return logits_BV.masked_fill(logits_BV < kth, float("-inf"))


def top_p(logits_BV: torch.Tensor, p: float) -> torch.Tensor:
    """Drop the least likely tokens whose cumulative probability is ≤ 1 − p (at least one is kept).

    Hugging Face's rule on the same ascending cumulative sums, applied as a threshold on the values (no
    argsort): tokens tied with the last one kept are all kept, where an unstable sort keeps some of them.
    """
    if p >= 1.0:
        return logits_BV
    sorted_BV = _sorted(logits_BV)
    n_removed = (sorted_BV.softmax(-1).cumsum(-1) <= 1 - p).sum(-1, keepdim=True)  # a prefix
    threshold = sorted_BV.gather(1, n_removed.clamp(max=logits_BV.shape[-1] - 1))  # lowest kept [B, 1]
    return logits_BV.where(logits_BV >= threshold, float("-inf"))


def _sorted(x_BV: torch.Tensor) -> torch.Tensor:
    """Each row in ascending order (values only). On CPU numpy's SIMD sort is 7–17× ``torch.sort`` on a
    65,536-word row, which also computes the permutation."""
    if x_BV.device.type == "cpu" and x_BV.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.sort(x_BV.detach().numpy(), axis=-1))
    return torch.sort(x_BV, dim=-1).values


def warp(logits_BV: torch.Tensor, t: float, k: int, p: float) -> torch.Tensor:
    """Temperature → top-k → top-p."""
    return top_p(top_k(temperature(logits_BV, t), k), p)


def cfg_mix(
    full_BV: torch.Tensor, image_BV: torch.Tensor, uncond_BV: torch.Tensor, cfg_text: float,
    cfg_image: float,
) -> torch.Tensor:
    """Three-way (InstructPix2Pix) guidance: ``u + g_img·(i − u) + g_txt·(f − i)`` on raw logits."""
    return uncond_BV + cfg_image * (image_BV - uncond_BV) + cfg_text * (full_BV - image_BV)


def text_scores(
    logits_BV: torch.Tensor, seen: torch.Tensor | list[list[int]],
    allowed: torch.Tensor | list[list[int]], cfg: TextSampling, inplace: bool = False,
) -> torch.Tensor:
    """The official text chain on raw logits; the scores to sample from (or take the argmax of).

    ``allowed`` is a bool ``[V]`` mask, or per row the few columns that are not allowed; ``seen`` the ids
    so far (``[B, S]``, or a list per row) for the repetition penalty. ``inplace``: the forbidden
    columns and the penalty may be written into ``logits_BV`` (a caller's scratch tensor: no copy of
    the whole batch).
    """
    if isinstance(allowed, torch.Tensor):
        logits_BV, inplace = allow_only(logits_BV, allowed), True  # a new tensor: ours to write
    else:
        logits_BV = forbid(logits_BV, allowed, inplace)
    scores = penalize(logits_BV, seen, cfg.repetition_penalty, inplace)
    return scores if cfg.greedy else warp(scores, cfg.temperature, cfg.top_k, cfg.top_p)


def sample(scores_BV: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None,
           greedy: bool) -> torch.Tensor:
    """One index per row ``[B]``: the argmax, or a draw from ``softmax(scores)``.

    ``generator`` may be one generator per row (each row then draws only from its own).

    Draws by inverting the cumulative distribution with one uniform number per row: exact, and on CPU
    ~10× faster than ``torch.multinomial``, which draws an exponential variate for every word.
    """
    if greedy:
        return argmax(scores_BV)
    cdf_BV = scores_BV.softmax(-1).cumsum(-1)
    total_B1 = cdf_BV[:, -1:]
    if isinstance(generator, list):
        u_B1 = torch.cat([torch.rand(1, 1, generator=g, device=cdf_BV.device, dtype=cdf_BV.dtype)
                          for g in generator])
    else:
        u_B1 = torch.rand(cdf_BV.shape[0], 1, generator=generator, device=cdf_BV.device,
                          dtype=cdf_BV.dtype)
    # u·total can round up to the total; below it, the first cdf > target is always a possible word
    target_B1 = torch.minimum(u_B1 * total_B1, torch.nextafter(total_B1, torch.zeros_like(total_B1)))
    drawn = torch.searchsorted(cdf_BV, target_B1, right=True).squeeze(-1)
    # Scores of +inf (a temperature so small that logits/t overflows) make the softmax NaN: the limit
    # of sampling as t -> 0 is the argmax.
    finite = total_B1[:, 0].isfinite()
    return drawn if bool(finite.all()) else torch.where(finite, drawn, argmax(scores_BV))


def argmax(scores_BV: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``scores.argmax(-1)`` exactly (the first maximum; NaN counts as the largest). On CPU through
    the maxima of chunks of the row: torch's CPU argmax runs ~4× slower than a max-reduction."""
    B, V = scores_BV.shape
    if scores_BV.device.type != "cpu" or V < 4 * chunk:
        return scores_BV.argmax(-1)
    whole = V - V % chunk  # the last, shorter chunk (if any) gets a maximum of its own
    maxima = scores_BV[:, :whole].reshape(B, whole // chunk, chunk).amax(-1)
    if whole < V:
        maxima = torch.cat([maxima, scores_BV[:, whole:].amax(-1, keepdim=True)], 1)
    first = maxima.argmax(-1, keepdim=True)  # [B, 1] the first chunk holding a maximum
    # The window of that chunk; past the row's end it repeats the last column, which can only tie
    # with an earlier one: the first maximum stays the first.
    cols = (first * chunk + torch.arange(chunk, device=first.device)).clamp_(max=V - 1)  # [B, chunk]
    return cols.gather(1, scores_BV.gather(1, cols).argmax(-1, keepdim=True))[:, 0]
