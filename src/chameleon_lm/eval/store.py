"""The evaluation results store: one SQLite file with prompts, runs, answers and human judgments.

Tables:

- ``prompts``: the prompt set (parts as JSON; images as blobs);
- ``runs``: one row per system evaluated (a local model, an endpoint, an augmented baseline) with the
  settings that pin it, the model hash and package versions;
- ``answers``: one row per (run, prompt, sample): parts (text, image blobs), finish reason, error;
- ``judgments``: human judgments (``absolute``: one answer's fulfilment; ``relative``: two answers,
  ``first`` = the run shown first, so blinded choices can be un-blinded);
- ``blobs``: images by SHA-256 (PNG), shared by prompts and answers.

SQLite because one file holds a whole study, resumes after a crash (every answer and judgment is its
own transaction), needs no server and ships with Python. Parts in the store are
``{"type": "text", "text"}`` or ``{"type": "image", "sha"}``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from chameleon_lm.data.sources.base import png_bytes
from chameleon_lm.eval.prompts import Prompt, PromptSet

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (sha TEXT PRIMARY KEY, mime TEXT NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS prompts (
    id TEXT PRIMARY KEY, position INTEGER NOT NULL, category TEXT NOT NULL, output TEXT NOT NULL,
    modality TEXT NOT NULL, parts TEXT NOT NULL, reference TEXT NOT NULL, meta TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    name TEXT PRIMARY KEY, kind TEXT NOT NULL, settings TEXT NOT NULL, model_hash TEXT NOT NULL,
    versions TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS answers (
    run TEXT NOT NULL REFERENCES runs(name), prompt TEXT NOT NULL REFERENCES prompts(id),
    sample INTEGER NOT NULL, seed INTEGER, parts TEXT NOT NULL, finish TEXT NOT NULL,
    error TEXT, seconds REAL NOT NULL, created REAL NOT NULL, PRIMARY KEY (run, prompt, sample));
CREATE TABLE IF NOT EXISTS judgments (
    id INTEGER PRIMARY KEY AUTOINCREMENT, task TEXT NOT NULL, prompt TEXT NOT NULL,
    sample INTEGER NOT NULL, run_a TEXT NOT NULL, run_b TEXT NOT NULL, first TEXT NOT NULL,
    annotator TEXT NOT NULL, value TEXT NOT NULL, seconds REAL, created REAL NOT NULL,
    UNIQUE (task, prompt, sample, run_a, run_b, annotator));
"""


@dataclass
class Answer:
    run: str
    prompt: str
    parts: list[dict[str, Any]]
    """Stored parts: text, or ``{"type": "image", "sha"}``."""
    sample: int = 0
    seed: int | None = None
    finish: str = "stop"
    error: str | None = None
    seconds: float = 0.0

    @property
    def text(self) -> str:
        return "".join(p["text"] for p in self.parts if p["type"] == "text")

    @property
    def image_shas(self) -> list[str]:
        return [p["sha"] for p in self.parts if p["type"] == "image"]

    @property
    def modality(self) -> str:
        kinds = {p["type"] for p in self.parts if p["type"] == "image" or p.get("text", "").strip()}
        return "mixed" if kinds == {"text", "image"} else next(iter(kinds), "text")


@dataclass
class Run:
    name: str
    kind: str
    settings: dict[str, Any]
    model_hash: str = ""
    versions: dict[str, str] = field(default_factory=dict)


