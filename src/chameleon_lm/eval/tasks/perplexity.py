"""``chameleon eval perplexity``: per-token cross-entropy and perplexity on held-out token datasets.

Every target the document's loss mask includes is scored once, as training's validation counts them,
and split by modality: a target is an *image* target iff its id is an image code
(``vocab.image_start <= id < vocab.image_end``), every other target is *text* (structural tokens such
as ``</s>``, ``<racm3:break>`` and ``<eoss>`` included, as in the training loss).

The per-token CE comes from the model's own fused head loss (``Chameleon.forward(..., targets=...)``,
i.e. :func:`chameleon_lm.model.head.head_loss`), summed by modality with the trainer's own
:func:`chameleon_lm.model.head.modality_sums`.

Each document is a sequence of its own (nothing is packed across documents). A document longer than the
model's ``max_seq_len`` is scored in sliding windows of ``max_seq_len`` inputs, positions restarting at
0 in each (the model never saw positions beyond it): the first window scores its targets, each later
window moves on by ``stride`` targets and scores only the new ones, so every target is scored exactly
once, with at least ``max_seq_len - stride`` tokens of context once past the first window.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from chameleon_lm.checkpoints.convert import DTYPES
from chameleon_lm.data.packing import IGNORE_INDEX
from chameleon_lm.data.shards import TokenDataset
from chameleon_lm.documents import EncodedDocument
from chameleon_lm.eval.metrics import write_json
from chameleon_lm.model.head import modality_sums
from chameleon_lm.tokenizers.vocab import IMAGE, Vocab


@dataclass
class _Window:
    """Inputs ``ids[start:end]`` of one document, scoring targets ``ids[score_from + 1 : end + 1]``."""

    doc: int
    start: int
    end: int
    score_from: int

    def __len__(self) -> int:
        return self.end - self.start


def windows(num_pairs: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, end, score_from)`` of the windows over a document of ``num_pairs`` (input, target)
    pairs: at most ``max_len`` inputs each, every pair scored by exactly one window."""
    if max_len < 1 or not 1 <= stride <= max_len:
        raise ValueError(f"need 1 <= stride <= max_len, got stride {stride}, max_len {max_len}")
    if num_pairs <= 0:
        return []
    end = min(num_pairs, max_len)
    out = [(0, end, 0)]
    while end < num_pairs:
        scored, end = end, min(end + stride, num_pairs)
        out.append((end - max_len, end, scored))
    return out


