"""Predictive coding (``pc``, METHODS 5.3): its inference step and its local update, against hand computations.

The registry-wide per-group contracts of tests/test_rules.py do not apply to
it (``Rule.group_losses`` is False: its blocks learn from settled prediction
errors, not from a loss each); their equivalents here:
- routing: block k's update is the gradient of its own prediction error at
  the settled latents, computed from (x_{k-1}, x_k) alone; the projection
  learns from the top loss only; after T < L iterations only the top T
  blocks learn, with T = 0 or eta = 0 none (errors start at 0);
- the explicit rule: dW = -(1/N) sum (e_l * relu'(a_l)) x_{l-1}^T for a linear
  and a conv block (unfolded patches), and the inference steps by hand;
- the energy falls over the iterations (float64, a small fixed step);
- with a small top weight and settled inference, the update is BP's
  gradient (Whittington & Bogacz 2017; Millidge et al. 2022);
- training through `localssl train`, resume included, logs the energy curve.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from test_rules import make_views, setup
from torch import nn

from localssl.builder import build_optimizer, build_step
from localssl.cli import main
from localssl.config import ConfigError, TrainConfig
from localssl.engine.inference import MAX_HALVINGS, InferenceStep, energy, relax
from localssl.engine.step import _amp, _norm_stats_kept, train_step
from localssl.engine.trainer import train
from localssl.models import split_into_blocks
from localssl.reports.energy import energy_curves
from localssl.rules import Inference, build_rule, info_nce


def _double(enc, rule, views):
    return enc.double(), rule.double(), views.double()


def _fixed(rule, iterations: int, step_size: float) -> Inference:
    return Inference(iterations, step_size, backtrack=False)


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone()) for n, p in module.named_parameters()}


def _two_linear(d=(5, 6, 4)):
    seq = nn.Sequential(nn.Linear(d[0], d[1]), nn.ReLU(), nn.Linear(d[1], d[2]), nn.ReLU())
    return split_into_blocks(seq, [2], name="mlp")


def _two_conv():
    seq = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    return split_into_blocks(seq, [2], name="convs")


# ------------------------------------------------------------------ options and wiring


def test_options_are_checked():
    shapes = [(4,)]
    for bad, match in (({"iterations": -1}, "iterations"), ({"step_size": 2.0}, "step_size"),
                       ({"step_size": -0.1}, "step_size"), ({"top_weight": 0.0}, "top_weight"),
                       ({"top_loss": "mse"}, "top_loss.*infonce, invariance"), ({"proj_dim": 0}, "proj_dim"),
                       ({"temperature": 0.0}, "temperature")):
        with pytest.raises(ValueError, match=match):
            build_rule("pc", shapes, bad)
    rule = build_rule("pc", shapes, {"iterations": 7, "step_size": 0.3, "backtrack": False})
    assert rule.schedule == "inference" and not rule.group_losses and rule.local
    assert rule.inference == Inference(7, 0.3, False)


def test_builder_maps_the_schedule_to_the_inference_step():
    rule = build_rule("pc", [(4,)], {"iterations": 3, "step_size": 0.2})
    step = build_step(TrainConfig(rule="pc"), rule, total_steps=10)
    assert isinstance(step, InferenceStep) and step.schedule == Inference(3, 0.2, True)
    with pytest.raises(ConfigError, match="micro_batch"):
        build_step(TrainConfig(rule="pc", micro_batch=2), rule, total_steps=10)
    enc, rule, views = setup("pc", "tail")
    with pytest.raises(ValueError, match="micro_batch"):
        train_step(enc, rule, None, views, micro_batch=3)


def test_blocks_below_the_top_have_no_loss_of_their_own():
    enc, rule, views = setup("pc", "tail")
    h = enc(views)
    with pytest.raises(ValueError, match="block 1 has no loss of its own"):
        rule.loss(0, h[0])
    assert rule.group_parameters(0) == [] and rule.group_parameters(2) == [rule.projection.weight]


def test_top_losses_by_hand():
    """infonce: BP-InfoNCE's loss on the projection of the pooled top, times w; invariance: each view's pooled
    top pulled to the other view's (detached) feedforward code, w * mean ||z - target||^2 / 2."""
    torch.manual_seed(0)
    h = make_views((6, 2, 2), seed=3)
    rule = build_rule("pc", [(6, 2, 2)], {"top_weight": 0.5, "proj_dim": 5, "temperature": 0.2})
    p = h.mean((2, 3)) @ rule.projection.weight.T
    torch.testing.assert_close(rule.loss(0, h), 0.5 * info_nce(p[:4], p[4:], 0.2))
    inv = build_rule("pc", [(6, 2, 2)], {"top_weight": 0.5, "top_loss": "invariance"})
    assert inv.needs_top_context and list(inv.parameters()) == []
    ff = h + 0.1
    z, c = h.mean((2, 3)), ff.mean((2, 3))
    want = 0.5 * (z - torch.cat([c[4:], c[:4]])).pow(2).sum(1).mean() / 2
    torch.testing.assert_close(inv.loss(0, h, ff), want)
    with pytest.raises(ValueError, match="target"):
        inv.loss(0, h, None)


