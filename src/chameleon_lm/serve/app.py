"""``chameleon serve``: the engine behind an OpenAI-compatible HTTP API, with a web viewer.

One :class:`~chameleon_lm.generation.engine.Engine` runs in its own thread; each request submits a job
whose events cross into the event loop through an ``asyncio.Queue``. Image tokenization (requests'
images) and VQ decoding (answers' images and previews) run in a small thread pool, so neither the event
loop nor the batch waits on them. A request whose client goes away is cancelled, which frees its rows
at the next step.

Endpoints: ``POST /v1/chat/completions`` (streaming or not), ``POST /v1/images/generations``,
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus), ``GET /`` (the viewer).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import io
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from prometheus_client import (
    CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest,
)
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from chameleon_lm.data.sources.base import ImageRef, SkipSample, data_url_bytes, load_image, png_bytes
from chameleon_lm.documents import DocumentCodec
from chameleon_lm.generation.engine import Done, Engine, ImageComplete, ImageProgress, Job, TextDelta
from chameleon_lm.generation.sampling import GenerationConfig
from chameleon_lm.model import Chameleon
from chameleon_lm.serve.worker import EngineProcess, freeze_heap
from chameleon_lm.serve.openai import (
    ApiError, ChatRequest, CompletionRequest, ImagesRequest, Message, finish_reason, generation_config, image_part, image_urls,
    message_turns, png_data_url, prompt_ids,
)
from chameleon_lm.tokenizers.images import ImageError, open_image
from chameleon_lm.utils.config import Config

log = logging.getLogger("chameleon_lm.serve")


@dataclass
class ServeConfig(Config):
    """Limits and options of the server (``chameleon serve`` flags)."""

    model_name: str = "chameleon"
    max_batch: int = 32
    """Requests decoded together (an image or interleaved request takes three rows of the batch)."""
    max_concurrent: int = 128
    """Requests in flight (decoding or waiting for a place in the batch); beyond it: 429."""
    max_prompt_tokens: int | None = None
    """Default: the model's ``max_seq_len``."""
    max_new_tokens: int = 4096
    """The largest ``max_tokens`` a request may ask for."""
    default_max_tokens: int = 1024
    max_images: int = 8
    """Images per request."""
    max_image_bytes: int = 16 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_body_bytes: int = 64 * 2**20
    request_timeout_s: float = 600.0
    """Wall-clock limit per request; the answer so far is returned (``finish_reason`` "length")."""
    api_keys: list[str] = field(default_factory=list)
    """Accepted ``Authorization: Bearer`` keys for ``/v1/*``; empty = no authentication."""
    allow_remote_images: bool = False
    """Fetch http(s) ``image_url`` parts (off: only ``data:`` URLs are accepted)."""
    prompt_format: str = "raw"
    """Default prompt layout (``serve.openai.PROMPT_FORMATS``), per request ``prompt_format``."""
    image_workers: int = 1
    engine_process: bool = True
    """Run the engine in a child process (``serve/worker.py``); False: a thread of this process."""
    threads: int | None = None
    """Torch threads of the engine process (default: torch's)."""
    compile: bool = False
    """Decode with one ``torch.compile`` graph per step (``Engine(compile=True)``; compiles at start)."""

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_concurrent < 1:
            raise ValueError("max_batch and max_concurrent must be >= 1")
        if self.prompt_format not in ("raw", "chat"):
            raise ValueError(f"prompt_format must be 'raw' or 'chat', got {self.prompt_format!r}")


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("chameleon_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.tokens = Counter("chameleon_generated_tokens", "Generated tokens", ["modality"], registry=r)
        self.images = Counter("chameleon_generated_images", "Generated images", registry=r)
        self.ttft = Histogram("chameleon_time_to_first_token_seconds", "Time to the first token",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.duration = Histogram("chameleon_request_duration_seconds", "Generation time per request",
                                  buckets=(.1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r)
        self.running = Gauge("chameleon_running_requests", "Requests in the batch", registry=r)
        self.waiting = Gauge("chameleon_waiting_requests", "Requests waiting for the batch", registry=r)
        self.rows = Gauge("chameleon_batch_rows", "Rows in the batch", registry=r)
        self.inflight = Gauge("chameleon_inflight_requests", "Requests being handled", registry=r)


class Server:
    """The state behind the app: engine, limits, metrics, thread pool."""

    def __init__(self, model: Chameleon, codec: DocumentCodec, config: ServeConfig):
        self.model, self.codec, self.config = model, codec, config
        if config.engine_process:
            self.engine = EngineProcess(model, codec, max_rows=3 * config.max_batch, threads=config.threads,
                                        compile=config.compile)
        else:
            self.engine = Engine(model, codec.vocab, codec=codec, max_rows=3 * config.max_batch,
                                 decode_images=False, compile=config.compile)
        self.max_prompt_tokens = min(config.max_prompt_tokens or model.config.max_seq_len,
                                     model.config.max_seq_len)
        self.pool = concurrent.futures.ThreadPoolExecutor(config.image_workers, "chameleon-images")
        self.metrics = _Metrics()
        self.inflight = 0
        self.bridge: _Bridge | None = None
        decoder = codec.image
        self.can_decode = decoder is not None and getattr(decoder, "can_decode", True)
        self.image_size = getattr(decoder, "resolution", None) if decoder is not None else None

    # ----------------------------------------------------------------------------- images

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _open(self, where: str, url: str) -> Image.Image:
        c = self.config
        if url.startswith("data:"):
            try:
                data = data_url_bytes(url, where)
            except SkipSample as e:
                raise ApiError(400, str(e), param=where) from None
        elif url.startswith(("http://", "https://")):
            if not c.allow_remote_images:
                raise ApiError(400, f"{where}: http(s) image URLs are refused by this server (send a "
                                    "data: URL, or start it with --allow-remote-images)", param=where)
            try:
                data = png_bytes(load_image(ImageRef(url=url), allow_remote=True))
            except ImageError as e:
                raise ApiError(400, f"{where}: {e}", param=where) from None
        else:
            raise ApiError(400, f"{where}: an image_url must be a data: URL", param=where)
        if len(data) > c.max_image_bytes:
            raise ApiError(413, f"{where}: {len(data)} bytes > the limit of {c.max_image_bytes}",
                           param=where, code="image_too_large")
        try:
            with Image.open(io.BytesIO(data)) as probe:  # reads the header only
                w, h = probe.size
        except Exception as e:  # noqa: BLE001 - PIL raises many types on garbage
            raise ApiError(400, f"{where}: not a readable image ({type(e).__name__})", param=where) from None
        if w * h > c.max_image_pixels:
            raise ApiError(413, f"{where}: {w}x{h} pixels > the limit of {c.max_image_pixels}",
                           param=where, code="image_too_large")
        try:
            return open_image(data)
        except ImageError as e:
            raise ApiError(400, f"{where}: {e}", param=where) from None

    def _prompt(self, req: ChatRequest) -> list[int]:
        """Decode and tokenize the request's images and text (in the thread pool)."""
        urls = image_urls(req.messages)
        if len(urls) > self.config.max_images:
            raise ApiError(400, f"{len(urls)} images > the limit of {self.config.max_images} per request",
                           param="messages")
        if urls and self.codec.image is None:
            raise ApiError(400, "this model has no image tokenizer: send text only", param="messages")
        images = [self._open(where, url) for where, url in urls]
        turns = message_turns(req.messages, images)
        return prompt_ids(self.codec, turns, req.prompt_format or self.config.prompt_format)

    def _decode(self, codes: torch.Tensor, done: int | None = None) -> str:
        """A PNG data URL of the codes; with ``done``, a preview: codes after it are not yet sampled."""
        n = codes.numel() if done is None else self.codec.image_seq_len
        full = torch.zeros(n, dtype=torch.long)
        full[: codes.numel()] = codes
        image = self.codec.image.decode(full[None])[0]
        if done is not None:
            side = round(n ** 0.5)
            top = image.height * (done // side) // side
            image.paste((128, 128, 128), (0, top, image.width, image.height))
        return png_data_url(image)

    # ----------------------------------------------------------------------------- requests

    def _bridge(self) -> _Bridge:
        loop = asyncio.get_running_loop()
        if self.bridge is None or self.bridge.loop is not loop:
            self.bridge = _Bridge(loop)
        return self.bridge

    def admit(self) -> None:
        if self.inflight >= self.config.max_concurrent:
            raise ApiError(429, f"the server is handling {self.inflight} requests (its limit): retry "
                                "later", type="rate_limit_error", code="too_many_requests")

    def submit(self, ids: list[int], config: GenerationConfig) -> tuple[Job, asyncio.Queue]:
        if len(ids) > self.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the limit is {self.max_prompt_tokens}",
                           param="messages", code="context_length_exceeded")
        queue: asyncio.Queue = asyncio.Queue()
        bridge = self._bridge()
        try:
            job = self.engine.submit(ids, config, sink=lambda event: bridge.put(queue, event),
                                     timeout=self.config.request_timeout_s)
        except ValueError as e:
            raise ApiError(400, str(e), code="context_length_exceeded") from None
        except RuntimeError as e:  # the engine process is gone
            raise ApiError(503, str(e), type="server_error") from None
        return job, queue

    async def start(self, req: ChatRequest | CompletionRequest, prompt: ChatRequest) -> tuple[Job, asyncio.Queue]:
        """Admit a generation request and submit it; it counts as in flight until its answer ends."""
        self.admit()
        self.inflight += 1
        try:
            config = self.chat_config(req)
            ids = await self._run(self._prompt, prompt)
            return self.submit(ids, config)
        except BaseException:
            self.inflight -= 1
            raise

    def max_tokens(self, req: ChatRequest | CompletionRequest) -> int:
        n = getattr(req, "max_completion_tokens", None) or req.max_tokens or min(self.config.default_max_tokens,
                                                               self.config.max_new_tokens)
        if n > self.config.max_new_tokens:
            raise ApiError(400, f"max_tokens {n} > the limit of {self.config.max_new_tokens}",
                           param="max_tokens")
        return n

    def chat_config(self, req: ChatRequest | CompletionRequest) -> GenerationConfig:
        if req.stop:
            raise ApiError(400, "stop sequences are not supported", param="stop")
        if getattr(req, "echo", False):
            raise ApiError(400, "echo is not supported", param="echo")
        mode = getattr(req, "mode", "text")
        if mode != "text" and not self.can_decode:
            raise ApiError(400, f"mode {mode!r} needs an image decoder, which this model lacks",
                           param="mode")
        max_new = self.max_tokens(req)
        min_new = max_new if req.ignore_eos else min(req.min_tokens, max_new)
        config = generation_config(req, mode=mode, max_new_tokens=max_new, min_new_tokens=min_new,
                                   repetition_penalty=req.repetition_penalty, seed=req.seed)
        return config.replace(progress_every=getattr(req, "image_previews", 0) or 64)

    async def events(self, job: Job, queue: asyncio.Queue, request: Request, poll: bool = True
                     ) -> AsyncIterator:
        """The job's events, text deltas that arrived together merged into one; the job is cancelled
        if the client goes away or the consumer stops. ``poll=False`` for a streamed response, which
        Starlette closes itself when the client disconnects."""
        watcher = asyncio.ensure_future(self._watch(queue, request, poll))
        try:
            while True:
                event = await queue.get()
                if event is _GONE:
                    return
                while isinstance(event, TextDelta) and not queue.empty() and \
                        isinstance(queue._queue[0], TextDelta):  # a consumer behind the engine catches up
                    event = TextDelta(event.text + queue.get_nowait().text)
                yield event
                if isinstance(event, Done):
                    return
        finally:
            watcher.cancel()
            job.cancel()

    async def _watch(self, queue: asyncio.Queue, request: Request, poll: bool) -> None:
        """Ends the event stream when the client disconnects, or when the engine never answers."""
        give_up = time.monotonic() + self.config.request_timeout_s + 30
        while True:
            await asyncio.sleep(0.1 if poll else give_up - time.monotonic())
            if poll and await request.is_disconnected():
                queue.put_nowait(_GONE)
                return
            if time.monotonic() > give_up:
                queue.put_nowait(Done([], None, "error", 0, "the engine did not finish the request"))
                return

    def count(self, done: Done, mode: str) -> None:
        m = self.metrics
        n_images = len(done.document.images) if done.document is not None else 0
        codes = n_images * self.codec.image_seq_len
        m.tokens.labels("image").inc(codes)
        m.tokens.labels("text").inc(max(len(done.ids) - codes - 2 * n_images, 0))
        m.images.inc(n_images)


_GONE = object()
"""Queued when the client has gone away."""


class _Bridge:
    """Events from the engine thread into the event loop's queues: one wake-up per burst (a step
    emits an event for every running request), not one per event."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, object]] = []

    def put(self, queue: asyncio.Queue, event: object) -> None:
        with self.lock:
            self.pending.append((queue, event))
            if len(self.pending) > 1:
                return  # a flush is already scheduled
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self.lock:
            items, self.pending = self.pending, []
        for queue, event in items:
            queue.put_nowait(event)


class _AsgiMiddleware:
    """``handler(scope, receive, send, call_next)`` around the app, for HTTP requests."""

    def __init__(self, app, handler):
        self.app, self.handler = app, handler

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        await self.handler(scope, receive, send, self.app)


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(model: Chameleon, codec: DocumentCodec, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``model`` (its engine thread runs while the app does)."""
    config = config or ServeConfig()
    server = Server(model, codec, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(server.engine.start)
        freeze_heap()
        try:
            yield
        finally:
            server.engine.stop()
            server.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="chameleon-lm", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible serving of Chameleon-family mixed-modal models.")
    app.state.server = server

    # --------------------------------------------------------------------------- errors & guards

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        problems = e.errors()
        first = problems[0] if problems else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        message = "; ".join(f"{'.'.join(str(x) for x in p.get('loc', ()) if x != 'body')}: {p.get('msg')}"
                            for p in problems[:5]) or "invalid request"
        return error_response(ApiError(400, message, param=where))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return error_response(ApiError(500, f"internal error: {type(e).__name__}", type="server_error"))

    async def guard(scope, receive, send, call_next):
        # a plain ASGI middleware: Starlette's BaseHTTPMiddleware adds a task hop to every SSE chunk
        path = scope["path"]
        endpoint = path if path in KNOWN_PATHS else "other"
        status = 500
        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            headers = Headers(scope=scope)
            if path.startswith("/v1/") and config.api_keys:
                header = headers.get("authorization", "")
                key = header[7:] if header.lower().startswith("bearer ") else ""
                if not any(hmac.compare_digest(key.encode(), k.encode()) for k in config.api_keys):
                    raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)",
                                   type="authentication_error", code="invalid_api_key")
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
                raise ApiError(413, f"the request body is larger than {config.max_body_bytes} bytes",
                               code="request_too_large")
        except ApiError as e:
            await error_response(e)(scope, receive, sending)
        else:
            await call_next(scope, receive, sending)
        finally:
            server.metrics.requests.labels(endpoint, str(status)).inc()

    app.add_middleware(_AsgiMiddleware, handler=guard)

    # --------------------------------------------------------------------------- endpoints

    @app.get("/", include_in_schema=False)
    async def viewer() -> HTMLResponse:
        page = resources.files("chameleon_lm").joinpath("serve", "static", "index.html").read_text()
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        if not getattr(server.engine, "alive", True):
            return JSONResponse({"status": "error", "model": config.model_name,
                                 "error": server.engine.dead}, status_code=503)
        return {"status": "ok", "model": config.model_name, **server.engine.stats()}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        stats, m = server.engine.stats(), server.metrics
        m.running.set(stats["running"])
        m.waiting.set(stats["waiting"])
        m.rows.set(stats["rows"])
        m.inflight.set(server.inflight)
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "chameleon-lm"}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatRequest, request: Request):
        job, queue = await server.start(req, req)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": config.model_name}
        if req.stream:
            return _sse_response(_stream_chat(server, job, queue, request, meta, req, _usage_wanted(req)))
        try:
            return await _collect_chat(server, job, queue, request, meta, req)
        finally:
            server.inflight -= 1

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request):
        chat_like = ChatRequest(messages=[Message(role="user", content=req.prompt)], prompt_format="raw")
        job, queue = await server.start(req, chat_like)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": config.model_name}
        if req.stream:
            return _sse_response(_stream_completion(server, job, queue, request, meta, _usage_wanted(req)))
        try:
            text, done = "", None
            async for event in server.events(job, queue, request):
                if isinstance(event, TextDelta):
                    text += event.text
                elif isinstance(event, Done):
                    done = event
            _check_finished(done)
            server.count(done, "text")
            return {**meta, "object": "text_completion", "usage": _usage(done),
                    "choices": [{"index": 0, "text": text, "finish_reason": finish_reason(done.reason),
                                 "logprobs": None}]}
        finally:
            server.inflight -= 1

    @app.post("/v1/images/generations", response_model=None)
    async def images(req: ImagesRequest, request: Request):
        server.admit()
        if not server.can_decode:
            raise ApiError(400, "this model has no image decoder", param="model")
        if req.response_format != "b64_json":
            raise ApiError(400, "only response_format 'b64_json' is supported", param="response_format")
        if req.size is not None and server.image_size is not None and \
                req.size != f"{server.image_size}x{server.image_size}":
            raise ApiError(400, f"size must be {server.image_size}x{server.image_size}", param="size")
        server.inflight += 1
        try:
            chat_like = ChatRequest(messages=[Message(role="user", content=req.prompt)],
                                    prompt_format=req.prompt_format)
            ids = await server._run(server._prompt, chat_like)
            seed = req.seed if req.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little")
            jobs = []
            for i in range(req.n):
                gen_config = generation_config(req, mode="image", max_new_tokens=1, seed=seed + i)
                jobs.append(server.submit(ids, gen_config))
            started = time.monotonic()
            finals = []
            for job, queue in jobs:
                async for event in server.events(job, queue, request):
                    if isinstance(event, Done):
                        finals.append(event)
            for job, _ in jobs:
                job.cancel()
            if len(finals) < len(jobs):
                raise ApiError(499, "client closed the request", code="cancelled")
            failed = [d for d in finals if d.reason != "stop"]
            if failed:
                raise ApiError(503 if failed[0].reason == "error" else 504,
                               f"image generation ended early ({failed[0].reason})",
                               type="server_error")
            data = []
            for done in finals:
                server.count(done, "image")
                url = await server._run(server._decode, done.document.images[0].codes)
                data.append({"b64_json": url.split(",", 1)[1]})
            server.metrics.duration.observe(time.monotonic() - started)
            return {"created": int(time.time()), "data": data}
        finally:
            server.inflight -= 1

    return app


