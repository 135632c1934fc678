"""``chameleon eval generate``: answer a prompt set with one system and store every answer.

Systems (answerers):

- :class:`LocalAnswerer`: a model folder, run by the generation engine (all pending prompts in one
  continuous batch); the mode follows each prompt's expected output (text, image, mixed → interleaved);
- :class:`EndpointAnswerer`: any OpenAI-compatible chat endpoint (``chameleon serve``, vLLM, OpenAI);
  images go in as data URLs, image parts come back as data URLs (``chameleon serve``'s shape);
- :class:`AugmentedAnswerer`: the paper's augmented baseline: a text endpoint told to write
  ``<caption>…</caption>`` where an image belongs (the paper's suffix, :data:`CAPTION_SUFFIX`) and an
  image endpoint (OpenAI images API) that draws each caption into the answer.

Sampling settings and seeds are pinned per run and stored with it; prompt i (its position in the
store), sample s is answered with seed ``seed + i + s * 100_000``. A run resumes: answers already
stored are kept, errors are retried with ``retry_errors``.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from chameleon_lm.eval.prompts import Prompt, PromptSet
from chameleon_lm.eval.provenance import model_hash, versions
from chameleon_lm.eval.store import Answer, ResultStore, Run

CAPTION_SUFFIX = ("If the question requires an image to be generated, then generate an image caption "
                  "instead and enclose the caption in a pair of <caption></caption> tags.")
"""The instruction the paper appended to the baselines' prompts."""
_CAPTION = re.compile(r"<caption>(.*?)</caption>", re.DOTALL)
MODE_OF_OUTPUT = {"text": "text", "image": "image", "mixed": "interleaved"}
SEED_STRIDE = 100_000
"""Seeds of sample s start at ``seed + s * SEED_STRIDE``: prompt sets stay below this size."""


@dataclass
class Generated:
    """One answer before storing: parts are text or ``{"type": "image", "image": PIL.Image}``."""

    parts: list[dict[str, Any]]
    finish: str = "stop"
    error: str | None = None
    seconds: float = 0.0


@dataclass
class Item:
    prompt: Prompt
    images: list[Image.Image]
    sample: int
    seed: int


class Answerer(Protocol):
    kind: str

    def settings(self) -> dict[str, Any]:
        """Everything that pins the answers besides the seeds (stored with the run)."""

    def fingerprint(self) -> str:
        """The model's hash, or the endpoint's model name."""

    def answer(self, items: list[Item]) -> list[Generated]:
        """Answer the items (in order); a failing item gets ``finish="error"``, not an exception."""


# ------------------------------------------------------------------------------------ local model


@dataclass
class LocalAnswerer:
    """A model folder answered by the generation engine. ``sampling``: a GenerationConfig dict
    (``chameleon_lm.generation.sampling``) whose mode and seed are set per item."""

    model_dir: str
    sampling: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    max_rows: int = 24
    kind: str = "model"

    def __post_init__(self) -> None:
        from chameleon_lm.checkpoints import load_model
        from chameleon_lm.generation.sampling import GenerationConfig

        self.config = GenerationConfig.from_dict(self.sampling)
        self.loaded = load_model(self.model_dir, device=self.device)
        if self.loaded.image_tokenizer is None or not self.loaded.image_tokenizer.can_decode:
            raise ValueError(f"{self.model_dir}: the model has no image decoder (pass a VQGAN)")

    def settings(self) -> dict[str, Any]:
        return {"model_dir": str(Path(self.model_dir).resolve()), "sampling": self.config.to_dict()}

    def fingerprint(self) -> str:
        return model_hash(self.model_dir)

    def answer(self, items: list[Item]) -> list[Generated]:
        from chameleon_lm.documents import Document, ImagePart, TextPart
        from chameleon_lm.generation.engine import Engine

        codec = self.loaded.codec
        engine = Engine(self.loaded.model, codec.vocab, codec=codec, max_rows=self.max_rows,
                        pack=self.config.cpu_packed_weights)
        out: list[Generated | None] = [None] * len(items)
        jobs, started = [], time.monotonic()
        for i, item in enumerate(items):
            pictures = iter(item.images)
            doc = Document.of(*(p["text"] if p["type"] == "text" else next(pictures)
                                for p in item.prompt.parts))
            try:
                ids = codec.encode(doc, bos=True).ids.tolist()
                cfg = self.config.replace(mode=MODE_OF_OUTPUT[item.prompt.output], seed=item.seed)
                jobs.append((i, engine.submit(ids, cfg)))
            except ValueError as e:  # e.g. a prompt longer than the model's context
                out[i] = Generated([], "error", str(e))
        for (i, _), done in zip(jobs, engine.run([job for _, job in jobs])):
            parts: list[dict[str, Any]] = []
            for part in done.document.parts if done.document is not None else []:
                if isinstance(part, TextPart):
                    parts.append({"type": "text", "text": part.text})
                elif isinstance(part, ImagePart) and part.image is not None:
                    parts.append({"type": "image", "image": part.image})
            finish = "error" if done.reason == "error" else ("length" if done.reason != "stop" else "stop")
            out[i] = Generated(parts, finish, done.error)
        seconds = (time.monotonic() - started) / max(len(items), 1)  # one batch: time per answer
        for g in out:
            g.seconds = seconds
        return out


