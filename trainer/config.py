"""The one config system: YAML recipes mapped onto dataclasses, with `key=value` overrides.

    cfg = load_config("launch_configs/encoder_ssl.yaml", ["encoder_ssl.train.lr=3e-4", "seed=1"])

Unknown keys, wrong types and missing files fail here, before any compute, naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class TrainConfig:
    """What every stage's loop needs."""

    batch_size: int = 32  # per process, per micro-step
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_steps: int = 1000  # optimizer steps
    max_grad_norm: float = 1.0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    checkpoint_every: int = 0  # 0: checkpoint at the end only
    keep_checkpoints: int = 2
    num_workers: int = 0  # DataLoader workers per process


def _is_dataclass_type(t) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def _coerce(value, t, key: str):
    """Check/convert one value against a dataclass field type; dataclasses recurse."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(t)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if _is_dataclass_type(t):
        if isinstance(value, t):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(t, value, key)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(t) or (typing.Any,)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is typing.Literal:
        if value not in typing.get_args(t):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(t))}")
        return value
    if t is typing.Any:
        return value
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if t is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-3 as a string
        except ValueError:
            pass
    if t is dict and isinstance(value, dict):
        return value
    if not isinstance(value, t) or (t is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {t.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a dict; unknown keys are errors that suggest the nearest name."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in hints:
            near = difflib.get_close_matches(key, names, n=1)
            raise ConfigError(f"unknown key {full!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                              + f"; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`a.b.c=value` sets data['a']['b']['c'] (value parsed as YAML: 3, 1e-3, true, [a, b])."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def check_path(path: str | None, key: str, kind: str = "file or folder") -> None:
    if path and not os.path.exists(path):
        raise ConfigError(f"{key}: {kind} not found: {path}")


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"recipe not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of keys")
    # YAML anchors / aliases (`common: &c {...}`, `lora: *c`) load as ONE shared dict: an override of
    # one section would silently change the other. A JSON round trip gives each section its own copy.
    return json.loads(json.dumps(data, default=str))


__all__ = ["ConfigError", "TrainConfig", "from_dict", "apply_overrides", "to_dict", "check_path", "load_yaml", "field"]
