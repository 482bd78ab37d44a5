"""`localssl bench` on a ResNet with a blockwise rule and its BP twin: the twin comes from the registry, and the
activation figures are the measuring tool's own, between the per-stage floor and end-to-end BP."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from localssl.reports.bench import (
    SavedBytesTracker,
    add_bench_parser,
    bp_twins,
    build_state,
    encoder_block_bytes,
    format_report,
    run_bench,
    twin_table,
)
from localssl.reports.bench.common import random_views

LOCAL, TWIN = "blockwise-barlow", "bp-barlow"
ENCODER, WIDTH, SIZE, BATCH, SEED = "resnet18", 1 / 16, 16, 4, 0
# A head about as wide as the blocks: the defaults (256-channel expansion, 512-wide projector) are sized for
# width 1 and would dwarf blocks of 4-32 channels.
HEAD = {"expansion": 8, "projector": [16, 16]}
DEV = torch.device("cpu")


@pytest.fixture(scope="module")
def res():
    return run_bench(encoder=ENCODER, widths=[WIDTH], image_sizes=[SIZE], batch_size=BATCH, steps=1, warmup=0,
                     rounds=2, precisions=["fp32"], rules=[LOCAL, TWIN], device="cpu", compare_precision=False,
                     flops=False, breakdown=False, augment=False, seed=SEED, rule_options=HEAD)


def test_the_twin_comes_from_the_registry():
    assert bp_twins([LOCAL, TWIN], ENCODER, WIDTH, SIZE) == {LOCAL: TWIN, TWIN: TWIN}
    # Its registered twin (bp-simclr) not benched: the first end-to-end rule benched stands in.
    assert bp_twins(["blockwise-simclr", TWIN], ENCODER, WIDTH, SIZE) == {"blockwise-simclr": TWIN, TWIN: TWIN}
    assert bp_twins([LOCAL, "loco"], ENCODER, WIDTH, SIZE) == {LOCAL: None, "loco": None}


def test_floor_blockwise_and_bp_come_from_the_tracker_in_that_order(res):
    m = res["memory"][0]
    local, bp, floor = m["rules"][LOCAL], m["rules"][TWIN], m["floor"]
    assert floor["floor_bytes"] <= local["peak_saved_activation_bytes"] <= bp["peak_saved_activation_bytes"]
    assert local["bp_twin"] == TWIN and local["vs_bp"] == pytest.approx(
        local["peak_saved_activation_bytes"] / bp["peak_saved_activation_bytes"])
    assert local["vs_floor"] == pytest.approx(local["peak_saved_activation_bytes"] / floor["floor_bytes"])
    assert len(local["group_peaks"]) == 4 and len(bp["group_peaks"]) == 1  # one stage's graph at a time
    # The same figures measured here, with the tool and the bench's own build and inputs.
    views = random_views(BATCH, SIZE, DEV, True, SEED)
    for rule in (LOCAL, TWIN):
        st = build_state(rule, ENCODER, WIDTH, SIZE, DEV, None, True, SEED, rule_options=HEAD)
        with SavedBytesTracker(list(st.encoder.parameters()) + list(st.rule.parameters())) as tr:
            st.step(views)
        assert tr.peak_bytes == m["rules"][rule]["peak_saved_activation_bytes"]
        assert tr.group_peaks == m["rules"][rule]["group_peaks"]
    per_block, total = encoder_block_bytes(st.encoder, views)
    assert per_block == floor["block_bytes"] and total == floor["bp_encoder_bytes"]
    # A stage's group holds its blocks and its head: never less than the block alone.
    assert all(g >= b for g, b in zip(local["group_peaks"], floor["block_bytes"]))


def test_speed_rows_against_the_twin_and_the_options_recorded(res):
    rows = {r["rule"]: r for r in res["speed"]["entries"][0]["rules"]}
    assert rows[LOCAL]["bp_twin"] == TWIN and rows[TWIN]["vs_bp"] == pytest.approx(1.0)
    assert rows[LOCAL]["vs_bp"] == pytest.approx(rows[LOCAL]["images_per_s"] / rows[TWIN]["images_per_s"])
    c = res["config"]
    assert c["bp_twins"] == {LOCAL: TWIN, TWIN: TWIN}
    assert c["encoder_options"]["stem"] == "cifar"  # auto, resolved at 16 px
    for rule in (LOCAL, TWIN):  # every option written out: the head asked for, the rest at its default
        assert c["rule_options"][rule]["expansion"] == 8 and c["rule_options"][rule]["lambd"] == 0.0051
    text = format_report(res)
    assert "BP twin" in text and f"{LOCAL}: " in text and "the floor" in text


def test_the_readme_table_is_generated_from_the_json(res, tmp_path, capsys):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(res))
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--table", str(path)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == twin_table([res]).strip()
    rows = [ln for ln in printed.splitlines() if ln.startswith("| ")][1:]  # under the header
    assert len(rows) == 3 and rows[0].startswith(f"| {ENCODER} width {WIDTH}, {SIZE} px")  # rule, twin, floor
    m = res["memory"][0]
    assert rows[0].split(" | ")[1:5] == [LOCAL, TWIN, f"{m['rules'][LOCAL]['peak_saved_activation_bytes'] / 2**20:.2f}",
                                         f"{m['rules'][LOCAL]['vs_bp']:.2f}x"]
    assert "per-stage floor" in rows[2] and f"{m['floor']['floor_bytes'] / 2**20:.2f}" in rows[2]


def test_a_rule_option_no_benched_rule_takes_is_an_error():
    with pytest.raises(ValueError, match=r"'temprature' is taken by none of the rules benched"):
        run_bench(encoder=ENCODER, widths=[WIDTH], image_sizes=[SIZE], rules=[LOCAL], device="cpu",
                  rule_options={"temprature": 0.1})
