"""The generation engine: continuous batching of text, image and interleaved requests.

Requests join and leave the running batch between steps. Each step samples one token for every live
row and feeds all of them to the model in one call; the KV cache keeps a length per row, so rows of
different lengths share the batch without padding and a new request is prefilled alone, in its own
row, while the others wait (no re-prefill, ever). Every request has its own sampling settings and
random generator: its output does not depend on what else is in the batch.

Modality control follows Meta's decoders (spec §5.2–5.3):

- text steps allow only text tokens and ``</s>`` (plus ``<racm3:break>`` in interleaved mode, while a
  whole image block still fits before the length limit);
- an image block is ``<racm3:break>``, exactly N sampled codes, then ``<eoss>`` (forced, no sampling);
- image codes come from classifier-free guidance over three rows of the same batch: the full context,
  the context filtered to {image tokens, ``<s>``, BOI, EOI}, and ``[<s>, BOI]``. The two guidance rows
  are prefilled when the block opens and leave when it closes; the full row keeps its cache.

Logits are computed only over the rows of the output head the row's state allows: the text rows for
a text step, the K image rows for an image step (Meta masks every other logit to −inf, after guidance
for images, and guidance is elementwise, so the tokens are the same).

:class:`Engine` is driven by :meth:`Engine.step` (the functions below step it in the caller's thread)
or by its own thread (:meth:`Engine.start`, used by the server). Events reach each request's ``sink``
from the stepping thread.

Shape legend: B rows, D model dim, V vocabulary, Vt text vocabulary, K codebook size, N codes per image.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from PIL import Image

from chameleon_lm.documents import Document, DocumentCodec
from chameleon_lm.generation.packed import PackedMatrix, _version, pack_linears, packed_modules
from chameleon_lm.generation.sampling import GenerationConfig, cfg_mix, sample, text_scores, warp
from chameleon_lm.model import Chameleon
from chameleon_lm.model.decode_attention import cpu_kernel, kernel_applies
from chameleon_lm.model.transformer import DecodeStep
from chameleon_lm.tokenizers.text import TextTokenizer
from chameleon_lm.tokenizers.vocab import IMAGE, TEXT, Vocab

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class TextDelta:
    """New text, always a stable suffix (never half of a UTF-8 character)."""

    text: str


@dataclass(frozen=True)
class ImageProgress:
    done: int
    total: int
    index: int = 0
    """Which image of the answer (0-based)."""
    codes: torch.Tensor | None = None
    """``[done]`` long codes so far (CPU), for previews."""


@dataclass(frozen=True)
class ImageComplete:
    codes: torch.Tensor
    """``[N]`` long codes (CPU)."""
    image: Image.Image | None
    """The decoded pixels, or None when the codec has no image decoder (or decoding is left to the
    caller: ``Engine(decode_images=False)``)."""
    index: int = 0


FINISH_REASONS = ("stop", "length", "cancelled", "timeout", "error")


@dataclass(frozen=True)
class Done:
    ids: list[int]
    """Every new token (``</s>`` included when sampled). A prompt's trailing ``<racm3:break>`` in image or
    interleaved mode counts as new, so ``ids`` is always a well-formed document on its own."""
    document: Document | None
    """``codec.decode(ids)``, with the images of the :class:`ImageComplete` events (None without codec)."""
    reason: str = "stop"
    """One of :data:`FINISH_REASONS`: ``</s>`` or a finished image (stop), the length limit, a cancel,
    the request's time limit, or an engine error (``error`` says which)."""
    prompt_tokens: int = 0
    error: str | None = None


Event = TextDelta | ImageProgress | ImageComplete | Done
Sink = Callable[[Event], None]


# ----------------------------------------------------------------------------------------- public API


def generate_text(
    model: Chameleon, vocab: Vocab, prompts: list[list[int]], config: GenerationConfig
) -> list[list[int]]:
    """Continue each prompt with text until ``</s>`` or the limit, all in one continuous batch.

    Prompt i samples with seed ``config.seed + i`` (random when the seed is None).

    Returns:
        Each prompt's new ids, up to and including its first ``</s>`` (absent if it hit the limit).
    """
    config = config.replace(mode="text")
    engine = Engine(model, vocab, max_rows=max(len(prompts), 1), pack=config.cpu_packed_weights)
    jobs = [engine.submit(p, _seeded(config, i)) for i, p in enumerate(prompts)]
    return [done.ids for done in engine.run(jobs)]


