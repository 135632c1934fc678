"""``chameleon eval lm-harness``: text tasks of lm-evaluation-harness (``lm_eval`` 0.4) on a model.

:class:`TextScorer` does the work on plain tuples; ``ChameleonLM`` (built on first use, registered with
lm_eval as ``chameleon``, ``model_args="pretrained=DIR"``) is the ``lm_eval.api.model.LM`` around it.
``lm_eval`` is optional: this module imports without it, and asking for ``ChameleonLM`` or running an
evaluation without it raises an ``ImportError`` saying what to install.

Requests follow lm_eval's Hugging Face model (``lm_eval/models/huggingface.py``):

- a context and its continuation are encoded together and split at the context's length, with
  ``<s>`` in front (trailing spaces of the context move to the continuation); an empty context is
  ``<s>`` alone; the sequence is cut from the left to ``max_length + 1`` tokens;
- ``loglikelihood_rolling`` scores a string in disjoint windows of ``max_length`` predictions after
  ``<s>`` (``lm_eval.utils.get_rolling_token_windows``), each token once;
- ``generate_until`` generates after ``<s>`` + context (cut from the left to leave ``max_gen_toks``),
  stops at ``</s>``, at ``max_gen_toks`` or once an ``until`` string appears, and returns the text before
  the first ``until`` string; greedy unless ``do_sample`` with a temperature above 0.

Scores are over text only: the image-code columns (``vocab.image_start .. image_end``) and the ids
beyond the tokenizer are masked to −inf before the log-softmax, because Chameleon's official text-mode
decoding never lets an image token be sampled, so a text answer's probability is its probability among
non-image tokens. Special tokens keep their columns, so every id the text tokenizer produces has a
finite score. Generation runs on :class:`chameleon_lm.generation.engine.Engine` in text mode, which
allows only text tokens and ``</s>`` (Meta's text decoder), so greedy answers are exactly
``generate_text``'s. ``is_greedy`` of a log-likelihood is the argmax over the scored (non-image) ids:
it can disagree with generation only where another special token than ``</s>`` is the argmax.

Offline use: ``run_lm_harness(..., offline=True)`` (``--offline``) sets ``HF_DATASETS_OFFLINE=1`` and
``HF_HUB_OFFLINE=1`` before lm_eval loads a dataset, for local tasks (``dataset_path: json`` with
``data_files``) on a machine without network.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from chameleon_lm.checkpoints import LoadedModel, load_model
from chameleon_lm.checkpoints.convert import DTYPES as CONVERT_DTYPES
from chameleon_lm.generation.engine import Engine, TextDelta
from chameleon_lm.generation.sampling import GenerationConfig, TextSampling

log = logging.getLogger(__name__)

INSTALL_HINT = ("lm-evaluation-harness is not installed; install it with "
                "pip install 'chameleon-lm[eval]'")
# lm_eval users also write torch's names (bfloat16, float16, float32)
DTYPES = {**CONVERT_DTYPES, **{str(t).removeprefix("torch."): t for t in CONVERT_DTYPES.values()}}
_GEN_KEYS = {"until", "max_gen_toks", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k"}


def _import_lm_eval():
    try:
        import lm_eval
        import lm_eval.api.model
        import lm_eval.api.registry
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return lm_eval


class TextScorer:
    """Log-likelihoods and greedy/sampled continuations of text, on a chameleon-lm model.

    Args:
        pretrained: a model folder (any layout ``load_model`` reads) or a loaded model.
        device: where to run (default: CPU, or where ``pretrained`` already is).
        dtype: cast the weights (``fp32``, ``bf16``, ``fp16``; default as stored).
        batch_size: sequences per forward pass when scoring; rows of the generation batch.
        max_length: longest sequence (default the model's ``max_seq_len``).
        max_gen_toks: new tokens when a request gives no ``max_gen_toks``.
        seed: sampled requests use seed ``seed + i``, i the request's index.
    """

    def __init__(self, pretrained: str | os.PathLike | LoadedModel, device: str | None = None,
                 dtype: str | torch.dtype | None = None, batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, seed: int = 0):
        if isinstance(dtype, str):
            if dtype not in DTYPES and dtype != "auto":
                raise ValueError(f"dtype must be one of {sorted(DTYPES)} or auto, got {dtype!r}")
            dtype = DTYPES.get(dtype)
        if isinstance(pretrained, LoadedModel):
            self.loaded = pretrained
            if device is not None or dtype is not None:
                self.loaded.model.to(device=device, dtype=dtype)
        else:
            self.loaded = load_model(pretrained, dtype=dtype, device=device)
        self.pretrained = str(pretrained) if not isinstance(pretrained, LoadedModel) else None
        self.model = self.loaded.model.eval()
        self.tok = self.loaded.text_tokenizer
        self.vocab = self.tok.vocab
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size 'auto' is not supported; give a number")
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or self.model.config.max_seq_len)
        self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)
        if self.batch_size < 1 or self.max_length < 2:
            raise ValueError(f"need batch_size >= 1 and max_length >= 2, got {self.batch_size}, "
                             f"{self.max_length}")
        V, v = self.model.config.vocab_size, self.vocab
        bias = torch.zeros(V)
        bias[v.image_start : v.image_end] = -math.inf
        bias[v.size :] = -math.inf  # logits the tokenizer has no token for
        self._device = self.model.output.weight.device
        self.logit_bias = bias.to(self._device)

    @property
    def device(self) -> torch.device:
        return self._device

    # ------------------------------------------------------------------ tokens

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(context ids, continuation ids)`` by lm_eval's causal convention (module docstring)."""
        bos = self.vocab.bos_id
        if context == "":
            return [bos], self.tok.encode(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context)
        return [bos] + ctx, whole[len(ctx) :]

    @torch.no_grad()
    def score_tokens(self, requests: Sequence[tuple[list[int], list[int]]]
                     ) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is greedy)`` of token-id pairs, over non-image ids.

        Requests are batched longest first; an empty continuation scores ``(0.0, True)``.
        """
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        todo = []
        for i, (ctx, cont) in enumerate(requests):
            if not cont:
                out[i] = (0.0, True)
                continue
            if not ctx:
                raise ValueError("a context must have at least one token (<s>)")
            if len(cont) > self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens is longer than max_length "
                                 f"{self.max_length}")
            inp = (list(ctx) + list(cont))[-(self.max_length + 1) :][:-1]
            todo.append((i, inp, list(cont)))
        todo.sort(key=lambda r: (-len(r[1]), r[0]))
        for s in range(0, len(todo), self.batch_size):
            chunk = todo[s : s + self.batch_size]
            T = len(chunk[0][1])
            ids = torch.full((len(chunk), T), self.vocab.pad_id, dtype=torch.long)
            for b, (_, inp, _) in enumerate(chunk):
                ids[b, : len(inp)] = torch.tensor(inp)
            # right padding under causal attention; the head runs on the continuation rows only
            h = self.model.hidden_states(ids.to(self.device))
            picked = torch.cat([h[b, len(inp) - len(cont) : len(inp)]
                                for b, (_, inp, cont) in enumerate(chunk)])
            logp = (self.model.output(picked).float() + self.logit_bias).log_softmax(-1)
            target = torch.tensor([t for _, _, cont in chunk for t in cont], device=self.device)
            tok_logp = logp.gather(1, target[:, None])[:, 0].double().cpu()
            greedy = (logp.argmax(-1) == target).cpu()
            at = 0
            for i, _, cont in chunk:
                n = len(cont)
                out[i] = (float(tok_logp[at : at + n].sum()), bool(greedy[at : at + n].all()))
                at += n
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is greedy)`` of ``(context, continuation)`` strings."""
        return self.score_tokens([self.encode_pair(c, x) for c, x in requests])

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """``(context, continuation)`` token windows that score every token of ``text`` once."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        return [make_disjoint_window(w) for w in get_rolling_token_windows(
            token_list=self.tok.encode(text), prefix_token=self.vocab.bos_id,
            max_seq_len=self.max_length, context_len=1)]

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """``log p(text | <s>)`` of each text, however long (windows of ``max_length``)."""
        _import_lm_eval()
        windows = [self.rolling_windows(t) for t in texts]
        scores = iter(self.score_tokens([w for ws in windows for w in ws]))
        return [sum((next(scores)[0] for _ in ws), 0.0) for ws in windows]

    # ------------------------------------------------------------------ generation

    def generation_config(self, gen_kwargs: dict[str, Any], index: int
                          ) -> tuple[GenerationConfig, list[str]]:
        """The engine's settings and the stop strings of one ``generate_until`` request."""
        kw = dict(gen_kwargs or {})
        unknown = sorted(set(kw) - _GEN_KEYS)
        if unknown:
            log.warning("generate_until: ignoring generation kwargs %s", unknown)
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = int(kw.get("max_gen_toks") or kw.get("max_new_tokens") or self.max_gen_toks)
        temperature = float(kw.get("temperature", 1.0 if kw.get("do_sample") else 0.0))
        sample = bool(kw.get("do_sample")) and temperature > 0
        text = TextSampling(greedy=True, repetition_penalty=1.0)
        if sample:
            text = TextSampling(temperature=temperature, top_p=float(kw.get("top_p") or 1.0),
                                top_k=int(kw.get("top_k") or 0), repetition_penalty=1.0)
        return GenerationConfig(mode="text", text=text, max_new_tokens=max_gen,
                                seed=self.seed + index), until

    def generate_until(self, requests: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
        """The continuation of each ``(context, gen_kwargs)``, cut before its first ``until`` string."""
        if not requests:
            return []
        engine = Engine(self.model, self.vocab, codec=self.loaded.codec, max_rows=self.batch_size,
                        max_seq_len=self.max_length, decode_images=False)
        jobs = []
        for i, (context, gen_kwargs) in enumerate(requests):
            config, until = self.generation_config(gen_kwargs, i)
            room = self.max_length - config.max_new_tokens
            if room < 1:
                raise ValueError(f"max_gen_toks {config.max_new_tokens} leaves no room for a context "
                                 f"within max_length {self.max_length}")
            ids = ([self.vocab.bos_id] + self.tok.encode(context))[-room:]
            jobs.append((len(ids), i, ids, config, until))
        jobs.sort(key=lambda j: (-j[0], j[1]))  # longest first, as lm_eval's models do
        stops: dict[int, _StopStrings] = {}
        for _, i, ids, config, until in jobs:
            stops[i] = _StopStrings(until)
            stops[i].job = engine.submit(ids, config, sink=stops[i])
        engine.run([stop.job for stop in stops.values()])
        out = []
        for i in range(len(requests)):
            new = [t for t in stops[i].job.finished.ids if t != self.vocab.eos_id]
            out.append(cut_at(self.tok.decode(new), stops[i].until))
        return out


class _StopStrings:
    """A job's sink: cancels the job once its text holds a stop string (no token is wasted after)."""

    def __init__(self, until: list[str]):
        self.until = until
        self.stops = [u for u in until if u]
        self.text = ""
        self.job: Any = None

    def __call__(self, event: Any) -> None:
        if self.stops and isinstance(event, TextDelta):
            self.text += event.text
            if any(u in self.text for u in self.stops):
                self.job.cancel()


def cut_at(text: str, until: Sequence[str]) -> str:
    """``text`` before the first occurrence of any non-empty stop string (lm_eval's post-processing)."""
    for u in until:
        if u:
            text = text.split(u)[0]
    return text


@functools.cache
def chameleon_lm_class() -> type:
    """``ChameleonLM``: an ``lm_eval.api.model.LM`` over :class:`TextScorer`, registered as
    ``chameleon``."""
    _import_lm_eval()
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    @register_model("chameleon")
    class ChameleonLM(TextScorer, LM):
        """lm_eval's view of a chameleon-lm model: ``model_args="pretrained=DIR,batch_size=8"``."""

        def __init__(self, pretrained: str | os.PathLike | LoadedModel, max_batch_size: Any = None,
                     **kwargs: Any):
            LM.__init__(self)
            TextScorer.__init__(self, pretrained, **kwargs)

        @property
        def tokenizer_name(self) -> str:
            return "chameleon-lm"

        def get_model_info(self) -> dict[str, Any]:
            return {"model_dir": self.pretrained, "model_num_parameters": sum(
                p.numel() for p in self.model.parameters()), "model_dtype": str(
                self.model.output.weight.dtype), "max_length": self.max_length}

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            args = [r.args for r in requests]
            res = TextScorer.loglikelihood(self, args)
            for a, r in zip(args, res):
                self.cache_hook.add_partial("loglikelihood", a, r)
            return res

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            args = [r.args for r in requests]
            res = TextScorer.loglikelihood_rolling(self, [a[0] for a in args])
            for a, r in zip(args, res):
                self.cache_hook.add_partial("loglikelihood_rolling", a, r)
            return res

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            args = [r.args for r in requests]
            res = TextScorer.generate_until(self, args)
            for a, r in zip(args, res):
                self.cache_hook.add_partial("generate_until", a, r)
            return res

    ChameleonLM.__module__, ChameleonLM.__qualname__ = __name__, "ChameleonLM"  # for pickle
    return ChameleonLM


def __getattr__(name: str) -> Any:
    if name == "ChameleonLM":  # built on first use: lm_eval is optional
        return chameleon_lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def set_offline() -> None:
    """No network for Hugging Face datasets and hub (also when they are already imported)."""
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        config = sys.modules["datasets"].config
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True


def run_lm_harness(
    model_dir: str | os.PathLike | LoadedModel,
    tasks: list[str],
    out: str | os.PathLike | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    seed: int = 0,
    include_path: str | os.PathLike | None = None,
    *,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str | None = None,
    offline: bool = False,
    log_samples: bool = False,
    bootstrap_iters: int = 100_000,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of ``tasks`` on the model; with ``out``, write ``out/results.json``
    (and ``samples_<task>.jsonl`` with ``log_samples``).

    Seeds are pinned: python's ``random`` to ``seed``, numpy, torch and the few-shot sampler to
    ``seed + 1234`` (``seed=0`` is lm_eval's own default). Tasks are looked up in ``include_path``
    alone when they are all there (lm_eval's built-in index takes seconds to build), else in both.
    """
    if offline:
        set_offline()
    lm_eval = _import_lm_eval()
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table

    if not tasks:
        raise ValueError("no tasks given")
    manager = None
    if include_path is not None:
        if not Path(include_path).exists():
            raise FileNotFoundError(f"{include_path}: no such task folder")
        try:
            manager = TaskManager(include_path=str(include_path), include_defaults=False)
        except TypeError:  # an lm_eval without include_defaults
            manager = None
        if manager is None or not set(tasks) <= set(manager.all_tasks):
            manager = TaskManager(include_path=str(include_path))
    lm = chameleon_lm_class()(model_dir, batch_size=batch_size, device=device, dtype=dtype,
                              seed=seed)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
        batch_size=batch_size, log_samples=log_samples, bootstrap_iters=bootstrap_iters,
        random_seed=seed, numpy_random_seed=seed + 1234, torch_random_seed=seed + 1234,
        fewshot_random_seed=seed + 1234)
    if results is None:  # not the main process
        return {}
    samples = results.pop("samples", None) or {}
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(
            results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
        for task, rows in samples.items():
            (out / f"samples_{task}.jsonl").write_text("".join(
                json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n" for r in rows))
        print(f"wrote {out / 'results.json'}")
    if samples:
        results["samples"] = samples
    return results


def _limit(text: str) -> int | float:
    value = float(text)
    return int(value) if value >= 1 else value


def _cmd(args: argparse.Namespace) -> int:
    run_lm_harness(args.model, args.tasks, args.out, args.limit, args.num_fewshot, args.seed,
                   args.include_path, batch_size=args.batch_size, device=args.device,
                   dtype=args.dtype, offline=args.offline, log_samples=args.log_samples)
    return 0


def add_cli(ev: argparse._SubParsersAction) -> None:
    """Register ``chameleon eval lm-harness`` on the ``chameleon eval`` subcommands."""
    p = ev.add_parser("lm-harness", help="text tasks of lm-evaluation-harness",
                      description="Run lm-evaluation-harness tasks (multiple choice, generation, "
                                  "perplexity) on the model's text mode; needs "
                                  "pip install 'chameleon-lm[eval]'.")
    p.add_argument("--model", required=True, help="model folder (any layout load_model reads)")
    p.add_argument("--tasks", nargs="+", required=True, help="lm_eval task, group or tag names")
    p.add_argument("--include-path", help="folder of extra task YAML files")
    p.add_argument("--limit", type=_limit, default=None,
                   help="at most this many documents per task (a fraction below 1: of each task)")
    p.add_argument("--num-fewshot", type=int, default=None, help="default: each task's own")
    p.add_argument("--seed", type=int, default=0, help="0 gives lm_eval's default seeds")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="default cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="default: as stored")
    p.add_argument("--offline", action="store_true",
                   help="set HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 (local datasets only)")
    p.add_argument("--log-samples", action="store_true", help="also write samples_<task>.jsonl")
    p.add_argument("--out", help="folder for results.json")
    p.set_defaults(func=_cmd)
