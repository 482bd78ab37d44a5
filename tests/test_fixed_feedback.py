"""``ff`` (B = identity) and ``dfa`` (fixed random B, top-layer context): METHODS 2 and 5.3.

The registry-wide contracts (tests/test_rules.py) run on both; here: each
loss against a hand computation (float64, plain Python sums), ``ff``'s lack of
parameters, and ``dfa``'s B staying bit-identical through the real step and
optimizers (AdamW and LARS with weight decay) and through a checkpoint.
"""
from __future__ import annotations

import math

import pytest
import torch

from localssl.builder import build_optimizer
from localssl.config import ConfigError, TrainConfig, validate_train
from localssl.engine import trainer as trainer_mod
from localssl.engine.checkpoint import CHECKPOINT, load_checkpoint, load_weights
from localssl.engine.step import train_step
from localssl.models import build_encoder
from localssl.rules import bp_counterpart, build_rule

N = 3  # images: 2N = 6 stacked views


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


F_BY_HAND = {
    "softplus": lambda up, un: _softplus(1 - up) + _softplus(1 + un),
    "hinge": lambda up, un: max(0.0, 1 - up) + max(0.0, 1 + un),
    "type1": lambda up, un: _softplus(un - up),
}


def _loss_by_hand(z: list[list[float]], bc: list[list[float]], f: str, threshold: float = 0.0) -> float:
    """mean_i f(z_i . bc_i - theta, z_{i+1 mod 2N} . bc_i - theta), row i's context being view-swapped."""
    n = len(z)
    total = 0.0
    for i in range(n):
        u_pos = sum(a * b for a, b in zip(z[i], bc[i])) - threshold
        u_neg = sum(a * b for a, b in zip(z[(i + 1) % n], bc[i])) - threshold
        total += F_BY_HAND[f](u_pos, u_neg)
    return total / n


def _swap(rows: list) -> list:
    """Row i of view 1 <-> row i of view 2, by index."""
    n = len(rows) // 2
    return [rows[(i + n) % (2 * n)] for i in range(2 * n)]


def _maps(c: int, s: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2 * N, c, s, s, generator=g, dtype=torch.float64)  # >= 0, like a ReLU's output


def _matvec(b: torch.Tensor, c: list[float]) -> list[float]:
    return [sum(b_jk * c_k for b_jk, c_k in zip(row, c)) for row in b.tolist()]


# ---------------------------------------------------------------- ff


def test_ff_is_registered_local_without_parameters_and_pools_globally():
    shapes = [(4, 8, 8), (6, 4, 4)]
    rule = build_rule("ff", shapes, {}, grids=[4, 2])
    assert rule.local and not rule.needs_top_context
    assert list(rule.parameters()) == [] and all(rule.group_parameters(g) == [] for g in range(2))
    assert rule.grids == [1, 1]  # the run's grids are not used (see ForwardForward)
    assert rule.options.f == "hinge" and rule.options.threshold == 0.0
    assert bp_counterpart("ff") == "bp-clapp++" and not build_rule("bp-clapp++", shapes, {}).local


@pytest.mark.parametrize("f, threshold", [("softplus", 0.0), ("softplus", 1.5), ("hinge", 0.0), ("hinge", 2.0),
                                          ("type1", 0.7)])
def test_ff_loss_and_gradient_by_hand(f, threshold):
    """u_pos = z_i . z_{i+N}, u_neg = z_{i+1} . z_{i+N}, z = mean over H, W; context detached."""
    c, s = 3, 4
    rule = build_rule("ff", [(c, s, s)], {"f": f, "threshold": threshold}, grids=[2])
    h = _maps(c, s, seed=1).mul(0.8).requires_grad_()
    z = [[sum(h[i, ch].flatten().tolist()) / (s * s) for ch in range(c)] for i in range(2 * N)]
    want = _loss_by_hand(z, _swap(z), f, threshold)
    got = rule.loss(0, h)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-14)
    # Gradient: only through z (the context is detached), spread evenly over the H x W cells.
    (grad,) = torch.autograd.grad(got, h)
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    ct = torch.tensor(_swap(z), dtype=torch.float64)  # a constant: no gradient through the context
    u_pos, u_neg = (zt * ct).sum(1) - threshold, (zt.roll(-1, 0) * ct).sum(1) - threshold
    terms = {"softplus": lambda: torch.nn.functional.softplus(1 - u_pos) + torch.nn.functional.softplus(1 + u_neg),
             "hinge": lambda: torch.relu(1 - u_pos) + torch.relu(1 + u_neg),
             "type1": lambda: torch.nn.functional.softplus(u_neg - u_pos)}[f]()
    (dz,) = torch.autograd.grad(terms.mean(), zt)
    torch.testing.assert_close(grad, (dz / (s * s))[:, :, None, None].expand_as(h), rtol=1e-12, atol=1e-15)
    assert grad.abs().max() > 1e-4