def generate_images(
    model: Chameleon, vocab: Vocab, prompts: list[list[int]], config: GenerationConfig,
    image_seq_len: int,
) -> torch.Tensor:
    """One image per prompt (``<racm3:break>`` appended when missing), all in one batch of 3B rows.

    Prompt i samples with seed ``config.seed + i``.

    Returns:
        ``[B, N]`` long codes, on the model's device.
    """
    if not prompts:
        raise ValueError("no prompts")
    config = config.replace(mode="image")
    engine = Engine(model, vocab, max_rows=3 * len(prompts), image_seq_len=image_seq_len,
                    pack=config.cpu_packed_weights)
    jobs = [engine.submit(p, _seeded(config, i)) for i, p in enumerate(prompts)]
    engine.run(jobs)
    return torch.stack([job.last_codes for job in jobs]).to(engine.device)


def stream(
    model: Chameleon, codec: DocumentCodec, prompt: Document | list[int] | torch.Tensor,
    config: GenerationConfig,
) -> Iterator[Event]:
    """Generate from one prompt in ``config.mode``, yielding events as tokens arrive; ends with Done.

    A :class:`Document` prompt is encoded with ``<s>``; ids are used as given. ``image`` mode makes one
    image (``<racm3:break>`` appended when missing); ``text`` mode writes text until ``</s>`` or the
    limit; ``interleaved`` mode writes text and opens an image block whenever it samples (or the prompt
    ends with) ``<racm3:break>``.
    """
    if isinstance(prompt, Document):
        prompt = codec.encode(prompt, bos=True).ids
    ids = [int(i) for i in torch.as_tensor(prompt, dtype=torch.long).flatten()]
    engine = Engine(model, codec.vocab, codec=codec, max_rows=1 if config.mode == "text" else 3,
                    pack=config.cpu_packed_weights)
    events: collections.deque[Event] = collections.deque()
    job = engine.submit(ids, config, sink=events.append)  # errors raise here, before iteration
    return engine.iterate(job, events)


def _seeded(config: GenerationConfig, i: int) -> GenerationConfig:
    return config if config.seed is None else config.replace(seed=config.seed + i)


# ----------------------------------------------------------------------------------------- internals


class _Detokenizer:
    """Incremental text: emits the decoded text of pending ids once it does not end mid-character.

    Byte-level BPE decodes by concatenation, so text that ends on a whole character never changes
    when more ids arrive; a trailing U+FFFD (an incomplete UTF-8 sequence) is held back.
    """

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def push(self, token: int) -> str:
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):
            return ""
        self.pending.clear()
        return text

    def flush(self) -> str:
        """Whatever is held back (the text run has ended)."""
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending.clear()
        return text


class _Row:
    """One row of the batch: its job, its role (full / image / uncond) and its slot in the cache."""

    __slots__ = ("job", "role", "slot")

    def __init__(self, job: Job, role: str, slot: int):
        self.job, self.role, self.slot = job, role, slot


def plan_request(vocab: Vocab, ids: list[int], config: GenerationConfig, image_seq_len: int,
                 max_seq_len: int) -> tuple[list[int], int, int]:
    """A request's sequence (BOI appended in image mode), where its new ids start and its length
    limit; ``ValueError`` for a prompt that is empty, out of the vocabulary or leaves no room."""
    n, mode = image_seq_len, config.mode
    if not ids:
        raise ValueError("empty prompt")
    if min(ids) < 0 or max(ids) >= vocab.size:
        raise ValueError(f"prompt ids must be in [0, {vocab.size})")
    if mode == "image" and ids[-1] != vocab.boi_id:
        ids = ids + [vocab.boi_id]
    opened = mode != "text" and ids[-1] == vocab.boi_id
    start = len(ids) - opened  # new ids begin here (an open BOI counts as new)
    budget = n + 2 if mode == "image" else config.max_new_tokens
    limit = min(min(config.max_seq_len or max_seq_len, max_seq_len), start + budget)
    if len(ids) >= limit or (opened and len(ids) + n + 1 > limit):
        raise ValueError(f"a prompt of {start} tokens leaves no room to generate "
                         f"(limit {limit}, {n + 2} tokens per image block)")
    return list(ids), start, limit


