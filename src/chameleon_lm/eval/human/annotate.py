"""``chameleon eval annotate``: the Chameleon paper's human evaluation as a served page.

Two tasks. *absolute*: an annotator sees a prompt and one answer and says whether the answer
fulfils the task (``fulfills`` / ``partially`` / ``does_not``). *relative*: the prompt and two runs'
answers side by side, labelled only "Answer 1" / "Answer 2" in an order drawn per annotator; the
choice is ``first`` / ``tie`` / ``second`` better, and the judgment's ``first`` names the run shown
first so the choice can be un-blinded. Several annotators judge each item.

Everything lives in the results store (``eval/store.py``): a restarted server continues where each
annotator stopped. The page never sees a run name: items go by an opaque key.

Routes: ``GET /`` (the page), ``GET /api/next?annotator=NAME``, ``POST /api/judge``,
``GET /api/progress``, ``GET /blob/{sha}``. With a token, every route needs ``?token=T`` or
``Authorization: Bearer T``.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from chameleon_lm.eval.metrics.agreement import CHOICES, FULFILMENT
from chameleon_lm.eval.store import ResultStore

log = logging.getLogger("chameleon_lm.eval.annotate")

TASKS: tuple[str, ...] = ("absolute", "relative")
LABELS: dict[str, str] = {
    "fulfills": "Fulfills the task", "partially": "Partially fulfills", "does_not": "Does not fulfill",
    "first": "Answer 1 is better", "tie": "About the same", "second": "Answer 2 is better",
}
VALUES: dict[str, tuple[str, ...]] = {"absolute": tuple(FULFILMENT), "relative": tuple(CHOICES)}
ANNOTATOR = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SHA = re.compile(r"[0-9a-f]{64}")
MAX_BODY_BYTES = 64 * 1024
TOKEN_ENV = "CHAMELEON_ANNOTATE_TOKEN"


def _digest(*parts: Any) -> bytes:
    return hashlib.sha256(json.dumps(["chameleon-annotate/1", *parts]).encode()).digest()


@dataclass(frozen=True)
class Item:
    """One thing to judge: an answer (absolute, ``run_b`` empty) or a pair of answers (relative)."""

    task: str
    prompt: str
    sample: int
    run_a: str
    run_b: str
    key: str
    """Opaque: a hash, so the page cannot tell runs apart by it."""

    @property
    def ident(self) -> tuple[str, str, int, str, str]:
        return self.task, self.prompt, self.sample, self.run_a, self.run_b


@dataclass
class Round:
    """What a round of annotation covers and how it is dealt out."""

    runs: list[str]
    """Runs judged one by one (absolute task)."""
    compare: list[str] = field(default_factory=list)
    """Pairs ``"A:B"`` judged side by side (relative task); empty: the first run against each other
    run (the paper's design: the model against each baseline)."""
    tasks: tuple[str, ...] = TASKS
    annotators_per_item: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.runs, str) or isinstance(self.compare, str) or isinstance(self.tasks, str):
            raise TypeError("runs, compare and tasks are lists of strings, not a string")
        self.runs, self.compare, self.tasks = list(self.runs), list(self.compare), tuple(self.tasks)
        if not self.tasks or any(t not in TASKS for t in self.tasks) or len(set(self.tasks)) < len(
                self.tasks):
            raise ValueError(f"tasks must be distinct values of {TASKS}, got {list(self.tasks)}")
        if isinstance(self.annotators_per_item, bool) or not isinstance(
                self.annotators_per_item, int) or self.annotators_per_item < 1:
            raise ValueError(f"annotators_per_item must be an integer >= 1, got "
                             f"{self.annotators_per_item!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an integer, got {self.seed!r}")
        if not self.runs or any(not isinstance(r, str) or not r for r in self.runs):
            raise ValueError(f"runs must be non-empty run names, got {self.runs!r}")
        if len(set(self.runs)) < len(self.runs):
            raise ValueError(f"a run is listed twice in {self.runs}")
        for pair in self.compare:
            if not isinstance(pair, str) or ":" not in pair:
                raise ValueError(f"compare {pair!r}: write a pair as RUN_A:RUN_B")
        if "relative" in self.tasks and not self.compare and len(self.runs) < 2:
            raise ValueError("the relative task needs two runs: list two runs or give compare A:B")

    def pairs(self, known: set[str]) -> list[tuple[str, str]]:
        """The compared (A, B) runs; a name with ':' in it is split where both sides are runs."""
        if not self.compare:
            return [(self.runs[0], other) for other in self.runs[1:]]
        pairs: list[tuple[str, str]] = []
        for text in self.compare:
            cuts = [(text[:i], text[i + 1:]) for i, c in enumerate(text) if c == ":"]
            found = [(a, b) for a, b in cuts if a in known and b in known]
            if len(found) != 1:
                a, b = cuts[0]
                missing = [r for r in (a, b) if r not in known] if not found else []
                raise ValueError(f"compare {text!r}: " + (
                    f"unknown run(s) {missing}; the store has {sorted(known)}" if missing
                    else "ambiguous split (run names contain ':')"))
            a, b = found[0]
            if a == b:
                raise ValueError(f"compare {text!r}: a run against itself")
            if (a, b) in pairs or (b, a) in pairs:
                raise ValueError(f"compare {text!r}: this pair is listed twice")
            pairs.append((a, b))
        return pairs

    def items(self, store: ResultStore) -> list[Item]:
        """Every item: per task, each prompt (in store order) answered (sample 0) by its runs."""
        known = {r.name for r in store.runs()}
        unknown = [r for r in self.runs if r not in known]
        if unknown:
            raise ValueError(f"unknown run(s) {unknown}: {store.path} has {sorted(known) or 'none'}")
        pairs = self.pairs(known) if "relative" in self.tasks else []
        needed = {r for pair in pairs for r in pair} | (
            set(self.runs) if "absolute" in self.tasks else set())
        answered = {r: {a.prompt for a in store.answers(r) if a.sample == 0} for r in needed}
        order = [p.id for p in store.prompts()]
        idents: list[tuple[str, str, int, str, str]] = []
        for task in self.tasks:
            if task == "absolute":
                idents += [(task, p, 0, r, "") for r in self.runs for p in order if p in answered[r]]
            else:
                idents += [(task, p, 0, a, b) for a, b in pairs for p in order
                           if p in answered[a] and p in answered[b]]
        if not idents:
            raise ValueError(f"no prompt in {store.path} has answers from the runs of this round "
                             f"(runs {self.runs}, pairs {[f'{a}:{b}' for a, b in pairs]})")
        return [Item(*i, key=_digest("item", self.seed, *i).hex()[:24]) for i in idents]

    def order(self, item: Item, annotator: str) -> tuple[int, bytes]:
        """Sort key of an item for an annotator: tasks in order, items shuffled per annotator."""
        return self.tasks.index(item.task), _digest("order", self.seed, annotator, item.key)

    def first_is_a(self, item: Item, annotator: str) -> bool:
        """A fair coin per (seed, item, annotator): does run A's answer come first?"""
        return item.task == "absolute" or (_digest("first", self.seed, item.key, annotator)[0] & 1) == 1