# ------------------------------------------------------------------ the energy and its inference


@pytest.mark.parametrize("case", ["tail", "vgg", "resnet18-units"])
@pytest.mark.parametrize("top_loss", ["infonce", "invariance"])
def test_energy_falls_monotonically_with_a_small_fixed_step(case, top_loss):
    """Gradient descent on the latents: with a small enough eta (no backtracking) E falls at every iteration
    (float64), from E_0 = the top loss alone (every prediction error is 0 at the feedforward latents)."""
    enc, rule, views = _double(*setup("pc", case, top_loss=top_loss))
    out = relax(enc, rule, views, _fixed(rule, 30, 1e-3))
    e = out.energies
    assert e.shape == (31,)
    ff = enc(views)
    top = ff[-1].detach() if rule.needs_top_context else None
    torch.testing.assert_close(e[0], rule.loss(len(enc) - 1, ff[-1], top).detach(), rtol=1e-12, atol=0)
    assert (e.diff() < 0).all(), e
    assert e[-1] < e[0] * (1 - 1e-3)


def test_backtracking_keeps_the_energy_from_rising_where_a_fixed_step_diverges():
    """ResNet-50 stages with BatchNorm on 8 views: eta = 0.1 makes the fixed-step energy rise (its
    curvature is above 2 / eta); backtracking halves the step instead, and E never rises."""
    enc, rule, views = _double(*setup("pc", "resnet50"))
    fixed = relax(copy.deepcopy(enc), rule, views, _fixed(rule, 20, 0.1)).energies
    assert (fixed.diff() > 0).any()
    back = relax(enc, rule, views, Inference(20, 0.1, backtrack=True))
    assert (back.energies.diff() <= 0).all() and back.energies[-1] < back.energies[0]
    assert back.step_size < 0.1


def test_backtracking_stops_inference_where_no_step_lowers_the_energy(monkeypatch):
    """A top term whose gradient at the feedforward point is v but whose curvature is 1e6: every step down to
    1/1024 of eta raises E, so the latents stay, the curve stays flat (T + 1 values) and no block learns."""
    enc, rule, views = _double(*setup("pc", "tail"))
    ff = enc(views)[-1].detach()
    v = torch.ones_like(ff)
    monkeypatch.setattr(rule, "loss", lambda g, h, top=None: 1e6 * (h - ff).pow(2).sum() + (h * v).sum())
    step = InferenceStep(Inference(5, 0.1, backtrack=True))
    step(enc, rule, None, views)
    e = step.last.energies
    assert e.shape == (6,) and (e == e[0]).all()
    torch.testing.assert_close(step.last.xs[-1], ff, rtol=0, atol=0)
    assert all(p.grad is None or not p.grad.any() for p in enc.parameters())
    assert step.last.step_size == pytest.approx(0.1 / 2**MAX_HALVINGS)


