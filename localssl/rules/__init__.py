"""Learning rules by name.

``RULES`` maps a name to a factory ``(feature_shapes, options) -> Rule``.
Adding a rule means registering one more factory; the trainer never sees
rule names.
"""
from __future__ import annotations

from collections.abc import Sequence

from localssl.registry import Registry
from localssl.rules.base import FEEDBACK_KINDS, Group, Rule, RuleOptions, check_groups
from localssl.rules.bp import BPInfoNCE
from localssl.rules.clapp import BPCLAPPPlusPlus, CLAPPPlusPlus, Feedback
from localssl.rules.losses import (
    CONTRASTIVE_F,
    INFONCE_LOSSES,
    contrastive_loss,
    info_nce,
    info_nce_symmetric,
    nt_xent,
    scores,
    spatial_pool,
    swap_views,
)

RULES: Registry = Registry("rule")

#: Rules that pool to the encoder's reference grids by default.
SPATIAL_RULES = {"clapp++", "clapp++dfb", "clapp++both"}

RULES.register("clapp++")(lambda shapes, opt: CLAPPPlusPlus(shapes, opt, context="same", spatial=True))
RULES.register("clapp++global")(lambda shapes, opt: CLAPPPlusPlus(shapes, opt, context="same", spatial=False))
RULES.register("clapp++dfb")(lambda shapes, opt: CLAPPPlusPlus(shapes, opt, context="top", spatial=True))
RULES.register("clapp++both")(lambda shapes, opt: CLAPPPlusPlus(shapes, opt, context="both", spatial=True))
RULES.register("bp-clapp++")(BPCLAPPPlusPlus)
# METHODS 2.3: the reference's one-direction InfoNCE is *the* BP baseline;
# the other two are different losses and keep their own names.
RULES.register("bp-infonce")(lambda shapes, opt: BPInfoNCE(shapes, opt, loss="infonce"))
RULES.register("bp-infonce-sym")(lambda shapes, opt: BPInfoNCE(shapes, opt, loss="infonce-symmetric"))
RULES.register("bp-ntxent")(lambda shapes, opt: BPInfoNCE(shapes, opt, loss="nt-xent"))

#: The end-to-end rule whose gradient a local rule is compared with
#: (gradient alignment, METHODS 3).
BP_COUNTERPART = {
    "clapp++": "bp-clapp++",
    "clapp++global": "bp-clapp++",
    "clapp++dfb": "bp-clapp++",
    "clapp++both": "bp-clapp++",
}


def build_rule(name: str, feature_shapes: Sequence[tuple[int, ...]], options: RuleOptions | None = None) -> Rule:
    """Build a registered rule for an encoder whose blocks output ``feature_shapes``."""
    factory = RULES.get(name)
    return factory(list(feature_shapes), options or RuleOptions())


__all__ = [
    "RULES", "SPATIAL_RULES", "BP_COUNTERPART", "FEEDBACK_KINDS", "Group", "Rule", "RuleOptions", "build_rule",
    "check_groups",
    "CLAPPPlusPlus", "BPCLAPPPlusPlus", "BPInfoNCE", "Feedback", "CONTRASTIVE_F", "contrastive_loss",
    "info_nce", "info_nce_symmetric", "nt_xent", "INFONCE_LOSSES", "scores", "spatial_pool", "swap_views",
]
