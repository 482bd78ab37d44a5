"""A comparison's per-rule settings: ``RULE:KEY=VALUE`` flags and YAML mappings nested by rule.

`CompareConfig.rule_options` and `CompareConfig.recipes` go through these
(its ``__post_init__``); a recipe may set only `RECIPE_KEYS`.
"""
from __future__ import annotations

from typing import Any

from localssl.config.errors import ConfigError, shown

#: What a comparison's recipe may set for one rule (`CompareConfig.recipes`): its encoder and its input.
RECIPE_KEYS = ("encoder", "width", "encoder_options", "resize", "grids", "crop_scale")


def nest_recipes(recipes: dict[str, Any] | None) -> dict[str, dict[str, Any]] | None:
    """``{"gim:encoder": "vgg6-patches", "gim:encoder_options.patch": "8"}`` as ``{"gim": {"encoder":
    "vgg6-patches", "encoder_options": {"patch": "8"}}}``; keys outside `RECIPE_KEYS` are errors."""
    nested = nest_rule_options(recipes, "recipes")
    if not nested:
        return None
    out: dict[str, dict[str, Any]] = {}
    for rule, recipe in nested.items():
        if not isinstance(recipe, dict):
            raise ConfigError(f"CompareConfig.recipes: {shown(rule)} must map to a recipe, got {shown(recipe)}")
        flat: dict[str, Any] = {}
        for key, value in recipe.items():
            head, dot, sub = str(key).partition(".")
            if head not in RECIPE_KEYS or (dot and head != "encoder_options") or (dot and not sub):
                raise ConfigError(f"CompareConfig.recipes of {rule}: unknown key {shown(key)}; valid: "
                                  f"{', '.join(RECIPE_KEYS)} (and encoder_options.KEY)")
            if dot:
                opts = flat.setdefault("encoder_options", {})
                if not isinstance(opts, dict):
                    raise ConfigError(f"CompareConfig.recipes of {rule}: encoder_options must be a mapping")
                opts[sub] = value
            else:
                flat[head] = value if head != "encoder_options" else {**dict(value or {}), **flat.get(head, {})}
        out[rule] = flat
    return out


def nest_rule_options(options: dict[str, Any] | None, field_name: str = "rule_options"
                      ) -> dict[str, dict[str, Any]] | None:
    """``{"A:overlap": "2", "B": {"temperature": 0.2}}`` as ``{"A": {"overlap": "2"}, "B": {...}}`` (A, B: rules).

    The command line gives one rule's option as ``RULE:KEY=VALUE`` (a rule
    name holds no ``:``); YAML gives a mapping per rule. Both may mix: a
    flag's ``RULE:KEY`` overrides that key of the file's mapping.
    """
    if not options:
        return None
    nested: dict[str, dict[str, Any]] = {}
    for key, value in options.items():
        rule, sep, opt = key.partition(":")
        if sep:
            if not rule or not opt:
                raise ConfigError(f"CompareConfig.{field_name}: expected RULE:KEY=VALUE, got {shown(key)}")
            nested.setdefault(rule, {})[opt] = value
        elif isinstance(value, dict):
            nested[key] = {**value, **nested.get(key, {})}
        else:
            raise ConfigError(f"CompareConfig.{field_name}: {shown(key)} must map a rule to its options (YAML) or "
                              f"be RULE:KEY (command line), got {shown(value)}")
    return nested