def test_two_inference_steps_by_hand():
    """x_l <- x_l - eta (e_l - J_{l+1}^T e_{l+1}) below the top and x_L <- x_L - eta (e_L + N w dL/dx_L),
    written out for two ReLU linear blocks; at t = 0 every error is 0, so step 1 moves the top only."""
    torch.manual_seed(0)
    enc = _two_linear().double()
    rule = build_rule("pc", [(6,), (4,)], {"proj_dim": 3, "top_weight": 0.7}).double()
    x0 = make_views((5,), seed=1, dtype=torch.float64)
    n, eta = x0.shape[0], 0.3
    w0, b0 = enc.blocks[0][0].weight.detach(), enc.blocks[0][0].bias.detach()
    w1, b1 = enc.blocks[1][0].weight.detach(), enc.blocks[1][0].bias.detach()

    def top_grad(x2):
        x2 = x2.clone().requires_grad_()
        (g,) = torch.autograd.grad(rule.loss(1, x2), x2)  # the top loss is tested by hand above
        return g

    x1 = torch.relu(x0 @ w0.T + b0)
    x2 = torch.relu(x1 @ w1.T + b1)
    for _ in range(2):
        a0, a1 = x0 @ w0.T + b0, x1 @ w1.T + b1
        e1, e2 = x1 - torch.relu(a0), x2 - torch.relu(a1)
        x1, x2 = (x1 - eta * (e1 - ((a1 > 0) * e2) @ w1),
                  x2 - eta * (e2 + n * top_grad(x2)))
    out = relax(enc, rule, x0, _fixed(rule, 2, eta))
    torch.testing.assert_close(out.xs[0], x1, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.xs[1], x2, rtol=1e-12, atol=1e-14)
    assert (out.xs[0] != torch.relu(x0 @ w0.T + b0)).any()  # the error reached block 1 in step 2


# ------------------------------------------------------------------ the local update


def _settled(enc, rule, views, schedule):
    """The step's gradients, and the latents it settled on (the same relaxation run again: deterministic)."""
    latents = relax(copy.deepcopy(enc), copy.deepcopy(rule), views, schedule).xs
    InferenceStep(schedule)(enc, rule, None, views)
    return [x.detach() for x in latents]


