"""Shared behaviour of the configuration dataclasses: named presets, JSON round trips, overrides.

Every stage's config is a plain ``@dataclass`` that inherits :class:`Config` and registers its presets
with :meth:`Config.register_preset`. A config is always fully described by its JSON dict, so a
checkpoint folder holds ``<name>.json`` next to its safetensors and nothing else is needed to rebuild it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

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
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for k, v in d.items():
            if not _matches(v, hints[k]):
                raise ValueError(f"{cls.__name__}.{k}: expected {hints[k]}, got {v!r}")
            default = names[k].default
            # JSON has no tuples: restore them where the field's default is one.
            kwargs[k] = tuple(v) if isinstance(v, list) and isinstance(default, tuple) else v
        return cls(**kwargs)

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


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON-ish value fits a field's type hint (ints are accepted for floats)."""
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
    if origin in (tuple, list):
        return isinstance(value, (tuple, list))
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, origin or hint)


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    return v
