"""The rule registry: names, each rule's typed options, and `build_rule`.

A rule registers its factory ``(feature_shapes, options, grids) -> Rule`` next
to its code with `register_rule`, naming the dataclass of its options (a
`RuleOptions` subclass) and, for a local rule, the end-to-end rule its
gradient is compared with (gradient alignment, METHODS 3). Options come as a
mapping (YAML ``rule_options:``, or ``--rule-opt KEY=VALUE``), checked against
that dataclass: an unknown key lists the valid ones, a wrong type names its
key. Nothing outside ``rules/`` names a rule or knows its options.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from localssl.config import ConfigError, from_dict
from localssl.registry import Registry
from localssl.rules.base import Rule, RuleOptions, check_groups


@dataclass(frozen=True)
class RuleEntry:
    factory: Callable[..., Rule]
    options: type[RuleOptions]
    counterpart: str | None = None


RULES: Registry[RuleEntry] = Registry("rule")


def register_rule(name: str, options: type[RuleOptions] = RuleOptions, counterpart: str | None = None) -> Callable:
    """Decorator: register a rule factory ``(feature_shapes, options, grids) -> Rule`` under ``name``."""

    def deco(factory: Callable[..., Rule]) -> Callable[..., Rule]:
        RULES.register(name)(RuleEntry(factory, options, counterpart))
        return factory

    return deco


def rule_options(name: str, options: Mapping[str, Any] | RuleOptions | None = None) -> RuleOptions:
    """The typed, checked options of rule ``name`` from a mapping (its defaults for None)."""
    cls = RULES.get(name).options
    if isinstance(options, RuleOptions):
        if not isinstance(options, cls):
            raise ConfigError(f"rule {name!r} takes {cls.__name__}, got {type(options).__name__}")
        opts = options
    else:
        given = dict(options or {})
        if given and cls is RuleOptions:
            raise ConfigError(f"rule {name!r} takes no rule_options, got {', '.join(map(repr, sorted(given)))}")
        try:
            opts = from_dict(cls, given)
        except ConfigError as e:
            raise ConfigError(f"rule_options of {name}: {e}") from None
    try:
        _check_finite(opts)
        opts.check()
    except ValueError as e:
        raise ConfigError(f"rule_options of {name}: {e}") from None
    return opts


def _check_finite(opts: RuleOptions) -> None:
    # nan and inf parse as floats; a nan temperature would stop the run at step 1 with a misleading NaN.
    for key, value in asdict(opts).items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ValueError(f"{key} must be a finite number, got {value!r}")


def resolve_rule_options(name: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every option of rule ``name`` as a run uses it (what `localssl train` saves)."""
    return asdict(rule_options(name, options))


#: Separates a rule's name from the options of one variant of it: ``clapp++@b_rank=64,b_dtype=bf16``.
VARIANT_SEP = "@"


def split_variant(label: str) -> tuple[str, dict[str, str]]:
    """``"clapp++@b_rank=64,b_optimizer=sgd"`` -> ``("clapp++", {"b_rank": "64", "b_optimizer": "sgd"})``.

    A variant is a registered rule with options of its own, under a label of
    its own, so that `localssl bench` and `localssl compare` can run several
    variants of one rule side by side (``--rules clapp++ clapp++@b_rank=64``).
    A plain name is its own label with no options. The values are strings,
    typed by the rule's options dataclass like ``--rule-opt`` values.
    """
    name, sep, rest = label.partition(VARIANT_SEP)
    if not sep:
        return label, {}
    if not rest.strip():
        raise ValueError(f"rule variant {label!r}: expected NAME{VARIANT_SEP}KEY=VALUE[,KEY=VALUE...]")
    out = {}
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"rule variant {label!r}: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return name, out


def bp_counterpart(name: str) -> str | None:
    """The end-to-end rule a local rule's gradient is compared with (None: none registered)."""
    return RULES.get(name).counterpart


def build_rule(
    name: str,
    feature_shapes: Sequence[tuple[int, ...]],
    options: Mapping[str, Any] | RuleOptions | None = None,
    grids: Sequence[int] | None = None,
) -> Rule:
    """Build a registered rule for an encoder whose blocks output ``feature_shapes``.

    ``options``: the rule's own options (a mapping or its dataclass);
    ``grids``: the run's pooling grid per block, for rules that pool their loss spatially.
    """
    entry = RULES.get(name)
    rule = entry.factory(list(feature_shapes), rule_options(name, options), None if grids is None else list(grids))
    check_groups(rule.groups(), rule.num_blocks)
    return rule


__all__ = ["RULES", "RuleEntry", "register_rule", "rule_options", "resolve_rule_options", "bp_counterpart",
           "build_rule", "split_variant", "VARIANT_SEP"]
