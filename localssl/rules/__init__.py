"""Learning rules by name.

`RULES` maps a name to a registered rule (`localssl.rules.registry`): its
factory, the dataclass of its options and its end-to-end counterpart. A rule
registers itself next to its code; the trainer never sees rule names.
"""
from __future__ import annotations

from localssl.rules import blockwise, bp, clapp, fixed_feedback, patches, pc, scff  # noqa: F401  (registers the rules)
from localssl.rules.base import FEEDBACK_KINDS, Group, Inference, OptimizerHint, Rule, RuleOptions, check_groups
from localssl.rules.blockwise import Blockwise, Head, inject_noise
from localssl.rules.bp import BPInfoNCE, InfoNCEOptions
from localssl.rules.clapp import BPCLAPPPlusPlus, CLAPPPlusPlus, ContrastiveOptions
from localssl.rules.feedback import Feedback, feedback_flops, feedback_numel, shared_feedback_flops
from localssl.rules.figures import BENCH_RULES, DEMO_RULES, speed_target, speed_targets
from localssl.rules.fixed_feedback import DFAOptions, DirectFeedbackAlignment, FFOptions, ForwardForward
from localssl.rules.losses import (
    CONTRASTIVE_F,
    INFONCE_LOSSES,
    barlow_twins,
    contrastive_loss,
    info_nce,
    info_nce_symmetric,
    nt_xent,
    scores,
    spatial_pool,
    swap_views,
    vicreg,
)
from localssl.rules.patches import CLAPP2021Options, CPCOptions, PatchPredictive
from localssl.rules.pc import PCOptions, PredictiveCoding
from localssl.rules.registry import (
    RULES,
    bp_counterpart,
    build_rule,
    register_rule,
    resolve_rule_options,
    rule_options,
    split_variant,
)
from localssl.rules.scff import SCFF, SCFFOptions

__all__ = [
    "RULES", "FEEDBACK_KINDS", "Group", "Inference", "OptimizerHint", "Rule", "RuleOptions", "build_rule",
    "check_groups", "BENCH_RULES", "DEMO_RULES", "speed_target", "speed_targets",
    "register_rule", "rule_options", "resolve_rule_options", "bp_counterpart", "split_variant",
    "Blockwise", "Head", "inject_noise",
    "SCFF", "SCFFOptions", "PatchPredictive", "CPCOptions", "CLAPP2021Options",
    "CLAPPPlusPlus", "BPCLAPPPlusPlus", "ContrastiveOptions", "BPInfoNCE", "InfoNCEOptions", "Feedback",
    "feedback_flops", "feedback_numel", "shared_feedback_flops",
    "ForwardForward", "FFOptions", "DirectFeedbackAlignment", "DFAOptions",
    "PCOptions", "PredictiveCoding",
    "CONTRASTIVE_F", "contrastive_loss", "info_nce", "info_nce_symmetric", "nt_xent", "barlow_twins", "vicreg",
    "INFONCE_LOSSES", "scores", "spatial_pool", "swap_views",
]
