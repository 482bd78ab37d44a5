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

from localssl.engine import runtime
from localssl.reports import bench
from localssl.reports.bench import (
    FLOP_PARTS,
    SHOWN_CPU_FLAGS,
    TIME_PARTS,
    SavedBytesTracker,
    _quartiles,
    add_bench_parser,
    bench_main,
    format_report,
    precision_support,
    resolve_precisions,
    run_bench,
)
from localssl.rules import speed_target

BASELINE = "bp-infonce"  # the end-to-end rule of these runs: every other rule's BP twin here
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
        encoder="vgg6", widths=[WIDTH], image_sizes=[SIZE], batch_size=BATCH, steps=1, warmup=0, rounds=1,
        precisions=["fp32"], rules=[*LOCAL, BASELINE], device="cpu", compare_precision=False, micro_batch=MICRO,
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
    assert res["config"]["precision"] == "fp32"
    (entry,) = res["speed"]["entries"]
    assert (entry["width"], entry["precision"]) == (WIDTH, "fp32")
    rows = {r["label"]: r for r in entry["rules"]}
    assert set(rows) == {*LOCAL, BASELINE, *MB.values()}
    assert set(res["memory"][0]["rules"]) == set(rows)
    for r in rows.values():
        assert r["images_per_s"] > 0 and len(r["rounds"]) == 1
        assert 0 < r["optimizer_share"] < 1 and r["step_ms"] > 0
    assert rows[BASELINE]["vs_bp"] == pytest.approx(1.0)
    assert rows[BASELINE]["vs_bp_rounds_quartiles"] == pytest.approx([1.0, 1.0])
    for r in rows.values():  # one round: the per-round ratio is the ratio
        assert r["vs_bp_rounds_quartiles"] == pytest.approx([r["vs_bp"], r["vs_bp"]])
    for name in LOCAL:  # the figure's targets at this width (`localssl.rules.speed_target`), judged on vs twin
        assert rows[name]["target_vs_bp"] == speed_target(name, WIDTH) is not None
        assert rows[name]["meets_target"] == (rows[name]["vs_bp"] >= rows[name]["target_vs_bp"])
    assert "target_vs_bp" not in rows[BASELINE]
    assert res["targets"]["speed_vs_bp"] == {name: {str(WIDTH): speed_target(name, WIDTH)} for name in LOCAL}
    assert res["speed"]["augment"]["images_per_s"] > 0
    assert set(res["speed"]["augment"]["vs_train"]) == {*LOCAL, BASELINE}
    json.dumps(res)  # the --json output
    text = format_report(res)
    for needle in ("clapp++global", BASELINE, "floor", "GFLOP", "p+g+opt", "torch"):
        assert needle in text
    # The FLOP notes follow the measured figures: the dense B is heavy, the global one is not.
    assert all(res["flops"]["rules"][r]["local"] for r in LOCAL) and not res["flops"]["rules"][BASELINE]["local"]
    assert "measured: clapp++'s own parameters" in text and "clapp++global's own parameters" not in text


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
    res = run_bench(encoder="vgg6", widths=[WIDTH], image_sizes=[SIZE], batch_size=2, steps=1, warmup=0, rounds=1,
                    precisions=["fp32"], rules=["clapp++", "clapp++global"], device="cpu", memory=False,
                    flops=False, augment=False, breakdown=False)
    (entry,) = res["speed"]["entries"]
    rows = {r["label"]: r for r in entry["rules"]}
    assert set(rows) == {"clapp++", "clapp++global", "clapp++global [bf16, channels_last]",
                         "clapp++global [fp32, contiguous]", "clapp++ [unfused AdamW]"}
    assert all(r["images_per_s"] > 0 for r in rows.values())
    assert all("vs_bp" not in r for r in rows.values())  # no BP rule asked for: no ratios


def test_cli_json(capsys, tmp_path):
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "bench.json"
    args = parser.parse_args(["bench", "--width", str(WIDTH), "--image-size", "32", "--no-speed", "--no-memory",
                              "--no-augment", "--batch-size", "2", "--precisions", "fp32", "--rules", "clapp++global",
                              "--json", "--out", str(out)])
    assert args.func is bench_main
    assert bench_main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["flops"]["rules"]["clapp++global"]["total"] > 0


def _speed_only(**kw):
    """The speed rounds alone, 1 step of 1 round per variant on the tiniest encoder."""
    args = dict(encoder="vgg6", widths=[WIDTH], image_sizes=[SIZE], batch_size=2, steps=1, warmup=0, rounds=1,
                rules=["clapp++global", BASELINE], device="cpu", memory=False, flops=False, augment=False,
                breakdown=False, compare_precision=False)
    return run_bench(**{**args, **kw})


