"""Shared behaviour of the configuration dataclasses: named presets, JSON round trips, overrides.

Every stage's config is a plain ``@dataclass`` that inherits :class:`Config` and registers its presets
with :meth:`Config.register_preset`. A config is always fully described by its JSON dict, so a
checkpoint folder holds ``<name>.json`` next to its safetensors and nothing else is needed to rebuild it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

C = TypeVar("C", bound="Config")


class Config:
    """Mixin for dataclass configs: ``preset(name)``, ``to_dict``/``from_dict``, ``save``/``load``."""

    _presets: ClassVar[dict[str, Callable[[], Any]]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._presets = {}

    @classmethod
    def register_preset(cls, name: str) -> Callable[[Callable[[], C]], Callable[[], C]]:
        """Decorator: register a zero-argument function returning a config under ``name``."""

        def deco(fn: Callable[[], C]) -> Callable[[], C]:
            cls._presets[name] = fn
            return fn

        return deco

    @classmethod
    def preset_names(cls) -> list[str]:
        return sorted(cls._presets)

    @classmethod
    def preset(cls: type[C], name: str, **overrides: Any) -> C:
        """The named preset, with optional field overrides (``preset("tiny", n_layers=3)``)."""
        if name not in cls._presets:
            raise KeyError(
                f"unknown {cls.__name__} preset {name!r}; known: {', '.join(cls.preset_names())}"
            )
        cfg = cls._presets[name]()
        return dataclasses.replace(cfg, **overrides) if overrides else cfg

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        """Build from a JSON dict; fields typed as configs (or lists of them) are built from dicts too."""
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__}: expected a mapping, got {d!r}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}")
        missing = [n for n, f in fields.items() if n not in d and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"{cls.__name__}: missing field(s) {missing}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _build(v, hints[k], f"{cls.__name__}.{k}") for k, v in d.items()})

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def load(cls: type[C], path: str | os.PathLike) -> C:
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(d)


def _is_config(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, Config)


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON-ish value fits a field's type hint at the top level (ints are accepted for floats)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if _is_config(hint):
        return isinstance(value, (dict, hint))
    if origin in (tuple, list):
        return isinstance(value, (tuple, list))
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, origin or hint)


def _build(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against ``hint`` all the way down, nested configs built from their dicts.

    Args:
        value: The JSON-ish value of a field (or of an element of one).
        hint: The type hint it must fit.
        where: The field's name in error messages (``MixtureConfig.sources[0].weight``).
    """
    if not _matches(value, hint):
        raise ValueError(f"{where}: expected {hint}, got {value!r}")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _build(value, next(h for h in args if _matches(value, h)), where)
    if _is_config(hint):
        if isinstance(value, hint):
            return value
        try:
            return hint.from_dict(value)
        except ValueError as e:
            msg = str(e)
            # The nested message starts with the class name: put the field's full path there instead.
            msg = msg[len(hint.__name__):] if msg.startswith(hint.__name__) else ": " + msg
            raise ValueError(where + msg) from e
    if origin is list and args:
        return [_build(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple and args:
        # JSON has no tuples: a list where a tuple is asked for becomes one.
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{where}: expected {len(args)} values ({hint}), got {value!r}")
        return tuple(_build(v, h, f"{where}[{i}]") for i, (v, h) in enumerate(zip(value, args)))
    if origin is tuple:
        return tuple(value)
    if origin is dict and args:
        return {_build(k, args[0], f"{where} key"): _build(v, args[1], f"{where}[{k!r}]")
                for k, v in value.items()}
    return value


def _jsonable(v: Any) -> Any:
    if isinstance(v, Config):
        return v.to_dict()
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


def read_config_file(path: Path) -> dict[str, Any]:
    """A TOML, YAML or JSON file as a dict."""
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"{path}: unknown config format (use .toml, .yaml or .json)")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a mapping")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key=value`` or ``a.b=value`` (values parsed as YAML: ``steps=10``, ``betas=[0.9,0.99]``)."""
    data = json.loads(json.dumps(data))  # deep copy
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value")
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p} is not a mapping")
        node[leaf] = yaml.safe_load(raw)
    return data