KNOWN_PATHS = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
               "/v1/images/generations")


def _check_finished(done: Done | None) -> None:
    """A non-streamed answer needs its Done, without an engine error."""
    if done is None:
        raise ApiError(499, "client closed the request", code="cancelled")
    if done.reason == "error":
        raise ApiError(503, f"generation failed: {done.error}", type="server_error")


def _usage_wanted(req: ChatRequest | CompletionRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def _sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _usage(done: Done) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": len(done.ids),
            "total_tokens": done.prompt_tokens + len(done.ids)}


async def _collect_chat(server: Server, job: Job, queue: asyncio.Queue, request: Request,
                        meta: dict, req: ChatRequest) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    done: Done | None = None
    started, first = time.monotonic(), None
    async for event in server.events(job, queue, request):
        if first is None and isinstance(event, (TextDelta, ImageProgress, ImageComplete)):
            first = time.monotonic() - started
        if isinstance(event, TextDelta):
            if parts and parts[-1]["type"] == "text":
                parts[-1]["text"] += event.text
            else:
                parts.append({"type": "text", "text": event.text})
        elif isinstance(event, ImageComplete):
            parts.append(image_part(await server._run(server._decode, event.codes)))
        elif isinstance(event, Done):
            done = event
    _check_finished(done)
    server.count(done, req.mode)
    server.metrics.duration.observe(time.monotonic() - started)
    if first is not None:
        server.metrics.ttft.observe(first)
    content: str | list = parts
    if req.mode == "text":
        content = "".join(p["text"] for p in parts)
    return {**meta, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": finish_reason(done.reason), "logprobs": None}],
            "usage": _usage(done)}