def test_ff_refuses_linear_f_for_training():
    build_rule("ff", [(4,)], {"f": "linear"})  # one evaluation is defined
    with pytest.raises(ConfigError, match="f=linear is unbounded below with B = identity"):
        validate_train(TrainConfig(rule="ff", rule_options={"f": "linear"}))
    with pytest.raises(ConfigError, match="unknown FFOptions key.*'feedback'.*valid keys: f, threshold"):
        build_rule("ff", [(4,)], {"feedback": "fixed"})


# ---------------------------------------------------------------- dfa


def test_dfa_loss_by_hand():
    """z^l . (B^l c), c = the other view's top code pooled to the top grid, B^l the rule's frozen matrix."""
    shapes, grids = [(2, 4, 4), (3, 2, 2)], [2, 1]
    rule = build_rule("dfa", shapes, {}, grids=grids).double()
    assert rule.needs_top_context and len(rule.same) == 0
    hs = [_maps(*shapes[0][:2], seed=2), _maps(*shapes[1][:2], seed=3)]
    top = hs[-1]
    c_top = _swap([[float(v) for v in top[i].mean((1, 2))] for i in range(2 * N)])  # grid 1: channel means
    for g, (h, grid) in enumerate(zip(hs, grids)):
        k = h.shape[-1] // grid
        # Pooled cells in (channel, row, column) order, as spatial_pool flattens them.
        z = [[float(h[i, ch, r * k:(r + 1) * k, q * k:(q + 1) * k].mean())
              for ch in range(h.shape[1]) for r in range(grid) for q in range(grid)] for i in range(2 * N)]
        b = rule.top[g].weight.detach()
        assert b.shape == (len(z[0]), len(c_top[0]))
        want = _loss_by_hand(z, [_matvec(b, c) for c in c_top], "hinge")
        assert rule.loss(g, h, top).item() == pytest.approx(want, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("bad", ["trainable", "identity"])
def test_dfa_refuses_other_feedback(bad):
    with pytest.raises(ConfigError, match=f"dfa's feedback is fixed random by definition.*feedback='{bad}'"):
        build_rule("dfa", [(4, 2, 2)], {"feedback": bad}, grids=[1])


def _vgg_dfa(**opts):
    torch.manual_seed(0)
    enc = build_encoder("vgg6", width=1 / 32, in_channels=3)
    rule = build_rule("dfa", enc.feature_shapes((3, 16, 16)), opts, grids=[8, 4, 2, 2, 2, 1])
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 16, 16, generator=g)
    return enc, rule, torch.cat([x, x + 0.3 * torch.randn(x.shape, generator=g)])


@pytest.mark.parametrize("optimizer", ["adamw", "lars"])
@pytest.mark.parametrize("train_top", [False, True])
def test_dfa_feedback_stays_bit_identical_through_training_steps(optimizer, train_top):
    """Three steps of the real step and optimizer (weight decay 0.1): every frozen B is unchanged and
    held by no optimizer; the encoder moves; with train_top only the top layer's own B trains."""
    enc, rule, views = _vgg_dfa(train_top=train_top)
    before = {n: p.detach().clone() for n, p in rule.named_parameters()}
    enc0 = {n: p.detach().clone() for n, p in enc.named_parameters()}
    top_b = rule.top[-1].weight
    owned = [rule.group_parameters(g) for g in range(6)]
    assert owned == [[]] * 5 + [[top_b] if train_top else []]  # the top group owns the top B, if anyone
    opt = build_optimizer(enc, rule, lr=1e-2, weight_decay=0.1, optimizer=optimizer)
    held = {id(p) for grp in opt.param_groups for p in grp["params"]}
    assert {id(p) for p in rule.parameters()} & held == ({id(top_b)} if train_top else set())
    for _ in range(3):
        losses = train_step(enc, rule, opt, views)
        assert all(torch.isfinite(v) for v in losses)
    for n, p in rule.named_parameters():
        if train_top and p is top_b:
            assert not torch.equal(p, before[n]), "the trainable top B did not train"
        else:
            assert not p.requires_grad and p.grad is None and torch.equal(p, before[n]), n
    assert all(not torch.equal(p, enc0[n]) for n, p in enc.named_parameters() if p.dim() > 1)


