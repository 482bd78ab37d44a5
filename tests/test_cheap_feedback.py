"""Cheaper B for the CLAPP++ family (issue 14): low rank, bf16 from fp32 masters, an optimizer without second moment.

- ``b_rank``: B = U V^T gives the loss and gradients of the dense B that equals
  U V^T (float64), the three-factor rule of METHODS 2 with that B, and the
  dense init's scale; a rank >= the smaller dim keeps the dense B.
- ``b_dtype=bf16``: fp32 master, fp32 gradient and optimizer state, a loss
  within a bound derived from bf16's unit roundoff.
- ``b_optimizer=sgd``: B in its own SGD (no second moment), the encoder in
  AdamW; one step at the end == a step after every group; the optimizer's
  state survives a checkpoint, and a resumed run equals the uninterrupted one.
"""
from __future__ import annotations

import copy
import dataclasses
import io

import pytest
import torch

from localssl.builder import build_optimizer
from localssl.config import ConfigError
from localssl.engine.optim import OptimizerSet, set_lr
from localssl.engine.step import train_step
from localssl.models import build_encoder
from localssl.rules import Feedback, build_rule, contrastive_loss, feedback_flops, feedback_numel, swap_views
from tests.test_rules import _three_factor_dz, _views64, make_views, named_trainable, same_draws

GRIDS = [8, 4, 2, 2, 2, 1]


def _vgg(seed: int = 0):
    torch.manual_seed(seed)
    enc = build_encoder("vgg6", width=1 / 32, in_channels=3)  # 4, 8, 8, 16, 32, 32 channels at 16 px
    return enc, enc.feature_shapes((3, 16, 16))


# ------------------------------------------------------------------ low rank


def test_rank_below_the_smaller_dim_factors_b_and_at_or_above_it_keeps_dense():
    low = Feedback(6, 4, rank=3)
    assert low.rank == 3 and low.weight is None
    assert low.u.shape == (4, 3) and low.v.shape == (3, 6)
    assert sum(p.numel() for p in low.parameters()) == 3 * (4 + 6) == feedback_numel(6, 4, 3)
    for r in (4, 5, 100):  # U V^T of rank >= min(d_c, d_z) spans every matrix: dense, as documented
        full = Feedback(6, 4, rank=r)
        assert full.rank == 0 and full.u is None and full.weight.shape == (4, 6)
        assert feedback_numel(6, 4, r) == 24
    with pytest.raises(ValueError, match="b_rank=2 needs a B matrix"):
        Feedback(5, 5, "identity", rank=2)
    fixed = Feedback(6, 4, "fixed", rank=2)
    assert not any(p.requires_grad for p in fixed.parameters())


def test_default_options_build_the_dense_b_bit_for_bit():
    """b_rank=0, b_dtype=fp32 (the defaults): the same parameters, drawn from the same RNG, as before."""
    shapes = _vgg()[1]
    torch.manual_seed(0)
    rule = build_rule("clapp++", shapes, {}, grids=GRIDS)
    torch.manual_seed(0)
    rule_b = build_rule("clapp++", shapes, {"b_rank": 0, "b_dtype": "fp32", "b_optimizer": "same"}, grids=GRIDS)
    torch.manual_seed(0)
    want = [torch.nn.Linear(d, d, bias=False).weight for d in rule.dims]
    for a, b, w in zip(rule.same, rule_b.same, want):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.weight, w)


