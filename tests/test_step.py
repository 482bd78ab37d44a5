"""The step seam (localssl.engine.step): overlapping groups, BatchNorm statistics, micro-batching, sequential mode.

A small rule with overlapping groups (LoCo's shape, METHODS 5.2) is checked
against the same gradients computed by hand, one loss at a time, with the
detaches written out explicitly.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from localssl.engine.step import MicroBatchedStep, NonFiniteLossError, PlainStep, SequentialStep, train_step
from localssl.models import BlockEncoder
from localssl.rules import Group, Rule, RuleOptions, check_groups


def encoder(norm: bool = False, seed: int = 0) -> BlockEncoder:
    torch.manual_seed(seed)

    def block(c_in: int, c_out: int) -> nn.Module:
        layers = [nn.Conv2d(c_in, c_out, 3, padding=1)]
        if norm:
            layers.append(nn.BatchNorm2d(c_out))
        return nn.Sequential(*layers, nn.ReLU())

    return BlockEncoder([block(3, 4), block(4, 5), block(5, 6), block(6, 6)], name="toy")


class Overlapping(Rule):
    """Loss k on block min(k + overlap, last)'s output, back-propagated through blocks k..that block."""

    def __init__(self, shapes, overlap: int = 1) -> None:
        super().__init__(shapes, RuleOptions())
        self.overlap = overlap
        self.heads = nn.ModuleList([nn.Linear(self.feature_shapes[g.output][0], 3) for g in self.groups()])

    def groups(self) -> list[Group]:
        n = self.num_blocks
        return [Group(tuple(range(k, min(k + self.overlap, n - 1) + 1))) for k in range(n)]

    def represent(self, g, h):
        return h.mean((2, 3))

    def objective(self, g, z, context=None):
        p = self.heads[g](z)
        return (p[: len(p) // 2] - p[len(p) // 2:]).pow(2).mean() - p.var(0).mean()

    def group_parameters(self, g):
        return list(self.heads[g].parameters())


def setup(norm=False, overlap=1):
    """float64 throughout: the checks below compare sums taken in different orders, exact to ~1e-15 relative."""
    enc = encoder(norm)
    shapes = enc.feature_shapes((3, 8, 8))
    enc.double()
    rule = Overlapping(shapes, overlap).double()
    views = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return enc, rule, views


def grads(*modules: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for i, m in enumerate(modules) for n, p in m.named_parameters()}


def by_hand(enc, rule, views) -> dict[str, torch.Tensor]:
    """Every loss on its own: its group's blocks from the detached output of the block below; gradients summed."""
    enc.zero_grad(set_to_none=True)
    rule.zero_grad(set_to_none=True)
    with torch.no_grad():
        outs = enc(views)
    for g, group in enumerate(rule.groups()):
        h = views if group.input < 0 else outs[group.input].detach()
        for b in group.blocks:
            h = enc.blocks[b](h)
        rule.loss(g, h).backward()
    return grads(enc, rule)


def test_groups_must_be_consecutive_ordered_and_cover_every_block():
    with pytest.raises(ValueError, match="consecutive"):
        Group((0, 2))
    with pytest.raises(ValueError, match="ordered by their first block"):
        check_groups([Group((1,)), Group((0,))], 2)
    with pytest.raises(ValueError, match=r"blocks \[2\] belong to no group"):
        check_groups([Group((0,)), Group((2,))], 3)
    with pytest.raises(ValueError, match="reach past"):
        check_groups([Group((0, 1, 2))], 2)
    g = Group((2, 3))
    assert (g.input, g.output) == (1, 3)


@pytest.mark.parametrize("overlap", [0, 1, 2])
def test_overlapping_groups_get_the_sum_of_the_gradients_of_each_loss_by_hand(overlap):
    enc, rule, views = setup(overlap=overlap)
    enc_b, rule_b = copy.deepcopy(enc), copy.deepcopy(rule)
    want = by_hand(enc_b, rule_b, views)
    train_step(enc, rule, None, views)
    got = grads(enc, rule)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12, msg=n)


def test_overlap_sends_gradient_one_block_down_and_no_further():
    enc, rule, views = setup(overlap=1)
    real = rule.objective
    for k in range(4):
        rule.objective = lambda g, z, c=None, k=k: real(g, z, c) * (1.0 if g == k else 0.0)
        enc.zero_grad(set_to_none=True)
        train_step(enc, rule, None, views)
        reached = {b for b in range(4) if enc.blocks[b][0].weight.grad is not None
                   and bool(enc.blocks[b][0].weight.grad.abs().sum() > 0)}
        assert reached == set(range(k, min(k + 1, 3) + 1)), (k, reached)


def test_a_block_shared_by_two_groups_moves_its_batchnorm_statistics_once():
    enc, rule, views = setup(norm=True, overlap=1)
    enc_plain = copy.deepcopy(enc)
    train_step(enc, rule, None, views)
    enc_plain(views)  # one forward in training mode: every running statistic moves once
    for (n, a), (_, b) in zip(enc.named_buffers(), enc_plain.named_buffers()):
        assert torch.equal(a, b), n


def test_micro_batched_overlapping_step_equals_the_plain_one():
    enc, rule, views = setup(overlap=1)
    enc_b, rule_b = copy.deepcopy(enc), copy.deepcopy(rule)
    la = PlainStep()(enc, rule, None, views)
    lb = MicroBatchedStep(3)(enc_b, rule_b, None, views)
    torch.testing.assert_close(torch.stack(la), torch.stack(lb), rtol=1e-12, atol=0)
    a, b = grads(enc, rule), grads(enc_b, rule_b)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-10, atol=1e-12, msg=n)
    enc_n, rule_n, _ = setup(norm=True)
    with pytest.raises(ValueError, match="BatchNorm"):
        MicroBatchedStep(3)(enc_n, rule_n, None, views)


