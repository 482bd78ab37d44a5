"""`localssl bench` on a tiny encoder: the structure and the invariants that could break.

No timing assertions: the speed targets are printed by the benchmark, never
tested (a loaded CI machine would make them flaky).
"""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn

from localssl.reports.bench import (
    BASELINE,
    FLOP_PARTS,
    TIME_PARTS,
    SavedBytesTracker,
    _quartiles,
    add_bench_parser,
    bench_main,
    format_report,
    run_bench,
)

WIDTH = 1 / 16  # VGG-6 channels 8, 16, 16, 32, 64, 64
CHANNELS = [8, 16, 16, 32, 64, 64]
POOLED = [False, True, False, True, True, True]  # max-pool after layers 2, 4, 5, 6
GRIDS = [8, 4, 4, 4, 2, 2]
SIZE, BATCH = 32, 4
VIEWS = 2 * BATCH
LOCAL = ["clapp++", "clapp++global"]
MICRO = 2  # views per chunk in the micro-batched rows
MB = {r: f"{r} [micro-batch {MICRO}]" for r in [*LOCAL, BASELINE]}


@pytest.fixture(scope="module")
def res():
    return run_bench(
        encoder="vgg6", width=WIDTH, image_sizes=[SIZE], batch_size=BATCH, steps=1, warmup=0, rounds=1,
        amp="off", rules=[*LOCAL, BASELINE], device="cpu", compare_precision=False, micro_batch=MICRO,
    )


def _layers():
    """(c_in, c_out, side of the conv's map, pooled) per VGG-6 block at SIZE px."""
    out, c_in, side = [], 3, SIZE
    for c, pooled in zip(CHANNELS, POOLED):
        out.append((c_in, c, side, pooled))
        c_in, side = c, side // 2 if pooled else side
    return out


def test_structure_and_report(res):
    assert {"config", "env", "speed", "flops", "memory", "targets"} <= set(res)
    assert res["config"]["amp_dtype"] == "fp32"
    rows = {r["label"]: r for r in res["speed"]["rules"]}
    assert set(rows) == {*LOCAL, BASELINE, *MB.values()}
    assert set(res["memory"][0]["rules"]) == set(rows)
    for r in rows.values():
        assert r["images_per_s"] > 0 and len(r["rounds"]) == 1
        assert 0 < r["optimizer_share"] < 1 and r["step_ms"] > 0
    assert rows[BASELINE]["vs_bp"] == pytest.approx(1.0)
    assert rows[BASELINE]["vs_bp_rounds_quartiles"] == pytest.approx([1.0, 1.0])
    for r in rows.values():  # one round: the per-round ratio is the ratio
        assert r["vs_bp_rounds_quartiles"] == pytest.approx([r["vs_bp"], r["vs_bp"]])
    assert rows["clapp++global"]["target_vs_bp"] == 1.3 and rows["clapp++"]["target_vs_bp"] == 0.9
    assert res["speed"]["augment"]["images_per_s"] > 0
    assert set(res["speed"]["augment"]["vs_train"]) == {*LOCAL, BASELINE}
    json.dumps(res)  # the --json output
    text = format_report(res)
    for needle in ("clapp++global", BASELINE, "floor", "GFLOP", "p+g+opt", "torch"):
        assert needle in text


def test_time_breakdown_sees_no_input_gradient_in_local_steps(res):
    """Every conv backward of a local step computes the weight gradient only (no gradient crosses a
    block, so none is asked of a block's input); BP computes the input gradient at every layer but
    the first."""
    tb = res["time_breakdown"]["rules"]
    assert set(tb) == {*LOCAL, BASELINE}
    for rule in LOCAL:
        assert tb[rule]["conv_dw_dx"] == 0.0 and tb[rule]["conv_dw"] > 0
    assert tb[BASELINE]["conv_dw_dx"] > 0 and tb[BASELINE]["conv_dw"] > 0
    for d in tb.values():
        assert d["conv_fwd"] > 0 and d["optimizer"] > 0 and d["outside_ops"] >= 0
        assert d["total"] == pytest.approx(sum(d[p] for p in TIME_PARTS))
    assert "Where a step's time goes" in format_report(res)


