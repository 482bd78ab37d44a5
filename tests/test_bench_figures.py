"""What the bench reads from `localssl.rules.figures` and from the rules themselves, never from names: the speed
targets per width (issues 2 and 14), the rules of the extra speed rows (by their own parameters), and the FLOP
notes (by how much each rule's own parameters cost against the pass its step skips)."""
from __future__ import annotations

import pytest
import torch

from localssl.reports.bench.common import RuleFacts, build_state, rule_facts
from localssl.reports.bench.flop_notes import HEAVY_OWN_FLOPS, flop_notes
from localssl.reports.bench.speed import extra_rules, speed_variants
from localssl.rules import BENCH_RULES, DEMO_RULES, RULES, speed_target, speed_targets

WIDTH, SIZE = 1 / 16, 32


@pytest.mark.parametrize("label,narrow,full", [
    ("clapp++global", 1.4, 1.5),  # issue 14: a small-B local rule >= 1.4x at width 0.25, >= 1.5x at 1.0
    ("clapp++", 0.9, 0.9),  # issue 2: CLAPP++ with its dense spatial B >= 0.9x
    ("clapp++@b_rank=64", 0.9, 1.0),  # issue 14: a cheaper-B CLAPP++ variant >= 1.0x at width 1.0
    ("clapp++@b_structure=shared,b_optimizer=sgd", 0.9, 1.0),
    ("clapp++global@b_dtype=bf16", 1.4, 1.5),  # a variant without a target of its own: its rule's
    ("bp-infonce", None, None),
    ("blockwise-simclr", None, None),
])
def test_speed_target_per_width(label, narrow, full):
    assert speed_target(label, 0.25) == narrow and speed_target(label, 0.5) == narrow
    assert speed_target(label, 1.0) == full and speed_target(label, 2.0) == full


def test_speed_targets_for_the_json():
    got = speed_targets(["clapp++", "bp-infonce", "clapp++@b_rank=8"], [0.25, 1.0])
    assert got == {"clapp++": {"0.25": 0.9, "1.0": 0.9}, "clapp++@b_rank=8": {"0.25": 0.9, "1.0": 1.0}}


def test_the_figures_name_registered_rules():
    for label in (*BENCH_RULES, *DEMO_RULES):
        assert label in RULES


def test_extra_rules_by_own_parameters():
    facts = {"a": RuleFacts(True, 10), "b": RuleFacts(True, 5), "c": RuleFacts(False, 100), "d": None}
    assert extra_rules(["a", "b", "c", "d"], facts) == ("b", "c")  # fewest of the local rules; most of all
    assert extra_rules(["c", "d"], facts) == ("c", "c")  # no local rule built: the first rule
    assert extra_rules(["d", "c"], facts) == ("d", "c")
    assert extra_rules(["d"], facts) == ("d", "d")  # nothing built: the first rule for both
    rows = speed_variants(["a", "b", "c"], WIDTH, ["fp32"], True, True, True, None, facts)
    assert [r["label"] for r in rows if not r["main"]] == ["b [bf16, channels_last]", "b [fp32, contiguous]",
                                                           "c [unfused AdamW]"]


@pytest.mark.parametrize("rules", [["bp-infonce", "clapp++global", "clapp++"], ["blockwise-simclr", "bp-simclr"]])
def test_rule_facts_are_the_built_rules(rules):
    """Counted on the meta device == the trainable parameters of the rule the bench then trains."""
    facts = rule_facts(rules, "vgg6", WIDTH, SIZE)
    for r in rules:
        st = build_state(r, "vgg6", WIDTH, SIZE, torch.device("cpu"), None, False, 0)
        assert facts[r] == RuleFacts(st.rule.local, sum(p.numel() for p in st.rule.parameters() if p.requires_grad))
    ref, big = extra_rules(rules, facts)
    local = [r for r in rules if facts[r].local]
    assert ref in local and facts[ref].own_params == min(facts[r].own_params for r in local)
    assert facts[big].own_params == max(f.own_params for f in facts.values())


def _flops(local: bool, own: float, bwd_input: float, total: float) -> dict:
    """A FLOP row (per view), in units of 10 MFLOP: 100 prints as 1.0000 GFLOP."""
    u = 1e7
    return {"local": local, "rule_params_fwd": own * u / 2, "rule_params_bwd": own * u / 2,
            "encoder_bwd_input": bwd_input * u, "total": total * u}


def test_flop_notes_for_the_rules_whose_own_parameters_are_heavy():
    twin = {"heavy": "bp", "light": "bp", "bp": "bp"}
    saved = 100.0
    per_rule = {"heavy": _flops(True, 80.0, 0.0, 255.0), "light": _flops(True, 1.0, 0.0, 200.0),
                "bp": _flops(False, 5.0, saved, 250.0)}
    notes = "\n".join(flop_notes(per_rule, 0.25, twin, "resnet18"))
    assert "heavy's own parameters (B/proj forward + backward) 0.8000 GFLOP/view = 0.80x the skipped " \
           "input-gradient pass (1.0000 in bp)." in notes
    assert "light's own parameters" not in notes and "light 2.0000 (0.80x)" in notes  # listed beside
    assert "roughly even with bp in FLOPs (1.02x); light keeps the saving." in notes
    assert "METHODS" not in notes  # the reference figures are VGG-6's
    assert "METHODS 2.2b (vgg6" in "\n".join(flop_notes(per_rule, 0.25, twin, "vgg6"))
    # Just under the threshold: no rule is heavy, no note at all (e.g. blockwise rules on a ResNet-50).
    per_rule["heavy"] = _flops(True, HEAVY_OWN_FLOPS * saved * 0.99, 0.0, 200.0)
    assert flop_notes(per_rule, 0.25, twin, "vgg6") == []
    per_rule["heavy"] = _flops(True, HEAVY_OWN_FLOPS * saved, 0.0, 200.0)  # at it: a note, and the AdamW caveat
    assert "heavy keeps part of the saving (0.80x bp's FLOPs)" in "\n".join(flop_notes(per_rule, 0.25, twin, "vgg6"))
    # A block of several layers computes part of the input gradient itself: it skips only the rest.
    per_rule["heavy"] = _flops(True, 50.0, 60.0, 300.0)
    notes = "\n".join(flop_notes(per_rule, 0.25, twin, "vgg6"))
    assert "input-gradient pass of bp (1.0000), of which it skips 0.4000" in notes
    assert "heavy costs more FLOPs than bp (1.20x)" in notes
    # An end-to-end rule is never the subject, whatever its own parameters cost.
    assert flop_notes({"bp": _flops(False, 1e6, saved, 250.0)}, 0.25, {"bp": "bp"}, "vgg6") == []