def test_dfa_checkpoint_saves_b_and_loads_it_back(tmp_path, monkeypatch):
    """A real run (AdamW, weight decay 0.1): the checkpoint holds every B as it was drawn (saved, not
    re-derived), the optimizer holds no state for it, and a rule built with other random B loads it."""
    drawn = {}
    real_build = trainer_mod.build_model

    def recording_build(*a, **kw):
        model = real_build(*a, **kw)
        drawn.update({n: t.detach().clone() for n, t in model.rule.state_dict().items()})
        return model

    monkeypatch.setattr(trainer_mod, "build_model", recording_build)
    cfg = TrainConfig(rule="dfa", dataset="shapes10", width=1 / 16, subset=32, batch_size=8, max_steps=2,
                      weight_decay=0.1, amp="off", progress=False, out=str(tmp_path / "run"), seed=3)
    run = trainer_mod.train(cfg)
    state = load_checkpoint(run / CHECKPOINT)
    assert drawn and state["rule"].keys() == drawn.keys() == {f"top.{k}.weight" for k in range(6)}
    for n, t in drawn.items():
        assert torch.equal(state["rule"][n], t), n
    n_encoder = sum(1 for p in build_encoder("vgg6", 1 / 16).parameters())
    assert len(state["optimizer"]["state"]) == n_encoder  # no optimizer state for a frozen B
    torch.manual_seed(99)
    shapes = build_encoder("vgg6", 1 / 16).feature_shapes((3, 32, 32))
    fresh = build_rule("dfa", shapes, state["config"]["rule_options"], grids=state["config"]["grids"])
    assert not torch.equal(fresh.top[0].weight, drawn["top.0.weight"])
    load_weights(fresh, state["rule"], run / CHECKPOINT, "rule")
    for n, t in fresh.state_dict().items():
        assert torch.equal(t, drawn[n]), n
    assert all(not p.requires_grad for p in fresh.parameters())



# ---------------------------------------------------------------- the commands take both rules


def test_bench_measures_both_against_bp_clapp():
    """`localssl bench --rules ff dfa bp-clapp++`: the twin is the registered counterpart; dfa's frozen B
    costs memory but no gradient or optimizer state, and no backward FLOPs; ff has no rule tensors at all."""
    from localssl.reports.bench import run_bench

    res = run_bench(encoder="vgg6", widths=[1 / 16], image_sizes=[32], batch_size=2, steps=1, warmup=0, rounds=1,
                    precisions=["fp32"], rules=["ff", "dfa", "bp-clapp++"], device="cpu", speed=False,
                    compare_precision=False, breakdown=False, augment=False)
    mem = res["memory"][0]["rules"]
    assert mem["ff"]["bp_twin"] == mem["dfa"]["bp_twin"] == "bp-clapp++"
    assert mem["ff"]["parameters"]["rule"]["numel"] == 0
    dfa_rule = mem["dfa"]["parameters"]["rule"]
    assert dfa_rule["numel"] > 0 and dfa_rule["trainable_numel"] == 0
    assert dfa_rule["grads_bytes"] == dfa_rule["optimizer_bytes"] == 0
    flops = res["flops"]["rules"]
    assert flops["ff"]["rule_params_fwd"] == flops["ff"]["context_fwd"] == 0
    assert flops["dfa"]["rule_params_fwd"] > 0 and flops["dfa"]["rule_params_bwd"] == 0
    assert flops["dfa"]["context_fwd"] == flops["dfa"]["encoder_fwd"]  # the DFB context's extra forward


def test_align_and_compare_take_both(tmp_path, capsys):
    """`localssl align` on a dfa run (its frozen B from the checkpoint; nothing to fit) and on ff, then
    `localssl compare --rules ff dfa`: one row each, read against bp-clapp++."""
    import argparse
    import csv
    import json

    from localssl.cli import main
    from localssl.theory.align import add_align_parser, align_main

    cfg = TrainConfig(rule="dfa", dataset="shapes10", width=1 / 16, subset=32, batch_size=8, max_steps=2,
                      amp="off", progress=False, out=str(tmp_path / "dfa"), seed=0)
    run = trainer_mod.train(cfg)
    parser = argparse.ArgumentParser(prog="localssl")
    add_align_parser(parser.add_subparsers(dest="command", required=True))
    for extra in ([], ["--rule", "ff"]):
        args = parser.parse_args(["align", str(run), "--batches", "1", "--batch-size", "8", "--fit-b", "2",
                                  "--json", *extra])
        assert align_main(args) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["rule"] == (extra[1] if extra else "dfa") and res["b_fitted"] is False
        assert "no trainable B" in res["fit_b"]["reason"]
        assert res["b_source"] == ("fresh" if extra else "checkpoint")
        assert abs(res["layers"][-1]["cosine_mean"] - 1) < 1e-6  # the top block: the same loss both ways
        assert len(res["layers"]) == 6

    out = tmp_path / "cmp"
    assert main(["compare", "--rules", "ff", "dfa", "--width", "0.0625", "--dataset", "shapes10", "--subset", "32",
                 "--budget", "2", "--batch-size", "8", "--amp", "off", "--probe-epochs", "1",
                 "--probe-train-subset", "40", "--probe-test-subset", "40", "--measure-steps", "1",
                 "--measure-warmup", "0", "--measure-rounds", "1", "--out", str(out)]) == 0
    with open(out / "compare.csv", newline="") as fh:
        rows = {r["rule"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"ff", "dfa", "random-init"}
    assert rows["ff"]["steps"] == rows["dfa"]["steps"] == "2" and rows["ff"]["local"] == "true"
    assert float(rows["dfa"]["peak_activation_vs_bp"]) > 0
    assert "vs bp-clapp++" in (out / "compare.md").read_text()