# -------------------------------------------------------------------------------------- endpoints


def _client(base_url: str, api_key: str | None, timeout: float):
    from openai import OpenAI

    return OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=2)


def _data_url(image: Image.Image) -> str:
    from chameleon_lm.data.sources.base import png_bytes

    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def _user_content(item: Item, suffix: str | None = None) -> list[dict[str, Any]]:
    pictures = iter(item.images)
    content = [{"type": "text", "text": p["text"]} if p["type"] == "text"
               else {"type": "image_url", "image_url": {"url": _data_url(next(pictures))}}
               for p in item.prompt.parts]
    if suffix:
        content.append({"type": "text", "text": suffix})
    return content


def _content_parts(content: Any) -> list[dict[str, Any]]:
    """An OpenAI message content (a string, or a list of text / image_url parts) as answer parts."""
    from chameleon_lm.data.sources.base import SkipSample, data_url_bytes

    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    parts = []
    for part in content:
        part = part if isinstance(part, dict) else part.model_dump()
        if part.get("type") == "text":
            parts.append({"type": "text", "text": part.get("text") or ""})
        elif part.get("type") == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            try:
                data = data_url_bytes(url, "an answer's image_url")
            except SkipSample as e:
                raise ValueError(f"{e.detail} (answers must carry images as data URLs)") from None
            parts.append({"type": "image", "image": Image.open(io.BytesIO(data)).convert("RGB")})
        else:
            raise ValueError(f"unknown content part type {part.get('type')!r} in the answer")
    return parts


def _parallel(items: list[Item], fn: Callable[[Item], Generated], concurrency: int) -> list[Generated]:
    def guarded(item: Item) -> Generated:
        t0 = time.monotonic()
        try:
            g = fn(item)
        except Exception as e:  # noqa: BLE001 - one failing request must not lose the others
            g = Generated([], "error", f"{type(e).__name__}: {e}")
        g.seconds = time.monotonic() - t0
        return g

    with concurrent.futures.ThreadPoolExecutor(max(1, concurrency)) as pool:
        return list(pool.map(guarded, items))


@dataclass
class EndpointAnswerer:
    """An OpenAI-compatible chat endpoint. ``extra_body`` is sent as is; with ``chameleon_modes`` the
    request also carries ``chameleon serve``'s ``mode`` for each prompt's expected output."""

    base_url: str
    model: str
    api_key: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    chameleon_modes: bool = False
    concurrency: int = 4
    timeout: float = 600.0
    kind: str = "endpoint"

    def settings(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "model": self.model, "temperature": self.temperature,
                "top_p": self.top_p, "max_tokens": self.max_tokens, "extra_body": self.extra_body,
                "chameleon_modes": self.chameleon_modes}

    def fingerprint(self) -> str:
        return f"endpoint:{self.model}"

    def _ask(self, client, item: Item, suffix: str | None = None) -> tuple[Any, str]:
        extra = dict(self.extra_body)
        if self.chameleon_modes:
            extra["mode"] = MODE_OF_OUTPUT[item.prompt.output]
        options = {k: v for k, v in (("temperature", self.temperature), ("top_p", self.top_p),
                                     ("max_tokens", self.max_tokens)) if v is not None}
        r = client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": _user_content(item, suffix)}],
            seed=item.seed, extra_body=extra or None, **options)
        choice = r.choices[0]
        return choice.message.content, "stop" if choice.finish_reason == "stop" else "length"

    def answer(self, items: list[Item]) -> list[Generated]:
        client = _client(self.base_url, self.api_key, self.timeout)

        def one(item: Item) -> Generated:
            content, finish = self._ask(client, item)
            return Generated(_content_parts(content), finish)

        return _parallel(items, one, self.concurrency)


