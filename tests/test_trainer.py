"""The training loop: resume, checkpoints, non-finite losses, run folders."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from localssl.config import ConfigError, TrainConfig
from localssl.engine import trainer as trainer_mod
from localssl.engine.checkpoint import CHECKPOINT, load_checkpoint
from localssl.engine.trainer import NonFiniteLossError, train


def tiny_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(
        rule="clapp++", dataset="shapes10", width=1 / 16, subset=96, batch_size=16, epochs=1,
        max_steps=None, amp="off", deterministic=True, progress=False, checkpoint_every=3, log_every=1,
        out=str(tmp_path / "run"), seed=3,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALSSL_CACHE", str(tmp_path / "cache"))


def _weights(run_dir):
    return load_checkpoint(run_dir / CHECKPOINT)["encoder"]


# pc: its own step, predictive coding's inference; clapp++ with a low-rank B in its own SGD (issue 14): the
# optimizer is then an OptimizerSet, whose state must come back too.
@pytest.mark.parametrize("rule, options", [("clapp++", None), ("bp-infonce", None), ("pc", None),
                                           ("clapp++", {"b_rank": 4, "b_optimizer": "sgd", "b_lr_scale": 10.0})])
def test_resume_mid_epoch_matches_uninterrupted(tmp_path, route_steps, monkeypatch, rule, options):
    """A crash after step 4 (last checkpoint: step 3, mid-epoch) + --resume == one clean run."""
    clean = train(tiny_cfg(tmp_path, rule=rule, rule_options=options, out=str(tmp_path / "clean")))

    calls = {"n": 0}

    def crashing_step(real_step, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated stop")
        return real_step(*a, **kw)

    route_steps(crashing_step)
    cfg = tiny_cfg(tmp_path, rule=rule, rule_options=options, out=str(tmp_path / "crashed"))
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    state = load_checkpoint(tmp_path / "crashed" / CHECKPOINT)
    assert state["step"] == 3  # 6 steps per epoch: the stop was mid-epoch
    route_steps(None)
    resumed = train(cfg, resume=True)

    a, b = _weights(clean), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = (load_checkpoint(r / CHECKPOINT)["rule"] for r in (clean, resumed))  # B and heads alike
    assert ra.keys() == rb.keys()
    for k in ra:
        assert torch.equal(ra[k], rb[k]), k
    # The metric log describes one trajectory: steps 1..6 once each.
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_checkpoint_loads_weights_only_and_holds_everything(tmp_path):
    run = train(tiny_cfg(tmp_path, max_steps=2))
    state = torch.load(run / CHECKPOINT, weights_only=True)
    assert {"encoder", "rule", "optimizer", "step", "rng", "config"} <= set(state)
    assert state["step"] == 2 and state["config"]["rule"] == "clapp++"
    assert (run / "config.yaml").exists() and (run / "metrics.csv").exists() and (run / "encoder.pt").exists()
    # One AdamW over every block and B: state for each trainable parameter.
    assert len(state["optimizer"]["state"]) == len(state["optimizer"]["param_groups"][0]["params"]) == 6 * 2 + 6


def test_training_changes_weights(tmp_path):
    from localssl.models import build_encoder

    run = train(tiny_cfg(tmp_path, max_steps=2))
    torch.manual_seed(3)
    init = build_encoder("vgg6", 1 / 16).state_dict()
    trained = _weights(run)
    assert all(not torch.equal(init[k], trained[k]) for k in init)


def test_resnet_run_saves_its_resolved_options_and_resumes_and_reloads(tmp_path):
    """ResNet-18 (BatchNorm, CIFAR stem chosen at 32 px): the run saves the stem it used, resumes and loads back."""
    from localssl.engine.checkpoint import load_encoder_from_run

    cfg = tiny_cfg(tmp_path, encoder="resnet18", rule="bp-infonce", batch_size=8, subset=32, max_steps=1)
    run = train(cfg)
    saved = load_checkpoint(run / CHECKPOINT)["config"]
    assert saved["encoder_options"] == {"stem": "cifar", "cut": "stages", "zero_init": False}
    assert saved["grids"] == [1, 1, 1, 1]  # no reference grids for ResNets: global pooling per block
    # Options left unset, or some given as a config file or --encoder-opt would: the others are the run's.
    for step, options in ((2, None), (3, {"zero_init": "false"})):
        train(dataclasses.replace(cfg, max_steps=step, encoder_options=options), resume=True)
    with pytest.raises(ConfigError, match="cannot resume.*encoder_options.*'cut': 'units'"):
        train(dataclasses.replace(cfg, max_steps=4, encoder_options={"cut": "units"}), resume=True)
    encoder, tcfg = load_encoder_from_run(run)
    assert tcfg.encoder_options == saved["encoder_options"] and len(encoder) == 4
    weights = _weights(run)
    assert all(torch.equal(v, weights[k]) for k, v in encoder.state_dict().items())


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from localssl.rules.clapp import CLAPPPlusPlus

    real_loss = CLAPPPlusPlus.loss
    calls = {"n": 0}

    def bad_loss(self, g, h, top=None):
        calls["n"] += 1
        loss = real_loss(self, g, h, top)
        # Step 5, block 2: NaN (6 blocks per step).
        return loss * float("nan") if calls["n"] == 4 * 6 + 2 else loss

    monkeypatch.setattr(CLAPPPlusPlus, "loss", bad_loss)
    cfg = tiny_cfg(tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"group 2 \(blocks \[2\]\).*step 5.*last good checkpoint"):
        train(cfg)
    state = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert state["step"] == 3
    for v in state["encoder"].values():
        assert torch.isfinite(v).all()


def test_existing_run_is_not_overwritten(tmp_path):
    cfg = tiny_cfg(tmp_path, max_steps=1)
    train(cfg)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg)


def test_resume_refuses_a_different_config(tmp_path):
    cfg = tiny_cfg(tmp_path, max_steps=1)
    train(cfg)
    with pytest.raises(ConfigError, match="lr"):
        train(tiny_cfg(tmp_path, max_steps=2, lr=1e-3), resume=True)


def test_resume_refuses_a_checkpoint_with_one_optimizer_per_group(tmp_path):
    """A checkpoint of the earlier layout (a list of per-group optimizer states) is named, not half-loaded."""
    cfg = tiny_cfg(tmp_path, max_steps=1)
    run = train(cfg)
    state = load_checkpoint(run / CHECKPOINT)
    state["optimizers"] = [state.pop("optimizer")]
    torch.save(state, run / CHECKPOINT)
    before = (run / CHECKPOINT).read_bytes()
    with pytest.raises(ConfigError, match=f"{run / CHECKPOINT}.*one optimizer per group"):
        train(tiny_cfg(tmp_path, max_steps=2), resume=True)
    assert (run / CHECKPOINT).read_bytes() == before


def test_corrupt_checkpoint_is_reported_by_name(tmp_path):
    cfg = tiny_cfg(tmp_path, max_steps=1)
    run = train(cfg)
    data = (run / CHECKPOINT).read_bytes()
    (run / CHECKPOINT).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=str(run / CHECKPOINT)):
        load_checkpoint(run / CHECKPOINT)


def test_micro_batch_reaches_the_step_and_may_change_on_resume(tmp_path, monkeypatch):
    """`train` hands micro_batch to every step, and --resume may change it (same gradient, other memory).

    The first step's losses (same weights, same views) match the plain run's;
    later weights are not compared in float32, since AdamW turns rounding in
    near-zero gradients into lr-sized steps (the exact float64 equality of
    the gradients and updates is in test_rules.py).
    """
    seen = []
    real_build = trainer_mod.build_step

    def spy(*a, **kw):
        step = real_build(*a, **kw)
        seen.append(getattr(step, "micro_batch", None))
        return step

    monkeypatch.setattr(trainer_mod, "build_step", spy)
    plain = train(tiny_cfg(tmp_path, out=str(tmp_path / "plain"), max_steps=2))
    train(tiny_cfg(tmp_path, out=str(tmp_path / "mb"), max_steps=2, micro_batch=5))
    chunked = train(tiny_cfg(tmp_path, out=str(tmp_path / "mb"), max_steps=3, micro_batch=12), resume=True)
    assert seen == [None, 5, 12]  # one step object per run
    first = [json.loads((r / "metrics.jsonl").read_text().splitlines()[0]) for r in (plain, chunked)]
    losses = [[v for k, v in row.items() if k.startswith("loss_")] for row in first]
    assert len(losses[0]) == 6
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-6)


def test_micro_batch_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="micro_batch"):
        train(tiny_cfg(tmp_path, micro_batch=0))


_CHURN = """
import ctypes, json, resource, torch
from localssl.engine.runtime import allocator_state, retain_freed_memory

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def churn(n=8):
    # One block's life in a local step: its output and a same-size gradient (16 MiB each) are
    # freed together, then the next, smaller block allocates.
    f = faults()
    for _ in range(n):
        a, b, c = torch.ones(4 << 20), torch.ones(4 << 20), torch.ones(1 << 20)
        del a, b
        d = torch.ones(1 << 20)
        del c, d
    return (faults() - f) / n