@pytest.mark.parametrize("name", ["clapp++", "clapp++both", "clapp++dfb", "bp-clapp++"])
def test_low_rank_loss_and_gradients_equal_the_dense_b_built_by_hand(name):
    """A rank-r B and the dense B = U V^T give the same loss, the same dL/dh, and dL/dB whose chain rule gives
    dL/dU = (dL/dB) V and dL/dV^T = U^T (dL/dB) (float64; b_l2 > 0: the penalty is |U V^T|_F^2 too)."""
    enc, shapes = _vgg()
    opts = {"b_rank": 3, "b_l2": 1e-2, "f": "softplus"}
    low = build_rule(name, shapes, opts, grids=GRIDS).double()
    dense = build_rule(name, shapes, {**opts, "b_rank": 0}, grids=GRIDS).double()
    low_b = [*low.same, *low.top] if hasattr(low, "same") else [low.head]
    dense_b = [*dense.same, *dense.top] if hasattr(dense, "same") else [dense.head]
    assert any(m.rank == 3 for m in low_b)
    with torch.no_grad():
        for ml, md in zip(low_b, dense_b):
            md.weight.copy_(ml.matrix())
    x = make_views((3, 16, 16), dtype=torch.float64)
    enc = enc.double()
    outs = [h.detach() for h in enc(x)]
    top = outs[-1] if low.needs_top_context else None
    pairs = list(zip(low_b, dense_b))
    for g, group in enumerate(low.groups()):
        h = outs[group.output].clone().requires_grad_()
        h2 = h.detach().clone().requires_grad_()
        loss_l, loss_d = low.loss(g, h, top), dense.loss(g, h2, top)
        torch.testing.assert_close(loss_l, loss_d, rtol=1e-12, atol=1e-14)
        owned = {id(p) for p in low.group_parameters(g)}
        mine = [(ml, md) for ml, md in pairs if any(id(p) in owned for p in ml.parameters())]
        gl = torch.autograd.grad(loss_l, [h, *[p for ml, _ in mine for p in ml.parameters()]])
        gd = torch.autograd.grad(loss_d, [h2, *[md.weight for _, md in mine]])
        torch.testing.assert_close(gl[0], gd[0], rtol=1e-10, atol=1e-14)
        at = 1
        for (ml, _), db in zip(mine, gd[1:]):
            if ml.rank == 0:  # a layer whose smaller dim is <= r keeps its dense B
                torch.testing.assert_close(gl[at], db, rtol=1e-10, atol=1e-14)
                at += 1
                continue
            du, dv = gl[at], gl[at + 1]
            at += 2
            torch.testing.assert_close(du, db @ ml.v.detach().t(), rtol=1e-10, atol=1e-14)
            torch.testing.assert_close(dv, ml.u.detach().t() @ db, rtol=1e-10, atol=1e-14)


def test_low_rank_init_has_the_dense_init_scale():
    """Entries of U V^T have the dense Kaiming-uniform init's variance 1 / (3 d_c) (and mean 0)."""
    torch.manual_seed(0)
    d_c, d_z, r = 512, 384, 64
    b = Feedback(d_c, d_z, rank=r).matrix().detach()
    dense = Feedback(d_c, d_z).matrix().detach()
    want = 1 / (3 * d_c)
    # 196,608 entries: the sample variance's relative error is ~sqrt(2 / N) x (kurtosis), well under 5%.
    assert abs(b.var().item() / want - 1) < 0.05
    assert abs(dense.var().item() / want - 1) < 0.05
    assert abs(b.mean().item()) < 0.05 * want ** 0.5
    # Kaiming-uniform for U as well would start B three times smaller in variance: the check tells them apart.
    assert b.var().item() > 2 * want / 3


