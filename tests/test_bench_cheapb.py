"""`localssl bench` with CLAPP++'s cheaper B (issue 14): variants side by side, exact memory and FLOP accounting.

The accounting is checked against hand counts: a rank-r B holds r (d_z + d_c)
parameters, each with its gradient and the optimizer state that its optimizer
keeps (AdamW 2 tensors, momentum SGD 1, plain SGD 0); B c and dB cost the
FLOPs of `localssl.rules.feedback_flops`.
"""
from __future__ import annotations

import pytest
import torch

from localssl.reports.bench.common import bench_config, bp_twins, build_state, check_rule_options
from localssl.reports.bench.flops import step_flops
from localssl.reports.bench.memory import measure_memory, parameter_memory, training_state_bytes
from localssl.reports.bench.run import run_bench
from localssl.rules import feedback_flops, split_variant

WIDTH, SIZE, BATCH = 1 / 32, 32, 2  # VGG-6 channels 4, 8, 8, 16, 32, 32; grids 8, 4, 4, 4, 2, 2 at 32 px
DIMS = [4 * 64, 8 * 16, 8 * 16, 16 * 16, 32 * 4, 32 * 4]  # channels x grid^2 per layer: B^l is DIMS[l] square
DEV = torch.device("cpu")


def _state(label: str):
    return build_state(label, "vgg6", WIDTH, SIZE, DEV, None, False, 0)


def _views(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * BATCH, 3, SIZE, SIZE, generator=g)


def test_split_variant():
    assert split_variant("clapp++") == ("clapp++", {})
    assert split_variant("clapp++@b_rank=64, b_optimizer=sgd") == ("clapp++", {"b_rank": "64", "b_optimizer": "sgd"})
    for bad in ("clapp++@", "clapp++@b_rank", "clapp++@=3"):
        with pytest.raises(ValueError, match="rule variant"):
            split_variant(bad)


def test_a_variant_trains_with_its_own_options_over_the_shared_ones():
    cfg = bench_config("clapp++@b_rank=8", "vgg6", WIDTH, rule_options={"b_rank": 2, "f": "softplus", "proj_dim": 8})
    assert cfg.rule == "clapp++" and cfg.rule_options == {"b_rank": "8", "f": "softplus"}
    check_rule_options(["clapp++@b_rank=8", "bp-infonce"], {"proj_dim": 8})
    twins = bp_twins(["bp-infonce", "clapp++", "clapp++@b_rank=8", "clapp++@b_optimizer=sgd"], "vgg6", WIDTH, SIZE)
    assert twins == {r: "bp-infonce" for r in twins}
    with pytest.raises(Exception, match="b_rnk"):
        _state("clapp++@b_rnk=3")


@pytest.mark.parametrize("label, rank, state_tensors", [
    ("clapp++", 0, 2),
    ("clapp++@b_rank=3", 3, 2),
    ("clapp++@b_rank=3,b_optimizer=sgd", 3, 1),
    ("clapp++@b_optimizer=sgd,b_momentum=0", 0, 0),
])
def test_parameter_and_optimizer_bytes_are_the_hand_count(label, rank, state_tensors):
    st = _state(label)
    st.step(_views())
    n_rule = sum(d * d if rank == 0 else rank * 2 * d for d in DIMS)
    n_enc = sum(p.numel() for p in st.encoder.parameters())
    assert n_enc == sum(9 * a * b + b for a, b in zip([3, 4, 8, 8, 16, 32], [4, 8, 8, 16, 32, 32]))
    mem = parameter_memory(st)
    assert mem["rule"]["numel"] == mem["rule"]["trainable_numel"] == n_rule
    assert mem["rule"]["params_bytes"] == mem["rule"]["grads_bytes"] == 4 * n_rule
    assert mem["rule"]["optimizer_bytes"] == 4 * state_tensors * n_rule
    assert mem["encoder"]["optimizer_bytes"] == 4 * 2 * n_enc  # the encoder keeps AdamW: exp_avg, exp_avg_sq
    # The planned bytes (before a step: the memory guard) equal what the step allocated, step counters apart.
    assert training_state_bytes(st) == mem["total_bytes"] - mem["optimizer_step_counters_bytes"]


@pytest.mark.parametrize("label, rank", [("clapp++", 0), ("clapp++@b_rank=3", 3), ("clapp++@b_rank=5,b_dtype=bf16", 5)])
def test_b_flops_are_the_formula(label, rank):
    """B c forward + its weight gradient, per view, counted by the bench == sum_l feedback_flops(d_l, d_l, r)."""
    d = step_flops(_state(label), _views())
    assert d["rule_params_fwd"] + d["rule_params_bwd"] == sum(feedback_flops(n, n, rank) for n in DIMS)
    assert d["rule_params_fwd"] == sum(feedback_flops(n, n, rank, trainable=False) for n in DIMS)
    assert d["encoder_bwd_input"] == 0


def test_memory_table_reports_whole_process_bytes_per_variant():
    rules = ["bp-infonce", "clapp++", "clapp++@b_rank=3,b_optimizer=sgd"]
    twins = bp_twins(rules, "vgg6", WIDTH, SIZE)
    m = measure_memory(rules, "vgg6", WIDTH, SIZE, BATCH, DEV, None, False, None, 0, lambda s: None, twins)
    rows = m["rules"]
    for r in rules:
        d = rows[r]
        assert d["whole_process_bytes"] == d["parameters"]["total_bytes"] + d["peak_saved_activation_bytes"]
        assert d["whole_vs_bp"] == pytest.approx(d["whole_process_bytes"] / rows["bp-infonce"]["whole_process_bytes"])
    assert rows["clapp++@b_rank=3,b_optimizer=sgd"]["whole_process_bytes"] < rows["clapp++"]["whole_process_bytes"]


def test_run_bench_labels_variant_rows_and_records_their_options():
    rules = ["bp-infonce", "clapp++", "clapp++@b_rank=3"]
    res = run_bench(rules=rules, encoder="vgg6", widths=[WIDTH], precisions=["fp32"], image_sizes=[SIZE],
                    batch_size=BATCH, speed=False, augment=False, breakdown=False, rss=False, threads=1,
                    log=lambda s: None)
    assert set(res["flops"]["rules"]) == set(rules)
    assert set(rules) <= set(res["memory"][0]["rules"])
    assert res["config"]["rule_options"]["clapp++@b_rank=3"]["b_rank"] == 3
    assert res["config"]["rule_options"]["clapp++"]["b_rank"] == 0