class MallInfo2(ctypes.Structure):
    _fields_ = [(k, ctypes.c_size_t) for k in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = retain_freed_memory()
churn()
mmapped = libc.mallinfo2().hblkhd
big = torch.ones(6 << 20)  # 24 MiB: below the new mmap threshold, so from the heap
from_heap = libc.mallinfo2().hblkhd == mmapped
del big
print(json.dumps({"after": churn(), "from_heap": from_heap, "applied": applied, "state": allocator_state()}))
"""


def test_retain_freed_memory_keeps_freed_blocks_mapped():
    """After `retain_freed_memory`, buffers up to 32 MiB come from the heap and a local step's
    alloc/free churn touches no new page (glibc's defaults may hand the pages back between blocks,
    depending on the heap's layout: `localssl bench` counts the faults per step both ways)."""
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("not applicable: mallopt tuning applies to glibc only")
    out = subprocess.run([sys.executable, "-c", _CHURN], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["applied"] and res["state"].startswith("glibc, freed memory retained")
    assert res["from_heap"]
    assert res["after"] < 9216 / 10  # a round touches 36 MiB = 9216 pages


def test_retain_freed_memory_is_a_resumable_option(tmp_path, monkeypatch):
    """`train` applies it when asked, records the allocator with the run, and --resume may change it."""
    calls = []
    monkeypatch.setattr(trainer_mod, "retain_freed_memory", lambda: calls.append(1) or True)
    train(tiny_cfg(tmp_path, max_steps=1, retain_freed_memory=False))
    assert calls == []
    run = train(tiny_cfg(tmp_path, max_steps=2, retain_freed_memory=True), resume=True)
    assert calls == [1]
    assert "allocator" in load_checkpoint(run / CHECKPOINT)["env"]


def test_nonfinite_weights_stop_before_the_checkpoint(tmp_path, route_steps, monkeypatch):
    """Step 6's losses finite, its update overflowed (as with a huge lr): the checkpoint due after it is not
    written over step 3's, and the error says why."""
    calls = {"n": 0}

    def overflowing_step(real_step, encoder, *a, **kw):
        losses = real_step(encoder, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 6:
            with torch.no_grad():
                next(encoder.parameters()).fill_(float("inf"))
        return losses

    route_steps(overflowing_step)
    with pytest.raises(trainer_mod.NonFiniteWeightsError,
                       match=r"after step 6 the weights are not finite \(blocks\.0\..*last good checkpoint is kept"):
        train(tiny_cfg(tmp_path, max_steps=7))
    state = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["encoder"].values())
    assert not (tmp_path / "run" / "encoder.pt").exists()


def test_probe_refuses_non_finite_weights(tmp_path):
    from localssl.config import ProbeConfig
    from localssl.evaluation.run import probe_run

    run = train(tiny_cfg(tmp_path, max_steps=1))
    state = load_checkpoint(run / CHECKPOINT)
    key = next(iter(state["encoder"]))
    state["encoder"][key].fill_(float("inf"))
    torch.save(state, run / CHECKPOINT)
    with pytest.raises(ConfigError, match=rf"{run / CHECKPOINT} holds non-finite weights \({key}"):
        probe_run(ProbeConfig(run=str(run), train_subset=20, test_subset=20, amp="off"))
    assert not (run / "probe.json").exists()


def test_max_steps_overrides_epochs(tmp_path):
    """6 steps per epoch here: --max-steps 8 with --epochs 1 trains 8 steps (the help's "overrides epochs")."""
    run = train(tiny_cfg(tmp_path, max_steps=8))
    assert load_checkpoint(run / CHECKPOINT)["step"] == 8


def test_resume_with_epochs_drops_the_runs_max_steps_and_an_empty_resume_says_so(tmp_path, capsys):
    from localssl.cli import main

    out = str(tmp_path / "run")
    flags = ["--dataset", "shapes10", "--width", "0.0625", "--subset", "96", "--batch-size", "16", "--amp", "off",
             "--no-progress", "--seed", "3"]
    assert main(["train", *flags, "--max-steps", "2", "--out", out]) == 0
    # The README's resume example: --epochs alone asks for 2 epochs (12 steps), not the run's 2 steps.
    assert main(["train", "--resume", "--out", out, "--epochs", "2"]) == 0
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT)["step"] == 12
    def files():  # the lock file records its holder, not the run
        return {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.name != ".localssl.lock"}

    before = files()
    assert CHECKPOINT in before and "metrics.jsonl" in before
    capsys.readouterr()
    assert main(["train", "--resume", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "nothing to train" in err and "is at step 12" in err and "--epochs 2 (6 steps each)" in err
    assert files() == before  # nothing rewritten
