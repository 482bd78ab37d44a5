"""Real data: a short CLAPP++ run on the shared CIFAR-10 archive, probed against random init.

This is the end-to-end check that the whole pipeline (JPEG archive -> uint8
cache -> batched SimCLR views -> block-by-block CLAPP++ -> frozen-encoder
probes) learns something a random encoder of the same shape does not have.
In CI (CI=true) it must run: a missing archive is a failure, not a skip.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from localssl.config import ProbeConfig, TrainConfig
from localssl.engine.trainer import train
from localssl.evaluation.run import probe_run

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ARCHIVE = SHARED / "cifar10-jpeg.tar.gz"

# The budget: small enough for CI on 2 CPU cores (a few minutes), large enough
# for the local rule to move past its random initialisation (see the README's
# CIFAR-10 section for how these were chosen and what longer runs give).
WIDTH = 0.125
STEPS = 2000
LR = 5e-4
PRETRAIN_IMAGES = 10_000
PROBE_TRAIN, PROBE_TEST = 5000, 2000


def _archive() -> Path:
    if not ARCHIVE.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{ARCHIVE} is missing: CI must run the real-data test")
        pytest.skip(f"{ARCHIVE} is missing (the shared real-data folder is not on this machine)")
    return ARCHIVE


@pytest.mark.slow
def test_clapp_beats_random_init_on_cifar10(tmp_path):
    archive = _archive()
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    try:
        run = train(TrainConfig(
            rule="clapp++", dataset="cifar10", data_dir=str(archive), width=WIDTH, subset=PRETRAIN_IMAGES,
            batch_size=32, epochs=100, max_steps=STEPS, lr=LR, seed=0, out=str(tmp_path / "clapp"),
            progress=False, log_every=100, checkpoint_every=10_000,
            # fp32 on every CPU: `auto` would pick bf16 where the CPU has it
            # natively, and the margin below was measured in fp32.
            amp="off",
        ))
        probes = {}
        for random_init in (False, True):
            result, _ = probe_run(ProbeConfig(
                run=str(run), random_init=random_init, protocols=["fast", "knn"], train_subset=PROBE_TRAIN,
                test_subset=PROBE_TEST, epochs_fast=50, seed=0, amp="off",
            ))
            probes["random" if random_init else "clapp++"] = {
                k: result[k]["test_acc"] for k in ("fast_all", "fast_last", "knn_last")}
    finally:
        torch.set_num_threads(old)
    print(json.dumps(probes, indent=1))
    trained, random = probes["clapp++"], probes["random"]
    # kNN on the last layer is where a short run first shows what it learnt:
    # measured 34.6% vs 30.2% for this budget (2000 steps). Linear probes of
    # wide random conv features are strong (51%), and at this budget CLAPP++
    # only matches them (52.0% vs 51.1%); it must at least not fall behind.
    assert trained["knn_last"] > random["knn_last"] + 0.02, probes
    assert trained["fast_all"] > random["fast_all"] - 0.01, probes
