"""YAML + `section.key=value` overrides -> RunConfig, strictly: unknown keys and wrong types are errors."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from opt_ds.config.resolve import ResolvedConfig, resolve
from opt_ds.config.sections import ConfigError, RunConfig


def _closest(name: str, choices) -> str:
    match = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _coerce(value: Any, annotation, where: str):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is typing.Union:                  # Optional[X]
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), where)
    if dataclasses.is_dataclass(annotation):
        return build_dataclass(annotation, value, where)
    if origin in (list, typing.List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):          # YAML 1.1 reads 1e-2 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def build_dataclass(cls, values, where: str = ""):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown key {path!r}{_closest(key, names)}; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _key_type(dotted: list):
    """The annotation of a dotted key of RunConfig (e.g. ["sample", "prompt"] -> Optional[str]); None when the
    path is not a key (build_dataclass then reports it with a suggestion)."""
    cls = RunConfig
    annotation = None
    for key in dotted:
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if key not in hints:
            return None
        annotation = hints[key]
        cls = _without_none(annotation)
    return annotation


def _without_none(annotation):
    if typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def parse_override_value(dotted: list, text: str):
    """A string key takes the text as written (`sample.prompt=Q: What` is the string "Q: What", not a YAML
    mapping); `null` or `~` clear an optional string. Every other key's value is parsed as YAML, which its
    type needs (numbers, booleans, lists such as data.train=[{path: corpus}])."""
    annotation = _key_type(dotted)
    if annotation is not None and _without_none(annotation) is str:
        optional = annotation is not str
        return None if optional and text in ("null", "~") else text
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict, overrides) -> dict:
    """Apply `section.key=value` strings to a nested dict (values parsed by parse_override_value)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.steps=100)")
        dotted, text = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {key!r} is not a section")
        try:
            node[keys[-1]] = parse_override_value(keys, text)
        except yaml.YAMLError as err:
            reason = str(err).splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({reason}); quote it for the "
                              "shell, e.g. 'data.train=[{path: corpus}]'") from None
    return raw


def load_config(path=None, overrides=(), world_size: Optional[int] = None) -> "ResolvedConfig":
    """Read a YAML config (None or "-": no file, defaults) and apply `section.key=value` overrides."""
    raw: dict = {}
    if path is not None and str(path) != "-":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; pass a YAML file such as "
                              "ds_configs/demo.yaml")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, parallel:, ...)")
        if isinstance(raw.get("deepspeed"), str) and not Path(raw["deepspeed"]).is_absolute():
            raw["deepspeed"] = str(path.parent / raw["deepspeed"])    # relative to the YAML file
    raw = apply_overrides(raw, overrides)
    return resolve(build_dataclass(RunConfig, raw), world_size)
