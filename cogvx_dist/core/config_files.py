"""Configuration: nested dataclasses loaded from YAML or TOML, with `section.key=value` command-line overrides.

Unknown keys and values of the wrong type are rejected with a message that names the full key; impossible
combinations are checked by each config's `validate`.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cogvx_dist.core.errors import CogvxError, first_line

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except CogvxError as err:
                errors.append(str(err))
        raise CogvxError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise CogvxError(f"{key} must be a table/mapping, got {value!r}")
        return from_dict(annotation, value, prefix=f"{key}.")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise CogvxError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise CogvxError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise CogvxError(f"{key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise CogvxError(f"{key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise CogvxError(f"{key} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise CogvxError(f"{key} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise CogvxError(f"{key} must be a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    types_of = _field_types(cls)
    unknown = sorted(set(data) - set(types_of))
    if unknown:
        known = ", ".join(sorted(types_of))
        raise CogvxError(f"unknown config key {prefix}{unknown[0]} (known keys here: {known})")
    values = {name: _coerce(value, types_of[name], f"{prefix}{name}") for name, value in data.items()}
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-data form of a config (for saving next to a run)."""
    return dataclasses.asdict(config)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML (.yaml/.yml) or TOML (.toml) config file into a mapping."""
    path = Path(path)
    if not path.is_file():
        raise CogvxError(f"config file {path} does not exist")
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise CogvxError(f"{path}: not UTF-8 text") from err
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except tomllib.TOMLDecodeError as err:
        raise CogvxError(_syntax_error(path, "TOML", *_toml_error_place(err))) from err
    except yaml.MarkedYAMLError as err:
        # PyYAML's message spans five lines with a caret drawing; its marks hold the place (counted from 0).
        mark = err.problem_mark
        problem = err.problem or first_line(err)
        if err.context and err.context_mark is not None:
            problem += f" ({err.context} at line {err.context_mark.line + 1}, column {err.context_mark.column + 1})"
        raise CogvxError(_syntax_error(path, "YAML", problem, mark.line + 1 if mark else None,
                                       mark.column + 1 if mark else None)) from err
    except yaml.YAMLError as err:
        raise CogvxError(_syntax_error(path, "YAML", first_line(err), None, None)) from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CogvxError(f"{path}: the top level must be a mapping")
    return data


_TOML_PLACE = re.compile(r"^(?P<problem>.*) \(at line (?P<line>\d+), column (?P<column>\d+)\)$")


def _toml_error_place(err: tomllib.TOMLDecodeError) -> tuple[str, int | None, int | None]:
    """(problem, line, column) of a TOML error: Python 3.14 gives them as attributes, earlier versions only inside
    the message ("Invalid value (at line 3, column 7)")."""
    message = first_line(err)
    found = _TOML_PLACE.match(message)
    problem = found["problem"] if found else message
    line = getattr(err, "lineno", None) or (int(found["line"]) if found else None)
    column = getattr(err, "colno", None) or (int(found["column"]) if found else None)
    return getattr(err, "msg", None) or problem, line, column


def _syntax_error(path: Path, language: str, problem: str, line: int | None, column: int | None) -> str:
    """One line: the file, and where in it, first (as compilers print it, so editors and terminals can jump there)."""
    place = f"{path}:{line}:{column}" if line is not None and column is not None else str(path)
    return f"{place}: {language} syntax error: {problem}"


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (values parsed as YAML scalars/lists) to a nested mapping."""
    result = dict(data)
    for override in overrides:
        if "=" not in override:
            raise CogvxError(f"override {override!r} is not of the form section.key=value")
        dotted, raw = override.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = result
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return result


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load `cls` from an optional file plus overrides, then run its `validate()` if it has one."""
    data = read_config_file(path) if path else {}
    config = from_dict(cls, apply_overrides(data, overrides or []))
    validate = getattr(config, "validate", None)
    if validate:
        validate()
    return config
