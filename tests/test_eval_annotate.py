"""``chameleon eval annotate`` over HTTP: dealing items, judging, resuming, blinding, the token."""

from __future__ import annotations

import argparse
import base64
import io
import re
from collections import Counter

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from chameleon_lm.eval.human import annotate
from chameleon_lm.eval.human.annotate import Round, create_annotation_app
from chameleon_lm.eval.prompts import Prompt, PromptSet
from chameleon_lm.eval.store import Answer, ResultStore, Run

RUN_A, RUN_B, RUN_C = "chameleon-zeta", "baseline-omega", "partial-kappa"
SECRET = re.compile("zeta|omega|kappa", re.IGNORECASE)
"""What of the run names must never reach a client."""
MARK = {RUN_A: "ALPHA", RUN_B: "BRAVO", RUN_C: "CHARLIE"}
PROMPTS = [f"p{i}" for i in range(4)]


def data_url(color: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def make_store(path) -> ResultStore:
    """4 prompts (one with an image); A and B answer all, C only p0 and p1; answers carry images."""
    store = ResultStore(path)
    prompts = [Prompt(pid, [{"type": "text", "text": f"Prompt {pid}: draw and describe."}]
                      + ([{"type": "image", "data": data_url((0, 0, 255))}] if pid == "p0" else []))
               for pid in PROMPTS]
    store.add_prompts(PromptSet(prompts))
    for n, run in enumerate((RUN_A, RUN_B, RUN_C)):
        store.start_run(Run(run, "model", {"n": n}))
        sha = store.put_image(Image.new("RGB", (8, 8), (60 * n, 200, 0)))
        for pid in PROMPTS if run != RUN_C else PROMPTS[:2]:
            store.put_answer(Answer(run, pid, [{"type": "text", "text": f"{MARK[run]} answers {pid}"},
                                               {"type": "image", "sha": sha}]))
    return store


def shown_run(parts: list[dict]) -> tuple[str, str]:
    """(run, prompt) of an answer as shown, from its marker text."""
    text = " ".join(p["text"] for p in parts if p["type"] == "text")
    mark, _, pid = text.partition(" answers ")
    return next(r for r, m in MARK.items() if m == mark), pid


@pytest.fixture
def store(tmp_path):
    with make_store(tmp_path / "r.sqlite") as s:
        yield s


ROUND = Round([RUN_A, RUN_B], [f"{RUN_A}:{RUN_B}"], ("absolute", "relative"), 3, seed=0)


def client_of(store, round=ROUND, token=None) -> TestClient:
    return TestClient(create_annotation_app(store, round, token))


def get_next(client, name):
    r = client.get("/api/next", params={"annotator": name})
    assert r.status_code == 200, r.text
    assert not SECRET.search(r.text), r.text
    return r.json()


def judge(client, name, view, value=None):
    value = value or view["choices"][0]["value"]
    r = client.post("/api/judge", json={"annotator": name, "item": view["item"], "value": value,
                                        "seconds": 1.5})
    assert r.status_code == 200, r.text
    return value


def drive(client, names, values=None):
    """Round-robin the annotators until none has an item left; the log of what each saw and chose."""
    log, left, turn = [], list(names), 0
    while left:
        name = left[turn % len(left)]
        view = get_next(client, name)
        if view["done"]:
            left.remove(name)
            continue
        options = [c["value"] for c in view["choices"]]
        value = values(view) if values else options[turn % len(options)]
        log.append((name, view, judge(client, name, view, value)))
        turn += 1
    return log


def test_three_annotators_complete_the_round_exactly(store):
    client = client_of(store)
    log = drive(client, ["ann1", "ann2", "ann.3"])
    judgments = store.judgments()
    assert len(log) == len(judgments) == 3 * (4 * 2 + 4)
    per_item = Counter((j["task"], j["prompt"], j["run_a"], j["run_b"]) for j in judgments)
    assert len(per_item) == 12 and set(per_item.values()) == {3}
    assert len({(j["task"], j["prompt"], j["run_a"], j["run_b"], j["annotator"])
                for j in judgments}) == len(judgments)          # nobody judged an item twice
    assert {(j["run_a"], j["run_b"]) for j in judgments if j["task"] == "absolute"} == {
        (RUN_A, ""), (RUN_B, "")}
    assert {(j["run_a"], j["run_b"]) for j in judgments if j["task"] == "relative"} == {(RUN_A, RUN_B)}
    assert all(j["seconds"] == 1.5 for j in judgments)
    # each annotator sees the absolute items first, each in an order of their own
    orders = {n: [v["item"] for name, v, _ in log if name == n] for n in ("ann1", "ann2", "ann.3")}
    assert len({tuple(o) for o in orders.values()}) == 3
    tasks = [v["task"] for name, v, _ in log if name == "ann1"]
    assert tasks == ["absolute"] * 8 + ["relative"] * 4
    last = [v["progress"] for name, v, _ in log if name == "ann1"][-1]
    assert last == {"done": 11, "total": 12}
    progress = client.get("/api/progress")
    assert not SECRET.search(progress.text)
    assert progress.json()["tasks"] == {"absolute": {"items": 8, "judgments": 24, "complete": 8},
                                        "relative": {"items": 4, "judgments": 12, "complete": 4}}
    assert get_next(client, "late-comer") == {"done": True, "progress": {"done": 0, "total": 0}}


def test_blinding_order_varies_first_is_stored_and_no_run_name_is_sent(store):
    client = client_of(store)
    page = client.get("/")
    assert page.status_code == 200 and "Answer" in page.text and not SECRET.search(page.text)
    log = drive(client, ["ann1", "ann2", "ann3"])
    relative = [(name, view) for name, view, _ in log if view["task"] == "relative"]
    stored = {(j["annotator"], j["prompt"]): j for j in store.judgments("relative")}
    firsts = []
    for name, view in relative:
        assert [c["value"] for c in view["choices"]] == ["first", "tie", "second"]
        (run1, pid), (run2, pid2) = map(shown_run, view["answers"])
        assert pid == pid2 and {run1, run2} == {RUN_A, RUN_B}
        assert stored[name, pid]["first"] == run1        # what Answer 1 showed
        firsts.append(run1)
    assert set(firsts) == {RUN_A, RUN_B}                 # both orders occur
    for name, view, value in log:
        if view["task"] == "absolute":
            run, pid = shown_run(view["answers"][0])
            j = next(j for j in store.judgments("absolute") if j["annotator"] == name
                     and j["prompt"] == pid and j["run_a"] == run)
            assert j["value"] == value and j["first"] == run
        assert all(p["url"].startswith("/blob/") for parts in [view["prompt"], *view["answers"]]
                   for p in parts if p["type"] == "image")
    # the prompt's image and the answers' images are served
    image = next(p for _, v, _ in log for p in v["prompt"] if p["type"] == "image")
    r = client.get(image["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (12, 10)


def test_the_pair_order_is_fixed_per_annotator_and_item(store):
    round = Round([RUN_A, RUN_B], tasks=("relative",), seed=5)
    client = client_of(store, round)
    view = get_next(client, "x")
    assert get_next(client, "x") == view
    item = client.app.state.annotation.by_key[view["item"]]
    assert shown_run(view["answers"][0])[0] == (RUN_A if round.first_is_a(item, "x") else RUN_B)
    coins = [round.first_is_a(item, f"a{i}") for i in range(40)]
    assert 10 < sum(coins) < 30        # a fair coin per annotator, not one order per item


def test_a_second_judgment_is_409_and_changes_nothing(store):
    client = client_of(store)
    view = get_next(client, "ann1")
    judge(client, "ann1", view, view["choices"][0]["value"])
    before = store.judgments()
    r = client.post("/api/judge", json={"annotator": "ann1", "item": view["item"],
                                        "value": view["choices"][2]["value"]})
    assert r.status_code == 409 and r.json()["error"]["code"] == "already_judged"
    assert store.judgments() == before
    assert get_next(client, "ann1")["item"] != view["item"]
    judge(client, "ann2", view)        # another annotator may judge the same item
    assert len(store.judgments()) == 2


@pytest.mark.parametrize("body, status, param", [
    ({"annotator": "", "value": "fulfills"}, 400, "annotator"),
    ({"annotator": "a b", "value": "fulfills"}, 400, "annotator"),
    ({"annotator": "x" * 65, "value": "fulfills"}, 400, "annotator"),
    ({"annotator": "<script>", "value": "fulfills"}, 400, "annotator"),
    ({"annotator": "ann\n", "value": "fulfills"}, 400, "annotator"),
    ({"annotator": "ann", "value": "win"}, 400, "value"),
    ({"annotator": "ann", "value": "first"}, 400, "value"),       # a relative choice, absolute item
    ({"annotator": "ann", "value": ""}, 400, "value"),
    ({"annotator": "ann", "value": 1}, 400, "value"),
    ({"annotator": "ann", "value": "fulfills", "seconds": -1}, 400, "seconds"),
    ({"annotator": "ann", "value": "fulfills", "seconds": "soon"}, 400, "seconds"),
    ({"annotator": "ann", "value": "fulfills", "extra": 1}, 400, "extra"),
    ({"annotator": "ann", "value": "fulfills", "item": "nope"}, 404, "item"),
    ({"value": "fulfills"}, 400, "annotator"),
])
def test_bad_judgments_are_4xx_json_and_store_nothing(store, body, status, param):
    client = client_of(store)
    view = get_next(client, "ann")
    assert view["task"] == "absolute"
    r = client.post("/api/judge", json={"item": view["item"], **body})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]
    assert store.judgments() == []


def test_bad_requests_are_4xx_json(store):
    client = client_of(store)
    for r, status in [
        (client.get("/api/next"), 400),
        (client.get("/api/next", params={"annotator": "two words"}), 400),
        (client.post("/api/judge", content=b"not json", headers={"content-type": "application/json"}),
         400),
        (client.post("/api/judge", json=[1, 2]), 400),
        (client.post("/api/judge", content=b"{" * 70_000,
                     headers={"content-type": "application/json"}), 413),
        (client.get("/blob/" + "0" * 64), 404),
        (client.get("/blob/../r.sqlite"), 404),
        (client.get("/api/nothing"), 404),
        (client.delete("/api/judge"), 405),
    ]:
        assert r.status_code == status, (r.request.url, r.text)
        assert r.json()["error"]["message"]
    assert store.judgments() == []


def test_resume_on_a_new_app_over_the_same_file(tmp_path):
    path = tmp_path / "r.sqlite"
    with make_store(path) as store:
        client = client_of(store)
        judged = []
        for _ in range(3):
            view = get_next(client, "ann1")
            judge(client, "ann1", view)
            judged.append(view)
        get_next(client, "ann2")                        # seen but not judged: nothing kept
        pending = get_next(client, "ann1")
    with ResultStore(path) as store:
        client = client_of(store)
        view = get_next(client, "ann1")
        assert view == pending                   # the same item, its answers in the same order
        assert view["item"] not in {v["item"] for v in judged}
        assert view["progress"] == {"done": 3, "total": 12}
        for old in judged:
            r = client.post("/api/judge", json={"annotator": "ann1", "item": old["item"],
                                                "value": old["choices"][1]["value"]})
            assert r.status_code == 409
        log = drive(client, ["ann1", "ann2", "ann3"])
        assert not {v["item"] for v in judged} & {v["item"] for name, v, _ in log if name == "ann1"}
        assert client.get("/api/progress").json()["tasks"]["absolute"]["complete"] == 8
        assert len(store.judgments()) == 36


def test_items_are_the_prompts_every_run_answered(store):
    round = Round([RUN_A, RUN_C], tasks=("absolute", "relative"), annotators_per_item=1)
    items = round.items(store)
    assert Counter((i.task, i.run_a) for i in items) == {("absolute", RUN_A): 4,
                                                          ("absolute", RUN_C): 2,
                                                          ("relative", RUN_A): 2}
    assert all(not SECRET.search(i.key) for i in items) and len({i.key for i in items}) == 8
    client = client_of(store, round)
    assert len(drive(client, ["solo"])) == 8
    assert get_next(client, "solo")["done"] is True
    # a run name with ':' in it still splits where both sides are runs
    store.start_run(Run("a:b", "model", {}))
    assert Round(["a:b"], [f"a:b:{RUN_A}"]).pairs({r.name for r in store.runs()}) == [("a:b", RUN_A)]


@pytest.mark.parametrize("kwargs, message", [
    ({"runs": [RUN_A, "nobody"]}, "unknown run"),
    ({"runs": [RUN_A], "compare": [f"{RUN_A}:nobody"]}, "unknown run"),
    ({"runs": [RUN_A], "compare": [f"{RUN_A}:{RUN_A}"]}, "itself"),
    ({"runs": [RUN_A], "compare": [f"{RUN_A}:{RUN_B}", f"{RUN_B}:{RUN_A}"]}, "twice"),
    ({"runs": [RUN_A], "compare": ["just-one"]}, "RUN_A:RUN_B"),
    ({"runs": [RUN_A]}, "two runs"),
    ({"runs": [RUN_A, RUN_A], "tasks": ("absolute",)}, "twice"),
    ({"runs": []}, "runs"),
    ({"runs": [RUN_A], "tasks": ("absolute", "ranking")}, "tasks"),
    ({"runs": [RUN_A], "tasks": ()}, "tasks"),
    ({"runs": [RUN_A], "tasks": ("absolute",), "annotators_per_item": 0}, "annotators_per_item"),
])
def test_a_bad_round_is_a_clear_error(store, kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_annotation_app(store, Round(**kwargs))


def test_a_round_without_answers_is_an_error(tmp_path):
    with make_store(tmp_path / "r.sqlite") as store:
        store.start_run(Run("silent", "model", {}))
        with pytest.raises(ValueError, match="no prompt .* has answers"):
            create_annotation_app(store, Round(["silent"], tasks=("absolute",)))


def test_the_token_guards_every_route(store):
    client = client_of(store, token="s3cret")
    sha = store.answer(RUN_A, "p0").image_shas[0]
    for path in ("/", "/api/next?annotator=a", "/api/progress", f"/blob/{sha}", "/nothing"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = client.get(path, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = client.get(path + ("&" if "?" in path else "?") + "token=wrong")
        assert r.status_code == 401
    r = client.post("/api/judge", json={"annotator": "a", "item": "x", "value": "tie"})
    assert r.status_code == 401
    assert client.get("/?token=s3cret").status_code == 200
    assert client.get(f"/blob/{sha}?token=s3cret").content[:4] == b"\x89PNG"
    view = client.get("/api/next?annotator=a", headers={"Authorization": "Bearer s3cret"}).json()
    r = client.post("/api/judge?token=s3cret", json={"annotator": "a", "item": view["item"],
                                                     "value": "fulfills"})
    assert r.status_code == 200 and len(store.judgments()) == 1


def cli_args(argv):
    parser = argparse.ArgumentParser(prog="chameleon eval")
    annotate.add_cli(parser.add_subparsers(dest="eval_command", required=True))
    return parser.parse_args(["annotate", *argv])


def test_cli_flags_errors_and_server_start(store, tmp_path, monkeypatch, capsys):
    args = cli_args(["--store", str(store.path), "--runs", RUN_A, "nobody"])
    with pytest.raises(ValueError, match=r"unknown run\(s\) \['nobody'\]"):
        args.func(args)
    args = cli_args(["--store", str(tmp_path / "typo.sqlite"), "--runs", RUN_A])
    with pytest.raises(FileNotFoundError):
        args.func(args)
    assert not (tmp_path / "typo.sqlite").exists()
    with pytest.raises(SystemExit):
        cli_args(["--store", str(store.path), "--runs", RUN_A, "--tasks", "ranking"])
    capsys.readouterr()

    import uvicorn

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    args = cli_args(["--store", str(store.path), "--runs", RUN_A, RUN_B, "--compare",
                     f"{RUN_B}:{RUN_A}", "--per-item", "2", "--seed", "7", "--port", "8123",
                     "--token", "tok"])
    assert args.func(args) == 0
    assert started["port"] == 8123 and started["host"] == "127.0.0.1"
    annotation = started["app"].state.annotation
    assert annotation.round == Round([RUN_A, RUN_B], [f"{RUN_B}:{RUN_A}"], annotate.TASKS, 2, 7)
    assert {(i.run_a, i.run_b) for i in annotation.items if i.task == "relative"} == {(RUN_B, RUN_A)}
    assert "http://127.0.0.1:8123/?token=tok" in capsys.readouterr().out