def check_annotator(name: Any) -> str:
    if not isinstance(name, str) or not ANNOTATOR.fullmatch(name):
        raise AnnotateError(400, f"annotator must be 1-64 letters, digits, '_', '-' or '.', got "
                                 f"{str(name)[:80]!r}", param="annotator")
    return name


class AnnotateError(Exception):
    """A client fault: HTTP ``status`` and a JSON error body like ``chameleon serve``'s."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error", 409: "conflict_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


class Annotation:
    """A round over a store: its items, dealt out from the judgments the store holds."""

    def __init__(self, store: ResultStore, round: Round):
        self.store, self.round = store, round
        self.items = round.items(store)
        self.by_key = {i.key: i for i in self.items}
        self.by_ident = {i.ident: i for i in self.items}
        # prompts never change in a store (add_prompts refuses), so one read serves the round
        self.prompts = {p.id: p for p in store.prompts()}

    def judged(self) -> dict[str, set[str]]:
        """Item key -> annotators who judged it (read from the store, so resuming needs nothing)."""
        who: dict[str, set[str]] = {i.key: set() for i in self.items}
        for j in self.store.judgments():
            item = self.by_ident.get((j["task"], j["prompt"], j["sample"], j["run_a"], j["run_b"]))
            if item is not None:
                who[item.key].add(j["annotator"])
        return who

    def next(self, annotator: str) -> tuple[Item | None, dict[str, int]]:
        """The annotator's next item (None: nothing left for them) and their progress."""
        who = self.judged()
        done = sum(annotator in w for w in who.values())
        todo = [i for i in self.items if annotator not in who[i.key]
                and len(who[i.key]) < self.round.annotators_per_item]
        item = min(todo, key=lambda i: self.round.order(i, annotator), default=None)
        return item, {"done": done, "total": done + len(todo)}

    def _parts(self, parts: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        shown: list[dict[str, Any]] = []
        for p in parts:
            if p.get("type") == "text":
                shown.append({"type": "text", "text": p.get("text", "")})
            elif p.get("type") == "image" and "sha" in p:
                shown.append({"type": "image", "url": f"/blob/{p['sha']}"})
            elif p.get("type") == "image":  # not stored in the store: nothing to show
                shown.append({"type": "text", "text": "[image not available]"})
        return shown

    def view(self, item: Item, annotator: str) -> dict[str, Any]:
        """What the page shows: the prompt and the answer(s), nothing run-specific."""
        runs = [item.run_a] if item.task == "absolute" else (
            [item.run_a, item.run_b] if self.round.first_is_a(item, annotator)
            else [item.run_b, item.run_a])
        answers = [self._parts(self.store.answer(r, item.prompt, item.sample).parts) for r in runs]
        return {"done": False, "task": item.task, "item": item.key,
                "prompt": self._parts(self.prompts[item.prompt].parts), "answers": answers,
                "choices": [{"value": v, "label": LABELS[v]} for v in VALUES[item.task]]}

    def judge(self, annotator: str, key: str, value: str, seconds: float | None) -> None:
        item = self.by_key.get(key)
        if item is None:
            raise AnnotateError(404, f"no item {key[:80]!r} in this round", param="item")
        if value not in VALUES[item.task]:
            raise AnnotateError(400, f"value {value[:80]!r}: a {item.task} judgment is one of "
                                     f"{list(VALUES[item.task])}", param="value")
        first = item.run_a if self.round.first_is_a(item, annotator) else item.run_b
        if not self.store.put_judgment(item.task, item.prompt, item.sample, item.run_a, item.run_b,
                                       first, annotator, value, seconds):
            raise AnnotateError(409, f"{annotator} already judged this item (the first judgment "
                                     "stands)", param="item", code="already_judged")

    def progress(self) -> dict[str, Any]:
        who = self.judged()
        tasks = {}
        for task in self.round.tasks:
            mine = [len(who[i.key]) for i in self.items if i.task == task]
            tasks[task] = {"items": len(mine), "judgments": sum(mine),
                           "complete": sum(n >= self.round.annotators_per_item for n in mine)}
        return {"annotators_per_item": self.round.annotators_per_item, "tasks": tasks}


class JudgeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    annotator: str
    item: str = Field(max_length=200)
    value: str = Field(max_length=200)
    seconds: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    """Time the annotator spent on the item."""


def create_annotation_app(store: ResultStore, round: Round, token: str | None = None) -> FastAPI:
    """The annotation server of ``round`` over ``store`` (raises ValueError on a bad round)."""
    annotation = Annotation(store, round)
    app = FastAPI(title="chameleon-lm annotation", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.annotation = annotation

    @app.exception_handler(AnnotateError)
    async def _annotate_error(request: Request, e: AnnotateError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        problems = e.errors()
        where = ".".join(str(x) for x in (problems[0].get("loc", ()) if problems else ())
                         if x != "body") or None
        message = "; ".join(f"{'.'.join(str(x) for x in p.get('loc', ()) if x != 'body')}: "
                            f"{p.get('msg')}" for p in problems[:5]) or "invalid request"
        return AnnotateError(400, message, param=where).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return AnnotateError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return AnnotateError(500, f"internal error: {type(e).__name__}").response()

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token:
            header = request.headers.get("authorization", "")
            given = request.query_params.get("token") or (
                header[7:] if header.lower().startswith("bearer ") else "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return AnnotateError(401, "this annotation server needs its token (open the link "
                                          "with ?token=...)", code="invalid_token").response()
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return AnnotateError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes",
                                 code="request_too_large").response()
        return await call_next(request)

    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        html = resources.files("chameleon_lm").joinpath(
            "eval", "human", "static", "annotate.html").read_text()
        # the token may be in the URL: keep it out of Referer headers
        return HTMLResponse(html, headers={"Referrer-Policy": "no-referrer",
                                           "Cache-Control": "no-store"})

    @app.get("/api/next")
    def next_item(annotator: str | None = None) -> dict[str, Any]:
        name = check_annotator(annotator)
        item, progress = annotation.next(name)
        if item is None:
            return {"done": True, "progress": progress}
        return {**annotation.view(item, name), "progress": progress}

    @app.post("/api/judge")
    def judge(body: JudgeBody) -> dict[str, Any]:
        name = check_annotator(body.annotator)
        annotation.judge(name, body.item, body.value, body.seconds)
        return {"ok": True}

    @app.get("/api/progress")
    def progress() -> dict[str, Any]:
        return annotation.progress()

    @app.get("/blob/{sha}")
    def blob(sha: str) -> Response:
        try:
            if not _SHA.fullmatch(sha):
                raise KeyError(sha)
            mime, data = store.blob(sha)
        except KeyError:
            raise AnnotateError(404, f"no image {sha[:80]!r}", param="sha") from None
        # content-addressed: a sha's bytes never change
        return Response(data, media_type=mime,
                        headers={"Cache-Control": "private, max-age=86400, immutable"})

    return app


# ------------------------------------------------------------------------------------------ CLI


def add_cli(ev: argparse._SubParsersAction) -> None:
    """Register ``annotate`` on the ``chameleon eval`` subcommands."""
    p = ev.add_parser(
        "annotate", help="serve the human-evaluation page (absolute and relative tasks)",
        description="Annotators open the page, enter a name and judge answers from a results "
                    "store: absolute (does one answer fulfil the task?) and relative (which of two "
                    "blinded answers is better?). Judgments go into the store; restarting resumes.")
    p.add_argument("--store", type=Path, required=True, help="results store (SQLite file)")
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN",
                   help="runs to judge (absolute task)")
    p.add_argument("--compare", nargs="+", default=[], metavar="A:B",
                   help="pairs for the relative task (default: the first run against each other)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--per-item", type=int, default=3, help="annotators per item (default 3)")
    p.add_argument("--seed", type=int, default=0, help="deals the items and the order of pairs")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--token", help=f"shared token every request needs (also ${TOKEN_ENV})")
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=_cmd_annotate)


def app_from_args(args: argparse.Namespace) -> tuple[FastAPI, ResultStore, str | None]:
    """(app, its store, the token) from the parsed flags; ValueError on a bad round."""
    if not args.store.is_file():
        # ResultStore would create an empty store: a typo must not look like "unknown runs"
        raise FileNotFoundError(f"results store {args.store} not found")
    token = args.token or os.environ.get(TOKEN_ENV) or None
    store = ResultStore(args.store)
    try:
        round = Round(args.runs, args.compare, tuple(args.tasks), args.per_item, args.seed)
        return create_annotation_app(store, round, token), store, token
    except BaseException:
        store.close()
        raise


def _cmd_annotate(args: argparse.Namespace) -> int:
    import uvicorn

    app, store, token = app_from_args(args)
    progress = app.state.annotation.progress()["tasks"]
    counts = ", ".join(f"{t}: {v['items']} items" for t, v in progress.items())
    url = f"http://{args.host}:{args.port}/" + (f"?token={token}" if token else "")
    print(f"annotation round ({counts}; {args.per_item} annotators per item) at {url}", flush=True)
    if not token and args.host not in ("127.0.0.1", "localhost", "::1"):
        print("warning: no --token: anyone who can reach this address can judge", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        store.close()
    return 0
