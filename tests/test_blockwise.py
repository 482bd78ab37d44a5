"""Blockwise SSL and LoCo (METHODS 5.1, 5.2): heads, losses per stage, overlap, noise, sequential training."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from localssl.builder import build_step
from localssl.config import ConfigError, TrainConfig
from localssl.engine.optim import lr_at
from localssl.engine.step import MicroBatchedStep, PlainStep, SequentialStep, train_step
from localssl.engine.trainer import train
from localssl.models import build_encoder
from localssl.rules import RULES, Head, build_rule, inject_noise
from localssl.rules.losses import barlow_twins, nt_xent, vicreg

SMALL = {"expansion": 8, "projector": [16, 16]}


def resnet(seed: int = 0):
    torch.manual_seed(seed)
    enc = build_encoder("resnet18", 1 / 16, 3, {"stem": "cifar"})
    return enc, enc.feature_shapes((3, 16, 16))


def views(seed: int = 1, n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 3, 16, 16, generator=g)
    return torch.cat([base + 0.2 * torch.randn(base.shape, generator=g),
                      base + 0.2 * torch.randn(base.shape, generator=g)])


def grads(*modules: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p.grad.clone() for i, m in enumerate(modules) for n, p in m.named_parameters()
            if p.grad is not None}


def test_the_head_is_conv_expansion_bn_relu_pool_then_the_projector():
    head = Head((8, 4, 4), RULES.get("blockwise-barlow").options(expansion=12, expansion_kernel=3, projector=[20, 5]))
    conv, bn, relu, pool, _ = head.expand
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.bias is None
    assert (conv.in_channels, conv.out_channels) == (8, 12) and isinstance(bn, nn.BatchNorm2d)
    assert isinstance(pool, nn.AdaptiveAvgPool2d)
    kinds = [type(m) for m in head.projector]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]  # no BN/ReLU after the last layer
    assert [m.out_features for m in head.projector if isinstance(m, nn.Linear)] == [20, 5]
    assert all(m.bias is None for m in head.projector if isinstance(m, nn.Linear))
    assert head(torch.randn(6, 8, 4, 4)).shape == (6, 5)


@pytest.mark.parametrize("name, loss", [("blockwise-barlow", lambda a, b: barlow_twins(a, b, 0.0051)),
                                        ("blockwise-vicreg", lambda a, b: vicreg(a, b, 25, 25, 1)),
                                        ("blockwise-simclr", lambda a, b: nt_xent(a, b, 0.5))])
def test_each_stage_has_its_own_head_and_the_published_loss(name, loss):
    enc, shapes = resnet()
    rule = build_rule(name, shapes, SMALL)
    assert len(rule.heads) == 4 and [list(g.blocks) for g in rule.groups()] == [[0], [1], [2], [3]]
    v = views()
    outs = enc(v)
    for k in range(4):
        p = rule.heads[k](outs[k])
        torch.testing.assert_close(rule.loss(k, outs[k]), loss(p[:6], p[6:]))


def test_end_to_end_twins_put_the_head_on_the_last_stage_only():
    enc, shapes = resnet()
    rule = build_rule("bp-barlow", shapes, SMALL)
    assert not rule.local and [list(g.blocks) for g in rule.groups()] == [[0, 1, 2, 3]]
    assert len(rule.heads) == 1 and rule.heads[0].expand[0].in_channels == shapes[-1][0]


def test_loco_with_overlap_0_is_blockwise_simclr_exactly():
    enc, shapes = resnet()
    enc_b = copy.deepcopy(enc)
    torch.manual_seed(5)
    loco = build_rule("loco", shapes, {**SMALL, "overlap": 0})
    torch.manual_seed(5)
    simclr = build_rule("blockwise-simclr", shapes, SMALL)
    v = views()
    la = train_step(enc, loco, None, v)
    lb = train_step(enc_b, simclr, None, v)
    assert torch.equal(torch.stack(la), torch.stack(lb))
    a, b = grads(enc, loco), grads(enc_b, simclr)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_loco_stage_above_gets_the_sum_of_both_losses_gradients_by_hand():
    """Loss k through stages k and k+1 from the detached output of stage k-1: worked out loss by loss."""
    enc, shapes = resnet()
    enc.eval().double()  # fixed BatchNorm statistics: the hand computation runs each stage more than once
    rule = build_rule("loco", shapes, SMALL)
    rule.eval().double()  # float64: the sums below differ from the step's only in their order
    v = views().double()
    train_step(enc, rule, None, v)
    got = grads(enc)
    enc.zero_grad(set_to_none=True)
    with torch.no_grad():
        outs = enc(v)
    per_loss = []
    for k, (first, last) in enumerate([(0, 1), (1, 2), (2, 3), (3, 3)]):
        enc.zero_grad(set_to_none=True)
        h = v if first == 0 else outs[first - 1].detach()
        for b in range(first, last + 1):
            h = enc.blocks[b](h)
        rule.loss(k, h).backward()
        per_loss.append(grads(enc))
    for name in got:
        want = sum(g[name] for g in per_loss if name in g)
        torch.testing.assert_close(got[name], want, rtol=1e-10, atol=1e-12, msg=name)
    # Stage 2 (index 1) is reached by losses 0 and 1 and by no other; stage 0 by loss 0 only.
    reached = [{n.split(".")[2] for n in g if n.startswith("0.blocks.")} for g in per_loss]
    assert reached == [{"0", "1"}, {"1", "2"}, {"2", "3"}, {"3"}]


def test_noise_is_injected_while_training_only_scaled_by_the_activation_std():
    torch.manual_seed(0)
    h = torch.randn(64, 4, 8, 8) * torch.tensor([1.0, 2.0, 3.0, 4.0])[None, :, None, None]
    for mode in ("hw", "channel", "all"):
        d = inject_noise(h, 0.25, mode) - h
        if mode == "channel":
            ratio = d.std(dim=(0, 2, 3)) / h.std(dim=(0, 2, 3))
            torch.testing.assert_close(ratio, torch.full((4,), 0.25), rtol=0.05, atol=0)
        else:
            assert abs(float(d.std() / (h.std() if mode == "all" else h.std(dim=(2, 3)).mean())) - 0.25) < 0.03
    enc, shapes = resnet()
    rule = build_rule("blockwise-barlow", shapes, {**SMALL, "noise": 0.25})
    x = torch.randn(4, *shapes[0])
    assert not torch.equal(rule.handoff(0, x), x)
    rule.eval()
    assert torch.equal(rule.handoff(0, x), x)
    with pytest.raises(ValueError, match="noise injection"):
        MicroBatchedStep(3)(enc, rule.train(), None, views())


def test_sequential_schedule_trains_each_stage_for_its_share_of_the_run(tmp_path):
    rule_opts = {**SMALL, "schedule": "sequential"}
    cfg = TrainConfig(rule="blockwise-barlow", encoder="resnet18", width=1 / 16, dataset="shapes10", subset=64,
                      batch_size=8, max_steps=8, amp="off", progress=False, log_every=1, out=str(tmp_path / "r"),
                      rule_options=rule_opts, encoder_options={"stem": "cifar"})
    step = build_step(cfg, build_rule("blockwise-barlow", resnet()[1], rule_opts), 8)
    assert isinstance(step, SequentialStep) and step.steps_per_group == 2
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    trained = [[k for k in range(1, 5) if row[f"loss_{k}"] is not None] for row in rows]
    assert trained == [[1], [1], [2], [2], [3], [3], [4], [4]]
    with pytest.raises(ConfigError, match="overlapping groups would move them"):
        build_rule("loco", resnet()[1], {"schedule": "sequential"})


def test_sequential_schedule_gives_every_stage_its_own_warmup_and_cosine(tmp_path):
    # One cosine over the run would leave the last stage only the decay's tail; each stage is a run of its own.
    rule_opts = {**SMALL, "schedule": "sequential"}
    cfg = TrainConfig(rule="blockwise-barlow", encoder="resnet18", width=1 / 16, dataset="shapes10", subset=64,
                      batch_size=8, max_steps=14, amp="off", progress=False, log_every=1, out=str(tmp_path / "r"),
                      rule_options=rule_opts, encoder_options={"stem": "cifar"}, lr=1e-3, lr_schedule="cosine",
                      warmup_steps=1, min_lr=1e-5)
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    lrs = [row["lr"] for row in rows]
    per_stage = [lr_at(i, 1e-3, 4, "cosine", 1, 1e-5) for i in range(4)]  # ceil(14 / 4) = 4 steps per stage
    assert lrs[:12] == pytest.approx(per_stage * 3)
    assert per_stage[0] == 0 and per_stage[1] == pytest.approx(1e-3) and per_stage[3] < per_stage[2] < 1e-3
    # The last stage's schedule spans what is left of the run (2 steps here).
    assert lrs[12:] == pytest.approx([lr_at(i, 1e-3, 2, "cosine", 1, 1e-5) for i in range(2)])
    assert PlainStep().lr_span(7, 13, 4) == (7, 13)
    assert SequentialStep(4).lr_span(12, 13, 4) == (0, 1)
    assert SequentialStep(3).lr_span(11, 13, 4) == (2, 4)


def test_options_are_checked_and_listed():
    with pytest.raises(ConfigError, match="expansion_kernel must be 1 or 3"):
        build_rule("blockwise-vicreg", resnet()[1], {"expansion_kernel": 2})
    with pytest.raises(ConfigError, match=r"unknown BlockwiseBarlowOptions key\(s\) 'temperature'.*lambd"):
        build_rule("blockwise-barlow", resnet()[1], {"temperature": 0.2})
    with pytest.raises(ConfigError, match="unknown noise_mode 'pixel'"):
        build_rule("blockwise-simclr", resnet()[1], {"noise_mode": "pixel"})


def test_expansion_0_is_the_encoders_output_width_as_the_paper_expands_to_2048():
    _, shapes = resnet()
    rule = build_rule("blockwise-barlow", shapes, {"expansion": 0})
    assert [h.expand[0].out_channels for h in rule.heads] == [shapes[-1][0]] * 4
    assert build_rule("blockwise-barlow", shapes).heads[0].expand[0].out_channels == 256  # the CPU-sized default
    assert build_rule("blockwise-barlow", shapes, {"expansion": 12}).heads[0].expand[0].out_channels == 12