def _rows(doc: EncodedDocument, w: _Window, image_range: tuple[int, int] | None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, targets (``IGNORE_INDEX`` where not scored) and image-target flags of a window."""
    ids = doc.ids[w.start : w.end + 1].long()
    target = ids[1:]
    scored = doc.loss_mask[w.start + 1 : w.end + 1].bool().clone()
    scored[: w.score_from - w.start] = False  # scored by an earlier window
    if image_range is None:
        image = doc.modality[w.start + 1 : w.end + 1] == IMAGE
    else:
        image = (target >= image_range[0]) & (target < image_range[1])
    return ids[:-1], torch.where(scored, target, IGNORE_INDEX), image


def _batches(rows: list[_Window], batch_tokens: int) -> list[list[_Window]]:
    """Windows longest first, as many a batch as fit ``batch_tokens`` padded slots (at least one)."""
    order = sorted(rows, key=lambda w: (-len(w), w.doc, w.start))
    out: list[list[_Window]] = []
    for w in order:
        if out and (len(out[-1]) + 1) * len(out[-1][0]) <= batch_tokens:
            out[-1].append(w)
        else:
            out.append([w])
    return out


def _groups(dataset: TokenDataset, n_docs: int, tokens: int):
    """The first ``n_docs`` documents as ``{index: document}`` groups of about ``tokens`` tokens (so a
    large dataset is never all in memory; windows are sorted by length within a group)."""
    group: dict[int, EncodedDocument] = {}
    size = 0
    for i in range(n_docs):
        group[i] = dataset[i]
        size += len(group[i])
        if size >= tokens:
            yield group
            group, size = {}, 0
    if group:
        yield group


def _score(model: nn.Module, rows: list[tuple[torch.Tensor, ...]], pad_id: int, chunk_size: int,
           device: torch.device) -> torch.Tensor:
    """``[ce, n, ce_text, n_text, ce_image, n_image]`` (float64) of one batch of window rows."""
    inputs, targets, images = zip(*rows)
    ids, tgt, img = (pad_sequence(list(parts), batch_first=True, padding_value=fill).to(device)
                     for parts, fill in ((inputs, pad_id), (targets, IGNORE_INDEX), (images, False)))
    # right padding under plain causal attention: pad slots never reach a real token
    loss, ce, z, norm = model(ids, targets=tgt, chunk_size=chunk_size, ignore_index=IGNORE_INDEX)
    # float64 per-token CE: the three sums then add up exactly
    s = modality_sums((loss, ce.double(), z, norm), tgt, img, IGNORE_INDEX)
    sums = [s.ce, s.n, s.ce_text, s.n_text, s.ce_image, s.n_image]
    return torch.stack([x.double() for x in sums]).cpu()


def _ppl(ce: float) -> float:
    if math.isnan(ce):
        return math.nan
    try:
        return math.exp(ce)
    except OverflowError:
        return math.inf


def _summary(ce_sum: float, n: int) -> dict[str, float | int]:
    ce = ce_sum / n if n else math.nan
    return {"tokens": n, "ce": ce, "ppl": _ppl(ce)}


@torch.no_grad()
def perplexity(
    model: nn.Module,
    dataset: TokenDataset,
    batch_tokens: int = 16384,
    limit: int | None = None,
    *,
    vocab: Vocab | None = None,
    stride: int | None = None,
    pad_id: int | None = None,
    chunk_size: int = 2048,
) -> dict[str, Any]:
    """CE and perplexity over all, text and image targets of ``dataset`` (its first ``limit`` documents).

    Args:
        model: a ``Chameleon`` (its ``max_seq_len`` bounds a window); run in eval mode, no sampling.
        dataset: the held-out token dataset.
        batch_tokens: padded input slots per forward pass (a window longer than that goes alone).
        limit: at most this many documents (default all).
        vocab: the tokenizer's vocabulary: its image-id range tells image targets from text ones and
            its ``<pad>`` fills pad slots. Without it, the modality recorded in the shards is used
            (the same for documents made by ``DocumentCodec``).
        stride: targets a window moves on by in a long document (default ``max_seq_len // 2``).
        pad_id: input id of pad slots (default the vocabulary's ``<pad>``, else 0); never scored.
        chunk_size: tokens per application of the output head.

    Returns:
        ``{"documents", "windows", "windowed_documents", "all", "text", "image"}``, the last three
        ``{"tokens", "ce", "ppl"}`` with ``ce`` in nats per token and ``ppl = exp(ce)`` (NaN where
        there is no such target).
    """
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    max_len = model.config.max_seq_len
    stride = stride or max(max_len // 2, 1)
    if dataset.vocab_size > model.config.vocab_size:
        raise ValueError(f"{dataset.path}: ids from a vocabulary of {dataset.vocab_size}, the model has "
                         f"only {model.config.vocab_size} logits")
    if pad_id is None:
        pad_id = vocab.pad_id if vocab is not None else 0
    image_range = (vocab.image_start, vocab.image_end) if vocab is not None else None
    n_docs = len(dataset) if limit is None else min(limit, len(dataset))
    device = next(model.parameters()).device
    # [ce, n, ce_text, n_text, ce_image, n_image], summed in float64 as the trainer's validation does
    totals = torch.zeros(6, dtype=torch.float64)
    n_windows = windowed = 0
    was_training = model.training
    model.eval()
    try:
        for docs in _groups(dataset, n_docs, 64 * batch_tokens):
            rows = [_Window(i, s, e, f) for i, d in docs.items()
                    for s, e, f in windows(len(d) - 1, max_len, stride)]
            n_windows += len(rows)
            windowed += sum(len(d) - 1 > max_len for d in docs.values())
            for batch in _batches(rows, batch_tokens):
                totals += _score(model, [_rows(docs[w.doc], w, image_range) for w in batch], pad_id,
                                 chunk_size, device)
    finally:
        model.train(was_training)
    ce_all, n, ce_text, n_text, ce_image, n_image = totals.tolist()
    return {
        "documents": n_docs, "windows": n_windows, "windowed_documents": windowed,
        "all": _summary(ce_all, int(n)), "text": _summary(ce_text, int(n_text)),
        "image": _summary(ce_image, int(n_image)),
    }


def parse_data(specs: list[str]) -> dict[str, str]:
    """``name=DIR`` (or ``DIR``, named after its folder) → ``{name: DIR}``; names must differ."""
    out: dict[str, str] = {}
    for spec in specs:
        name, path = spec.split("=", 1) if "=" in spec else (Path(spec).name, spec)
        if not name or not path:
            raise ValueError(f"--data {spec!r}: expected name=TOKENS_DIR")
        if name in out:
            raise ValueError(f"--data: the name {name!r} is given twice")
        out[name] = path
    return out


def run_perplexity(
    model_dir: str | os.PathLike,
    shards: dict[str, str | os.PathLike],
    out: str | os.PathLike | None = None,
    limit: int | None = None,
    *,
    batch_tokens: int = 16384,
    stride: int | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, dict[str, Any]]:
    """Load the model and score every token dataset of ``shards`` (name → folder); with ``out``, write
    ``out/metrics.json`` (NaN written as null)."""
    from chameleon_lm.checkpoints import load_model

    if not shards:
        raise ValueError("no token datasets to evaluate")
    datasets = {name: TokenDataset(path) for name, path in shards.items()}  # fail before loading
    loaded = load_model(model_dir, dtype=dtype, device=device)
    vocab = loaded.text_tokenizer.vocab
    results: dict[str, dict[str, Any]] = {}
    for name, ds in datasets.items():
        if ds.vocab_size != vocab.size:
            raise ValueError(f"{ds.path}: tokenized with a vocabulary of {ds.vocab_size} ids, the "
                             f"model's tokenizer has {vocab.size}")
        m = perplexity(loaded.model, ds, batch_tokens, limit, vocab=vocab, stride=stride)
        results[name] = {"data": str(ds.path), **m}
        parts = [f"{k} ce {m[k]['ce']:.4f} ppl {m[k]['ppl']:.2f} ({m[k]['tokens']} tokens)"
                 for k in ("all", "text", "image") if m[k]["tokens"]]
        print(f"{name}: {'; '.join(parts) or 'no targets'} over {m['documents']} documents")
    if out is not None:
        print(f"wrote {write_json(Path(out) / 'metrics.json', results)}")
    return results


def _cmd(args: argparse.Namespace) -> int:
    run_perplexity(args.model, parse_data(args.data), args.out, args.limit,
                   batch_tokens=args.batch_tokens, stride=args.stride, device=args.device,
                   dtype=DTYPES[args.dtype] if args.dtype else None)
    return 0


def add_cli(ev: argparse._SubParsersAction) -> None:
    """Register ``chameleon eval perplexity`` on the ``chameleon eval`` subcommands."""
    p = ev.add_parser("perplexity", help="per-modality perplexity on held-out token datasets",
                      description="Cross-entropy and perplexity of every loss target of tokenized "
                                  "held-out data (`chameleon data tokenize`), over all, text and image "
                                  "targets. Long documents are scored in sliding windows.")
    p.add_argument("--model", required=True, help="model folder (any layout load_model reads)")
    p.add_argument("--data", nargs="+", required=True, metavar="NAME=TOKENS_DIR",
                   help="token datasets, optionally named: held_out=DIR")
    p.add_argument("--limit", type=int, default=None, help="at most this many documents per dataset")
    p.add_argument("--batch-tokens", type=int, default=16384, help="padded input slots per forward pass")
    p.add_argument("--stride", type=int, default=None,
                   help="targets a window moves on by in a long document (default max_seq_len / 2)")
    p.add_argument("--device", default=None, help="default cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: as stored")
    p.add_argument("--out", help="folder for metrics.json")
    p.set_defaults(func=_cmd)