def test_sequential_trains_one_group_at_a_time_with_the_lower_ones_frozen():
    enc, rule, views = setup(norm=True, overlap=0)
    step = SequentialStep(steps_per_group=2)
    assert [step.active(i, 4) for i in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
    opt = torch.optim.SGD(list(enc.parameters()) + list(rule.parameters()), lr=0.1)
    stats0 = [b.clone() for b in enc.blocks[0].buffers()]
    before, rule_before = copy.deepcopy(enc), copy.deepcopy(rule)
    losses = step(enc, rule, opt, views, index=2)  # group 1's turn
    assert [v is not None for v in losses] == [False, True, False, False]
    changed = [not all(torch.equal(p, q) for p, q in zip(enc.blocks[b].parameters(), before.blocks[b].parameters()))
               for b in range(4)]
    assert changed == [False, True, False, False]
    # The frozen block ran in eval mode: its running statistics did not move; it is back in training mode.
    assert all(torch.equal(a, b) for a, b in zip(enc.blocks[0].buffers(), stats0)) and enc.blocks[0].training
    # Its loss equals the loss of group 1 with block 0 in eval mode, by hand.
    with torch.no_grad():
        before.blocks[0].eval()
        h = before.blocks[0](views)
        want = rule_before.loss(1, before.blocks[1](h))
    torch.testing.assert_close(losses[1], want)
    enc_o, rule_o, _ = setup(overlap=1)
    with pytest.raises(ValueError, match="do not overlap"):
        step(enc_o, rule_o, None, views)


def test_a_non_finite_loss_stops_the_step_before_the_update():
    enc, rule, views = setup()
    before = copy.deepcopy(enc)
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    rule.objective = lambda g, z, c=None: z.sum() * (float("nan") if g == 2 else 1.0)
    with pytest.raises(NonFiniteLossError, match=r"loss of group 3 \(blocks \[3, 4\]\) is nan"):
        train_step(enc, rule, opt, views)
    assert all(torch.equal(p, q) for p, q in zip(enc.parameters(), before.parameters()))


def test_a_batch_says_its_layout_and_the_step_checks_it_against_the_rules():
    from localssl.data.augment import SimCLRViews, ViewBatch, ViewLayout

    enc, rule, views = setup()
    maker = SimCLRViews(8, (0.5,) * 3, (0.25,) * 3)
    batch = maker.batch(torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8))
    batch = ViewBatch(batch.x.double(), batch.layout)  # the float64 encoder of `setup`
    assert batch.layout == ViewLayout(2, "rows") == rule.layout and batch.x.shape == (8, 3, 8, 8)
    assert batch.images == 4
    losses = PlainStep()(enc, rule, None, batch)
    assert len(losses) == 4
    rule.layout = ViewLayout(2, "channels")  # a rule that reads channel-stacked views (SCFF-like)
    with pytest.raises(ValueError, match=r"reads batches laid out as ViewLayout\(n=2, stacking='channels'\)"):
        PlainStep()(enc, rule, None, batch)
    with pytest.raises(ValueError, match="pass a ViewBatch"):
        PlainStep()(enc, rule, None, views)
    with pytest.raises(ValueError, match="stacking"):
        ViewLayout(2, "diagonal")
    assert isinstance(ViewBatch(views, ViewLayout()).images, int)
