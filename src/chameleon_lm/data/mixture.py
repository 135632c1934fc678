"""Mixtures of token datasets in stages, and the deterministic stream of documents drawn from one.

The paper pretrains on text, image-text pairs and interleaved documents, and in a second stage (the
last 20 % of steps) halves the weight of the first stage's data and mixes in higher-quality sources;
images with faces are up-weighted 2x. Here that is::

    sources = [MixtureSource("text", "tok/text"), MixtureSource("pairs", "tok/pairs",
               upweight=[Upweight("faces")]), MixtureSource("sft", "tok/sft", weight=0.0)]
    stages = [Stage(start_step=8000, scale_previous=0.5, weights={"sft": 1.0})]

Each draw picks a source with probability proportional to the weights of the stage active at its step,
from a uniform that is a pure function of (seed, draw index). Within a source, documents come in epochs:
seeded permutations of the source's documents, each up-weighted one repeated ``factor`` times, so every
document is seen a known number of times per epoch. The state is the number of draws and how many came
from each source, so a resumed stream continues exactly.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chameleon_lm.data.shards import TokenDataset
from chameleon_lm.documents import EncodedDocument
from chameleon_lm.utils.config import Config

_BLOCK = 4096  # uniforms generated at a time
_CHOICE, _ORDER = 0, 1  # keep the source-choice and document-order random streams apart


def _check_weight(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0:
        raise ValueError(f"{where} must be a finite number >= 0, got {value!r}")


@dataclass
class Upweight(Config):
    """A rule that repeats the documents whose metadata match it (the paper: images with faces, 2x)."""

    field: str
    """A metadata field of the document (``docs.jsonl`` "meta", from the sample's json or columns)."""
    equals: Any = True
    """The rule holds where ``meta[field] == equals`` (True does not match 1)."""
    factor: int = 2
    """Copies of such a document per epoch of its source. An integer, so that an epoch stays a finite
    list in which every document appears a whole, known number of times. Rules that all hold multiply."""

    def __post_init__(self) -> None:
        if not isinstance(self.field, str) or not self.field:
            raise ValueError(f"Upweight.field must be a non-empty string, got {self.field!r}")
        if isinstance(self.factor, bool) or not isinstance(self.factor, int) or self.factor < 1:
            raise ValueError(f"Upweight.factor must be an integer >= 1, got {self.factor!r}")

    def holds(self, value: Any) -> bool:
        """Whether a document whose ``meta[field]`` is ``value`` matches."""
        return value == self.equals and isinstance(value, bool) == isinstance(self.equals, bool)


@dataclass
class MixtureSource(Config):
    """One token dataset of a mixture."""

    name: str
    """Unique name, used by stages and in the loader's state."""
    path: str
    """Token dataset folder (``chameleon data tokenize``)."""
    weight: float = 1.0
    """Weight in the first stage (0: the source is used only from a later stage on)."""
    upweight: list[Upweight] = field(default_factory=list)
    """Rules that repeat some documents within each epoch of this source."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"MixtureSource.name must be a non-empty string, got {self.name!r}")
        _check_weight(self.weight, f"source {self.name!r}: weight")
        if any(not isinstance(u, Upweight) for u in self.upweight):
            raise ValueError(f"source {self.name!r}: upweight must hold Upweight rules")


@dataclass
class Stage(Config):
    """A change of the mixture's weights from ``start_step`` on."""

    start_step: int
    """First step of the stage."""
    scale_previous: float = 1.0
    """Every weight of the stage before is multiplied by this (0.5: the paper's second stage)."""
    weights: dict[str, float] = field(default_factory=dict)
    """Weights of sources set or added at this stage (after the scaling)."""

    def __post_init__(self) -> None:
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, int) or self.start_step < 1:
            raise ValueError(f"Stage.start_step must be an integer >= 1, got {self.start_step!r}")
        _check_weight(self.scale_previous, f"stage at step {self.start_step}: scale_previous")
        for name, w in self.weights.items():
            _check_weight(w, f"stage at step {self.start_step}: weight of {name!r}")


