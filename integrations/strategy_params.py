"""Strategy configs from JSON-like parameters (the REST body's ``strategy_params``), checked field by field."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ragkv.kvstore.errors import ConfigError


def config_from_params(config_class: type, params: Mapping[str, Any]) -> Any:
    """Build a frozen strategy config from JSON values, converting lists to tuples and nested objects to
    nested configs. Unknown names and wrong types raise ``ConfigError`` naming what is allowed."""
    if not dataclasses.is_dataclass(config_class):
        raise ConfigError(f"{config_class.__name__} takes no parameters")
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ConfigError(f"unknown strategy parameters {unknown}; allowed: {sorted(fields)}")
    defaults = config_class()
    values: dict[str, Any] = {}
    for name, value in params.items():
        values[name] = _convert(name, value, getattr(defaults, name))
    try:
        return config_class(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid strategy parameters: {exc}") from exc


def _convert(name: str, value: Any, default: Any) -> Any:
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        if not isinstance(value, Mapping):
            raise ConfigError(f"strategy parameter {name!r} must be an object")
        return config_from_params(type(default), value)
    if value is None:
        if default is None:
            return None
        raise ConfigError(f"strategy parameter {name!r} may not be null")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"strategy parameter {name!r} must be a boolean")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"strategy parameter {name!r} must be an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"strategy parameter {name!r} must be a number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"strategy parameter {name!r} must be a string")
        return value
    if isinstance(default, tuple) or default is None:
        if isinstance(value, list):
            if len(value) > 256 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise ConfigError(f"strategy parameter {name!r} must be a list of at most 256 numbers")
            return tuple(value)
        if default is None and isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        raise ConfigError(f"strategy parameter {name!r} must be a list of numbers")
    raise ConfigError(f"strategy parameter {name!r} cannot be set through this interface")


__all__ = ["config_from_params"]
