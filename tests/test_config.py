"""Config: nested configs from and to JSON dicts, and errors that name the field."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from chameleon_lm.generation.sampling import GenerationConfig
from chameleon_lm.utils.config import Config


@dataclass
class Inner(Config):
    x: int
    """Must be >= 0."""
    y: float = 1.0

    def __post_init__(self) -> None:
        if self.x < 0:
            raise ValueError(f"x must be >= 0, got {self.x}")


@dataclass
class Middle(Config):
    inner: Inner
    many: list[Inner] = field(default_factory=list)


@dataclass
class Outer(Config):
    middle: Middle
    maybe: Inner | None = None
    pair: tuple[int, int] = (1, 2)
    sizes: tuple[int, ...] = ()
    weights: dict[str, float] = field(default_factory=dict)


def test_nested_configs_are_built_from_dicts_and_round_trip():
    d = {"middle": {"inner": {"x": 1}, "many": [{"x": 2, "y": 3}, {"x": 4}]}, "maybe": {"x": 5},
         "pair": [3, 4], "sizes": [1, 2, 3], "weights": {"a": 1}}
    cfg = Outer.from_dict(d)
    assert cfg == Outer(Middle(Inner(1), [Inner(2, 3.0), Inner(4)]), Inner(5), (3, 4), (1, 2, 3), {"a": 1})
    assert isinstance(cfg.middle.many[1], Inner) and cfg.pair == (3, 4) and cfg.sizes == (1, 2, 3)
    as_json = json.loads(json.dumps(cfg.to_dict()))
    assert as_json["middle"]["many"][0] == {"x": 2, "y": 3} and as_json["pair"] == [3, 4]
    assert Outer.from_dict(as_json) == cfg
    assert Outer.from_dict({"middle": {"inner": {"x": 0}}, "maybe": None}).maybe is None
    # Configs already built are kept as they are.
    assert Outer.from_dict({"middle": Middle(Inner(7))}).middle.inner.x == 7


@pytest.mark.parametrize("d, message", [
    ({"middle": {"inner": {"x": "1"}}}, r"Outer\.middle\.inner\.x: expected"),
    ({"middle": {"inner": {"x": 1}, "many": [{"x": 1}, {"z": 1}]}},
     r"Outer\.middle\.many\[1\]: unknown field\(s\) \['z'\]"),
    ({"middle": {"inner": {"y": 1.0}}}, r"Outer\.middle\.inner: missing field\(s\) \['x'\]"),
    ({"middle": {"inner": {"x": -1}}}, r"Outer\.middle\.inner: x must be >= 0"),
    ({"middle": {"inner": 3}}, r"Outer\.middle\.inner: expected"),
    ({"middle": {"inner": {"x": 1}, "many": {"x": 1}}}, r"Outer\.middle\.many: expected"),
    ({"middle": {"inner": {"x": 1}}, "maybe": [1]}, r"Outer\.maybe: expected"),
    ({"middle": {"inner": {"x": 1}}, "pair": [1, 2, 3]}, r"Outer\.pair: expected 2 values"),
    ({"middle": {"inner": {"x": 1}}, "sizes": [1, "2"]}, r"Outer\.sizes\[1\]: expected"),
    ({"middle": {"inner": {"x": 1}}, "weights": {"a": "high"}}, r"Outer\.weights\['a'\]: expected"),
    ({}, r"Outer: missing field\(s\) \['middle'\]"),
])
def test_errors_name_the_nested_field(d, message):
    with pytest.raises(ValueError, match=message):
        Outer.from_dict(d)


def test_a_config_with_its_own_from_dict_still_round_trips():
    cfg = GenerationConfig.preset("anole")
    assert GenerationConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        GenerationConfig.from_dict({"text": {"temp": 1.0}})
