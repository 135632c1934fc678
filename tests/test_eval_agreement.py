"""Krippendorff's alpha, bootstrap intervals and rates of the human evaluation."""

import math

import numpy as np
import pytest

from chameleon_lm.eval.metrics.agreement import (
    CHOICES,
    FULFILMENT,
    RELATIVE,
    bootstrap_alpha,
    bootstrap_mean,
    fulfilment_rates,
    krippendorff_alpha,
    reliability_matrix,
    unblind,
    win_rate,
)

NAN = np.nan
# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability": 4 coders x 12 units
WORKED = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, NAN, NAN, NAN],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, NAN, 3],
    [NAN, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, NAN],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, NAN],
]
LEVELS = ("nominal", "ordinal", "interval", "ratio")


def reference(data, level, value_domain=None):
    """Alpha from the ``krippendorff`` package (a test extra), the reference implementation."""
    krippendorff = pytest.importorskip("krippendorff")
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement=level,
                                    value_domain=value_domain))


# --- point values -----------------------------------------------------------------------------------


@pytest.mark.parametrize("level, expected", [
    ("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849), ("ratio", 0.797)])
def test_worked_example(level, expected):
    alpha = krippendorff_alpha(WORKED, level)
    assert round(alpha, 3) == expected
    assert alpha == pytest.approx(reference(WORKED, level), abs=1e-12)


def test_worked_example_with_none_and_string_categories():
    with_none = [[None if isinstance(v, float) else v for v in row] for row in WORKED]
    assert krippendorff_alpha(with_none, "interval") == pytest.approx(
        krippendorff_alpha(np.asarray(WORKED), "interval"), abs=1e-15)
    names = ["very low", "low", "mid", "high", "very high"]
    named = [[None if isinstance(v, float) else names[v - 1] for v in row] for row in WORKED]
    assert krippendorff_alpha(named, "ordinal", values=names) == pytest.approx(0.8153875, abs=1e-6)
    # the nominal value does not depend on the order of the categories
    assert krippendorff_alpha(named, "nominal") == pytest.approx(0.743421052631579, abs=1e-12)
    # a string array cannot hold None: numpy stores np.nan as "nan", read as missing
    as_array = np.array([[names[v - 1] if not isinstance(v, float) else NAN for v in row]
                         for row in WORKED])
    assert as_array.dtype.kind == "U"
    assert krippendorff_alpha(as_array, "ordinal", values=names) == pytest.approx(0.8153875,
                                                                                  abs=1e-6)


def test_tiny_nominal_by_hand():
    # units (a,a) (a,b) (b,b) (b,b), 2 values each so every pair is divided by m_u - 1 = 1:
    #   o_aa = 2, o_ab = o_ba = 1, o_bb = 2 + 2 = 4  ->  n_a = 3, n_b = 5, n = 8
    #   alpha = 1 - (n - 1) * (o_ab + o_ba) / (n_a n_b + n_b n_a) = 1 - 7 * 2 / 30 = 8/15
    data = [["a", "a", "b", "b"], ["a", "b", "b", "b"]]
    assert krippendorff_alpha(data) == pytest.approx(8 / 15, abs=1e-15)
    assert krippendorff_alpha(data) == pytest.approx(reference(data, "nominal"), abs=1e-12)


def test_tiny_interval_by_hand():
    # units (1,1) (2,2) (3,4): o_11 = 2, o_22 = 2, o_34 = o_43 = 1  ->  n_1 = n_2 = 2, n_3 = n_4 = 1,
    # n = 6; sum o delta^2 = 2 * (3 - 4)^2 = 2;
    # sum_{c != k} n_c n_k delta^2 = 2 * (4*1 + 2*4 + 2*9 + 2*1 + 2*4 + 1*1) = 82
    # alpha = 1 - (n - 1) * 2 / 82 = 36/41
    data = [[1, 2, 3], [1, 2, 4]]
    assert krippendorff_alpha(data, "interval") == pytest.approx(36 / 41, abs=1e-15)
    # nominal: only (3,4) disagrees: o = diag(2, 2, 1, 1) off (3,4); sum_{c != k} n_c n_k = 36 - 10
    assert krippendorff_alpha(data, "nominal") == pytest.approx(1 - 5 * 2 / 26, abs=1e-15)


def test_perfect_agreement_and_no_variation():
    assert krippendorff_alpha([[1, 2, 3, None], [1, 2, 3, 4]], "nominal") == 1.0
    assert krippendorff_alpha([[1, 2, 3], [1, 2, 3], [1, 2, None]], "interval") == 1.0
    assert math.isnan(krippendorff_alpha([["x", "x", "x"], ["x", "x", None]]))
    # no unit with two values: nothing to compare
    assert math.isnan(krippendorff_alpha([[1, None, 3], [None, 2, None]]))


def test_unpaired_units_and_unused_categories_change_nothing():
    data = [["a", "b", "b", "c"], ["a", "b", "c", None]]
    base = krippendorff_alpha(data, "ordinal", values=["a", "b", "c"])
    padded = [row + [v] for row, v in zip(data, ["a", None])]
    assert krippendorff_alpha(padded, "ordinal", values=["a", "b", "c"]) == pytest.approx(base)
    assert krippendorff_alpha(data, "ordinal", values=["a", "z", "b", "c"]) == pytest.approx(base)


# --- against the reference implementation -----------------------------------------------------------


def random_matrix(seed, n_annotators, n_units, choices, missing=0.3):
    rng = np.random.default_rng(seed)
    # a per-unit "true" value plus noise, so that alpha is neither ~0 nor ~1
    truth = rng.integers(0, len(choices), n_units)
    noisy = np.clip(truth + rng.integers(-1, 2, (n_annotators, n_units)), 0, len(choices) - 1)
    data = np.asarray(choices, dtype=float)[noisy]
    data[rng.random(data.shape) < missing] = NAN
    return data


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("seed, shape, choices", [
    (0, (3, 40), [1, 2, 3]),
    (1, (4, 25), [0, 1, 2, 3, 4]),
    (2, (2, 60), [0.5, 1.0, 2.5, 7.0]),
    (3, (6, 15), [0, 3, 4, 10, 11, 30]),
    (4, (3, 200), [1, 2, 3]),
])
def test_matches_reference_numeric(level, seed, shape, choices):
    data = random_matrix(seed, *shape, choices)
    assert krippendorff_alpha(data, level) == pytest.approx(reference(data, level), abs=1e-9)


def test_matches_reference_continuous_values():
    rng = np.random.default_rng(7)
    data = rng.normal(5.0, 1.0, (1, 30)) + rng.normal(0.0, 0.7, (4, 30))
    data[rng.random(data.shape) < 0.25] = NAN
    for level in ("interval", "ratio"):
        assert krippendorff_alpha(data, level) == pytest.approx(reference(data, level), abs=1e-9)


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_matches_reference_string_categories(seed):
    ranks = random_matrix(seed, 3, 50, [0, 1, 2])
    labels = [[None if np.isnan(v) else FULFILMENT[int(v)] for v in row] for row in ranks]
    # the reference orders strings alphabetically; compare on the integer ranks of FULFILMENT
    for level in ("nominal", "ordinal"):
        ours = krippendorff_alpha(labels, level, values=FULFILMENT)
        assert ours == pytest.approx(reference(ranks, level, value_domain=[0, 1, 2]), abs=1e-9)


# --- bootstrap --------------------------------------------------------------------------------------


def test_bootstrap_alpha_deterministic_and_contains_estimate():
    data = random_matrix(5, 3, 60, [1, 2, 3])
    a = bootstrap_alpha(data, "ordinal", n_boot=300, seed=3)
    assert a == bootstrap_alpha(data, "ordinal", n_boot=300, seed=3)
    assert a["alpha"] == pytest.approx(krippendorff_alpha(data, "ordinal"))
    assert a["low"] <= a["alpha"] <= a["high"]
    assert a["low"] < a["high"]
    assert (a["n_boot"], a["seed"], a["n_valid"]) == (300, 3, 300)
    b = bootstrap_alpha(data, "ordinal", n_boot=300, seed=4)
    assert (b["low"], b["high"]) != (a["low"], a["high"])
    wider = bootstrap_alpha(data, "ordinal", n_boot=300, seed=3, ci=0.99)
    assert wider["low"] <= a["low"] and wider["high"] >= a["high"]


def test_bootstrap_alpha_skips_undefined_resamples():
    # one disagreeing unit among agreeing ones: resamples without it have D_o = 0 -> alpha 1;
    # resamples of a single category are undefined (nan) and skipped
    data = [["a", "a", "b", "a"], ["a", "a", "b", "b"]]
    res = bootstrap_alpha(data, n_boot=200, seed=0)
    assert 0 < res["n_valid"] < 200
    assert res["high"] == 1.0
    undefined = bootstrap_alpha([["x", "x"], ["x", "x"]], n_boot=50)
    assert math.isnan(undefined["alpha"]) and math.isnan(undefined["low"])
    assert undefined["n_valid"] == 0


def test_bootstrap_mean_basic():
    values = np.arange(20, dtype=float)
    res = bootstrap_mean(values, n_boot=500, seed=1)
    assert res["mean"] == pytest.approx(9.5)
    assert res["low"] < 9.5 < res["high"]
    assert res == bootstrap_mean(list(values), n_boot=500, seed=1)
    assert bootstrap_mean([2.0, 2.0, 2.0], n_boot=50) == {
        "mean": 2.0, "low": 2.0, "high": 2.0, "n": 3, "n_boot": 50, "seed": 0}


def test_clustered_bootstrap_is_wider():
    rng = np.random.default_rng(0)
    per_item = rng.integers(0, 2, 40).astype(float)
    values = np.repeat(per_item, 3)  # three identical judgments per item
    groups = np.repeat(np.arange(40), 3)
    flat = bootstrap_mean(values, n_boot=500, seed=0)
    clustered = bootstrap_mean(values, n_boot=500, seed=0, groups=list(groups))
    assert clustered["mean"] == flat["mean"]
    assert clustered["high"] - clustered["low"] > 1.3 * (flat["high"] - flat["low"])
    # resampling clusters of copies is resampling the items
    items = bootstrap_mean(per_item, n_boot=500, seed=0)
    assert clustered["high"] - clustered["low"] == pytest.approx(items["high"] - items["low"])


def test_clustered_mean_weights_values_not_groups():
    res = bootstrap_mean([1.0, 1.0, 1.0, 0.0], groups=["a", "a", "a", "b"], n_boot=200)
    assert res["mean"] == 0.75
    assert 0.0 <= res["low"] <= res["high"] <= 1.0


# --- rates ------------------------------------------------------------------------------------------


def test_win_rate_by_hand():
    outcomes = ["win", "win", "win", "tie", "tie", "loss"]
    res = win_rate(outcomes, n_boot=300)
    assert res["win_rate"] == pytest.approx(4 / 6)  # (3 + 2/2) / 6
    assert res["n"] == 6
    assert {k: res[k]["count"] for k in RELATIVE} == {"win": 3, "tie": 2, "loss": 1}
    assert {k: res[k]["share"] for k in RELATIVE} == pytest.approx(
        {"win": 0.5, "tie": 1 / 3, "loss": 1 / 6})
    assert 0.0 <= res["low"] <= res["win_rate"] <= res["high"] <= 1.0
    grouped = win_rate(outcomes, groups=[0, 0, 1, 1, 2, 2], n_boot=300)
    assert grouped["win_rate"] == res["win_rate"]
    assert win_rate(["tie"] * 4, n_boot=20)["win_rate"] == 0.5


def test_fulfilment_rates_by_hand():
    labels = ["fulfills"] * 5 + ["partially"] * 3 + ["does_not"] * 2
    res = fulfilment_rates(labels, groups=[i // 2 for i in range(10)], n_boot=300, seed=2)
    assert res["n"] == 10
    assert {k: res[k]["share"] for k in FULFILMENT} == pytest.approx(
        {"fulfills": 0.5, "partially": 0.3, "does_not": 0.2})
    assert {k: res[k]["count"] for k in FULFILMENT} == {"fulfills": 5, "partially": 3,
                                                          "does_not": 2}
    for k in FULFILMENT:
        assert 0.0 <= res[k]["low"] <= res[k]["share"] <= res[k]["high"] <= 1.0
    assert res == fulfilment_rates(labels, groups=[i // 2 for i in range(10)], n_boot=300, seed=2)


def test_unblind_both_orders():
    assert [unblind(c, True) for c in CHOICES] == ["win", "tie", "loss"]
    assert [unblind(c, False) for c in CHOICES] == ["loss", "tie", "win"]
    assert unblind("first", np.bool_(False)) == "loss"


# --- building the matrix ----------------------------------------------------------------------------


def test_reliability_matrix_from_records():
    records = [
        {"item": "p1", "annotator": "ann", "value": "fulfills"},
        {"item": "p1", "annotator": "bob", "value": "partially"},
        {"item": "p2", "annotator": "bob", "value": "does_not"},
        {"item": "p3", "annotator": "cat", "value": "fulfills"},
        {"item": "p2", "annotator": "ann", "value": "does_not"},
    ]
    matrix, units, annotators = reliability_matrix(records, "item", "annotator", "value")
    assert units == ["p1", "p2", "p3"]
    assert annotators == ["ann", "bob", "cat"]
    assert matrix == [["fulfills", "does_not", None],
                      ["partially", "does_not", None],
                      [None, None, "fulfills"]]
    assert krippendorff_alpha(matrix, "ordinal", values=FULFILMENT) == pytest.approx(
        reference([[0, 2, NAN], [1, 2, NAN], [NAN, NAN, 0]], "ordinal"), abs=1e-12)
    composite, units, _ = reliability_matrix(
        [{"prompt": "p", "sample": s, "annotator": "a", "value": "tie"} for s in (0, 1)],
        unit_key=lambda r: (r["prompt"], r["sample"]))
    assert units == [("p", 0), ("p", 1)] and composite == [["tie", "tie"]]


# --- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize("data, kwargs, message", [
    ([1, 2, 3], {}, "2-D"),
    ([[[1, 2]], [[1, 2]]], {}, "2-D"),
    ([[1, 2], [3]], {}, "2-D"),
    ([[1, 2, 3]], {}, "at least 2 annotators"),
    ([[], []], {}, "no units"),
    ([[1, 2], [1, 2]], {"level": "cardinal"}, "unknown level"),
    ([["a", "b"], ["a", "b"]], {"level": "interval"}, "interval level needs finite numbers"),
    ([[1, 2], [1, -1]], {"level": "ratio"}, "non-negative"),
    ([["a", 1], ["a", 1]], {}, "pass values"),
    ([["a", "b"], ["a", "c"]], {"values": ["a", "b"]}, "not in `values`"),
    ([["a", "b"], ["a", "b"]], {"values": ["a", "b", "a"]}, "duplicates"),
])
def test_alpha_bad_input(data, kwargs, message):
    with pytest.raises(ValueError, match=message):
        krippendorff_alpha(data, **kwargs)


def test_other_bad_input():
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_alpha(WORKED, n_boot=0)
    with pytest.raises(ValueError, match="ci must be"):
        bootstrap_mean([1.0, 2.0], ci=95)
    with pytest.raises(ValueError, match="one per value"):
        bootstrap_mean([1.0, 2.0], groups=[0])
    with pytest.raises(ValueError, match="finite"):
        bootstrap_mean([1.0, NAN])
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_mean([])
    with pytest.raises(ValueError, match="unknown fulfilment labels 'yes'"):
        fulfilment_rates(["fulfills", "yes"])
    with pytest.raises(ValueError, match="unknown outcomes 'first'"):
        win_rate(["win", "first"])
    with pytest.raises(ValueError, match="no outcomes"):
        win_rate([])
    with pytest.raises(ValueError, match="unknown choice 'left'"):
        unblind("left", True)
    with pytest.raises(TypeError, match="bool"):
        unblind("first", "false")
    with pytest.raises(ValueError, match="more than once"):
        reliability_matrix([{"item": 1, "annotator": "a", "value": 1}] * 2)
    with pytest.raises(ValueError, match="no field 'value'"):
        reliability_matrix([{"item": 1, "annotator": "a"}])