class ResultStore:
    """A results store at ``path`` (created when missing). Thread-safe: one connection, one lock."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.path}: not a results store ({e})") from None
        version = self.db.execute("SELECT value FROM info WHERE key='schema'").fetchone()
        if version is None:
            self.db.execute("INSERT INTO info VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(version[0]) != SCHEMA_VERSION:
            raise ValueError(f"{self.path}: results store schema {version[0]}, this version reads "
                             f"{SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def __enter__(self) -> ResultStore:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------- blobs

    def put_image(self, image: Image.Image) -> str:
        data = png_bytes(image.convert("RGB"))
        sha = hashlib.sha256(data).hexdigest()
        with self._lock:
            self.db.execute("INSERT OR IGNORE INTO blobs VALUES (?, 'image/png', ?)", (sha, data))
        return sha

    def blob(self, sha: str) -> tuple[str, bytes]:
        """(mime type, bytes) of a stored blob."""
        with self._lock:
            row = self.db.execute("SELECT mime, data FROM blobs WHERE sha=?", (sha,)).fetchone()
        if row is None:
            raise KeyError(f"no blob {sha}")
        return row["mime"], bytes(row["data"])

    def image(self, sha: str) -> Image.Image:
        return Image.open(io.BytesIO(self.blob(sha)[1])).convert("RGB")

    # ----------------------------------------------------------------------------------- prompts

    def add_prompts(self, prompts: PromptSet) -> int:
        """Store a prompt set (images as blobs). A prompt already stored must be unchanged: an answer
        belongs to the prompt it answered. Returns the number of new prompts."""
        new = 0
        existing = {p.id: p for p in self.prompts()}
        for p in prompts:
            parts = [{"type": "text", "text": x["text"]} if x["type"] == "text"
                     else {"type": "image", "sha": self.put_image(prompts.images(Prompt(p.id, [x]))[0])}
                     for x in p.parts]
            row = Prompt(p.id, parts, p.category, p.output, p.reference, p.meta)
            if p.id in existing:
                if existing[p.id].to_dict() != row.to_dict():
                    raise ValueError(f"prompt {p.id!r} differs from the one in {self.path}: use a new "
                                     "store or a new prompt id")
                continue
            with self._lock:
                self.db.execute("INSERT INTO prompts VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (
                    p.id, len(existing) + new, p.category, p.output, p.modality, json.dumps(parts),
                    json.dumps(p.reference), json.dumps(p.meta)))
            new += 1
        return new

    def prompts(self) -> list[Prompt]:
        with self._lock:
            rows = self.db.execute("SELECT * FROM prompts ORDER BY position").fetchall()
        return [Prompt(r["id"], json.loads(r["parts"]), r["category"], r["output"],
                       json.loads(r["reference"]), json.loads(r["meta"])) for r in rows]

    def prompt(self, prompt_id: str) -> Prompt:
        found = [p for p in self.prompts() if p.id == prompt_id]
        if not found:
            raise KeyError(f"no prompt {prompt_id!r}")
        return found[0]

    # -------------------------------------------------------------------------------------- runs

    def start_run(self, run: Run) -> Run:
        """Register a run, or resume it: a run of the same name must have the same settings."""
        with self._lock:
            row = self.db.execute("SELECT * FROM runs WHERE name=?", (run.name,)).fetchone()
            if row is None:
                self.db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?)", (
                    run.name, run.kind, json.dumps(run.settings, sort_keys=True), run.model_hash,
                    json.dumps(run.versions, sort_keys=True), time.time()))
                return run
        old = self._run(row)
        for what in ("kind", "settings", "model_hash"):
            if getattr(old, what) != json.loads(json.dumps(getattr(run, what))):
                raise ValueError(f"run {run.name!r} exists in {self.path} with another {what} "
                                 f"({getattr(old, what)!r} vs {getattr(run, what)!r}): resume with the "
                                 "same settings or pick a new run name")
        return old

    @staticmethod
    def _run(row: sqlite3.Row) -> Run:
        return Run(row["name"], row["kind"], json.loads(row["settings"]), row["model_hash"],
                   json.loads(row["versions"]))

    def runs(self) -> list[Run]:
        with self._lock:
            rows = self.db.execute("SELECT * FROM runs ORDER BY created").fetchall()
        return [self._run(r) for r in rows]

    # ----------------------------------------------------------------------------------- answers

    def has_answer(self, run: str, prompt: str, sample: int = 0) -> bool:
        with self._lock:
            return self.db.execute("SELECT 1 FROM answers WHERE run=? AND prompt=? AND sample=?",
                                   (run, prompt, sample)).fetchone() is not None

    def put_answer(self, answer: Answer) -> None:
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (
                answer.run, answer.prompt, answer.sample, answer.seed, json.dumps(answer.parts),
                answer.finish, answer.error, answer.seconds, time.time()))

    def answers(self, run: str | None = None) -> list[Answer]:
        query = "SELECT a.* FROM answers a JOIN prompts p ON p.id = a.prompt"
        args: tuple = ()
        if run is not None:
            query, args = query + " WHERE a.run=?", (run,)
        with self._lock:
            rows = self.db.execute(query + " ORDER BY a.run, p.position, a.sample", args).fetchall()
        return [Answer(r["run"], r["prompt"], json.loads(r["parts"]), r["sample"], r["seed"],
                       r["finish"], r["error"], r["seconds"]) for r in rows]

    def answer(self, run: str, prompt: str, sample: int = 0) -> Answer:
        with self._lock:
            r = self.db.execute("SELECT * FROM answers WHERE run=? AND prompt=? AND sample=?",
                                (run, prompt, sample)).fetchone()
        if r is None:
            raise KeyError(f"no answer of run {run!r} to prompt {prompt!r} (sample {sample})")
        return Answer(r["run"], r["prompt"], json.loads(r["parts"]), r["sample"], r["seed"],
                      r["finish"], r["error"], r["seconds"])

    # --------------------------------------------------------------------------------- judgments

    def put_judgment(self, task: str, prompt: str, sample: int, run_a: str, run_b: str, first: str,
                     annotator: str, value: str, seconds: float | None = None) -> bool:
        """Record a judgment; False (and nothing changed) when this annotator already judged it."""
        with self._lock:
            cur = self.db.execute(
                "INSERT OR IGNORE INTO judgments (task, prompt, sample, run_a, run_b, first, annotator,"
                " value, seconds, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (task, prompt, sample, run_a, run_b, first, annotator, value, seconds, time.time()))
        return cur.rowcount == 1

    def judgments(self, task: str | None = None) -> list[dict[str, Any]]:
        query, args = "SELECT * FROM judgments", ()
        if task is not None:
            query, args = query + " WHERE task=?", (task,)
        with self._lock:
            return [dict(r) for r in self.db.execute(query + " ORDER BY id", args).fetchall()]