@dataclass
class MixtureConfig(Config):
    """Token datasets and their weights, in stages."""

    sources: list[MixtureSource]
    """The datasets; their ``weight`` is the first stage."""
    stages: list[Stage] = field(default_factory=list)
    """Later stages, by increasing ``start_step``."""

    def __post_init__(self) -> None:
        if not self.sources or any(not isinstance(s, MixtureSource) for s in self.sources):
            raise ValueError("MixtureConfig.sources must be a non-empty list of MixtureSource")
        names = [s.name for s in self.sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"MixtureConfig: duplicate source name(s) {duplicates}")
        if any(not isinstance(s, Stage) for s in self.stages):
            raise ValueError("MixtureConfig.stages must be a list of Stage")
        starts = [s.start_step for s in self.stages]
        if any(a >= b for a, b in zip(starts, starts[1:])):
            raise ValueError(f"MixtureConfig: stages must be sorted by strictly increasing start_step, "
                             f"got {starts}")
        for stage in self.stages:
            unknown = sorted(set(stage.weights) - set(names))
            if unknown:
                raise ValueError(f"stage at step {stage.start_step}: unknown source(s) {unknown}; "
                                 f"the sources are {names}")
        for i, step in enumerate([0, *starts]):
            if not any(w > 0 for w in self.weights_at(step).values()):
                where = "the sources' weights" if i == 0 else f"the stage at step {step}"
                raise ValueError(f"MixtureConfig: every weight is 0 from step {step} ({where})")

    def weights_at(self, step: int) -> dict[str, float]:
        """Each source's weight at ``step`` (not normalised), in source order."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        weights = {s.name: float(s.weight) for s in self.sources}
        for stage in self.stages:
            if stage.start_step > step:
                break
            weights = {k: w * stage.scale_previous for k, w in weights.items()}
            weights.update({k: float(w) for k, w in stage.weights.items()})
        return weights


def _open_source(source: MixtureSource) -> tuple[TokenDataset, np.ndarray]:
    """The source's dataset and its epoch before shuffling: document indices, up-weighted ones repeated."""
    try:
        ds = TokenDataset(source.path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"mixture source {source.name!r}: {e}") from e
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"mixture source {source.name!r} ({source.path}): unreadable token dataset "
                         f"({e!r})") from e
    if len(ds) == 0:
        raise ValueError(f"mixture source {source.name!r} ({source.path}): the dataset has no documents")
    # The packer skips documents under 2 tokens (they hold no training pair): a source of only those
    # would never yield a pair.
    if int(ds.lengths.max()) < 2:
        raise ValueError(f"mixture source {source.name!r} ({source.path}): no document has 2 or more "
                         "tokens")
    copies = np.ones(len(ds), dtype=np.int64)
    for rule in source.upweight:
        values = ds.meta_values(rule.field)
        if all(v is None for v in values):
            raise ValueError(f"mixture source {source.name!r} ({source.path}): no document has the "
                             f"metadata field {rule.field!r} that an Upweight rule tests")
        copies *= np.where([rule.holds(v) for v in values], rule.factor, 1)
    return ds, np.repeat(np.arange(len(ds), dtype=np.int64), copies)


