"""Human-evaluation results from stored judgments, and ``chameleon eval report``."""

from __future__ import annotations

import json

import krippendorff
import numpy as np
import pytest

from chameleon_lm.eval.human.results import human_results
from chameleon_lm.eval.prompts import Prompt, PromptSet
from chameleon_lm.eval.store import Answer, ResultStore, Run


def judged_store(path):
    """4 prompts (2 categories), runs a and b, 3 annotators: absolute for a, relative a:b."""
    store = ResultStore(path)
    store.add_prompts(PromptSet([Prompt(f"p{i}", [{"type": "text", "text": f"q{i}"}],
                                        category="cook" if i < 2 else "travel",
                                        output="mixed" if i % 2 else "text") for i in range(4)]))
    for run in ("a", "b"):
        store.start_run(Run(run, "model", {}))
        for i in range(4):
            store.put_answer(Answer(run, f"p{i}", [{"type": "text", "text": f"{run}{i}"}]))
    absolute = {"p0": ["fulfills"] * 3, "p1": ["fulfills", "partially", "fulfills"],
                "p2": ["does_not", "does_not", "partially"], "p3": ["partially"] * 3}
    for prompt, values in absolute.items():
        for annotator, value in zip(("x", "y", "z"), values):
            store.put_judgment("absolute", prompt, 0, "a", "", "a", annotator, value)
    # a shown first on p0/p1, b first on p2/p3; choices are of the first/second shown
    relative = {"p0": ("a", ["first", "first", "tie"]), "p1": ("a", ["second", "tie", "second"]),
                "p2": ("b", ["second", "second", "second"]), "p3": ("b", ["first", "tie", "tie"])}
    for prompt, (first, values) in relative.items():
        for annotator, value in zip(("x", "y", "z"), values):
            store.put_judgment("relative", prompt, 0, "a", "b", first, annotator, value)
    return store


def test_human_results_unblind_count_and_agree_with_the_reference_alpha(tmp_path):
    with judged_store(tmp_path / "r.sqlite") as store:
        r = human_results(store, n_boot=200, seed=0)
    a = r["absolute"]["a"]
    assert a["all"]["n"] == 12 and a["prompts"] == 4
    assert a["all"]["fulfills"]["share"] == pytest.approx(5 / 12)
    assert a["all"]["does_not"]["share"] == pytest.approx(2 / 12)
    assert a["category"]["cook"]["fulfills"]["share"] == pytest.approx(5 / 6)
    assert a["output"]["mixed"]["partially"]["share"] == pytest.approx(4 / 6)
    rel = r["relative"]["a:b"]["all"]
    # a's outcomes: p0 win win tie; p1 loss tie loss; p2 (b first, "second" = a) win win win;
    # p3 (b first, "first" = b) loss tie tie -> 5 wins, 4 ties, 3 losses
    assert (rel["win"]["count"], rel["tie"]["count"], rel["loss"]["count"]) == (5, 4, 3)
    assert rel["win_rate"] == pytest.approx((5 + 4 / 2) / 12)
    assert rel["low"] <= rel["win_rate"] <= rel["high"]
    # alpha over the 4 judged answers, fulfilment as an ordinal scale, vs the reference package
    ranks = {"fulfills": 0, "partially": 1, "does_not": 2}
    data = np.array([[ranks[v[k]] for v in (["fulfills"] * 3, ["fulfills", "partially", "fulfills"],
                                             ["does_not", "does_not", "partially"], ["partially"] * 3)]
                     for k in range(3)], dtype=float)
    expected = krippendorff.alpha(reliability_data=data, level_of_measurement="ordinal",
                                  value_domain=[0, 1, 2])
    assert r["absolute_agreement"]["ordinal"]["alpha"] == pytest.approx(expected)
    assert r["absolute_agreement"]["units"] == 4 and r["absolute_agreement"]["annotators"] == 3


def test_report_of_human_results_writes_json_html_and_plots(tmp_path):
    from chameleon_lm.cli import main

    judged_store(tmp_path / "r.sqlite").close()
    (tmp_path / "eval.toml").write_text('out = "rep"\nseed = 3\n[human]\nstore = "r.sqlite"\nn_boot = 100\n')
    assert main(["eval", "report", "--config", str(tmp_path / "eval.toml")]) == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["seed"] == 3 and report["versions"]["python"]
    assert report["results"]["human"]["relative"]["a:b"]["all"]["win"]["count"] == 5
    for name in ("fulfilment.png", "fulfilment.svg", "win_rate.png", "win_rate.svg"):
        assert (tmp_path / "rep" / name).stat().st_size > 1000
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "fulfilment.png" in page and "win_rate" in page
    (tmp_path / "bad.toml").write_text("sed = 1\n[human]\nstore = 'r.sqlite'\n")
    assert main(["eval", "report", "--config", str(tmp_path / "bad.toml")]) == 2
    (tmp_path / "none.toml").write_text("seed = 1\n")
    assert main(["eval", "report", "--config", str(tmp_path / "none.toml")]) == 2