def test_three_factor_rule_with_a_low_rank_b():
    """h = relu(W x + b) with B = U V^T: autograd's dW, db equal the three-factor rule of METHODS 2 with
    B = U V^T, and dU, dV^T are the chain rule of its dL/dB (float64)."""
    torch.manual_seed(0)
    d_in, d, r = 5, 6, 2
    rule = build_rule("clapp++global", [(d,)], {"f": "hinge", "b_rank": r}).double()
    fb = rule.same[0]
    with torch.no_grad():
        fb.u.mul_(2.0)  # scores of order 1: both sides of the hinge kinks occur
    x = _views64((d_in,), 1)
    w = (torch.randn(d, d_in, dtype=torch.float64) * 0.7).requires_grad_()
    b = (torch.randn(d, dtype=torch.float64) * 0.1).requires_grad_()
    a = x @ w.T + b
    h = torch.relu(a)
    loss = rule.loss(0, h)
    bmat = (fb.u @ fb.v).detach()
    assert torch.linalg.matrix_rank(bmat) == r
    torch.testing.assert_close(loss, contrastive_loss(h, swap_views(h).detach() @ bmat.T, "hinge"), rtol=1e-12,
                               atol=0)
    gw, gb, gu, gv = torch.autograd.grad(loss, (w, b, fb.u, fb.v))
    dz, dbm, (u_pos, u_neg) = _three_factor_dz(h.detach(), bmat, "hinge")
    post = dz * (a.detach() > 0)
    torch.testing.assert_close(gw, torch.einsum("mj,mi->ji", post, x), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(gb, post.sum(0), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(gu, dbm @ fb.v.detach().T, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(gv, fb.u.detach().T @ dbm, rtol=1e-10, atol=1e-13)
    assert post.abs().max() > 1e-3, "degenerate case: the rule gives no update"
    assert ((u_pos >= 1) | (u_neg <= -1)).any() and ((u_pos < 1) | (u_neg > -1)).any()


def test_flop_and_parameter_formulas():
    # Dense: d_z d_c parameters, 2 d_z d_c forward + 2 d_z d_c for dB; low rank: r (d_z + d_c) and
    # 2 r (d_c + d_z) + 2 r (2 d_z + d_c).
    assert feedback_numel(8192, 4096) == 8192 * 4096
    assert feedback_numel(8192, 4096, 64) == 64 * (8192 + 4096)
    assert feedback_flops(10, 6) == 4 * 60 and feedback_flops(10, 6, trainable=False) == 120
    assert feedback_flops(10, 6, 2) == 2 * 2 * 16 + 2 * 2 * (12 + 10)
    assert feedback_flops(10, 6, 6) == feedback_flops(10, 6)


# ------------------------------------------------------------------ bf16


def test_bf16_b_keeps_fp32_masters_gradients_and_optimizer_state():
    enc, shapes = _vgg()
    rule = build_rule("clapp++", shapes, {"b_dtype": "bf16", "b_rank": 3}, grids=GRIDS)
    opt = build_optimizer(enc, rule, 1e-3, 0.0)
    before = {n: p.detach().clone() for n, p in rule.named_parameters()}
    losses = train_step(enc, rule, opt, make_views((3, 16, 16)))  # runs on any CPU (emulated bf16 where not native)
    assert all(torch.isfinite(v) for v in losses)
    for n, p in rule.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, n
        assert not torch.equal(p, before[n]), n
        st = opt.state[p]
        assert st and all(v.dtype == torch.float32 for k, v in st.items() if k != "step"), n


def _bf16_bound(z: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """A bound on |loss_bf16 - loss_fp32| for u = z . (B c) with B c in bf16, the rest in fp32 (or better).

    Rounding c and B to bf16 (unit roundoff u = 2^-8, half of bf16's epsilon 2^-7), a sum of d_c products
    accumulated in bf16 at worst, and the result rounded to bf16: each (B c)_i is off by at most
    gamma_{d_c + 2} (|B| |c|)_i, gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability, Lemma 3.1 and
    eq. 3.4). Both terms of the loss are 1-Lipschitz in their score (the hinge and softplus' slopes are <= 1),
    a score moves by at most |z| . that, and the loss is a mean over rows of two terms.
    """
    unit = torch.finfo(torch.bfloat16).eps / 2
    n = c.shape[1] + 2
    gamma = n * unit / (1 - n * unit)
    err = gamma * (c.abs() @ b.abs().T)  # per row of the context, per coordinate of B c
    du_pos = (z.abs() * err).sum(1)
    du_neg = (torch.roll(z, -1, 0).abs() * err).sum(1)
    return (du_pos + du_neg).mean()


@pytest.mark.parametrize("f", ["hinge", "softplus"])
def test_bf16_loss_is_within_bf16_rounding_of_fp32(f):
    """The worst-case bound (any accumulation order and precision) is loose by ~50x here, so the dims are small
    (d = 4) for it to say something: a bf16 B c computed wrongly (a transposed B, a lost cast) moves the loss
    by O(1)."""
    torch.manual_seed(0)
    d = 4
    rule = build_rule("clapp++global", [(d,)], {"f": f})
    rule16 = build_rule("clapp++global", [(d,)], {"f": f, "b_dtype": "bf16"})
    rule16.load_state_dict(rule.state_dict())
    z = 2 * torch.randn(2 * 8, d).abs()  # post-ReLU codes, scores of order 1
    loss, loss16 = rule.loss(0, z), rule16.loss(0, z)
    bound = _bf16_bound(z, rule.same[0].weight.detach(), swap_views(z))
    assert loss16.dtype == torch.float32
    assert (loss16 - loss).abs() <= bound, (loss16 - loss, bound)
    assert bound < 0.1 * loss.abs(), "the bound is too loose to test anything"
    # bf16 is really used: the bf16 B c differs from the fp32 one (and equals fp32 on bf16-rounded inputs
    # up to the accumulation).
    c = swap_views(z)
    assert not torch.equal(rule16.same[0](c), rule.same[0](c))


# ------------------------------------------------------------------ optimizer hints


def test_sgd_b_gets_its_own_optimizer_without_second_moment():
    enc, shapes = _vgg()
    rule = build_rule("clapp++", shapes, {"b_optimizer": "sgd", "b_momentum": 0.8, "b_lr_scale": 10.0},
                      grids=GRIDS)
    opt = build_optimizer(enc, rule, 1e-3, 0.0)
    assert isinstance(opt, OptimizerSet) and len(opt.optimizers) == 2
    adamw, sgd = opt.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(sgd, torch.optim.SGD)
    assert {id(p) for g in adamw.param_groups for p in g["params"]} == {id(p) for p in enc.parameters()}
    assert {id(p) for g in sgd.param_groups for p in g["params"]} == {id(p) for p in rule.parameters()}
    assert sgd.param_groups[0]["momentum"] == 0.8 and sgd.param_groups[0]["lr"] == pytest.approx(1e-2)
    set_lr(opt, 2e-3)  # the trainer's per-step lr: B follows it at its scale
    assert adamw.param_groups[0]["lr"] == 2e-3 and sgd.param_groups[0]["lr"] == pytest.approx(2e-2)
    train_step(enc, rule, opt, make_views((3, 16, 16)))
    for p in rule.parameters():
        assert set(opt.state[p]) == {"momentum_buffer"}
    for p in enc.parameters():
        assert {"exp_avg", "exp_avg_sq"} <= set(opt.state[p])
    # Momentum 0: plain SGD, no state at all for B.
    rule0 = build_rule("clapp++", shapes, {"b_optimizer": "sgd", "b_momentum": 0.0}, grids=GRIDS)
    opt0 = build_optimizer(enc, rule0, 1e-3, 0.0)
    train_step(enc, rule0, opt0, make_views((3, 16, 16)))
    assert all(not opt0.state.get(p) for p in rule0.parameters())


@pytest.mark.parametrize("bad, match", [
    ({"b_rank": -1}, "b_rank must be >= 0"),
    ({"b_dtype": "fp16"}, "unknown b_dtype 'fp16'; valid: fp32, bf16"),
    ({"b_optimizer": "adam"}, "unknown b_optimizer 'adam'; valid: same, sgd"),
    ({"b_optimizer": "sgd", "feedback": "fixed"}, "b_optimizer=sgd needs a trainable B"),
    ({"b_rank": 4, "feedback": "identity"}, "b_rank=4 needs a B matrix"),
    ({"b_momentum": 1.0}, r"b_momentum must be in \[0, 1\)"),
    ({"b_lr_scale": 0.0}, "b_lr_scale must be > 0"),
])
def test_bad_cheap_b_options_name_the_option(bad, match):
    with pytest.raises(ConfigError, match=match):
        build_rule("clapp++", [(4, 4, 4)], bad, grids=[2])


def test_one_step_at_the_end_equals_a_step_after_every_group_with_an_sgd_b():
    """The contract of tests/test_rules.py with the hinted optimizer: AdamW for every block, SGD for B, one
    OptimizerSet step at the end == per-group optimizers (the same kinds) stepped after each backward; bitwise."""
    enc, shapes = _vgg()
    rule = build_rule("clapp++", shapes, {"b_optimizer": "sgd", "b_rank": 3, "b_l2": 1e-3, "b_lr_scale": 3.0},
                      grids=GRIDS)
    views = make_views((3, 16, 16))
    enc_b, rule_b = copy.deepcopy(enc), copy.deepcopy(rule)
    opt = build_optimizer(enc, rule, lr=1e-2, weight_decay=1e-2)
    per_group = []
    for g, group in enumerate(rule_b.groups()):
        blocks = [p for k in group.blocks for p in enc_b.blocks[k].parameters()]
        per_group.append((torch.optim.AdamW(blocks, lr=1e-2, weight_decay=1e-2, fused=True),
                          torch.optim.SGD(rule_b.group_parameters(g), lr=3e-2, momentum=0.9, weight_decay=1e-2)))
    for i in range(3):
        same_draws(i)
        train_step(enc, rule, opt, views)
        h = views
        for g, group in enumerate(rule_b.groups()):
            for o in per_group[g]:
                o.zero_grad(set_to_none=True)
            out = enc_b.run_blocks(h.detach(), group.blocks)
            rule_b.loss(g, out).backward()
            for o in per_group[g]:
                o.step()
            h = out.detach()
    a, b = named_trainable(enc, rule), named_trainable(enc_b, rule_b)
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_optimizer_set_state_survives_a_checkpoint_and_continues_like_the_uninterrupted_run():
    def make():
        enc, shapes = _vgg()
        rule = build_rule("clapp++", shapes, {"b_optimizer": "sgd", "b_rank": 2}, grids=GRIDS)
        return enc, rule, build_optimizer(enc, rule, 1e-2, 0.0)

    views = make_views((3, 16, 16))
    enc, rule, opt = make()
    for _ in range(4):
        train_step(enc, rule, opt, views)
    enc2, rule2, opt2 = make()
    for _ in range(2):
        train_step(enc2, rule2, opt2, views)
    buf = io.BytesIO()
    torch.save({"encoder": enc2.state_dict(), "rule": rule2.state_dict(), "optimizer": opt2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    # torch's one-optimizer format, numbered across both: the encoder's 12 tensors, then B's 12 factors.
    assert sorted(saved["optimizer"]["state"]) == list(range(24))
    assert [len(g["params"]) for g in saved["optimizer"]["param_groups"]] == [12, 12]
    enc3, rule3, opt3 = make()
    enc3.load_state_dict(saved["encoder"])
    rule3.load_state_dict(saved["rule"])
    opt3.load_state_dict(saved["optimizer"])
    for _ in range(2):
        train_step(enc3, rule3, opt3, views)
    a, b = named_trainable(enc, rule), named_trainable(enc3, rule3)
    for n in a:
        assert torch.equal(a[n], b[n]), n
    with pytest.raises(ValueError, match="the saved optimizer has 1 parameter groups"):
        opt3.load_state_dict(torch.optim.AdamW(list(enc3.parameters())).state_dict())


def test_no_hint_keeps_the_single_adamw():
    enc, shapes = _vgg()
    opt = build_optimizer(enc, build_rule("clapp++", shapes, {"b_rank": 2}, grids=GRIDS), 1e-3, 0.0)
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 1


def test_a_run_saved_before_the_cheap_b_options_still_resumes(tmp_path, monkeypatch):
    """A checkpoint whose rule options lack b_rank & co. (written before they existed) resumes: it trained with
    their defaults, which are the earlier behaviour; asking for another value is still refused."""
    from localssl.engine.checkpoint import CHECKPOINT
    from localssl.engine.trainer import train
    from tests.test_trainer import tiny_cfg

    monkeypatch.setenv("LOCALSSL_CACHE", str(tmp_path / "cache"))
    cfg = tiny_cfg(tmp_path, max_steps=2, checkpoint_every=1)
    run = train(cfg)
    state = torch.load(run / CHECKPOINT, weights_only=True)
    for key in ("b_rank", "b_dtype", "b_optimizer", "b_momentum", "b_lr_scale"):
        del state["config"]["rule_options"][key]
    torch.save(state, run / CHECKPOINT)
    train(dataclasses.replace(cfg, max_steps=3), resume=True)
    assert torch.load(run / CHECKPOINT, weights_only=True)["step"] == 3
    with pytest.raises(ConfigError, match="cannot resume with a different config: rule_options"):
        train(dataclasses.replace(cfg, max_steps=4, rule_options={"b_rank": 2}), resume=True)


# ------------------------------------------------------------------ the registry contracts, on the variants

CHEAP = [{"b_rank": 3}, {"b_dtype": "bf16"}, {"b_rank": 3, "b_optimizer": "sgd", "b_lr_scale": 5.0},
         {"b_structure": "shared"}, {"b_structure": "shared", "b_rank": 3, "b_dtype": "bf16"}]


def _cheap_pairs():
    from localssl.builder import options_for
    from tests.test_rules import FEEDBACK_RULES

    out = []
    for name in FEEDBACK_RULES:
        for opts in CHEAP:
            try:
                build_rule(name, [(4, 4, 4)], options_for(name, opts), grids=[2])
            except ConfigError:  # dfa's B is fixed by definition: it takes no B optimizer (named in the error)
                continue
            out.append((name, opts))
    return out


@pytest.mark.parametrize("name, opts", _cheap_pairs(), ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={x}" for k, x in v.items()))
def test_registry_contracts_hold_for_the_cheap_b_options(name, opts, monkeypatch):
    """The per-group contracts of tests/test_rules.py (ownership, routing, per-group == summed backward,
    micro-batching, every trainable parameter moves, and for the options that keep one optimizer the
    bitwise one-step-at-the-end contract) on every feedback rule with each cheap-B option set."""
    import tests.test_rules as tr

    real_setup = tr.setup
    monkeypatch.setattr(tr, "setup", lambda rule_name, case="vgg", seed=0, **o: real_setup(
        rule_name, case, seed, **{**opts, **o}))
    tr.test_parameter_ownership(name, "vgg")
    tr.test_gradient_routing(name, "vgg", None, monkeypatch)
    tr.test_per_group_backward_equals_summed_backward(name, "vgg")
    tr.test_micro_batched_step_gives_the_plain_gradients(name, "vgg", 3)
    tr.test_one_step_changes_every_trainable_parameter(name, "vgg")
    if "b_optimizer" not in opts and name in tr.DISJOINT_RULES:  # the SGD-B form: its own test above
        tr.test_one_step_at_the_end_equals_a_step_after_every_group(name, "adamw")
