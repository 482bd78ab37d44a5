"""``localssl compare`` with variants of one rule side by side (``--rules clapp++ clapp++@b_rank=4``, issue 14).

Each label trains once, in its own folder, with its own options; the rest of
the comparison treats a label as it treats a rule's name.
"""
from __future__ import annotations

import csv

import pytest

from localssl.cli import main
from localssl.config import CompareConfig, ConfigError
from localssl.reports.compare.measure import baseline
from localssl.reports.compare.run import validate_compare
from localssl.reports.compare.runs import train_config

VARIANTS = ["clapp++", "clapp++@b_rank=4", "clapp++@b_rank=4,b_optimizer=sgd"]


def _cfg(tmp_path, **kw) -> CompareConfig:
    base = dict(rules=list(VARIANTS), dataset="shapes10", subset=64, budget=2, batch_size=16, width=1 / 16,
                amp="off", out=str(tmp_path / "cmp"))
    base.update(kw)
    return CompareConfig(**base)


def test_each_variant_trains_its_own_rule_options_in_its_own_folder(tmp_path):
    cfg = _cfg(tmp_path, rule_options={"clapp++@b_rank=4": {"b_lr_scale": "2"}})
    plain, low, sgd = (train_config(cfg, r) for r in VARIANTS)
    assert plain.rule == low.rule == sgd.rule == "clapp++"
    assert plain.rule_options["b_rank"] == 0 and low.rule_options["b_rank"] == sgd.rule_options["b_rank"] == 4
    assert low.rule_options["b_lr_scale"] == 2.0 and sgd.rule_options["b_optimizer"] == "sgd"
    assert len({plain.out, low.out, sgd.out}) == 3 and low.out.endswith("clapp++@b_rank=4")
    validate_compare(cfg)
    # The variants' end-to-end reference: their rule's registered counterpart.
    assert baseline({r: train_config(cfg, r) for r in VARIANTS[1:]})[0] == "bp-clapp++"


@pytest.mark.parametrize("rules, match", [
    (["clapp++", "clapp++@"], "rule variant 'clapp\\+\\+@'"),
    (["clapp++", "clap@b_rank=2"], "unknown rule\\(s\\) clap"),
    (["clapp++", "clapp++@b_rnk=2"], "b_rnk"),
    (["clapp++", "clapp++@b_rank=2", "clapp++@b_rank=2"], "listed twice"),
])
def test_bad_variants_are_refused_before_training(tmp_path, rules, match):
    with pytest.raises(ConfigError, match=match):
        validate_compare(_cfg(tmp_path, rules=rules))


def test_compare_runs_two_variants_side_by_side(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALSSL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cmp"
    assert main(["compare", "--rules", "clapp++", "clapp++@b_rank=4", "--dataset", "shapes10", "--subset", "64",
                 "--budget", "2", "--batch-size", "16", "--width", "0.0625", "--amp", "off", "--probe-epochs", "1",
                 "--probe-train-subset", "50", "--probe-test-subset", "50", "--no-measure", "--probes", "fast",
                 "--out", str(out)]) == 0
    with open(out / "compare.csv", newline="") as fh:
        rows = {r["rule"]: r for r in csv.DictReader(fh)}
    assert {"clapp++", "clapp++@b_rank=4"} <= set(rows)
    assert (out / "clapp++@b_rank=4" / "config.yaml").read_text().count("b_rank: 4") == 1
