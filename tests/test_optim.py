"""LARS and the lr schedule (`localssl.engine.optim`): the update by hand, the schedule's values, resume."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from test_trainer import tiny_cfg

from localssl.builder import build_model, build_optimizer
from localssl.config import ConfigError, TrainConfig, validate_train
from localssl.engine.checkpoint import CHECKPOINT, load_checkpoint
from localssl.engine.optim import LARS, lr_at
from localssl.engine.trainer import train


def _lars_by_hand(w, b, grads, lr, momentum, wd, eta):
    """The LARS update of barlowtwins' formula in numpy, float64: (w, b) after each (g_w, g_b) in ``grads``."""
    mu_w, mu_b, out = np.zeros_like(w), np.zeros_like(b), []
    for g_w, g_b in grads:
        d = g_w + wd * w  # the matrix: weight decay, then the trust ratio
        d = d * (eta * np.linalg.norm(w) / np.linalg.norm(d))
        mu_w = momentum * mu_w + d
        w = w - lr * mu_w
        mu_b = momentum * mu_b + g_b  # the bias: neither, its raw gradient
        b = b - lr * mu_b
        out.append((w, b))
    return out


def test_lars_one_and_two_steps_equal_a_hand_computation():
    rng = np.random.default_rng(0)
    w0, b0 = rng.normal(size=(3, 4)), rng.normal(size=3)
    grads = [(rng.normal(size=(3, 4)), rng.normal(size=3)) for _ in range(2)]
    lr, momentum, wd, eta = 0.5, 0.9, 0.1, 0.001
    expected = _lars_by_hand(w0, b0, grads, lr, momentum, wd, eta)

    w = torch.nn.Parameter(torch.tensor(w0))
    b = torch.nn.Parameter(torch.tensor(b0))
    opt = LARS([w, b], lr=lr, momentum=momentum, weight_decay=wd, eta=eta)
    for k, (g_w, g_b) in enumerate(grads):
        w.grad, b.grad = torch.tensor(g_w), torch.tensor(g_b)
        opt.step()
        np.testing.assert_allclose(w.detach().numpy(), expected[k][0], rtol=1e-13, atol=0)
        np.testing.assert_allclose(b.detach().numpy(), expected[k][1], rtol=1e-13, atol=0)
    # The trust ratio scaled the matrix's step far below lr * gradient; the bias moved by its full momentum step.
    assert np.abs(w.detach().numpy() - w0).max() < 1e-2 < np.abs(b.detach().numpy() - b0).max()


