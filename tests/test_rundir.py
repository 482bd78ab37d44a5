"""Run folders: one run per folder (an OS lock), new runs in empty folders, signals end a run with a checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from localssl.atomic import temp_path
from localssl.config import ConfigError, TrainConfig, load_yaml, replace
from localssl.data.base import ArraySource, Plan
from localssl.data.cache import write_entry
from localssl.engine.checkpoint import CHECKPOINT, load_checkpoint
from localssl.engine.rundir import LOCK, RunFolderLock
from localssl.engine.trainer import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "shapes10", "--width", "0.0625", "--subset", "64", "--batch-size", "16", "--amp", "off",
        "--no-progress", "--threads", "1", "--seed", "1"]


def tiny_cfg(out, **kw) -> TrainConfig:
    base = dict(rule="clapp++", dataset="shapes10", width=1 / 16, subset=64, batch_size=16, epochs=1, amp="off",
                progress=False, checkpoint_every=3, log_every=1, out=str(out), seed=1)
    base.update(kw)
    return TrainConfig(**base)


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CI", None)
    return env


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    t = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() - t > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# `held` keeps the lock object alive: a dropped one closes its file, and that releases the lock.
_HOLD = ("import sys, time; from localssl.engine.rundir import RunFolderLock; "
         "held = RunFolderLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)")


def test_second_run_on_a_locked_folder_fails_at_once_and_writes_nothing(tmp_path):
    """Process A holds RUN; `localssl train --out RUN` fails fast naming the folder and A, and leaves no file;
    after A is kill -9'd (no clean-up ran) the lock is free again."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        t = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "localssl", "train", *TINY, "--out", str(run)],
                                capture_output=True, text=True, env=_env(), timeout=120)
        took = time.monotonic() - t
        assert second.returncode == 2, second.stderr
        assert f"{run} is in use by another localssl run (pid {holder.pid} on host" in second.stderr
        assert sorted(p.name for p in run.iterdir()) == [LOCK]  # not even config.yaml or metrics
        assert took < 60  # it did not wait for the holder (which sleeps 120 s)
    finally:
        holder.kill()  # SIGKILL: the holder gets no chance to release anything
        holder.wait()
    with RunFolderLock(run):  # the kernel dropped the dead process's lock
        pass
    train(tiny_cfg(run, max_steps=1))
    assert load_checkpoint(run / CHECKPOINT)["step"] == 1


def test_the_lock_is_held_for_the_whole_run_and_released_after(tmp_path, route_steps, monkeypatch):
    run = tmp_path / "run"
    refused = []

    def step_and_try_the_lock(real_step, *a, **kw):
        try:
            RunFolderLock(run).acquire()
        except ConfigError as e:
            refused.append(str(e))
        return real_step(*a, **kw)

    route_steps(step_and_try_the_lock)
    train(tiny_cfg(run, max_steps=2))
    assert len(refused) == 2 and f"pid {os.getpid()}" in refused[0]
    with RunFolderLock(run):
        pass


def test_new_run_refuses_a_folder_with_other_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"run already holds other files \(notes.txt\).*empty or new folder"):
        train(tiny_cfg(run, max_steps=1))
    assert sorted(p.name for p in run.iterdir()) == sorted([LOCK, "notes.txt"])
    assert (run / "notes.txt").read_text() == "mine"


def test_empty_out_is_refused():
    with pytest.raises(ConfigError, match="out must name"):
        train(tiny_cfg("", max_steps=1))


