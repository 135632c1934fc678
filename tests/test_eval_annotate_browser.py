"""The annotation page (eval/human/static/annotate.html) driven in Chromium against a real server."""

from __future__ import annotations

import base64
import io

import browser_support
import pytest
from PIL import Image
from serve_support import LiveServer

from chameleon_lm.eval.human.annotate import Round, create_annotation_app
from chameleon_lm.eval.prompts import Prompt, PromptSet
from chameleon_lm.eval.store import Answer, ResultStore, Run

pytestmark = browser_support.requires_browser
browser = browser_support.browser
browser_page = browser_support.browser_page

RUN_A, RUN_B = "chameleon-zeta", "baseline-omega"
MARK = {RUN_A: "ALPHA", RUN_B: "BRAVO"}
TOKEN = "t0k"


def data_url(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (20, 14), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def live(tmp_path):
    """2 prompts (one with an image), both answered by A and B with text and an image: 6 items."""
    with ResultStore(tmp_path / "r.sqlite") as store:
        store.add_prompts(PromptSet([
            Prompt("q0", [{"type": "text", "text": "Draw this:"},
                          {"type": "image", "data": data_url((0, 0, 255))}]),
            Prompt("q1", [{"type": "text", "text": "Tell a story with a picture."}])]))
        for n, run in enumerate((RUN_A, RUN_B)):
            store.start_run(Run(run, "model", {"n": n}))
            sha = store.put_image(Image.new("RGB", (24, 24), (200 * n, 90, 30)))
            for pid in ("q0", "q1"):
                store.put_answer(Answer(run, pid, [
                    {"type": "text", "text": f"{MARK[run]} answers {pid}"},
                    {"type": "image", "sha": sha}]))
        app = create_annotation_app(store, Round([RUN_A, RUN_B], [f"{RUN_A}:{RUN_B}"],
                                                 annotators_per_item=1), token=TOKEN)
        with LiveServer(app) as server:
            server.store = store
            yield server


def wait_for_next(page, old: str | None) -> str:
    """Wait for an item other than ``old`` (or the end); the new state."""
    page.wait_for_function(
        "old => { const s = document.body.dataset.state; return s === 'done' || (s === 'item' "
        "&& document.getElementById('item').dataset.item !== old); }", arg=old)
    return page.evaluate("document.body.dataset.state")


def shown(page) -> dict:
    """What the page shows: the item's task and key, and the answers' runs and prompt by marker."""
    texts = page.locator("#answers .answer .text").all_text_contents()
    runs = [next(r for r, m in MARK.items() if t.startswith(m)) for t in texts]
    return {"task": page.get_attribute("#item", "data-task"),
            "item": page.get_attribute("#item", "data-item"),
            "runs": runs, "prompt": texts[0].rsplit(" ", 1)[-1],
            "headings": page.locator("#answers .answer h2").all_text_contents()}


def check_page(page) -> None:
    html = page.content()
    assert RUN_A not in html and RUN_B not in html and "zeta" not in html and "omega" not in html
    page.wait_for_function("[...document.images].every(i => i.complete)")
    widths = page.evaluate("[...document.querySelectorAll('#item img')].map(i => i.naturalWidth)")
    assert widths and all(w > 0 for w in widths), widths


def test_an_annotator_judges_by_click_and_key_reloads_and_finishes(browser_page, live):
    page = browser_page
    page.goto(f"{live.url}/?token={TOKEN}")
    page.wait_for_selector("body[data-state=login]")
    page.fill("#annotator", "ann_1")
    page.click("#start")
    assert wait_for_next(page, None) == "item"
    assert page.text_content("#progress") == "0 / 6 judged"
    done: list[tuple[dict, str]] = []
    state = "item"
    while state == "item":
        if len(done) == 3:                  # midway: reload, the name comes back from localStorage
            page.reload()
            assert wait_for_next(page, None) == "item"
            assert page.is_hidden("#login") and page.text_content("#progress") == "3 / 6 judged"
            assert page.get_attribute("#item", "data-item") not in {v["item"] for v, _ in done}
        check_page(page)
        view = shown(page)
        assert view["headings"] == (["Answer"] if view["task"] == "absolute"
                                    else ["Answer 1", "Answer 2"])
        values = page.eval_on_selector_all("#choices button", "bs => bs.map(b => b.dataset.value)")
        pick = len(done) % 3
        if len(done) % 2 == 0:
            page.click(f"#choices button[data-value={values[pick]}]")
        else:
            page.keyboard.press(str(pick + 1))
        done.append((view, values[pick]))
        state = wait_for_next(page, view["item"])

    assert page.is_visible("#done") and page.text_content("#progress") == "6 / 6 judged"
    assert [v["task"] for v, _ in done] == ["absolute"] * 4 + ["relative"] * 2
    judgments = live.store.judgments()
    assert len(judgments) == 6 and {j["annotator"] for j in judgments} == {"ann_1"}
    for view, value in done:
        if view["task"] == "absolute":
            (run,) = view["runs"]
            match = [j for j in judgments if j["task"] == "absolute" and j["run_a"] == run
                     and j["prompt"] == view["prompt"]]
            assert [(j["value"], j["first"]) for j in match] == [(value, run)]
        else:
            assert set(view["runs"]) == {RUN_A, RUN_B}
            match = [j for j in judgments if j["task"] == "relative" and j["prompt"] == view["prompt"]]
            assert [(j["value"], j["first"]) for j in match] == [(value, view["runs"][0])]
        assert all(j["seconds"] is not None and j["seconds"] >= 0 for j in match)
    html = page.content()
    assert RUN_A not in html and RUN_B not in html
    assert page.js_errors == []


def test_a_bad_name_is_refused_and_a_name_can_be_changed(browser_page, live):
    page = browser_page
    page.goto(f"{live.url}/?token={TOKEN}")
    page.fill("#annotator", "two words")
    page.click("#start")
    page.wait_for_selector("#status.error")
    assert page.evaluate("document.body.dataset.state") == "login"
    page.fill("#annotator", "ann-2")
    page.keyboard.press("Enter")
    assert wait_for_next(page, None) == "item"
    page.click("#switch")
    page.wait_for_selector("body[data-state=login]")
    assert page.evaluate("localStorage.length") == 0 and live.store.judgments() == []
    assert page.js_errors == []


def test_without_the_token_the_page_is_refused(browser_page, live):
    response = browser_page.goto(live.url)
    assert response.status == 401 and "token" in browser_page.content()