def test_settled_error_update_of_linear_blocks_by_hand():
    """dE/dW_l = -(1/N) sum_i (e_l * relu'(a_l))_i x_{l-1,i}^T, db_l = -(1/N) sum_i (e_l * relu'(a_l))_i,
    at the settled latents; the projection gets w * dL_top/dP at the settled top latent."""
    torch.manual_seed(0)
    enc = _two_linear().double()
    rule = build_rule("pc", [(6,), (4,)], {"proj_dim": 3}).double()
    x0 = make_views((5,), seed=1, dtype=torch.float64)
    n = x0.shape[0]
    x1, x2 = _settled(enc, rule, x0, _fixed(rule, 10, 0.2))
    for block, (below, above) in enumerate(((x0, x1), (x1, x2))):
        lin = enc.blocks[block][0]
        a = below @ lin.weight.detach().T + lin.bias.detach()
        post = (above - torch.relu(a)) * (a > 0)
        torch.testing.assert_close(lin.weight.grad, -post.T @ below / n, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(lin.bias.grad, -post.sum(0) / n, rtol=1e-10, atol=1e-14)
        assert lin.weight.grad.abs().max() > 1e-4, "degenerate case: no update"
    proj = rule.projection.weight
    (want,) = torch.autograd.grad(rule.loss(1, x2), proj)
    torch.testing.assert_close(proj.grad, want, rtol=1e-10, atol=1e-14)


def test_settled_error_update_of_conv_blocks_by_hand():
    """The same rule for a conv block, on unfolded patches: dW_jc = -(1/N) sum_{i,p} post_{ijp} patch_{icp}."""
    torch.manual_seed(0)
    enc = _two_conv().double()
    rule = build_rule("pc", [(3, 4, 4), (4, 4, 4)], {"proj_dim": 3}).double()
    x0 = make_views((2, 4, 4), seed=2, dtype=torch.float64)
    n = x0.shape[0]
    x1, x2 = _settled(enc, rule, x0, _fixed(rule, 10, 0.1))
    for block, (below, above) in enumerate(((x0, x1), (x1, x2))):
        conv = enc.blocks[block][0]
        w = conv.weight.detach()
        patches = F.unfold(below, 3, padding=1)  # (N, c_in * 9, positions)
        a = torch.einsum("jc,ncp->njp", w.flatten(1), patches) + conv.bias.detach()[None, :, None]
        post = (above.flatten(2) - torch.relu(a)) * (a > 0)
        torch.testing.assert_close(conv.weight.grad, -torch.einsum("njp,ncp->jc", post, patches).reshape_as(w) / n,
                                   rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(conv.bias.grad, -post.sum((0, 2)) / n, rtol=1e-10, atol=1e-14)
        assert conv.weight.grad.abs().max() > 1e-5, "degenerate case: no update"


@pytest.mark.parametrize("case", ["vgg", "resnet18"])
def test_each_block_learns_from_its_own_error_only(case):
    """Block k's gradient == the gradient of prediction_energy(k, x_k, f_k(x_{k-1})) alone at the settled
    latents: nothing but x_{k-1} and x_k reaches it (the rest of the network acts only through inference)."""
    enc, rule, views = _double(*setup("pc", case))
    schedule = Inference(8, 0.1, backtrack=True)
    xs = _settled(enc, rule, views, schedule)
    got = _grads(enc)
    below = [views, *xs[:-1]]
    for k, block in enumerate(enc.blocks):
        params = list(block.parameters())
        with _norm_stats_kept(block):
            local = rule.prediction_energy(k, xs[k], block(below[k]))
        want = torch.autograd.grad(local, params, allow_unused=True)
        names = [f"blocks.{k}.{n}" for n, _ in block.named_parameters()]
        for name, g in zip(names, want):
            torch.testing.assert_close(got[name], torch.zeros_like(got[name]) if g is None else g,
                                       rtol=1e-9, atol=1e-14, msg=name)
    assert all(got[f"blocks.{k}.{n}"].abs().max() > 0 for k, b in enumerate(enc.blocks)
               for n, p in b.named_parameters() if p.dim() > 1)


@pytest.mark.parametrize("schedule", [Inference(0, 0.1), Inference(5, 0.0)], ids=["T=0", "eta=0"])
def test_without_inference_only_the_projection_learns(schedule):
    """T = 0 (or eta = 0): the latents stay at the feedforward pass, every error is 0, so no block learns;
    the projection gets w times BP-InfoNCE's projection gradient at the feedforward codes."""
    enc, rule, views = _double(*setup("pc", "vgg", top_weight=0.5))
    InferenceStep(schedule)(enc, rule, None, views)
    assert all(p.grad is None or not p.grad.any() for p in enc.parameters())
    bp = build_rule("bp-infonce", rule.feature_shapes, {"proj_dim": 16}).double()
    bp.projection.load_state_dict(rule.projection.state_dict())
    (want,) = torch.autograd.grad(0.5 * bp.loss(0, enc(views)[-1].detach()), bp.projection.weight)
    torch.testing.assert_close(rule.projection.weight.grad, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("iterations", [1, 2, 4])
def test_error_reaches_one_block_further_down_per_iteration(iterations):
    """After T < L iterations the prediction errors are non-zero in the top T blocks only, so only they learn
    (Song et al. 2020, Z-IL: the error front moves one layer per inference step)."""
    enc, rule, views = _double(*setup("pc", "vgg"))
    InferenceStep(_fixed(rule, iterations, 0.1))(enc, rule, None, views)
    n = len(enc)
    for k, block in enumerate(enc.blocks):
        moved = any(p.grad is not None and bool(p.grad.any()) for p in block.parameters())
        assert moved == (k >= n - iterations), (k, moved)


def test_small_top_weight_and_settled_inference_give_bps_gradient():
    """PC approximates BP (Whittington & Bogacz 2017; Millidge et al. 2022): with w small and inference run
    to equilibrium, e_l ~ -w delta_l^BP, so each block's update ~ the BP gradient of w * L_top."""
    enc, rule, views = _double(*setup("pc", "tail", top_weight=1e-4))
    InferenceStep(_fixed(rule, 200, 0.2))(enc, rule, None, views)
    pc = [torch.cat([p.grad.flatten() for p in b.parameters()]) for b in enc.blocks]
    for p in enc.parameters():
        p.grad = None
    rule.loss(len(enc) - 1, enc(views)[-1]).backward()
    bp = [torch.cat([p.grad.flatten() for p in b.parameters()]) for b in enc.blocks]
    for k, (a, b) in enumerate(zip(pc, bp)):
        assert F.cosine_similarity(a, b, dim=0) > 0.99, k
        assert 0.8 < float(a.norm() / b.norm()) < 1.2, k


def test_training_lowers_the_feedforward_top_loss_on_a_fixed_batch():
    """What the weights learn is the SSL objective itself: E_0, the top loss at the feedforward latents (no
    inference yet), falls under PC's updates with its default inference (the registry-wide test checks the
    settled E, which inference alone already lowers)."""
    enc, rule, views = setup("pc", "vgg")
    opt = build_optimizer(enc, rule, lr=3e-3, weight_decay=0.0)
    step = InferenceStep.for_rule(rule)
    first = None
    for _ in range(20):
        step(enc, rule, opt, views)
        first = step.last.energies[0] if first is None else first
    assert step.last.energies[0] < 0.5 * first, (first, step.last.energies[0])


def test_energy_of_one_step_is_the_sum_of_its_group_losses():
    enc, rule, views = setup("pc", "tail")
    step = InferenceStep(Inference(4, 0.1, True))
    losses = step(enc, rule, None, views)
    torch.testing.assert_close(torch.stack(losses).sum(), step.last.energies[-1])
    m = step.metrics()
    assert list(m) == [f"energy_{t}" for t in range(5)] + ["inference_step_size"]
    with torch.no_grad():  # the settled latents' energy, evaluated again: the same group losses
        again = energy(enc, rule, views, step.last.xs, None, _amp(views, None, None))
    torch.testing.assert_close(torch.stack(again), torch.stack(losses))


# ------------------------------------------------------------------ training


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(rule="pc", dataset="shapes10", width=1 / 16, subset=96, batch_size=16, epochs=1, amp="off",
                deterministic=True, progress=False, checkpoint_every=3, log_every=1, out=str(tmp_path / "run"),
                seed=3, rule_options={"iterations": 3, "proj_dim": 16})
    base.update(kw)
    return TrainConfig(**base)


def test_train_logs_the_energy_curve(tmp_path, capsys):
    """`localssl train --rule pc` logs E at every iteration of every step; `localssl energy RUN` prints it.
    (Its resume == an uninterrupted run: tests/test_trainer.py, test_resume_mid_epoch_matches_uninterrupted.)"""
    run = train(_cfg(tmp_path))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    for r in rows:
        curve = [r[f"energy_{t}"] for t in range(4)]
        assert all(x >= y for x, y in zip(curve, curve[1:])), curve  # backtracking: E never rises
        assert curve[-1] == pytest.approx(r["loss"], rel=1e-5)
    assert (run / "metrics.csv").read_text().splitlines()[0].count("energy_") == 4
    # `localssl energy RUN`: the same curves, as a table.
    curves = energy_curves(run)
    assert [c["step"] for c in curves] == list(range(1, 7))
    assert curves[-1]["energies"] == [rows[-1][f"energy_{t}"] for t in range(4)]
    assert main(["energy", str(run), "--rows", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["step", "eta", "E_0", "E_1", "E_2", "E_3"] and len(table) == 3
    assert table[-1].split()[0] == "6" and float(table[-1].split()[-1]) == pytest.approx(rows[-1]["energy_3"], rel=1e-3)


def test_energy_command_names_a_run_without_a_curve(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert main(["energy", str(tmp_path)]) == 2
    assert "logs no energy curve" in capsys.readouterr().err
    assert main(["energy", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