class Job:
    """One request inside the engine: its sequence, sampling state and rows. Made by :meth:`Engine.submit`."""

    _ids = itertools.count()

    def __init__(self, engine: Engine, ids: list[int], config: GenerationConfig, sink: Sink | None,
                 timeout: float | None):
        mode = config.mode
        self.seq, self.start, self.limit = plan_request(engine.vocab, ids, config, engine.image_seq_len,
                                                        engine.max_seq_len)
        self.id = next(Job._ids)
        self.engine, self.config, self.mode, self.sink = engine, config, mode, sink
        self.rows_needed = 1 if mode == "text" else 3
        self.sampling_keys = {which: tuple(sorted(vars(getattr(config, which)).items()))
                              for which in ("text", "image")}  # for batching rows of equal settings
        self.generator = torch.Generator(device=engine.device)
        if config.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(config.seed)
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.cancelled = False
        self.finished: Done | None = None
        self.rows: list[_Row] = []  # [full] or [full, image, uncond] while an image block is open
        self.codes: list[int] = []
        self.last_codes: torch.Tensor | None = None
        self.forced: collections.deque[int] = collections.deque()  # already in seq, still to feed
        self.images: list[Image.Image | None] = []
        self.detok = _Detokenizer(engine.codec.text) if engine.codec is not None else None
        self.seen: dict[int, None] = {}  # text-head columns of the ids so far (repetition penalty)
        self._see(self.seq)

    @property
    def in_image(self) -> bool:
        return len(self.rows) == 3

    def cancel(self) -> None:
        """Stop at the next step (thread-safe); the job ends with ``Done(reason="cancelled")``."""
        self.cancelled = True

    def _see(self, ids: list[int]) -> None:
        column = self.engine.text_column
        self.seen.update((column[t], None) for t in ids if column[t] >= 0)

    def _emit(self, event: Event) -> None:
        if self.sink is not None:
            try:
                self.sink(event)
            except Exception:
                self.cancelled = True