def test_speed_entry_per_width_and_precision(monkeypatch):
    """One entry per (width, precision), in the order asked; widths from WIDE_WIDTH on take the wide_* counts;
    the extras (micro-batch rows) only at the first width and precision; bf16 rows against fp32."""
    widths, precisions, rules = [WIDTH, 2 * WIDTH], ["fp32", "bf16"], ["clapp++global", BASELINE]
    monkeypatch.setattr(bench.run, "WIDE_WIDTH", 2 * WIDTH)  # the second width counts as wide here
    res = _speed_only(widths=widths, precisions=precisions, rules=rules, rounds=1, wide_rounds=2, micro_batch=2)
    entries = res["speed"]["entries"]
    assert [(e["width"], e["precision"]) for e in entries] == [(w, p) for w in widths for p in precisions]
    assert [(e["steps"], e["warmup"], e["rounds"]) for e in entries] == [(1, 0, 1)] * 2 + [(1, 1, 2)] * 2
    for i, e in enumerate(entries):
        main = [r for r in e["rules"] if r["main"]]
        assert [r["rule"] for r in main] == rules
        assert all(r["precision"] == e["precision"] and r["width"] == e["width"] for r in main)
        assert all(len(r["rounds"]) == e["rounds"] for r in e["rules"])
        extras = [r["label"] for r in e["rules"] if not r["main"]]
        assert extras == ([f"{r} [micro-batch 2]" for r in rules] if i == 0 else [])
        assert {r["rule"]: r["vs_bp"] for r in main}[BASELINE] == pytest.approx(1.0)
        for r in main:
            assert ("vs_fp32" in r) == (e["precision"] == "bf16")
    text = format_report(res)
    assert "vs fp32" in text and f"width {2 * WIDTH}: 2 rounds x 1 steps (+1 warm-up)" in text
    json.dumps(res)


@pytest.mark.parametrize("flags,native", [
    ({"avx512f", "avx512bw"}, False),  # AVX-512 alone: oneDNN would emulate bf16
    ({"avx512f", "avx512_bf16"}, True),
    ({"amx_tile", "amx_bf16"}, True),
])
def test_auto_times_bf16_iff_the_cpu_has_it(monkeypatch, flags, native):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
    res = _speed_only(precisions="auto", rules=["clapp++global"])
    expected = ["bf16", "fp32"] if native else ["fp32"]  # --amp auto's pick first
    assert res["config"]["precisions"] == expected
    assert [e["precision"] for e in res["speed"]["entries"]] == expected
    sup = res["precision_support"]
    assert sup["native_bf16"] is native and sup["amp_auto"] == expected[0]
    assert sup["cpu_flags"] == {f: f in flags for f in SHOWN_CPU_FLAGS}
    assert (res["precision_note"] is not None) == (not native)
    text = format_report(res)
    for f in SHOWN_CPU_FLAGS:
        assert f"{f} {'present' if f in flags else 'absent'}" in text
    assert f"`--amp auto` picks {expected[0]}" in text
    assert ("bf16 skipped" in text) == (not native)


def test_resolve_precisions_names_bad_values():
    sup = {"native_bf16": False, "decided_by": "neither amx_bf16 nor avx512_bf16 in the CPU flags"}
    assert resolve_precisions(["bf16", "fp32", "bf16"], sup)[0] == ["bf16", "fp32"]
    assert "emulated" in resolve_precisions(["bf16"], sup)[1]
    assert resolve_precisions(["fp32"], sup) == (["fp32"], None)
    with pytest.raises(ValueError, match="fp16"):
        resolve_precisions(["fp32", "fp16"], sup)
    with pytest.raises(ValueError, match="'auto' alone"):
        resolve_precisions(["auto", "fp32"], sup)


def test_precision_support_on_cpu_follows_the_flags(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset())  # e.g. no /proc/cpuinfo
    sup = precision_support(torch.device("cpu"))
    assert not sup["native_bf16"] and sup["amp_auto"] == "fp32" and not any(sup["cpu_flags"].values())


def test_a_rule_that_does_not_fit_is_reported_not_run(monkeypatch):
    """With 10 MiB free (8 MiB under the guard), BP-InfoNCE (16 bytes x ~0.13M parameters with gradients and
    AdamW state at this width, ~2 MiB) runs and CLAPP++ (dense B alone 786k parameters, 12 MiB) is reported as
    not run, in the speed and the memory tables."""
    free = 10 * 2**20
    monkeypatch.setattr(bench.speed, "available_memory", lambda dev: free)
    monkeypatch.setattr(bench.memory, "available_memory", lambda dev: free)
    res = _speed_only(rules=[BASELINE, "clapp++"], precisions=["fp32"], memory=True)
    rows = {r["label"]: r for r in res["speed"]["entries"][0]["rules"]}
    assert "images_per_s" in rows[BASELINE] and "error" not in rows[BASELINE]
    assert "GiB available" in rows["clapp++"]["error"] and "images_per_s" not in rows["clapp++"]
    mem = res["memory"][0]["rules"]
    assert "GiB available" in mem["clapp++"]["error"] and "parameters" in mem[BASELINE]
    text = format_report(res)
    assert "clapp++ (width 0.0625, fp32): not run:" in text and "clapp++: not run:" in text
