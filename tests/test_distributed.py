"""torch.distributed on CPU (gloo, loopback): data-parallel equals one process; a lost rank is named.

Each test starts 2 processes (`tests/dist_worker.py`, or torchrun running it) with one thread each.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from localssl.engine.checkpoint import CHECKPOINT, load_checkpoint
from localssl.engine.step import PlainStep
from localssl.engine.trainer import train

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "dist_worker.py")
sys.path.insert(0, str(ROOT / "tests"))
import dist_worker  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", **extra}


def launch(n: int, *args: str, timeout: float = 100, **extra) -> list[subprocess.CompletedProcess]:
    """``n`` ranks of the worker, as torchrun would set them up; their exit codes and output."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, WORKER, *args], env=env(RANK=str(r), WORLD_SIZE=str(n),
                              LOCAL_RANK=str(r), MASTER_PORT=port, **extra), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(n)]
    deadline = time.monotonic() + timeout
    done = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            out += "\n[test: killed at the timeout]"
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out))
    return done


def ok(runs: list[subprocess.CompletedProcess]) -> None:
    for r, run in enumerate(runs):
        assert run.returncode == 0, f"rank {r} exited {run.returncode}:\n{run.stdout[-3000:]}"


@pytest.mark.parametrize("rule", ["clapp++", "bp-infonce"])
def test_data_parallel_gradients_equal_one_process_on_the_whole_batch(tmp_path, rule):
    """2 ranks, each half of every view: the averaged gradients and the losses are the single-process ones
    on the concatenated batch (float64). A gather without autograd would leave the encoder's gradients
    1/2 of these: the test lightly's 1/world_size bug fails."""
    ok(launch(2, "grads", rule, str(tmp_path)))
    enc, rule_m, views = dist_worker.tiny(rule)
    losses = PlainStep()(enc, rule_m, None, views)
    named = {f"enc.{k}": p for k, p in enc.named_parameters()} | {f"rule.{k}": p for k, p in rule_m.named_parameters()}
    ref = {k: p.grad for k, p in named.items() if p.grad is not None}
    torch.set_default_dtype(torch.float32)
    for r in range(2):
        got = torch.load(tmp_path / f"grads_{r}.pt")
        assert got["grads"].keys() == ref.keys()
        torch.testing.assert_close(got["losses"], torch.stack(losses), rtol=1e-12, atol=0)
        for k, g in ref.items():
            torch.testing.assert_close(got["grads"][k], g, rtol=1e-9, atol=1e-13, msg=k)


def test_every_rule_trains_data_parallel_as_one_process(tmp_path):
    """Registry-wide: for every registered rule, 2 ranks' averaged gradients and losses are the single-process
    ones on the whole batch (test_rules' VGG case, float64), in each rule's own view layout."""
    ok(launch(2, "contracts", str(tmp_path)))
    from localssl.rules import RULES

    for r in range(2):
        res = json.loads((tmp_path / f"contracts_{r}.json").read_text())
        assert res["rules"] == RULES.names()
        assert res["failures"] == {}, f"rank {r}: {res['failures']}"
        # Rules with a step of their own are refused data-parallel (test_data_parallel_refuses_other_steps).
        assert res["own_step"] == ["pc"]


def test_a_gradient_on_some_ranks_only_is_an_error_not_a_desync():
    runs = launch(2, "desync")
    for r, run in enumerate(runs):
        assert run.returncode == 3, run.stdout[-2000:]
        assert f"refused: rank {r}: encoder.blocks.0.0.bias has a gradient on 1 of 2 ranks" in run.stdout


def tiny_run(out: Path, **kw) -> dict:
    return {**dict(rule="clapp++", dataset="shapes10", width=1 / 16, subset=64, batch_size=16, max_steps=4,
                   amp="off", deterministic=True, progress=False, checkpoint_every=2, log_every=1, out=str(out),
                   seed=3, device="cpu", dist_timeout=20.0,
                   # LARS, not AdamW: AdamW's first steps are about lr * sign(gradient), so a gradient that
                   # float rounding leaves at +-1e-12 in one run moves its weight by 2 lr; LARS's step is linear
                   # in each gradient entry and keeps the runs' rounding differences at rounding size.
                   optimizer="lars", lr=0.05), **kw}