class Engine:
    """Continuous-batching generation over one model (see the module docstring).

    Args:
        model: the model; on CPU in fp32 its linear layers are swapped once for packed ones
            (``generation/packed.py``) unless ``pack`` is False.
        vocab: the tokenizer's vocabulary.
        codec: text and image tokenizers; without it there are no text deltas, documents or images.
        max_rows: rows of the batch (a text request takes 1, image and interleaved requests 3); requests
            beyond it wait in order.
        image_seq_len: codes per image (default: the codec's).
        decode_images: decode finished images in the engine (else ``ImageComplete.image`` is None and the
            caller decodes the codes, e.g. in another thread).
        compile: run each decoding step as one ``torch.compile`` graph (:func:`decode_step`): it fuses
            the norms, RoPE and attention's small ops around the matmuls. It compiles here, in the
            constructor (tens of seconds on CPU); a compiler failure logs a warning and decoding goes
            on eagerly.
    """

    def __init__(self, model: Chameleon, vocab: Vocab, *, codec: DocumentCodec | None = None,
                 max_rows: int = 32, image_seq_len: int | None = None, decode_images: bool = True,
                 pack: bool = True, max_seq_len: int | None = None, compile: bool = False):
        V = model.config.vocab_size
        if V < vocab.size:
            raise ValueError(f"the model has {V} logits but the tokenizer {vocab.size} ids")
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.model, self.vocab, self.codec = model, vocab, codec
        self.max_rows, self.decode_images, self.pack = max_rows, decode_images, pack
        self.image_seq_len = image_seq_len or (codec.image_seq_len if codec is not None else 1024)
        self.max_seq_len = min(max_seq_len or model.config.max_seq_len, model.config.max_seq_len)
        self.device = model.output.weight.device
        if pack:
            pack_linears(model)
        self._packed = packed_modules(model)
        if self.device.type == "cpu":
            cpu_kernel()  # built (once) before a compiled step traces the attention that calls it
        # cpp_wrapper: the graph's ~120 kernel calls go from C++, not Python (a step is milliseconds)
        self._compiled = (torch.compile(decode_step, dynamic=True, options={"cpp_wrapper": True}) if compile
                          else None)
        classes = torch.full((V,), -1, dtype=torch.int8)
        classes[: vocab.size] = vocab.classes
        text = classes == TEXT
        text[[vocab.eos_id, vocab.boi_id]] = True
        self.text_ids = text.nonzero()[:, 0].to(self.device)  # [Vt] the text rows of the head
        column = torch.full((V,), -1, dtype=torch.long)
        column[self.text_ids.cpu()] = torch.arange(self.text_ids.numel())
        self.text_column: list[int] = column.tolist()  # id -> its column in the text head, or -1
        self.boi_column, self.eos_column = self.text_column[vocab.boi_id], self.text_column[vocab.eos_id]
        keep = classes == IMAGE
        keep[[vocab.bos_id, vocab.boi_id, vocab.eoi_id]] = True
        self.image_context: list[bool] = keep.tolist()  # what the image-conditioned row keeps
        self._heads_key: tuple | None = None
        self._heads()
        with torch.inference_mode():  # as every cache the steps make: a compiled graph guards on it
            self.cache = model.new_cache(max_rows, min(256, self.max_seq_len))
        self.h = torch.zeros(max_rows, model.config.dim, dtype=model.output.weight.dtype, device=self.device)
        if self._compiled is not None:  # compile now, on rows nobody uses yet, not in a request's first step
            training = model.training
            model.eval()  # as the steps run it (the graph guards on the mode)
            with torch.inference_mode():
                self.cache.host_lengths[0] = 1  # one (zero) cached token, as every decoding row has
                self._decode(torch.zeros(1, 1, dtype=torch.long, device=self.device), 1)
            model.train(training)
            self.cache.host_lengths[:] = 0
        self.rows: list[_Row] = []
        self.jobs: list[Job] = []  # admitted, in order
        self.waiting: collections.deque[Job] = collections.deque()
        self.reserved = 0
        self._lock = threading.RLock()  # one step at a time; submissions go in between
        self._wake = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.counters = collections.Counter()
        self.on_sampled: Callable[[], None] | None = None
        """Called in each step once the tokens are chosen (their events emitted), before the model
        call: a sink that buffers events can ship them a model call earlier."""

    # ------------------------------------------------------------------------------------ requests

    def submit(self, prompt: list[int], config: GenerationConfig, sink: Sink | None = None,
               timeout: float | None = None) -> Job:
        """Queue a request (validated now: bad prompts and limits raise ``ValueError``).

        ``sink`` receives the job's events from the stepping thread and must not block; ``timeout`` in
        seconds ends the request with ``Done(reason="timeout")``.
        """
        job = Job(self, [int(t) for t in prompt], config, sink, timeout)
        if job.rows_needed > self.max_rows:
            raise ValueError(f"a {config.mode} request needs {job.rows_needed} rows; the engine has "
                             f"{self.max_rows}")
        with self._wake:
            self.waiting.append(job)
            self.counters["requests"] += 1
            self._wake.notify()
        return job

    def run(self, jobs: list[Job]) -> list[Done]:
        """Step until every one of ``jobs`` is done; their Done events in order."""
        while not all(job.finished for job in jobs):
            self.step()
        return [job.finished for job in jobs]

    def iterate(self, job: Job, events: collections.deque[Event]) -> Iterator[Event]:
        """Step until ``job`` is done, yielding the events its sink (``events.append``) collected."""
        try:
            while True:
                if not events:
                    self.step()
                while events:
                    event = events.popleft()
                    yield event
                    if isinstance(event, Done):
                        return
        finally:
            if job.finished is None:
                job.cancel()
                with self._lock, torch.inference_mode():  # freeing a row writes the cache
                    self._reap()

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def stats(self) -> dict[str, int]:
        return {**self.counters, "running": len(self.jobs), "waiting": len(self.waiting),
                "rows": len(self.rows), "cache_tokens": self.cache.max_len * self.max_rows}

    # ------------------------------------------------------------------------------- the stepping

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit waiting requests, sample one token per live row and feed them all; False when idle."""
        with self._lock:
            if not self.model.training:
                return self._step()
            self.model.eval()  # dropout off while generating, then back (train() walks every module)
            try:
                return self._step()
            finally:
                self.model.train()

    def _step(self) -> bool:
        self._heads()
        self._reap()
        self._admit()
        if not self.rows:
            if not self.waiting and self.cache.max_len > 256:  # idle: give back a grown cache
                self.cache = self.model.new_cache(self.max_rows, min(256, self.max_seq_len))
            return False
        feed = self._sample()
        if self.on_sampled is not None:
            self.on_sampled()
        if feed:
            self._feed(feed)
        # a sampled <racm3:break>, now in the full row's cache, opens an image block
        self._open_images([job for job in self.jobs if job.mode != "text" and not job.in_image
                           and job.seq[-1] == self.vocab.boi_id])
        self.counters["steps"] += 1
        return True

    def start(self) -> None:
        """Step in a background thread whenever there is work (until :meth:`stop`)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="chameleon-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self.busy and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:
                self._fail_all(f"{type(e).__name__}: {e}")

    def _fail_all(self, message: str) -> None:
        """End every admitted job with an error and start from an empty batch (waiting jobs stay)."""
        with self._lock:
            self.rows.clear()
            for job in self.jobs:
                job.rows.clear()
            for job in list(self.jobs):
                self._finish(job, "error", error=message)
            self.jobs.clear()
            self.reserved = 0
            self.cache.host_lengths[:] = 0
            self.counters["engine_errors"] += 1

    # ------------------------------------------------------------------------------------ internals

    def _heads(self) -> None:
        """The packed text and image rows of the output head (rebuilt when its weight changes)."""
        head = self.model.output
        key = tuple((t.data_ptr(), _version(t)) for t in itertools.chain(head.parameters(), head.buffers()))
        if key != self._heads_key:
            w = head.effective_weight() if hasattr(head, "effective_weight") else head.weight
            self.text_head = PackedMatrix(w.detach()[self.text_ids], self.pack)
            self.image_head = PackedMatrix(w.detach()[self.vocab.image_start : self.vocab.image_end],
                                           self.pack)
            self._heads_key = key

    def _reap(self) -> None:
        now = time.monotonic()
        with self._wake:
            waiting = list(self.waiting)
        for job in list(self.jobs) + waiting:
            if job.cancelled:
                self._finish(job, "cancelled")
            elif job.deadline is not None and now > job.deadline:
                self._finish(job, "timeout")

    def _admit(self) -> None:
        admitted = []
        while self.waiting and self.reserved + self.waiting[0].rows_needed <= self.max_rows:
            with self._wake:
                job = self.waiting.popleft()
            self.reserved += job.rows_needed
            self.jobs.append(job)
            admitted.append((self._alloc(job, "full"), job.seq))
            self.counters["prompt_tokens"] += len(job.seq)
        self._prefill(admitted)
        self._open_images([row.job for row, _ in admitted
                           if row.job.mode != "text" and row.job.seq[-1] == self.vocab.boi_id])

    def _alloc(self, job: Job, role: str) -> _Row:
        row = _Row(job, role, len(self.rows))
        self.rows.append(row)
        job.rows.append(row)
        self.cache.host_lengths[row.slot] = 0
        return row

    def _free(self, row: _Row) -> None:
        last = self.rows.pop()
        if last is not row:
            self.cache.move(last.slot, row.slot)
            self.h[row.slot] = self.h[last.slot]
            last.slot = row.slot
            self.rows[row.slot] = last
        self.cache.host_lengths[len(self.rows)] = 0
        row.job.rows.remove(row)

    def _room(self, need: int) -> None:
        if need > self.cache.max_len:
            k = self.cache.k
            self.cache.grow(min(self.max_seq_len, max(need, 2 * self.cache.max_len)),
                            zeroed=not kernel_applies(k.shape[-1], k.dtype, k.device))

    def _prefill(self, rows: list[tuple[_Row, list[int]]], budget: int = 2048) -> None:
        """Prefill new rows, packed into one input row per ``budget`` tokens (no padding)."""
        while rows:
            take, total = 0, 0
            while take < len(rows) and (take == 0 or total + len(rows[take][1]) <= budget):
                total += len(rows[take][1])
                take += 1
            chunk, rows = rows[:take], rows[take:]
            lengths = [len(ids) for _, ids in chunk]
            self._room(max(lengths))
            view = self.cache.packed([row.slot for row, _ in chunk], lengths)
            x = torch.tensor([[t for _, ids in chunk for t in ids]], dtype=torch.long, device=self.device)
            h = self.model.hidden_states(x, view)[0]
            ends = torch.tensor(lengths, device=self.device).cumsum(0) - 1
            self.h[torch.tensor([row.slot for row, _ in chunk], device=self.device)] = h[ends]

    def _open_images(self, jobs: list[Job]) -> None:
        """Add the two guidance rows of each job's image block (prefilled; the full row is kept)."""
        rows = []
        if jobs:  # room for whole blocks at once: one copy of the cache, not one per doubling
            self._room(max(len(job.seq) for job in jobs) + self.image_seq_len + 1)
        for job in jobs:
            if job.detok is not None and (tail := job.detok.flush()):
                job._emit(TextDelta(tail))
            image_ctx = [t for t in job.seq if self.image_context[t]]
            rows += [(self._alloc(job, "image"), image_ctx),
                     (self._alloc(job, "uncond"), [self.vocab.bos_id, self.vocab.boi_id])]
            job.codes = []
        self._prefill(rows)

    def _sample(self) -> list[tuple[_Row, int]]:
        """Choose every live row's next token; finished jobs leave. Returns (row, token) to feed."""
        text_jobs = [j for j in self.jobs if not j.in_image and not j.forced]
        image_jobs = [j for j in self.jobs if j.in_image]
        chosen: dict[int, int] = {}  # job id -> token
        if text_jobs:
            slots = torch.tensor([j.rows[0].slot for j in text_jobs], device=self.device)
            logits = self.text_head(self.h[slots]).float()  # [B, Vt]
            for group, idx in _groups(text_jobs, "text"):
                cfg = group.config.text
                scores = logits[idx] if len(idx) < len(text_jobs) else logits
                seen = [list(text_jobs[i].seen) for i in idx] if cfg.repetition_penalty != 1.0 else []
                scores = text_scores(scores, seen,
                                     [self._forbidden(text_jobs[i]) for i in idx], cfg, inplace=True)
                toks = self.text_ids[sample(scores, [text_jobs[i].generator for i in idx], cfg.greedy)]
                for i, tok in zip(idx, toks.tolist()):
                    chosen[text_jobs[i].id] = tok
        if image_jobs:
            slots = torch.tensor([r.slot for role in range(3) for r in (j.rows[role] for j in image_jobs)],
                                 device=self.device)
            full, image, uncond = self.image_head(self.h[slots]).float().split(len(image_jobs))
            for group, idx in _groups(image_jobs, "image"):
                cfg = group.config.image
                mix = cfg_mix(full[idx], image[idx], uncond[idx], cfg.cfg_text, cfg.cfg_image)  # [b, K]
                scores = mix if cfg.greedy else warp(mix, cfg.temperature, cfg.top_k, cfg.top_p)
                codes = sample(scores, [image_jobs[i].generator for i in idx], cfg.greedy)
                for i, code in zip(idx, codes.tolist()):
                    chosen[image_jobs[i].id] = self.vocab.image_start + code
        feed: list[tuple[_Row, int]] = []
        for job in list(self.jobs):
            if job.forced:
                feed.append((job.rows[0], job.forced.popleft()))
            elif job.in_image:
                feed += self._accept_code(job, chosen[job.id])
            else:
                feed += self._accept_text(job, chosen[job.id])
        return feed

    def _forbidden(self, job: Job) -> list[int]:
        """The text-head columns a text step of ``job`` may not sample (the head has no image rows)."""
        fits_image = job.mode == "interleaved" and job.limit - len(job.seq) >= self.image_seq_len + 2
        out = [] if fits_image else [self.boi_column]
        if len(job.seq) - job.start < job.config.min_new_tokens:
            out.append(self.eos_column)
        return out

    def _accept_text(self, job: Job, tok: int) -> list[tuple[_Row, int]]:
        job.seq.append(tok)
        job._see([tok])
        self.counters["text_tokens"] += 1
        if tok == self.vocab.eos_id:
            self._finish(job, "stop")
            return []
        if tok != self.vocab.boi_id and job.detok is not None and (delta := job.detok.push(tok)):
            job._emit(TextDelta(delta))
        if len(job.seq) >= job.limit:
            self._finish(job, "length")
            return []
        return [(job.rows[0], tok)]

    def _accept_code(self, job: Job, tok: int) -> list[tuple[_Row, int]]:
        n = self.image_seq_len
        job.codes.append(tok - self.vocab.image_start)
        job.seq.append(tok)
        self.counters["image_tokens"] += 1
        done = len(job.codes)
        if done % job.config.progress_every == 0 or done == n:
            job._emit(ImageProgress(done, n, len(job.images), torch.tensor(job.codes)))
        if done < n:
            return [(row, tok) for row in job.rows]
        job.seq.append(self.vocab.eoi_id)
        codes = job.last_codes = torch.tensor(job.codes)
        decoder = self.codec.image if self.codec is not None else None
        image = None
        if self.decode_images and decoder is not None and getattr(decoder, "can_decode", True):
            image = decoder.decode(codes[None].to(self.device))[0]
        job._emit(ImageComplete(codes, image, len(job.images)))
        job.images.append(image)
        if job.mode == "image" or len(job.seq) >= job.limit:
            self._finish(job, "stop" if job.mode == "image" else "length")
            return []
        for row in job.rows[1:]:
            self._free(row)
        job.forced.append(self.vocab.eoi_id)
        return [(job.rows[0], tok)]

    def _feed(self, feed: list[tuple[_Row, int]]) -> None:
        """One model call: each row's token, in slot order (every live row has one)."""
        feed.sort(key=lambda rt: rt[0].slot)
        n = len(self.rows)
        assert [r.slot for r, _ in feed] == list(range(n)), "every live row feeds one token per step"
        self._room(self.cache.length + 1)
        self._decode(torch.tensor([[t] for _, t in feed], dtype=torch.long, device=self.device), n)

    def _decode(self, x: torch.Tensor, n: int) -> None:
        """Rows ``[0, n)`` take their tokens ``x`` through :func:`decode_step` (compiled or not); the
        new keys go into the cache and the hidden states into ``self.h``."""
        if self._compiled is not None and self.cache.max_len >= 2:
            if any(layer.stale for layer in self._packed):  # the compiled graph can't see a new weight
                pack_linears(self.model)
            # One row runs as two (the second's output is dropped) and the longest row counts as at
            # least two tokens (the mask hides the rest): a size of 1 would compile a graph of its own.
            B = max(n, min(2, self.max_rows))
            lengths = torch.ones(B, dtype=torch.long)
            lengths[:n] = torch.from_numpy(self.cache.host_lengths[:n])
            try:
                h, k_new, v_new = self._compiled(
                    self.model, torch.cat([x, x.new_zeros(B - n, 1)]), self.cache.k[:, :B],
                    self.cache.v[:, :B], lengths.to(self.device), max(2, int(lengths.max())))
            except Exception as e:  # noqa: BLE001 - e.g. no C++ compiler: decode eagerly from here on
                log.warning("compiled decoding failed (%s: %s); decoding eagerly", type(e).__name__, e)
                self._compiled = None
                return self._decode(x, n)
        else:
            lengths = torch.from_numpy(self.cache.host_lengths[:n]).to(self.device)
            h, k_new, v_new = decode_step(self.model, x, self.cache.k[:, :n], self.cache.v[:, :n], lengths,
                                          self.cache.length)
        self.cache.rows(slice(0, n)).append(k_new[:, :n], v_new[:, :n])
        self.h[:n] = h[:n, -1]

    def _finish(self, job: Job, reason: str, error: str | None = None) -> None:
        if job.finished is not None:
            return
        for row in list(job.rows):
            self._free(row)
        if job in self.jobs:
            self.jobs.remove(job)
            self.reserved -= job.rows_needed
        else:
            with self._wake:
                if job in self.waiting:
                    self.waiting.remove(job)
        new = job.seq[job.start :]
        document = None
        try:
            if job.detok is not None and (tail := job.detok.flush()):
                job._emit(TextDelta(tail))
            if self.codec is not None:
                document = self.codec.decode(new, decode_images=False)
                for part, image in zip(document.images, job.images):
                    part.image = image
        except Exception as e:
            reason, error = "error", f"{type(e).__name__}: {e}"
        job.finished = Done(new, document, reason, job.start, error)
        self.counters[f"finished_{reason}"] += 1
        job._emit(job.finished)


def decode_step(model: Chameleon, x_B1: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                lengths_B: torch.Tensor, longest: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token per row through the model, reading cache buffers ``k``/``v`` (rows ``[0, B)``, row b
    holding ``lengths_B[b]`` tokens, ``longest`` the most): hidden states ``[B, 1, D]`` and the new keys
    and values ``[L, B, K, E]`` for :meth:`KVCache.append`. The function the engine compiles."""
    step = DecodeStep(k, v, lengths_B, longest)
    h = model.hidden_states(x_B1, step)
    return (h, *step.new_keys())


def _groups(jobs: list[Job], which: str) -> list[tuple[Job, list[int]]]:
    """Indices of the jobs with equal ``text`` or ``image`` sampling settings (one batched chain
    each), first job of each."""
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.sampling_keys[which], []).append(i)
    return [(jobs[idx[0]], idx) for idx in groups.values()]
