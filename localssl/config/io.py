"""Configs from and to dicts and YAML: type checks and coercion of every value, and upgrades of old configs.

Unknown keys are errors that list the valid ones; a value of the wrong type
is an error naming its key; a TrainConfig of an earlier version (rule
options as top-level keys) loads as today's.
"""
from __future__ import annotations

import types
import typing
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import yaml

from localssl.config.errors import ConfigError, shown
from localssl.config.schema import TrainConfig


def _check_type(cls_name: str, name: str, tp: Any, value: Any) -> Any:
    """Coerce YAML/CLI values to the field type, or fail naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _check_type(cls_name, name, non_none[0], value)
    if origin is dict:
        if isinstance(value, (list, tuple, str)):
            value = parse_key_values(cls_name, name, value)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{cls_name}.{name}: expected a mapping of names to values, got {value!r}")
        return dict(value)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{cls_name}.{name}: expected a list, got {shown(value)}")
        return [_check_type(cls_name, name, args[0], v) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{cls_name}.{name}: expected true/false, got {shown(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{cls_name}.{name}: expected an integer, got {shown(value)}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{cls_name}.{name}: expected an integer, got {shown(value)}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{cls_name}.{name}: expected a number, got {shown(value)}")
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{cls_name}.{name}: expected a number, got {shown(value)}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{cls_name}.{name}: expected a string, got {shown(value)}")
        return str(value)
    return value


def parse_key_values(cls_name: str, name: str, items: str | list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["stem=cifar", "cut=units"]`` (the command line's form of a mapping) as a dict of strings."""
    out = {}
    for item in [items] if isinstance(items, str) else items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{cls_name}.{name}: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


# Rule options that were TrainConfig fields before rules had options of their
# own; configs and checkpoints of those versions still load (`_upgrade_train`).
LEGACY_RULE_KEYS = ("f", "feedback", "b_l2", "temperature", "proj_dim")


def _upgrade_train(data: dict[str, Any]) -> dict[str, Any]:
    """A TrainConfig mapping of an earlier version, with its rule options moved into ``rule_options``.

    Only the options the rule has are kept (a CLAPP++ run saved InfoNCE's
    temperature too, unused); keys given in ``rule_options`` win.
    """
    legacy = {k: data[k] for k in LEGACY_RULE_KEYS if k in data}
    if not legacy:
        return data
    from localssl.rules import RULES

    data = {k: v for k, v in data.items() if k not in LEGACY_RULE_KEYS}
    rule = data.get("rule", TrainConfig.rule)
    if rule in RULES:
        known = {f.name for f in fields(RULES.get(rule).options)}
        kept = {k: v for k, v in legacy.items() if k in known}
        data["rule_options"] = {**kept, **(data.get("rule_options") or {})} or None
    return data


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a config dataclass from a dict; unknown keys list the valid ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"a {cls.__name__} must be a mapping, got {type(data).__name__}")
    if cls is TrainConfig:
        data = _upgrade_train(data)
    hints = typing.get_type_hints(cls)
    valid = {f.name for f in fields(cls)}
    # A YAML key may be a number, null or a list: sorted by repr, so mixed types still make a message.
    unknown = sorted(map(shown, set(data) - valid))
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} key(s) {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}; "
            f"valid keys: {', '.join(sorted(valid))}"
        )
    kwargs = {k: _check_type(cls.__name__, k, hints[k], v) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return asdict(cfg)


# A config is a few hundred bytes; reading at most this much keeps a wrong --config (an archive, a log)
# from being read whole into memory before it is refused.
MAX_CONFIG_BYTES = 1 << 20


def load_yaml(cls: type, path: str | Path) -> Any:
    """A ``cls`` from the YAML file ``path``; every failure is a `ConfigError` naming the file (and key).

    ``yaml.safe_load`` builds plain values only: a ``!!python/...`` tag is an
    error, never an object, so opening a config runs no code.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror or e})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is over {MAX_CONFIG_BYTES >> 20} MiB: not a localssl config")
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}): not a YAML config") from None
    except yaml.MarkedYAMLError as e:
        # PyYAML's own text spans several lines and quotes the source; one line with the position is enough.
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        if isinstance(e, yaml.constructor.ConstructorError) and e.problem and "tag" in e.problem:
            raise ConfigError(f"config file {path}{where}: {e.problem} (a config holds plain values only; the tag "
                              "was refused, nothing was run)") from None
        raise ConfigError(f"config file {path} is not valid YAML{where}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} nests its values too deeply to be a config") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"config file {path} holds a value that cannot be read: {e}") from None
    try:
        return from_dict(cls, {} if data is None else data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML atomically (temp file + rename); a failed write leaves no temp file."""
    from localssl.atomic import atomic_file

    with atomic_file(path, "w") as fh:
        fh.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def replace(cfg: Any, **overrides: Any) -> Any:
    """A copy of ``cfg`` with ``overrides`` applied through the same type checks."""
    data = to_dict(cfg)
    data.update(overrides)
    return from_dict(type(cfg), data)