async def _stream_chat(server: Server, job: Job, queue: asyncio.Queue, request: Request, meta: dict,
                       req: ChatRequest, include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        return _sse({**meta, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

    started, first = time.monotonic(), None
    preview: asyncio.Future | None = None
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for event in server.events(job, queue, request, poll=False):
            if first is None and isinstance(event, (TextDelta, ImageProgress, ImageComplete)):
                first = time.monotonic() - started
                server.metrics.ttft.observe(first)
            if isinstance(event, TextDelta):
                yield chunk({"content": event.text})
            elif isinstance(event, ImageProgress):
                progress = {"index": event.index, "done": event.done, "total": event.total}
                if req.image_previews and event.done < event.total and event.codes is not None \
                        and (preview is None or preview.done()):
                    preview = asyncio.ensure_future(server._run(server._decode, event.codes, event.done))
                    progress["preview"] = await preview
                yield chunk({}, image_progress=progress)
            elif isinstance(event, ImageComplete):
                yield chunk({"content": [image_part(await server._run(server._decode, event.codes))]})
            elif isinstance(event, Done):
                if event.reason == "error":
                    yield _sse(ApiError(503, f"generation failed: {event.error}", type="server_error").body())
                    yield _sse("[DONE]")
                    return
                server.count(event, req.mode)
                server.metrics.duration.observe(time.monotonic() - started)
                yield chunk({}, finish_reason(event.reason))
                if include_usage:
                    yield _sse({**meta, "object": "chat.completion.chunk", "choices": [],
                                "usage": _usage(event)})
                yield _sse("[DONE]")
    finally:
        job.cancel()
        server.inflight -= 1


async def _stream_completion(server: Server, job: Job, queue: asyncio.Queue, request: Request, meta: dict,
                             include_usage: bool) -> AsyncIterator[str]:
    def chunk(text: str, finish: str | None = None) -> str:
        return _sse({**meta, "object": "text_completion",
                     "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]})

    started, first = time.monotonic(), None
    try:
        async for event in server.events(job, queue, request, poll=False):
            if isinstance(event, TextDelta):
                if first is None:
                    first = time.monotonic() - started
                    server.metrics.ttft.observe(first)
                yield chunk(event.text)
            elif isinstance(event, Done):
                if event.reason == "error":
                    yield _sse(ApiError(503, f"generation failed: {event.error}", type="server_error").body())
                else:
                    server.count(event, "text")
                    server.metrics.duration.observe(time.monotonic() - started)
                    yield chunk("", finish_reason(event.reason))
                    if include_usage:
                        yield _sse({**meta, "object": "text_completion", "choices": [], "usage": _usage(event)})
                yield _sse("[DONE]")
    finally:
        job.cancel()
        server.inflight -= 1
