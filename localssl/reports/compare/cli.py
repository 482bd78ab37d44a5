"""The command line of ``localssl compare``: every flag is a field of `CompareConfig`."""
from __future__ import annotations

import argparse

HELPS = {
    "rules": "rules to compare, each trained into OUT/<rule>/ (`localssl rules` lists them); a variant of a rule "
             "with options of its own is RULE@KEY=VALUE[,KEY=VALUE] (e.g. clapp++@b_rank=64), its own row and folder",
    "rule_options": "one rule's own option as RULE:KEY=VALUE, repeatable, over the config file's (YAML: "
                    "rule_options: {RULE: {KEY: VALUE}}); a rule without any: its defaults",
    "budget": "training steps of every rule (required); a larger one later resumes every run",
    "probes": "probe protocols of every rule and of random-init: blocks (one linear probe per block), fast "
              "(all layers, last layer), knn, paper, paper-bn",
    "probe_epochs": "epochs of the fast and blocks linear probes",
    "paper_epochs": "epochs of the paper and paper-bn probes (the paper: 300)",
    "probe_train_subset": "probe on a fixed class-balanced subset of this many train images",
    "probe_test_subset": "and of this many test images",
    "measure": "measure training images/s and activation memory of every rule (localssl bench's tools)",
    "measure_steps": "timed steps per rule per round of the speed measurement",
    "measure_warmup": "untimed steps per rule before it",
    "measure_rounds": "rounds over the interleaved rules (median)",
    "progress": "progress bars of training and probes (one line per run is printed anyway)",
    "out": "the comparison's folder: one run folder per rule, compare.csv, compare.md, compare.png",
}


def add_compare_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``localssl compare``."""
    from localssl.cli import add_dataclass_flags
    from localssl.config import CompareConfig

    p = sub.add_parser(
        "compare", help="train rules on equal terms, probe them and a random-init encoder, measure speed and "
                        "memory; compare.csv/.md/.png",
        description="Every rule trains on the same encoder, data, budget and seed; all are probed alike, with a "
                    "random-init encoder; speed and activation memory come from one process. Run it again to "
                    "continue: finished runs and up-to-date probes are skipped.")
    p.add_argument("--config", help="YAML file with CompareConfig keys (flags override it)")
    add_dataclass_flags(p, CompareConfig, helps=HELPS)
    p.set_defaults(func=compare_main)
    return p


def compare_main(args: argparse.Namespace) -> int:
    from localssl.cli import resolve_args
    from localssl.config import CompareConfig
    from localssl.reports.compare.run import run_compare

    result = run_compare(resolve_args(CompareConfig, args))
    print(result["md"].read_text(), end="")
    return 0


__all__ = ["add_compare_parser", "compare_main"]