def test_quartiles_of_per_round_ratios():
    assert _quartiles([11.0, 1.0, 7.0, 2.0, 4.0]) == [2.0, 7.0]
    assert _quartiles([1.0, 2.0]) == [1.25, 1.75]
    assert _quartiles([3.0]) == [3.0, 3.0]


def test_floor_by_hand(res):
    """Per block: conv input, then ReLU output (fp32), and for pooled blocks the max-pool's int64
    indices (not its input: models/layers.py), the ReLU running after the pool. BP saves each
    block's output (the next conv's input) once."""
    m = res["memory"][0]
    assert m["image_size"] == SIZE
    block, shared = [], 0
    for k, (c_in, c, side, pooled) in enumerate(_layers()):
        out_side = side // 2 if pooled else side
        b = 4 * VIEWS * c_in * side**2 + 4 * VIEWS * c * out_side**2
        if pooled:
            b += 8 * VIEWS * c * out_side**2
        if k + 1 < len(CHANNELS):
            shared += 4 * VIEWS * c * out_side**2  # this ReLU output is the next conv's input
        block.append(b)
    f = m["floor"]
    assert f["block_bytes"] == block
    assert f["floor_bytes"] == max(block)
    assert f["bp_encoder_bytes"] == sum(block) - shared
    assert f["floor_ratio"] == pytest.approx(max(block) / (sum(block) - shared))
    # METHODS 2.2b's "about 0.41 for VGG-6 at 32 px" is the largest block over the sum of blocks,
    # counting a block as its input and conv output (0.40); in saved tensors it is 0.36, since the
    # index-only max-pool keeps no pre-pool map, and the floor against BP is higher (0.58).
    assert f["floor_ratio_vs_sum_of_blocks"] == pytest.approx(max(block) / sum(block))
    assert f["floor_ratio_vs_sum_of_blocks"] == pytest.approx(0.36, abs=0.01)


def test_local_activation_memory_between_floor_and_bp(res):
    m = res["memory"][0]
    bp = m["rules"][BASELINE]
    assert not bp["local"] and bp["group_peaks"] == [bp["peak_saved_activation_bytes"]]
    assert bp["peak_saved_activation_bytes"] >= m["floor"]["bp_encoder_bytes"]
    for name in LOCAL:
        d = m["rules"][name]
        assert d["local"] and len(d["group_peaks"]) == len(CHANNELS)  # one graph at a time, freed in between
        assert max(d["group_peaks"]) == d["peak_saved_activation_bytes"]
        assert m["floor"]["floor_bytes"] <= d["peak_saved_activation_bytes"] < bp["peak_saved_activation_bytes"]
        assert d["vs_bp"] < 1
    for d in m["rules"].values():
        assert d["live_after_step_bytes"] == 0  # every saved tensor was released
        assert d["peak_saved_param_bytes"] > 0  # conv weights are saved, and kept out of the activations


def test_micro_batched_rows_hold_one_chunk(res):
    """Micro-batched: a local rule holds about one block at MICRO of VIEWS views; BP about the encoder at MICRO."""
    m = res["memory"][0]
    floor, bp = m["floor"], m["rules"][BASELINE]["peak_saved_activation_bytes"]
    first_input = 4 * VIEWS * 3 * SIZE**2  # chunks of the input views share its storage: counted whole
    for name in LOCAL:
        d = m["rules"][MB[name]]
        assert d["micro_batch"] == MICRO and d["rule"] == name
        assert d["peak_saved_activation_bytes"] <= floor["floor_bytes"] * MICRO / VIEWS + first_input
        assert d["meets_target"] and d["vs_bp"] < 0.5
    d = m["rules"][MB[BASELINE]]
    assert not d["local"] and d["peak_saved_activation_bytes"] < bp / 2
    assert "micro-batch" in format_report(res)


