"""The rules the README's figures run, and the speed targets they hold rules to.

The wall "no rule name outside ``rules/``" (docs/architecture.md) keeps every
rule name in this package; the bench and the demo read their default rules and
their targets from here. A target is images/s against the rule's BP twin
(`localssl.reports.bench.common.bp_twins`) at the same width and precision.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from localssl.rules.registry import split_variant

#: The rules of the README's VGG-6 bench figure (issue 2), which `localssl bench` runs when no --rules are given:
#: dense CLAPP++, CLAPP++ without spatial dependence (small B), and their end-to-end twin.
BENCH_RULES = ("clapp++", "clapp++global", "bp-infonce")
#: What `localssl demo` trains: a local rule, then its end-to-end counterpart.
DEMO_RULES = ("clapp++", "bp-infonce")
#: The width multiplier from which a target is the full-width one (the paper's VGG-6 is width 1.0).
FULL_WIDTH = 1.0


@dataclass(frozen=True)
class SpeedTarget:
    """A rule's minimum images/s against its BP twin, below ``FULL_WIDTH`` and from it (None: no target there)."""

    narrow: float | None
    full: float | None

    def at(self, width: float) -> float | None:
        return self.full if width >= FULL_WIDTH else self.narrow


#: Per rule name, the target of the rule run with its registered options. Issue 14's acceptance: a small-B local
#: rule (CLAPP++ without spatial dependence) >= 1.4x BP-InfoNCE at width 0.25 and >= 1.5x at width 1.0 (the FLOP
#: ceiling of a step without the input-gradient pass is ~1.52x at full width, METHODS 2.2b). Issue 2's acceptance:
#: CLAPP++ with its dense spatial B >= 0.9x BP, at every width.
SPEED_TARGETS = {"clapp++global": SpeedTarget(1.4, 1.5), "clapp++": SpeedTarget(0.9, 0.9)}
#: Per rule name, the target of a variant of it (``NAME@KEY=VALUE``, `split_variant`) where it differs from the
#: rule's own. Issue 14: the fastest CLAPP++ variant with spatial dependence (a cheaper B: low rank, shared, bf16,
#: momentum SGD) >= 1.0x BP at width 1.0; below it, issue 2's 0.9x for CLAPP++ with spatial B still holds. (Every
#: CLAPP++ variant keeps spatial dependence: none of its options pools globally, that is clapp++global.)
VARIANT_SPEED_TARGETS = {"clapp++": SpeedTarget(0.9, 1.0)}


def speed_target(label: str, width: float) -> float | None:
    """The figure's speed target of rule ``label`` (a name or a variant label) at width multiplier ``width``.

    None where the figures set none (most rules: they are measured, not held to a number). A variant of a rule
    without a variant target of its own is held to the rule's target: its options change how B is stored or
    trained, not what the rule is.
    """
    name, own = split_variant(label)
    target = (VARIANT_SPEED_TARGETS.get(name) if own else None) or SPEED_TARGETS.get(name)
    return None if target is None else target.at(width)


def speed_targets(labels: Sequence[str], widths: Sequence[float]) -> dict[str, dict[str, float]]:
    """``{label: {str(width): target}}`` for every label and width that has one (the bench's JSON ``targets``)."""
    out = {r: {str(w): t for w in widths if (t := speed_target(r, w)) is not None} for r in labels}
    return {r: t for r, t in out.items() if t}


__all__ = ["BENCH_RULES", "DEMO_RULES", "FULL_WIDTH", "SPEED_TARGETS", "VARIANT_SPEED_TARGETS", "SpeedTarget",
           "speed_target", "speed_targets"]
