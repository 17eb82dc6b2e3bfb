"""Building a RunConfig from YAML or a plain dict: dotted `section.key=value` overrides, then
type checks that name the key, then finalize (checks.py)."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pretrain.config.checks import finalize
from pretrain.config.errors import ConfigError
from pretrain.config.run import RunConfig


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML or override value to the annotated type; raise naming the key."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is list:
        return _build_list(typing.get_args(tp)[0], value, key)
    if dataclasses.is_dataclass(tp):  # an optional sub-section (model.rope_scaling)
        return _build(tp, _yaml_text(value, key), f"{key}.")
    raise AssertionError(f"unsupported config type {tp} at {key}")


def _yaml_text(value: Any, key: str) -> Any:
    """An override's text for a list or a mapping (`key='{a: 1}'`) parsed as YAML flow text;
    other values as they are."""
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: not valid YAML: {e}") from None


def _build_list(item: type, value: Any, key: str) -> list:
    """A list field: a YAML list, or its YAML flow text from an override
    (`data.stages='[{path: A, start_step: 0}]'`); null is the empty list."""
    value = _yaml_text(value, key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if dataclasses.is_dataclass(item):
        return [_build(item, entry, f"{key}.{i}.") for i, entry in enumerate(value)]
    return [_coerce(entry, item, f"{key}.{i}") for i, entry in enumerate(value)]


def _build(cls: type, raw: dict, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = prefix + unknown[0]
        raise ConfigError(
            f"{key}: unknown key; valid keys under '{prefix.rstrip('.') or 'config'}' are {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.steps=40")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    # YAML parsing gives `40` -> int, `true` -> bool, `null` -> None, `1e-4` -> str in YAML 1.1,
    # so numbers in exponent form are retried as float.
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, str):
        try:
            parsed = float(parsed) if any(c in parsed for c in "eE.") else parsed
        except ValueError:
            pass
    if not isinstance(parsed, (bool, int, float, str, type(None))):
        parsed = value  # lists, mappings, dates: keep the text, the field type decides
    return key.split("."), parsed


def _is_string_field(path: list[str]) -> bool:
    """Whether `path` names a str-typed config field (its override text is then taken verbatim)."""
    cls: Any = RunConfig
    for part in path:
        if typing.get_origin(cls) is list and part.isdigit():  # data.stages.1.path
            cls = typing.get_args(cls)[0]
            continue
        if not dataclasses.is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        cls = hints[part]
    return cls is str


def _child(node: dict | list, part: str, text: str, *, list_below: bool) -> dict | list:
    """The section or list (or list entry: `data.stages.1`) an override descends into. The entry
    just past a list's end is added, so `data.stages.2.path=...` can append a stage."""
    if isinstance(node, list):
        if not part.isdigit() or int(part) > len(node):
            raise ConfigError(f"override {text!r}: {part!r} is not an index of a list of {len(node)} entries")
        if int(part) == len(node):
            node.append({})
        child = node[int(part)]
    else:
        child = node.get(part)
        if isinstance(child, str) and list_below:  # an earlier override's YAML text
            try:
                child = yaml.safe_load(child)
            except yaml.YAMLError:
                raise ConfigError(f"override {text!r}: {part} holds {child!r}, not a YAML list") from None
        if child is None:
            child = [] if list_below else {}
        node[part] = child
    if not isinstance(child, (dict, list)):
        raise ConfigError(f"override {text!r}: {part} is not a section")
    return child


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` overrides to a nested dict (before typing, so types are checked once)."""
    for text in overrides:
        path, value = _parse_override(text)
        if _is_string_field(path):
            value = text.split("=", 1)[1]  # `data.tokenizer=1e5` stays the path "1e5"
        node = raw
        for part, below in zip(path[:-1], path[1:]):
            node = _child(node, part, text, list_below=below.isdigit())
        if isinstance(node, list):
            raise ConfigError(f"override {text!r}: set a field of a list entry, e.g. data.stages.1.start_step=90")
        node[path[-1]] = value
    return raw


def config_from_dict(raw: dict, overrides: list[str] = ()) -> RunConfig:
    raw = apply_overrides(_deep_copy(raw), list(overrides))
    config = _build(RunConfig, raw, "")
    finalize(config)
    return config


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config, apply `key.sub=value` overrides, fill derived values, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (see configs/ for examples)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    # A list or a scalar at the top level would reach the overrides as a non-dict and fail there
    # with a TypeError; say what the file must look like instead.
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections (model:, train:, ...) at the top level, "
            f"got a {type(raw).__name__}; see configs/ for examples"
        )
    try:
        return config_from_dict(raw, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


def _deep_copy(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _deep_copy(v) for k, v in raw.items()}
    return raw