def test_new_run_starts_over_an_attempt_that_never_checkpointed(tmp_path, route_steps, monkeypatch):
    """What a run killed before its first checkpoint leaves (config, metrics, lock) is not a run."""
    run = tmp_path / "run"
    calls = {"n": 0}

    def dying_step(real_step, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise SystemExit("killed")
        return real_step(*a, **kw)

    route_steps(dying_step)
    with pytest.raises(SystemExit):
        train(tiny_cfg(run, max_steps=4))
    assert not (run / CHECKPOINT).exists() and (run / "metrics.jsonl").exists()
    route_steps(None)
    train(tiny_cfg(run, max_steps=2))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


# SIGINT is reset to Python's handler first: a test run in the background inherits it ignored.
_CLI = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); " \
       "from localssl.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_checkpoints_it_and_resume_continues(tmp_path, sig):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _CLI, "train", *TINY, "--epochs", "1000", "--log-every", "1",
                             "--checkpoint-every", "100000", "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    metrics = run / "metrics.jsonl"
    try:
        _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc, "two steps")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err
    state = load_checkpoint(run / CHECKPOINT)
    step = state["step"]
    assert step >= 2  # checkpoint_every was never reached: this checkpoint is the signal's
    assert f"{sig.name} received: stopped after step {step} of 4000; checkpoint written to {run / CHECKPOINT}" in err
    assert f"localssl train --resume --out {run}" in err
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged == list(range(1, step + 1))
    cfg = replace(load_yaml(TrainConfig, run / "config.yaml"), max_steps=step + 2, threads=None)
    train(cfg, resume=True)
    assert load_checkpoint(run / CHECKPOINT)["step"] == step + 2
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged == list(range(1, step + 3))


# A writer that is killed with kill -9 inside an atomic write: it can clean up nothing.
_KILLED_WRITER = ("import sys, time; from localssl.atomic import atomic_file\n"
                  "with atomic_file(sys.argv[1]) as fh:\n"
                  "    fh.write(b'x' * 1000); fh.flush(); print('writing', flush=True); time.sleep(120)\n")
_KILLED_DECODE = ("import sys, time, numpy as np\n"
                  "from pathlib import Path\n"
                  "from localssl.data.base import Plan, Source\n"
                  "from localssl.data.cache import write_entry\n"
                  "class Slow(Source):\n"
                  "    labels = np.zeros(4, dtype=np.int64); classes = ['a']\n"
                  "    def decode(self, indices, alloc):\n"
                  "        alloc((4, 8, 8, 3)); print('decoding', flush=True); time.sleep(120)\n"
                  "write_entry(Path(sys.argv[1]), 'train-x', dataset='t', split='train', plan=Plan([], 't', Slow),\n"
                  "            indices=None, source_obj=Slow())\n")


def _kill_midway(code: str, arg: Path, ready: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", code, str(arg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())
    try:
        assert proc.stdout.readline().strip() == ready, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_the_next_run_removes_the_temp_files_of_killed_writers_and_only_those(tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(run, max_steps=1))
    _kill_midway(_KILLED_WRITER, run / CHECKPOINT, "writing")
    orphans = [p.name for p in run.iterdir() if ".tmp-" in p.name]
    assert len(orphans) == 1 and orphans[0].startswith(".checkpoint.pt.tmp-")
    # A live writer's temp file (this process) and another host's must survive.
    live = temp_path(run / "probe.json")
    other_host = run / ".probe.json.tmp-1@some-other-host"
    live.write_text("{}")
    other_host.write_text("{}")
    train(replace(load_yaml(TrainConfig, run / "config.yaml"), max_steps=2, threads=None), resume=True)
    left = sorted(p.name for p in run.iterdir() if ".tmp-" in p.name)
    assert left == sorted([live.name, other_host.name])


def test_the_next_decode_removes_the_temp_files_of_a_killed_decode(tmp_path):
    cache = tmp_path / "cache"
    _kill_midway(_KILLED_DECODE, cache, "decoding")
    orphans = [p.name for p in cache.iterdir()]
    assert len(orphans) == 1 and orphans[0].startswith(".train-x.tmp-") and orphans[0].endswith(".images.npy")
    src = ArraySource(np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4), ["a"])
    write_entry(cache, "train-y", dataset="t", split="train", plan=Plan([], "t", lambda: src), indices=None,
                source_obj=src)
    assert not any(".tmp-" in p.name for p in cache.iterdir())
    assert sorted(p.name for p in cache.iterdir()) == ["train-y.images.npy", "train-y.json", "train-y.labels.npy"]