def torchrun(n: int, spec: dict, tmp_path: Path, timeout: float = 100, **extra) -> subprocess.CompletedProcess:
    cfg = tmp_path / f"cfg{time.monotonic_ns()}.json"
    cfg.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", WORKER, "train", str(cfg)]
    return subprocess.run(cmd, env=env(**extra), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("rule", ["clapp++", "bp-infonce"])
def test_data_parallel_training_matches_one_process(tmp_path, rule):
    """torchrun, 2 ranks, 4 steps: the same logged losses and final weights as `train` in one process
    (views drawn per image, so the ranks' halves are the single process's batch); the worker checks that
    both ranks hold bit-identical weights after every step."""
    spec = tiny_run(tmp_path / "dp", rule=rule)
    run = torchrun(2, spec, tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    one = train(dist_worker.TrainConfig(**tiny_run(tmp_path / "one", rule=rule)))
    a, b = load_checkpoint(one / CHECKPOINT), load_checkpoint(tmp_path / "dp" / CHECKPOINT)
    assert a["step"] == b["step"] == 4 and a["optimizer"].keys() == b["optimizer"].keys()
    for part in ("encoder", "rule"):
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], rtol=1e-4, atol=1e-6, msg=f"{part}.{k}")
    la = [json.loads(x)["loss"] for x in (one / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == 4
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-5, atol=1e-6)


def test_a_killed_rank_is_named_and_a_restart_resumes(tmp_path):
    """Rank 1 dies (SIGKILL) in step 3: rank 0 exits non-zero well within dist_timeout, naming rank 1;
    a restart with --resume continues from the checkpoint of step 2 to the end."""
    spec = tiny_run(tmp_path / "run", kill=[1, 2, 9])
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(spec))
    t0 = time.monotonic()
    runs = launch(2, "train", str(cfg), timeout=60)
    took = time.monotonic() - t0
    assert runs[1].returncode == -9
    assert runs[0].returncode not in (0, None), runs[0].stdout[-2000:]
    assert "RankLost" in runs[0].stdout and "lost: rank 1" in runs[0].stdout, runs[0].stdout[-2000:]
    assert took < spec["dist_timeout"] + 30  # the failure was seen, not waited out (startup included)
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT)["step"] == 2
    spec.pop("kill")
    cfg.write_text(json.dumps(spec))
    ok(launch(2, "train", str(cfg), timeout=60, RESUME="1"))
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT)["step"] == 4


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """SIGTERM reaches rank 1 alone during step 2: both ranks finish that step and stop (no rank is left
    waiting in a collective), rank 0 checkpoints step 2, and both report the interruption."""
    spec = tiny_run(tmp_path / "run", kill=[1, 1, 15], max_steps=6, checkpoint_every=100)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(spec))
    runs = launch(2, "train", str(cfg), timeout=60)
    for r, run in enumerate(runs):
        assert run.returncode not in (0, None) and "TrainingInterrupted" in run.stdout, (r, run.stdout[-2000:])
    assert "SIGTERM received: stopped after step 2 of 6" in runs[1].stdout
    assert "a stop signal on another rank received: stopped after step 2 of 6" in runs[0].stdout
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT)["step"] == 2


def test_data_parallel_refuses_other_steps():
    # Predictive coding's inference step, sequential and micro-batched steps run in one process only: refused
    # by name before any rank trains, never run as a plain step.
    from types import SimpleNamespace

    from localssl.config import ConfigError
    from localssl.engine import distributed as D
    from localssl.engine.inference import InferenceStep
    from localssl.engine.step import MicroBatchedStep, SequentialStep
    from localssl.rules import Inference

    par = D.DataParallel(SimpleNamespace(rank=0, world=2), batch_size=8)
    for step in (InferenceStep(Inference(3, 0.1, True)), SequentialStep(2), MicroBatchedStep(4)):
        with pytest.raises(ConfigError, match=f"runs plain steps; this run asks for {type(step).__name__}"):
            par.step(step)
    assert isinstance(par.step(PlainStep()), D.DataParallelStep)
