"""Pipeline-parallel local training on CPU (gloo, loopback, 2-3 ranks): the single process's weights.

Every stage updates from its own loss on the input one process would give it, so a pipeline trains to
bit-identical weights (deterministic mode, one thread per process); its checkpoints are the single-process
format both ways.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_distributed import WORKER, env, free_port, launch, ok, tiny_run

from localssl.config import TrainConfig
from localssl.engine.checkpoint import CHECKPOINT, load_checkpoint
from localssl.engine.trainer import train


def pipe_run(out, **kw) -> dict:
    # AdamW (the default), whose sign-like first steps would show any difference in a gradient.
    return tiny_run(out, optimizer="adamw", lr=2e-4, **kw)


def assert_same(a_dir, b_dir) -> None:
    a, b = load_checkpoint(a_dir / CHECKPOINT), load_checkpoint(b_dir / CHECKPOINT)
    assert a["step"] == b["step"]
    for part in ("encoder", "rule"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), f"optimizer {i}.{k}"


def run_ranks(n, spec, tmp_path, **extra) -> None:
    cfg = tmp_path / f"cfg_{n}_{len(list(tmp_path.iterdir()))}.json"
    cfg.write_text(json.dumps(spec))
    ok(launch(n, "train", str(cfg), timeout=90, **extra))


@pytest.mark.parametrize("n,stages", [(2, None), (3, [2, 2, 2])])
def test_pipeline_trains_the_single_process_weights(tmp_path, n, stages):
    """2 stages split by measured cost, 3 stages by hand: after 4 steps, the very weights, rule entries and
    optimizer state of one process; the logged losses too."""
    run_ranks(n, pipe_run(tmp_path / "pipe", pipeline=True, stages=stages), tmp_path)
    one = train(TrainConfig(**pipe_run(tmp_path / "one")))
    assert_same(one, tmp_path / "pipe")
    la = [json.loads(x)["loss"] for x in (one / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "pipe" / "metrics.jsonl").read_text().splitlines()]
    assert la == lb


def test_dfb_context_comes_down_the_pipeline(tmp_path):
    """clapp++dfb: every loss reads the top block's output, which the last stage broadcasts each step
    (synchronous): 2 stages train to the single process's weights."""
    run_ranks(2, pipe_run(tmp_path / "pipe", rule="clapp++dfb", pipeline=True, stages=[4, 2]), tmp_path)
    one = train(TrainConfig(**pipe_run(tmp_path / "one", rule="clapp++dfb")))
    assert_same(one, tmp_path / "pipe")


@pytest.mark.parametrize("stages", [[3, 3], [1, 2, 3]])
def test_loco_overlap_sends_gradients_down(tmp_path, stages):
    """LoCo (overlap 1): the group ending on a stage's first block starts one stage lower; its loss's gradient at
    the stage boundary goes back down (synchronous); the weights are the single process's."""
    run_ranks(len(stages), pipe_run(tmp_path / "pipe", rule="loco", pipeline=True, stages=stages,
                                    rule_options={"expansion": 8, "projector": [16, 16]}), tmp_path)
    one = train(TrainConfig(**pipe_run(tmp_path / "one", rule="loco", rule_options={"expansion": 8,
                                                                                   "projector": [16, 16]})))
    assert_same(one, tmp_path / "pipe")


def test_pipeline_checkpoints_resume_on_one_process_and_back(tmp_path):
    """A 2-stage run of 2 steps resumed by one process to step 4, and a 1-process run of 2 steps resumed by a
    2-stage pipeline to step 4: both are the uninterrupted single-process run."""
    one = train(TrainConfig(**pipe_run(tmp_path / "one")))
    run_ranks(2, pipe_run(tmp_path / "p2s", pipeline=True, max_steps=2), tmp_path)
    train(TrainConfig(**pipe_run(tmp_path / "p2s")), resume=True)
    assert_same(one, tmp_path / "p2s")
    train(TrainConfig(**pipe_run(tmp_path / "s2p", max_steps=2)))
    run_ranks(2, pipe_run(tmp_path / "s2p", pipeline=True), tmp_path, RESUME="1")
    assert_same(one, tmp_path / "s2p")


def test_a_hung_stage_is_named_within_the_timeout(tmp_path):
    """Stage 2 of 3 stops (SIGSTOP: alive, silent) in step 2: the other stages give up after dist_timeout
    (5 s) and exit non-zero naming rank 1, though no connection closed."""
    spec = pipe_run(tmp_path / "run", pipeline=True, stages=[2, 2, 2], dist_timeout=5.0, kill=[1, 1, 19])
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(spec))
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, WORKER, "train", str(cfg)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=env(RANK=str(r), WORLD_SIZE="3", LOCAL_RANK=str(r), MASTER_PORT=port))
             for r in range(3)]
    try:
        outs = {}
        for r in (0, 2):
            t0 = time.monotonic()
            outs[r] = procs[r].communicate(timeout=60)[0]
            assert procs[r].returncode not in (0, None), outs[r][-2000:]
            assert "lost: rank 1 (no heartbeat" in outs[r], outs[r][-2000:]
        assert time.monotonic() - t0 < 30
    finally:
        procs[1].send_signal(signal.SIGKILL)
        procs[1].communicate()
        for p in procs:
            if p.poll() is None:
                p.kill()