class DocumentStream:
    """Deterministic endless stream of documents drawn from the mixture.

    Args:
        config: The mixture.
        seed: Seed of the source choices and of every source's epoch permutations (an integer >= 0).
    """

    def __init__(self, config: MixtureConfig, seed: int):
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.config, self.seed = config, seed
        self.names = [s.name for s in config.sources]
        opened = [_open_source(s) for s in config.sources]
        self.datasets = [ds for ds, _ in opened]
        self._epoch_lists = [epoch for _, epoch in opened]
        vocab = {s.name: ds.vocab_size for s, ds in zip(config.sources, self.datasets)}
        if len(set(vocab.values())) > 1:
            raise ValueError(f"mixture sources have different vocabularies (vocab_size by source: "
                             f"{vocab}); tokenize them with the same tokenizers")
        self.vocab_size = self.datasets[0].vocab_size
        self._starts = [s.start_step for s in config.stages]
        self._cumulative: dict[int, tuple[np.ndarray, int]] = {}  # stage -> (cumsum, last used)
        self._block: tuple[int, np.ndarray] | None = None  # (block index, its uniforms)
        self._orders: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, its permutation)
        self.draws = 0
        self.counts = [0] * len(self.datasets)

    @property
    def epoch_sizes(self) -> list[int]:
        """Documents per epoch of each source (up-weighted ones counted as often as they repeat)."""
        return [len(e) for e in self._epoch_lists]

    def _uniform(self, draw: int) -> float:
        block, i = divmod(draw, _BLOCK)
        if self._block is None or self._block[0] != block:
            self._block = block, np.random.default_rng([self.seed, _CHOICE, block]).random(_BLOCK)
        return float(self._block[1][i])

    def _source_at(self, step: int, u: float) -> int:
        stage = bisect.bisect_right(self._starts, step)
        if stage not in self._cumulative:
            weights = np.array(list(self.config.weights_at(step).values()))
            self._cumulative[stage] = np.cumsum(weights), int(np.flatnonzero(weights > 0)[-1])
        cum, last = self._cumulative[stage]
        # Rounding of u * total can land on the total itself: that draw belongs to the last source in use.
        return min(int(np.searchsorted(cum, u * cum[-1], side="right")), last)

    def _document(self, source: int, c: int) -> int:
        """Element ``c`` of the source's endless sequence of epochs."""
        epoch, i = divmod(c, len(self._epoch_lists[source]))
        if self._orders.get(source, (None,))[0] != epoch:
            rng = np.random.default_rng([self.seed, _ORDER, source, epoch])
            self._orders[source] = epoch, rng.permutation(self._epoch_lists[source])
        return int(self._orders[source][1][i])

    def next(self, step: int) -> tuple[list[int], EncodedDocument]:
        """The next document, drawn with the weights of ``step``, and its ref ``[source, document]``."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        source = self._source_at(step, self._uniform(self.draws))
        ref = [source, self._document(source, self.counts[source])]
        doc = self.fetch(ref)
        self.draws += 1
        self.counts[source] += 1
        return ref, doc

    def fetch(self, ref: Any) -> EncodedDocument:
        """The document of a ref that :meth:`next` returned."""
        if not (isinstance(ref, (list, tuple)) and len(ref) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in ref)):
            raise ValueError(f"not a mixture document ref (expected [source, document]): {ref!r}")
        s, i = ref
        if not 0 <= s < len(self.datasets):
            raise ValueError(f"document ref {ref!r}: no source {s} (the mixture has {len(self.datasets)})")
        if not 0 <= i < len(self.datasets[s]):
            raise ValueError(f"document ref {ref!r}: source {self.names[s]!r} has "
                             f"{len(self.datasets[s])} documents")
        return self.datasets[s][i]

    def state_dict(self) -> dict:
        """JSON-able position of the stream, with what it must be resumed with."""
        return {"seed": self.seed, "sources": list(self.names), "epoch_sizes": self.epoch_sizes,
                "draws": self.draws, "counts": list(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``; refused (nothing changed) if it belongs to another stream."""
        keys = {"seed", "sources", "epoch_sizes", "draws", "counts"}
        if not isinstance(state, dict) or set(state) != keys:
            raise ValueError(f"not a DocumentStream state (expected the keys {sorted(keys)}): {state!r}")
        if state["seed"] != self.seed:
            raise ValueError(f"the stream state was saved with seed {state['seed']!r}, this stream has "
                             f"{self.seed}")
        if state["sources"] != self.names:
            raise ValueError(f"the stream state was saved for the sources {state['sources']!r}, this "
                             f"mixture has {self.names}")
        if state["epoch_sizes"] != self.epoch_sizes:
            raise ValueError(f"the stream state was saved with epochs of {state['epoch_sizes']!r} "
                             f"documents per source, these datasets give {self.epoch_sizes}: the data "
                             "or its up-weighting changed since")
        counts, draws = state["counts"], state["draws"]
        if not (isinstance(counts, list) and len(counts) == len(self.names)
                and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)):
            raise ValueError(f"stream state: counts must be {len(self.names)} integers >= 0, got {counts!r}")
        if isinstance(draws, bool) or not isinstance(draws, int) or draws != sum(counts):
            raise ValueError(f"stream state: draws ({draws!r}) must be the sum of counts ({sum(counts)})")
        self.draws, self.counts = draws, list(counts)
