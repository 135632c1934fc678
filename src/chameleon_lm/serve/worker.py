"""The engine in a process of its own, so the HTTP side and the decoding loop never share a GIL.

The engine steps hundreds of small torch calls per token, each releasing and retaking the GIL; in one
process, the event loop's work (SSE chunks for every running request) wedges itself between them and
slows every step (vLLM splits its API server and engine core for the same reason). The child process
runs a single-threaded loop: take the commands that arrived (submit, cancel, stop), step, send the
step's events as one message. The model reaches the child through ``torch.multiprocessing`` (shared
memory: the weights are not copied); its CPU weights are packed there.

Events cross the pipe as plain tuples and are rebuilt here, so a step's message stays small.
"""

from __future__ import annotations

import gc
import itertools
import threading
import traceback
from typing import Any

import torch
import torch.multiprocessing as mp

from chameleon_lm.documents import DocumentCodec
from chameleon_lm.generation.engine import (
    Done, Engine, Event, ImageComplete, ImageProgress, Sink, TextDelta, plan_request,
)
from chameleon_lm.generation.sampling import GenerationConfig
from chameleon_lm.model import Chameleon


def freeze_heap() -> None:
    """Move every object alive after start-up out of the collector's sight (``gc.freeze``, as vLLM
    does). A full collection walks torch's and the model's ~300k objects for ~200 ms; a burst of
    requests triggered one in the server process, stalling every stream. Called in both processes."""
    gc.collect()
    gc.freeze()


def _pack_event(event: Event) -> tuple:
    if isinstance(event, TextDelta):
        return ("text", event.text)
    if isinstance(event, ImageProgress):
        return ("progress", event.done, event.total, event.index,
                None if event.codes is None else event.codes.tolist())
    if isinstance(event, ImageComplete):
        return ("image", event.codes.tolist(), event.index)
    return ("done", event.ids, event.reason, event.prompt_tokens, event.error)


def _child(conn, model: Chameleon, codec: DocumentCodec, engine_kwargs: dict[str, Any], threads: int | None
           ) -> None:
    if threads:
        torch.set_num_threads(threads)
    engine = Engine(model, codec.vocab, codec=codec, decode_images=False, **engine_kwargs)
    freeze_heap()
    outbox: list[tuple[int, tuple]] = []
    jobs = {}

    def ship(always: bool = False) -> None:
        if outbox or always:
            for key, event in outbox:
                if event[0] == "done":
                    jobs.pop(key, None)
            conn.send(("events", outbox, engine.stats()))  # pickled here: the list can be reused
            outbox.clear()

    engine.on_sampled = ship  # a step's tokens go out before its model call, not after it
    conn.send(("ready", engine.stats()))
    while True:
        while conn.poll(0 if engine.busy else None):
            msg = conn.recv()
            if msg[0] == "submit":
                _, key, ids, config, timeout = msg
                try:
                    jobs[key] = engine.submit(ids, GenerationConfig.from_dict(config),
                                              sink=lambda e, key=key: outbox.append((key, _pack_event(e))),
                                              timeout=timeout)
                except ValueError as e:
                    outbox.append((key, ("done", [], "error", 0, str(e))))
            elif msg[0] == "cancel" and msg[1] in jobs:
                jobs[msg[1]].cancel()
            elif msg[0] == "stop":
                return
        try:
            engine.step()
        except Exception as e:  # noqa: BLE001 - as Engine._loop: fail the running jobs, keep serving
            traceback.print_exc()
            engine._fail_all(f"{type(e).__name__}: {e}")
        ship(always=True)  # the stats, at least


class RemoteJob:
    """The parent's handle on a job in the child: ``cancel()`` is all a caller needs."""

    def __init__(self, engine: EngineProcess, key: int):
        self.engine, self.key = engine, key

    def cancel(self) -> None:
        self.engine._send(("cancel", self.key))


class EngineProcess:
    """An :class:`~chameleon_lm.generation.engine.Engine` in a child process, with the same
    ``submit`` / ``stats`` / ``start`` / ``stop`` as the in-process one (events reach each sink from a
    reader thread here)."""

    def __init__(self, model: Chameleon, codec: DocumentCodec, *, threads: int | None = None,
                 **engine_kwargs):
        self.model, self.codec, self.engine_kwargs, self.threads = model, codec, engine_kwargs, threads
        self.vocab = codec.vocab
        self.image_seq_len = engine_kwargs.get("image_seq_len") or codec.image_seq_len
        self.max_seq_len = min(engine_kwargs.get("max_seq_len") or model.config.max_seq_len,
                               model.config.max_seq_len)
        self.max_rows = engine_kwargs.get("max_rows", 32)
        self.sinks: dict[int, Sink] = {}
        self.keys = itertools.count()
        self.lock = threading.Lock()
        self.latest: dict[str, int] = {}
        self.dead: str | None = None
        self.proc = None

    def start(self, timeout: float = 300.0) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child, name="chameleon-engine", daemon=True,
                                args=(child, self.model, self.codec, self.engine_kwargs, self.threads))
        self.proc.start()
        child.close()
        if not self.conn.poll(timeout):
            raise RuntimeError("the engine process did not start")
        kind, self.latest = self.conn.recv()
        self.reader = threading.Thread(target=self._read, name="chameleon-engine-reader", daemon=True)
        self.reader.start()

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self._send(("stop",))
        except (OSError, RuntimeError):
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc = None

    def submit(self, prompt: list[int], config: GenerationConfig, sink: Sink | None = None,
               timeout: float | None = None) -> RemoteJob:
        """Validated here (``ValueError`` at once, like ``Engine.submit``), then sent to the child."""
        ids = [int(t) for t in prompt]
        plan_request(self.vocab, ids, config, self.image_seq_len, self.max_seq_len)
        if (1 if config.mode == "text" else 3) > self.max_rows:
            raise ValueError(f"a {config.mode} request needs 3 rows; the engine has {self.max_rows}")
        key = next(self.keys)
        self.sinks[key] = sink or (lambda event: None)
        self._send(("submit", key, ids, config.to_dict(), timeout))
        return RemoteJob(self, key)

    def stats(self) -> dict[str, int]:
        return dict(self.latest)

    @property
    def alive(self) -> bool:
        return self.dead is None

    def _send(self, msg: tuple) -> None:
        if self.dead is not None:
            raise RuntimeError(f"the engine process is gone ({self.dead})")
        with self.lock:
            self.conn.send(msg)

    def _read(self) -> None:
        while True:
            try:
                kind, events, self.latest = self.conn.recv()
            except (EOFError, OSError) as e:
                self.dead = f"{type(e).__name__}: the engine process exited"
                for key in list(self.sinks):
                    self._deliver(key, ("done", [], "error", 0, self.dead))
                return
            for key, event in events:
                self._deliver(key, event)

    def _deliver(self, key: int, event: tuple) -> None:
        sink = self.sinks.get(key)
        if sink is None:
            return
        kind = event[0]
        if kind == "text":
            sink(TextDelta(event[1]))
        elif kind == "progress":
            codes = None if event[4] is None else torch.tensor(event[4])
            sink(ImageProgress(event[1], event[2], event[3], codes))
        elif kind == "image":
            sink(ImageComplete(torch.tensor(event[1]), None, event[2]))
        else:
            _, ids, reason, prompt_tokens, error = event
            document = None
            try:
                document = self.codec.decode(ids, decode_images=False) if ids else None
            except ValueError as e:
                reason, error = "error", str(e)
            del self.sinks[key]
            sink(Done(ids, document, reason, prompt_tokens, error))

