"""A whole human-evaluation round with the public commands: the built-in prompt set, two systems'
answers, three scripted annotators in Chromium, and the report."""

from __future__ import annotations

import json

import browser_support
import pytest
from serve_support import LiveServer, tiny_bundle

from chameleon_lm.cli import main
from chameleon_lm.eval.human.annotate import Round, create_annotation_app
from chameleon_lm.eval.store import ResultStore

pytestmark = [browser_support.requires_browser, pytest.mark.usefixtures("one_thread")]
browser = browser_support.browser
browser_page = browser_support.browser_page


def test_builtin_prompts_two_runs_three_annotators_and_the_report(tmp_path, browser_page):
    from chameleon_lm.checkpoints import save_model

    model, codec = tiny_bundle()
    save_model(tmp_path / "model", model, codec.text, codec.image)
    assert main(["eval", "prompts", "builtin", "--out", str(tmp_path / "prompts"), "--per-category", "1"]) == 0
    store = tmp_path / "study.sqlite"
    for run, seed in (("sys-a", "0"), ("sys-b", "7")):
        assert main(["eval", "generate", "--prompts", str(tmp_path / "prompts" / "prompts.jsonl"),
                     "--store", str(store), "--run", run, "--model", str(tmp_path / "model"),
                     "--seed", seed, "--max-new-tokens", "8"]) == 0
    # each annotator: absolute for both runs (6 items) + relative a:b (3 items); picks by a rule of
    # what is shown, so the expected results can be counted from the store afterwards
    with ResultStore(store) as s:
        app = create_annotation_app(s, Round(["sys-a", "sys-b"], ["sys-a:sys-b"], seed=1))
        with LiveServer(app) as server:
            for k, name in enumerate(("ann1", "ann2", "ann3")):
                page = browser_page
                page.goto(server.url + "/")
                page.evaluate("localStorage.clear()")
                page.reload()
                page.wait_for_selector("body[data-state=login]")
                page.fill("#annotator", name)
                page.click("#start")
                judged = 0
                while True:
                    page.wait_for_function("['item', 'done'].includes(document.body.dataset.state)")
                    if page.evaluate("document.body.dataset.state") == "done":
                        break
                    item = page.get_attribute("#item", "data-item")
                    assert "sys-" not in page.content()
                    page.keyboard.press(str((judged + k) % 3 + 1))
                    judged += 1
                    page.wait_for_function(
                        "old => document.body.dataset.state === 'done' || "
                        "document.getElementById('item').dataset.item !== old", arg=item)
                assert judged == 9
        judgments = s.judgments()
    assert len(judgments) == 27 and len({(j["annotator"], j["task"], j["prompt"], j["run_a"])
                                         for j in judgments}) == 27
    (tmp_path / "eval.toml").write_text(f'out = "report"\n[human]\nstore = "{store}"\nn_boot = 200\n')
    assert main(["eval", "report", "--config", str(tmp_path / "eval.toml")]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())["results"]["human"]
    for run in ("sys-a", "sys-b"):
        labels = [j["value"] for j in judgments if j["task"] == "absolute" and j["run_a"] == run]
        assert report["absolute"][run]["all"]["n"] == 9
        assert report["absolute"][run]["all"]["fulfills"]["count"] == labels.count("fulfills")
        assert set(report["absolute"][run]["output"]) == {"image", "mixed", "text"}
    rel = report["relative"]["sys-a:sys-b"]["all"]
    assert rel["n"] == 9 and rel["win"]["count"] + rel["tie"]["count"] + rel["loss"]["count"] == 9
    assert report["absolute_agreement"]["annotators"] == 3 and report["absolute_agreement"]["units"] == 6
    assert (tmp_path / "report" / "win_rate.svg").is_file()