@dataclass
class AugmentedAnswerer:
    """The paper's augmented baseline: ``text`` writes the answer with ``<caption>`` tags (the
    suffix is appended to every prompt), ``image_*`` draws each caption (OpenAI images API)."""

    text: EndpointAnswerer
    image_url: str
    image_model: str
    image_api_key: str | None = None
    image_size: str | None = None
    suffix: str = CAPTION_SUFFIX
    kind: str = "augmented"

    def settings(self) -> dict[str, Any]:
        return {"text": self.text.settings(), "image_url": self.image_url, "image_model": self.image_model,
                "image_size": self.image_size, "suffix": self.suffix}

    def fingerprint(self) -> str:
        return f"augmented:{self.text.model}+{self.image_model}"

    def answer(self, items: list[Item]) -> list[Generated]:
        text_client = _client(self.text.base_url, self.text.api_key, self.text.timeout)
        image_client = _client(self.image_url, self.image_api_key, self.text.timeout)

        def one(item: Item) -> Generated:
            content, finish = self.text._ask(text_client, item, self.suffix)
            text = "".join(p["text"] for p in _content_parts(content) if p["type"] == "text")
            return Generated(self._illustrate(image_client, text, item.seed), finish)

        return _parallel(items, one, self.text.concurrency)

    def _illustrate(self, client, text: str, seed: int) -> list[dict[str, Any]]:
        """The answer's parts: text between captions, each caption replaced by its image."""
        parts: list[dict[str, Any]] = []
        at = 0
        for m in _CAPTION.finditer(text):
            if text[at:m.start()].strip():
                parts.append({"type": "text", "text": text[at:m.start()]})
            caption = m.group(1).strip()
            options = {"size": self.image_size} if self.image_size else {}
            r = client.images.generate(model=self.image_model, prompt=caption, n=1,
                                       response_format="b64_json", extra_body={"seed": seed}, **options)
            if not r.data or not r.data[0].b64_json:
                raise ValueError(f"the image endpoint returned no image for caption {caption!r}")
            image = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).convert("RGB")
            parts.append({"type": "image", "image": image, "caption": caption})
            at = m.end()
        if text[at:].strip():
            parts.append({"type": "text", "text": text[at:]})
        return parts


# ------------------------------------------------------------------------------------------ runner


def run_generation(store: ResultStore, prompts: PromptSet, answerer: Answerer, run: str, *,
                   seed: int = 0, samples: int = 1, limit: int | None = None, batch: int = 64,
                   retry_errors: bool = False, log: Callable[[str], None] | None = print) -> dict:
    """Answer every (prompt, sample) the store lacks for ``run``; each answer is stored as it comes.

    Returns counts: ``answered`` now, ``kept`` (already stored), ``errors`` now.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    store.add_prompts(prompts)
    store.start_run(Run(run, answerer.kind, {**answerer.settings(), "seed": seed, "samples": samples},
                        answerer.fingerprint(), versions()))
    chosen = {p.id for p in list(prompts)[:limit]}
    stored = store.prompts()
    if len(stored) >= SEED_STRIDE:
        raise ValueError(f"prompt sets of {SEED_STRIDE} or more prompts need another seed scheme")
    position = {p.id: i for i, p in enumerate(stored)}
    todo, kept = [], 0
    for p in stored:
        if p.id not in chosen:
            continue
        for s in range(samples):
            done = store.has_answer(run, p.id, s)
            if done and (not retry_errors or store.answer(run, p.id, s).finish != "error"):
                kept += 1
                continue
            todo.append((p, s))
    by_id = {p.id: p for p in prompts}
    answered = errors = 0
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        items = [Item(p, prompts.images(by_id[p.id]), s, seed + position[p.id] + s * SEED_STRIDE)
                 for p, s in chunk]
        for item, g in zip(items, answerer.answer(items)):
            parts = [{k: v for k, v in x.items() if k != "image"} | {"sha": store.put_image(x["image"])}
                     if x["type"] == "image" else x for x in g.parts]
            store.put_answer(Answer(run, item.prompt.id, parts, item.sample, item.seed, g.finish,
                                    g.error, g.seconds))
            answered += 1
            errors += g.finish == "error"
        if log:
            log(f"{run}: {kept + answered}/{kept + len(todo)} answers stored ({errors} errors)")
    return {"answered": answered, "kept": kept, "errors": errors}
