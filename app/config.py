"""One config system: dataclasses with working defaults, overridden by a YAML/JSON file, then by
`--key=value` / `--section.key=value` command-line flags."""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config dataclass."""


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON-able data (nested dataclasses become dicts)."""
    return dataclasses.asdict(cfg)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) for `X | None` / `Optional[X]`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert `value` (from YAML or a command-line string) to the annotated type `tp`."""
    tp, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{where}: None is not allowed")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _merge(tp(), value, where)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if isinstance(value, str):
            value = json.loads(value)
        return dict(value)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is str and isinstance(value, bool):  # YAML's `true` for an auto | true | false field
        return "true" if value else "false"
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, str):
                return int(float(value)) if "e" in value.lower() else int(value)
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    return value


def _merge(cfg: T, data: dict[str, Any], where: str) -> T:
    types_ = _field_types(type(cfg))
    unknown = set(data) - set(types_)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(types_)}")
    for k, v in data.items():
        if dataclasses.is_dataclass(types_[k]) and isinstance(v, dict):
            setattr(cfg, k, _merge(getattr(cfg, k), v, f"{where}.{k}"))
        else:
            setattr(cfg, k, _coerce(v, types_[k], f"{where}.{k}"))
    return cfg


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build `cls` from (possibly partial, possibly nested) plain data; unknown keys are errors.

    A config class may define `validate()` (raising ConfigError); it runs on the result."""
    cfg = _merge(cls(), data, cls.__name__)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        data = data.setdefault(k, {})
    data[keys[-1]] = value


def parse_config(cls: type[T], argv: list[str] | None = None, description: str = "") -> T:
    """Parse `[--config FILE] [--key=value | --key value | --section.key=value ...]` into `cls`.

    Precedence: dataclass defaults < config file < flags. A bare `--flag` sets a bool to true.
    Unknown keys or unparsable values exit with a one-line message (argparse's usage error).
    """
    parser = argparse.ArgumentParser(description=description or cls.__doc__,
                                     epilog="Any config field may be set as --field=value or --section.field=value.")
    parser.add_argument("--config", help="YAML or JSON file with config values")
    args, rest = parser.parse_known_args(argv)
    data: dict[str, Any] = {}
    if args.config:
        from app import storage  # local import: config must stay importable without storage deps

        try:
            data = yaml.safe_load(storage.read_text(args.config)) or {}
        except FileNotFoundError:
            parser.error(f"config file not found: {args.config}")
    i = 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--"):
            parser.error(f"unexpected argument {tok!r} (flags look like --key=value)")
        key, eq, value = tok[2:].partition("=")
        if not eq:
            if i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                value, i = rest[i + 1], i + 1
            else:
                value = "true"
        _set_path(data, key.replace("-", "_"), value)
        i += 1
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits
