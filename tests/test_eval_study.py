"""A whole human-evaluation round with the public commands, on the quickstart's own output (toy
scale): the built-in prompt set its `eval report` answered, a second system, three scripted
annotators in Chromium, and the report of their judgments."""

from __future__ import annotations

import json

import browser_support
import pytest
from conftest import toy_quickstart_config
from serve_support import LiveServer

from chameleon_lm.cli import main
from chameleon_lm.eval.human.annotate import Round, create_annotation_app
from chameleon_lm.eval.store import ResultStore

pytestmark = [browser_support.requires_browser, pytest.mark.usefixtures("one_thread")]
browser = browser_support.browser
browser_page = browser_support.browser_page


def annotate(page, url: str, name: str, offset: int) -> int:
    """One scripted annotator: log in, press 1/2/3 by a fixed rule until done; the items judged."""
    page.goto(url)
    page.evaluate("localStorage.clear()")
    page.reload()
    page.wait_for_selector("body[data-state=login]")
    page.fill("#annotator", name)
    page.click("#start")
    judged = 0
    while True:
        page.wait_for_function("['item', 'done'].includes(document.body.dataset.state)")
        if page.evaluate("document.body.dataset.state") == "done":
            return judged
        item = page.get_attribute("#item", "data-item")
        assert "quickstart" not in page.content() and "seed7" not in page.content()
        page.keyboard.press(str((judged + offset) % 3 + 1))
        judged += 1
        page.wait_for_function("old => document.body.dataset.state === 'done' || "
                               "document.getElementById('item').dataset.item !== old", arg=item)


def test_a_human_evaluation_round_of_the_quickstart_model(tmp_path, browser_page):
    from chameleon_lm.quickstart import run

    out = tmp_path / "qs"
    run(out, toy_quickstart_config(), log=lambda line: None)
    store = out / "eval" / "answers.sqlite"
    prompts = out / "eval" / "prompts" / "prompts.jsonl"  # the built-in set the report answered
    assert main(["eval", "generate", "--prompts", str(prompts), "--store", str(store), "--run", "seed7",
                 "--model", str(out / "model"), "--seed", "7", "--max-new-tokens", "8"]) == 0
    with ResultStore(store) as s:
        assert {r.name for r in s.runs()} == {"quickstart", "seed7"} and len(s.prompts()) == 12
        app = create_annotation_app(s, Round(["quickstart", "seed7"], ["quickstart:seed7"], seed=1))
        with LiveServer(app) as server:
            # each annotator: absolute for both runs (24 items) + relative (12 items)
            assert [annotate(browser_page, server.url + "/", name, k)
                    for k, name in enumerate(("ann1", "ann2", "ann3"))] == [36, 36, 36]
        judgments = s.judgments()
    assert len(judgments) == 108
    config = json.loads((out / "eval.json").read_text())
    config = {"out": str(tmp_path / "report"), "seed": 0,
              "human": {"store": str(store), "n_boot": 200}, "pairs": config["pairs"],
              "model": config["model"]}
    (tmp_path / "eval.json").write_text(json.dumps(config))
    assert main(["eval", "report", "--config", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())["results"]
    first = json.loads((out / "eval" / "report.json").read_text())["results"]["pairs"]
    assert report["pairs"] == first  # the same seeds give the quickstart's own figures again
    human = report["human"]
    for run in ("quickstart", "seed7"):
        labels = [j["value"] for j in judgments if j["task"] == "absolute" and j["run_a"] == run]
        assert human["absolute"][run]["all"]["n"] == 36
        assert human["absolute"][run]["all"]["fulfills"]["count"] == labels.count("fulfills")
        assert set(human["absolute"][run]["output"]) == {"image", "mixed", "text"}
        assert set(human["absolute"][run]["category"]) == {"draw", "describe", "story"}
    rel = human["relative"]["quickstart:seed7"]["all"]
    assert rel["n"] == 36 and rel["win"]["count"] + rel["tie"]["count"] + rel["loss"]["count"] == 36
    assert human["absolute_agreement"]["annotators"] == 3 and human["absolute_agreement"]["units"] == 24
    assert (tmp_path / "report" / "win_rate.svg").is_file()