def test_parameter_memory_is_adamw_fp32(res):
    enc_numel = sum(9 * ci * c + c for ci, c, _, _ in _layers())
    dims = [c * g * g for c, g in zip(CHANNELS, GRIDS)]
    for d in res["memory"][0]["rules"].values():
        p = d["parameters"]
        assert p["encoder"]["numel"] == enc_numel
        for part in ("encoder", "rule"):
            q = p[part]
            n = q["trainable_numel"]
            assert n == q["numel"]
            assert q["params_bytes"] == 4 * n
            assert q["grads_bytes"] == 4 * n
            assert q["optimizer_bytes"] == 2 * 4 * n  # AdamW: exp_avg and exp_avg_sq
            assert q["total_bytes"] == 4 * n * (1 + 1 + 2)
    rules = res["memory"][0]["rules"]
    assert rules["clapp++"]["parameters"]["rule"]["numel"] == sum(d * d for d in dims)
    assert rules["clapp++global"]["parameters"]["rule"]["numel"] == sum(c * c for c in CHANNELS)
    # CLAPP++'s B matrices hold about 12x the encoder's parameters.
    assert rules["clapp++"]["parameters"]["rule"]["numel"] > 10 * enc_numel


def test_flops_by_part(res):
    fl = res["flops"]["rules"]
    conv_fwd = sum(2 * 9 * ci * c * side**2 for ci, c, side, _ in _layers())
    for d in fl.values():
        assert set(FLOP_PARTS) <= set(d)
        assert all(d[p] >= 0 for p in FLOP_PARTS) and d["total"] > 0
        assert d["encoder_fwd"] == pytest.approx(conv_fwd)
        assert d["encoder_bwd_weight"] == pytest.approx(conv_fwd)
        assert d["context_fwd"] == 0
    bp = fl[BASELINE]
    assert bp["encoder_bwd_input"] > 0 and bp["loss"] > 0 and bp["rule_params_bwd"] > 0
    for name in LOCAL:
        assert fl[name]["encoder_bwd_input"] == 0  # every block input is detached
        bw = fl[name]["encoder_bwd_weight"] + fl[name]["encoder_bwd_input"]
        assert bp["encoder_bwd_weight"] + bp["encoder_bwd_input"] > bw
    dims = [c * g * g for c, g in zip(CHANNELS, GRIDS)]
    dense = fl["clapp++"]
    assert dense["rule_params_fwd"] == pytest.approx(sum(2 * d * d for d in dims))  # B c
    assert dense["rule_params_bwd"] == pytest.approx(sum(2 * d * d for d in dims))  # dB
    assert fl["clapp++global"]["rule_params_fwd"] < dense["rule_params_fwd"]


def test_tracker_dedupes_releases_and_excludes_params():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(2, 2, 8, 8)
    with SavedBytesTracker(list(conv.parameters())) as tr:
        y = nn.functional.max_pool2d(torch.relu(conv(x)), 2)  # max-pool saves ReLU's output again
    relu_out, inp, idx = 4 * 2 * 3 * 64, 4 * 2 * 2 * 64, 8 * 2 * 3 * 16
    assert tr.live_bytes == tr.peak_bytes == relu_out + inp + idx
    assert tr.live_param_bytes == conv.weight.nbytes
    y.sum().backward()
    assert tr.live_bytes == 0 and tr.live_param_bytes == 0
    with SavedBytesTracker() as tr2:
        z = torch.relu(conv(x))
    assert tr2.live_bytes > 0
    del z  # dropping the graph without backward frees the saved tensors too (no reference cycle)
    assert tr2.live_bytes == 0


def test_precision_layout_and_unfused_variants():
    res = run_bench(encoder="vgg6", width=WIDTH, image_sizes=[SIZE], batch_size=2, steps=1, warmup=0, rounds=1,
                    amp="off", rules=["clapp++", "clapp++global"], device="cpu", memory=False, flops=False,
                    augment=False)
    rows = {r["label"]: r for r in res["speed"]["rules"]}
    assert set(rows) == {"clapp++", "clapp++global", "clapp++global [bf16, channels_last]",
                         "clapp++global [fp32, contiguous]", "clapp++ [unfused AdamW]"}
    assert all(r["images_per_s"] > 0 for r in rows.values())
    assert all("vs_bp" not in r for r in rows.values())  # no BP rule asked for: no ratios


def test_cli_json(capsys, tmp_path):
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "bench.json"
    args = parser.parse_args(["bench", "--width", str(WIDTH), "--image-size", "32", "--no-speed", "--no-memory",
                              "--no-augment", "--batch-size", "2", "--amp", "off", "--rules", "clapp++global",
                              "--json", "--out", str(out)])
    assert args.func is bench_main
    assert bench_main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["flops"]["rules"]["clapp++global"]["total"] > 0
