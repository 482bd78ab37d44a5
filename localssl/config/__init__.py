"""Typed run configurations that round-trip to YAML.

Every option of ``localssl train`` and ``localssl probe`` is a field here.
A YAML file gives a base (``--config``), command-line flags override it, and
the resolved config is saved with the run: what was left to a default that
depends on the data (``grids``, ``mean``, ``std``) is written out as the run
used it, so ``probe`` and ``align`` read the run's own values. Unknown keys
and names are errors that list the valid ones; impossible values are caught
before training starts, with a message that says what to change.

The package, one job per module; every name is re-exported here, so
``from localssl.config import X`` is the one import path:

- `errors`: `ConfigError` and `shown` (a value quoted, shortened, in a message);
- `schema`: `TrainConfig`, `ProbeConfig`, `CompareConfig` and the names some fields take;
- `recipes`: a comparison's per-rule options and recipes (`RECIPE_KEYS`, `nest_recipes`, `nest_rule_options`);
- `io`: dicts and YAML in and out, with type checks and the upgrade of old configs (`from_dict`, `load_yaml`, ...);
- `validate`: the checks before a run starts (`validate_train`, `validate_probe`, `check_grids`, ...).

Import order matters only in one direction: `localssl.rules` imports this
package at import time, so no module here imports rules, models, data or
torch at import time (the validators do so inside their functions).
"""
from __future__ import annotations

from localssl.config.errors import ConfigError, shown
from localssl.config.io import (
    LEGACY_RULE_KEYS,
    MAX_CONFIG_BYTES,
    from_dict,
    load_yaml,
    parse_key_values,
    replace,
    save_yaml,
    to_dict,
)
from localssl.config.recipes import RECIPE_KEYS, nest_recipes, nest_rule_options
from localssl.config.schema import (
    AMP_MODES,
    LR_SCHEDULES,
    OPTIMIZERS,
    PROBE_PROTOCOLS,
    CompareConfig,
    ProbeConfig,
    TrainConfig,
)
from localssl.config.validate import (
    MAX_LR,
    MAX_SEED,
    check_grids,
    check_normalization,
    check_shapes,
    validate_probe,
    validate_train,
)

__all__ = [
    "ConfigError", "TrainConfig", "ProbeConfig", "CompareConfig", "nest_rule_options", "nest_recipes", "RECIPE_KEYS",
    "from_dict", "to_dict",
    "load_yaml", "save_yaml", "replace", "parse_key_values", "validate_train", "validate_probe", "check_grids",
    "check_shapes", "check_normalization", "OPTIMIZERS", "LR_SCHEDULES",
    # public names of the single module this package was, imported by name elsewhere (or kept for that)
    "shown", "AMP_MODES", "PROBE_PROTOCOLS", "MAX_CONFIG_BYTES", "MAX_LR", "MAX_SEED", "LEGACY_RULE_KEYS",
]