def test_lars_state_is_its_momentum_and_resumes_through_a_weights_only_state_dict():
    """Step 1, save, load into a fresh LARS on copies, step 2: equal bit for bit to two steps in one go."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4))]
    grads = [[torch.randn_like(p) for p in params] for _ in range(2)]
    opt = LARS(params, lr=0.1, weight_decay=1e-2)
    for p, g in zip(params, grads[0]):
        p.grad = g
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = LARS(copies, lr=0.1, weight_decay=1e-2)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    for ps, opt_ in ((params, opt), (copies, fresh)):
        for p, g in zip(ps, grads[1]):
            p.grad = g.clone()
        opt_.step()
    assert all(torch.equal(a, b) for a, b in zip(params, copies))
    assert set(opt.state_dict()["state"][0]) == {"momentum_buffer"}


def test_lars_moves_a_zero_weight_by_its_raw_gradient():
    """||w|| = 0 makes the trust ratio 0; the references use 1 then, so a zero-initialised weight can move."""
    w = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    w.grad = torch.tensor([[1.0, -2.0], [0.5, 0.0]], dtype=torch.float64)
    LARS([w], lr=0.1, weight_decay=0.5).step()
    assert torch.equal(w.detach(), -0.1 * w.grad)


def test_lr_at_warmup_then_cosine_to_min_lr():
    at = [lr_at(s, 1.0, 10, "cosine", warmup_steps=4, min_lr=0.1) for s in (0, 2, 4, 7, 10, 12)]
    # step 0: 0; mid-warmup: half; end of warmup: lr; mid-cosine (3 of 6 steps): halfway to min_lr; the end.
    assert at == pytest.approx([0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1, 0.1], abs=1e-15)
    assert lr_at(5, 1.0, 10, "cosine", 4, 0.1) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 6)))
    assert [lr_at(s, 1.0, 10, "constant", 4) for s in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]
    assert lr_at(3, 2e-4, 10) == 2e-4  # the default: the lr itself, so runs without a schedule are unchanged
    with pytest.raises(ValueError, match="unknown lr schedule 'step'; valid: constant, cosine"):
        lr_at(0, 1.0, 10, "step")


def test_build_optimizer_keeps_fused_adamw_by_default_and_builds_lars_on_the_same_parameters():
    model = build_model(TrainConfig(width=1 / 16), 3, 32)
    enc, rule = model.encoder, model.rule
    adamw = build_optimizer(enc, rule, 1e-3, 0.0)
    lars = build_optimizer(enc, rule, 0.2, 1e-6, "lars", momentum=0.8)
    assert type(adamw) is torch.optim.AdamW and adamw.param_groups[0]["fused"]
    assert isinstance(lars, LARS) and lars.param_groups[0]["momentum"] == 0.8
    ids = [[id(p) for g in o.param_groups for p in g["params"]] for o in (adamw, lars)]
    assert ids[0] == ids[1]
    with pytest.raises(ConfigError, match="unknown optimizer 'sgd'; valid: adamw, lars"):
        build_optimizer(enc, rule, 1e-3, 0.0, "sgd")


@pytest.mark.parametrize(
    "kw, pattern",
    [
        ({"optimizer": "sgd"}, "unknown optimizer 'sgd'; valid: adamw, lars"),
        ({"lr_schedule": "step"}, "unknown lr_schedule 'step'; valid: constant, cosine"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\), got 1\.0"),
        ({"momentum": -0.1}, r"momentum must be in \[0, 1\)"),
        ({"warmup_steps": -1}, "warmup_steps must be >= 0, got -1"),
        ({"min_lr": -1e-3}, r"min_lr must be in \[0, lr\]"),
        ({"min_lr": 1e-3, "lr": 1e-4}, r"min_lr must be in \[0, lr\] .*lr is 0\.0001"),
        ({"min_lr": float("nan")}, "min_lr must be a finite number"),
        ({"lr": 2.0}, r"lr must be <= 1\.0 with optimizer adamw"),
    ],
)
def test_bad_optimizer_and_schedule_values_are_refused_naming_the_key(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate_train(TrainConfig(**kw))


def test_lars_takes_the_large_lr_its_reference_uses():
    validate_train(TrainConfig(optimizer="lars", lr=3.2))  # 0.2 x 4096 / 256 (blockwise SSL), no error


def _state(run):
    state = load_checkpoint(run / CHECKPOINT)
    return {**{f"encoder.{k}": v for k, v in state["encoder"].items()},
            **{f"rule.{k}": v for k, v in state["rule"].items()},
            **{f"mu.{k}": s["momentum_buffer"] for k, s in state["optimizer"]["state"].items()}}


def _lrs(run):
    return [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_lars_cosine_run_resumed_mid_run_equals_the_uninterrupted_one(tmp_path, route_steps):
    """LARS + warmup 2 + cosine, stopped after step 4 (checkpoint: step 3) and resumed == one clean run,
    weights and momentum bit for bit; and the lr of every logged step is `lr_at` of it."""
    kw = dict(optimizer="lars", lr=0.05, weight_decay=1e-4, lr_schedule="cosine", warmup_steps=2, min_lr=1e-3)
    clean = train(tiny_cfg(tmp_path, out=str(tmp_path / "clean"), **kw))

    calls = {"n": 0}

    def crashing_step(real_step, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated stop")
        return real_step(*a, **k)

    route_steps(crashing_step)
    cfg = tiny_cfg(tmp_path, out=str(tmp_path / "crashed"), **kw)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert load_checkpoint(tmp_path / "crashed" / CHECKPOINT)["step"] == 3  # 6 steps: stopped mid-run
    route_steps(None)
    resumed = train(cfg, resume=True)

    a, b = _state(clean), _state(resumed)
    assert a.keys() == b.keys() and any(k.startswith("mu.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    expected = [lr_at(s, 0.05, 6, "cosine", 2, 1e-3) for s in range(6)]
    assert _lrs(resumed) == _lrs(clean) == expected
    assert expected[0] == 0.0 and len(set(expected)) == 6  # warmup and cosine both ran


def test_resume_refuses_another_optimizer_schedule_or_cosine_length(tmp_path):
    kw = dict(optimizer="lars", lr=0.05, lr_schedule="cosine")
    train(tiny_cfg(tmp_path, max_steps=2, **kw))
    for change, pattern in (
        ({"optimizer": "adamw"}, "optimizer: run has 'lars', asked 'adamw'"),
        ({"momentum": 0.5}, "momentum: run has 0.9, asked 0.5"),
        ({"lr_schedule": "constant"}, "lr_schedule: run has 'cosine', asked 'constant'"),
        ({"warmup_steps": 1}, "warmup_steps: run has 0, asked 1"),
        ({"min_lr": 1e-3}, "min_lr: run has 0.0, asked 0.001"),
        ({"max_steps": 4}, "cannot resume lr_schedule cosine with another run length: the run is 2 steps, asked 4"),
    ):
        with pytest.raises(ConfigError, match=pattern):
            train(tiny_cfg(tmp_path, **{**kw, "max_steps": 4, **change}), resume=True)

    # A checkpoint of a version before optimizers were options resumes as what it was: AdamW, constant lr,
    # whose length may change on resume.
    old = tmp_path / "old"
    train(tiny_cfg(tmp_path, out=str(old), max_steps=2))
    state = torch.load(old / CHECKPOINT, weights_only=True)
    for key in ("optimizer", "momentum", "lr_schedule", "warmup_steps", "min_lr"):
        del state["config"][key]
    torch.save(state, old / CHECKPOINT)
    train(tiny_cfg(tmp_path, out=str(old), max_steps=3), resume=True)
    assert load_checkpoint(old / CHECKPOINT)["step"] == 3 and _lrs(old) == [2e-4] * 3
