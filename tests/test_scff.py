"""SCFF (METHODS 5.3): goodness and its loss by hand, the pairs of the view makers, the shared-weight
identity, the paper's CIFAR encoder, and train + probe through the command line.

The registry-wide contracts (gradient routing, micro-batching, AdamW equivalence, ...) run on `scff`
in tests/test_rules.py, on batches in its layout (`localssl.data.pairs.pair_rows`).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from localssl.builder import build_step, build_views
from localssl.cli import main
from localssl.config import ConfigError, TrainConfig
from localssl.data.augment import VIEW_MAKERS, ViewLayout
from localssl.data.pairs import PAIRS_LAYOUT, draw_shift, negative_partners, pair_rows
from localssl.engine.step import SequentialStep, train_step, unpack
from localssl.models import build_encoder, default_grids
from localssl.models.scff import StandardNorm, Triangle
from localssl.rules import build_rule
from localssl.rules.goodness import goodness, scff_loss

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


# ------------------------------------------------------------ goodness and loss


def test_goodness_is_the_channel_mean_of_squares_at_every_position():
    h = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.5]]]], dtype=torch.float64)  # (1, C=2, H=1, W=2)
    # position 0: (1 + 9) / 2 = 5; position 1: (4 + 0.25) / 2 = 2.125
    torch.testing.assert_close(goodness(h), torch.tensor([[5.0, 2.125]], dtype=torch.float64), rtol=0, atol=0)
    flat = torch.tensor([[1.0, 2.0, 2.0], [0.0, 3.0, 0.0]], dtype=torch.float64)  # (N, D): one position
    torch.testing.assert_close(goodness(flat), torch.tensor([[3.0], [3.0]], dtype=torch.float64), rtol=0, atol=0)
    assert goodness(torch.ones(2, 3, 4, 5, dtype=torch.bfloat16)).dtype == torch.float32
    with pytest.raises(ValueError, match="goodness takes"):
        goodness(torch.ones(2, 3, 4))


def test_scff_loss_by_hand_with_thresholds_and_lamda():
    g_pos = torch.tensor([[1.0, 3.0], [0.0, 4.0]], dtype=torch.float64)
    g_neg = torch.tensor([[2.0, 0.5], [6.0, 1.0]], dtype=torch.float64)
    th_p, th_n, lam = 2.0, 1.5, 0.1

    def sp(v: float) -> float:
        return math.log1p(math.exp(v))

    pos = (sp(2 - 1) + sp(2 - 3) + sp(2 - 0) + sp(2 - 4)) / 4
    neg = (sp(2 - 1.5) + sp(0.5 - 1.5) + sp(6 - 1.5) + sp(1 - 1.5)) / 4
    reg = lam * (math.sqrt(1 + 9) + math.sqrt(0 + 16)) / 2
    got = scff_loss(g_pos, g_neg, th_p, th_n, lam)
    assert got.dtype == torch.float64
    assert abs(got.item() - (pos + neg + reg)) < 1e-12
    assert abs(scff_loss(g_pos, g_neg, th_p, th_n).item() - (pos + neg)) < 1e-12


def test_the_rule_takes_each_blocks_thresholds_on_its_positive_and_negative_rows():
    shapes = [(2, 2, 2), (3, 1, 1), (4,), (4,)]
    rule = build_rule("scff", shapes, {"theta_pos": [1.0, 2.0], "theta_neg": [3.0], "lamda": [0.0, 0.5]})
    assert rule.theta_pos == [1.0, 2.0, 2.0, 2.0] and rule.theta_neg == [3.0] * 4 and rule.lamda == [0, .5, .5, .5]
    g = torch.Generator().manual_seed(0)
    h = torch.rand(6, 3, 1, 1, generator=g, dtype=torch.float64)  # 3 positive rows, then 3 negative rows
    gp, gn = h[:3].pow(2).mean(1).flatten(1), h[3:].pow(2).mean(1).flatten(1)
    want = (F.softplus(2.0 - gp).mean() + F.softplus(gn - 3.0).mean() + 0.5 * gp.norm(dim=1).mean())
    torch.testing.assert_close(rule.loss(1, h), want, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="as many negative as positive rows"):
        rule.loss(1, h[:5])


def test_options_are_checked_with_one_line_naming_them():
    shapes = [(4, 2, 2)]
    for opts, msg in [({"positive": "twins"}, "unknown positive 'twins'; valid: same, views"),
                      ({"schedule": "greedy"}, "unknown schedule 'greedy'; valid: simultaneous, sequential"),
                      ({"theta_pos": []}, "theta_pos needs at least one value"),
                      ({"lamda": [-1.0]}, "lamda must be >= 0"),
                      ({"theta_neg": [float("nan")]}, "theta_neg must be a finite number")]:
        with pytest.raises(ConfigError, match=msg):
            build_rule("scff", shapes, opts)
    assert build_rule("scff", shapes).view_maker == "pairs-same"
    assert build_rule("scff", shapes, {"positive": "views"}).view_maker == "pairs-views"
    assert build_rule("scff", shapes).layout == PAIRS_LAYOUT == ViewLayout(2, "pairs")


def test_sequential_schedule_trains_layer_after_layer_as_the_reference(tmp_path):
    shapes = [(4, 2, 2)] * 3
    assert build_rule("scff", shapes).schedule == "simultaneous"
    step = build_step(TrainConfig(rule="scff"), build_rule("scff", shapes, {"schedule": "sequential"}), 6)
    assert isinstance(step, SequentialStep) and step.steps_per_group == 2
    out = tmp_path / "seq"
    assert main(["train", "--rule", "scff", "--encoder", "scff-cifar", "--width", "0.0625", "--dataset", "shapes10",
                 "--subset", "32", "--batch-size", "8", "--max-steps", "6", "--amp", "off", "--no-progress",
                 "--log-every", "1", "--out", str(out), "--rule-opt", "schedule=sequential"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [[k for k in (1, 2, 3) if row[f"loss_{k}"] is not None] for row in rows] == [[1], [1], [2], [2], [3], [3]]


# ------------------------------------------------------------------ the pairs


def test_negative_partners_never_pair_an_image_with_itself():
    for b in (2, 3, 8):
        for s in range(1, b):
            p = negative_partners(b, s)
            assert sorted(p.tolist()) == list(range(b))  # every image's second half used once
            assert (p != torch.arange(b)).all()
    with pytest.raises(ValueError, match="shift must be in 1..3"):
        negative_partners(4, 0)
    with pytest.raises(ValueError, match="needs >= 2 images"):
        negative_partners(1, 1)


def test_pair_rows_positives_from_one_image_negatives_from_two():
    b = 5
    ids = torch.arange(b, dtype=torch.float64)
    first = ids.view(b, 1, 1, 1).expand(b, 1, 2, 2) * 10      # image i's first half: 10 i everywhere
    second = ids.view(b, 1, 1, 1).expand(b, 1, 2, 2) * 10 + 1  # its second half: 10 i + 1
    rows = pair_rows(first, second, shift=2)
    assert rows.shape == (2 * b, 1, 2, 2)
    for i in range(b):
        assert torch.all(rows[i] == (10 * i + 10 * i + 1) / 2)
        j = (i + 2) % b
        assert j != i and torch.all(rows[b + i] == (10 * i + 10 * j + 1) / 2)


def _constant_images(b: int) -> torch.Tensor:
    """uint8 (b, 8, 8, 3) images, image i all at value 20 i + 5 (a flip leaves it unchanged)."""
    return (torch.arange(b, dtype=torch.uint8) * 20 + 5).view(b, 1, 1, 1).expand(b, 8, 8, 3).contiguous()


def test_same_image_view_maker_gives_the_image_itself_and_mixtures_of_two():
    b = 6
    x = _constant_images(b)
    maker = VIEW_MAKERS.get("pairs-same")(8, MEAN, STD)
    torch.manual_seed(3)
    batch = maker.batch(x)
    assert batch.layout == PAIRS_LAYOUT and batch.x.shape == (2 * b, 3, 8, 8) and batch.images == b
    norm = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(
        1, 3, 1, 1)
    # A positive is the image with itself: its mean is the image, what a probe feeds for one image.
    torch.testing.assert_close(batch.x[:b], norm)
    # The negatives are image i with image (i + s) mod B for one shift s of 1..B-1, never s = 0.
    matches = [s for s in range(b) if torch.allclose(batch.x[b:], (norm + norm[(torch.arange(b) + s) % b]) / 2)]
    assert len(matches) == 1 and matches[0] != 0
    # Never one image twice in a negative: every negative differs from every positive.
    assert all(not torch.allclose(batch.x[b + i], batch.x[k]) for i in range(b) for k in range(b))


@pytest.mark.parametrize("name", ["pairs-same", "pairs-views"])
def test_view_makers_are_deterministic_given_a_seed(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8, generator=g)
    maker = VIEW_MAKERS.get(name)(16, MEAN, STD, crop_scale=(0.8, 1.0))
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(maker(x))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_two_view_positives_differ_between_halves_and_keep_the_pairing():
    """With ``positive=views`` the halves are two augmentations of one image: a positive is not the image
    itself (the crops differ), and negative i still takes image (i + s) mod B's second half."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=g)
    maker = VIEW_MAKERS.get("pairs-views")(16, MEAN, STD, crop_scale=(0.5, 1.0))
    torch.manual_seed(0)
    first, second = maker.halves(x)
    assert not torch.allclose(first, second)
    torch.manual_seed(0)
    maker.halves(x)
    shift = draw_shift(4)
    torch.manual_seed(0)
    torch.testing.assert_close(maker(x), pair_rows(first, second, shift))


def test_the_builder_builds_the_rules_view_maker_and_the_step_refuses_other_layouts():
    shapes = [(4, 8, 8)]
    rule = build_rule("scff", shapes, {"positive": "views"})
    cfg = TrainConfig(rule="scff")
    maker = build_views(cfg, 16, MEAN, STD, (0.8, 1.0), torch.device("cpu"), rule=rule)
    assert type(maker) is VIEW_MAKERS.get("pairs-views")
    simclr = VIEW_MAKERS.get("simclr")(16, MEAN, STD)
    x = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    with pytest.raises(ValueError, match="build the views with the rule's view maker 'pairs-views'"):
        unpack(simclr.batch(x), rule)
    assert unpack(maker.batch(x), rule).shape == (8, 3, 16, 16)


# ------------------------------------------------------ the shared-weight identity


class SharedHalvesConv(nn.Module):
    """SCFF's first layer as the reference writes it: one conv (with its bias) on each half, summed."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        c = pair.shape[1] // 2
        return self.conv(pair[:, :c]) + self.conv(pair[:, c:])


@pytest.mark.parametrize("encoder", ["vgg6", "scff-cifar"])
def test_one_conv_on_the_halves_mean_is_the_shared_conv_on_the_concatenation(encoder):
    """W*x1 + b + W*x2 + b == (2W)*((x1 + x2)/2) + 2b: the first conv of the encoder (weights W', bias b')
    on the view maker's rows equals the shared conv with W = W'/2, b = b'/2 on the concatenated pairs."""
    torch.manual_seed(0)
    enc = build_encoder(encoder, width=1 / 16).double()
    conv = next(m for m in enc.blocks[0] if isinstance(m, nn.Conv2d))
    shared = nn.Conv2d(3, conv.out_channels, conv.kernel_size, padding=conv.padding).double()
    with torch.no_grad():
        shared.weight.copy_(conv.weight / 2)
        shared.bias.copy_(conv.bias / 2)
    g = torch.Generator().manual_seed(1)
    first, second = (torch.randn(4, 3, 12, 12, generator=g, dtype=torch.float64) for _ in range(2))
    shift = 3
    partner = negative_partners(4, shift)
    concat = torch.cat([torch.cat([first, second], 1), torch.cat([first, second[partner]], 1)])  # 2C channels
    torch.testing.assert_close(conv(pair_rows(first, second, shift)), SharedHalvesConv(shared)(concat),
                               rtol=0, atol=1e-12)


def test_without_first_norm_the_whole_first_layer_is_the_shared_layer_on_the_padded_concatenation():
    """``first_norm=false``: reflect padding is per channel, so it commutes with the halves' mean, and
    block 1 up to its conv is the reference's pad + shared conv on the concatenation, negatives included
    (they keep the lower energy of a mixture, which the standardisation would rescale)."""
    torch.manual_seed(0)
    enc = build_encoder("scff-cifar", width=1 / 16, options={"first_norm": False}).double()
    assert isinstance(enc.blocks[0][1], nn.Identity) and isinstance(enc.blocks[1][1], StandardNorm)
    conv = enc.blocks[0][2]
    shared = nn.Conv2d(3, conv.out_channels, 5).double()
    with torch.no_grad():
        shared.weight.copy_(conv.weight / 2)
        shared.bias.copy_(conv.bias / 2)
    g = torch.Generator().manual_seed(2)
    first, second = (torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2))
    partner = negative_partners(4, 1)
    concat = torch.cat([torch.cat([first, second], 1), torch.cat([first, second[partner]], 1)])
    torch.testing.assert_close(enc.blocks[0][:3](pair_rows(first, second, 1)),
                               SharedHalvesConv(shared)(nn.ReflectionPad2d(2)(concat)), rtol=0, atol=1e-12)
    with pytest.raises(ConfigError, match="unknown SCFFEncoderOptions key"):
        build_encoder("scff-cifar", options={"norm": False})


def test_a_single_image_is_encoded_as_its_self_concatenation():
    """The reference's probe feeds ``cat(x, x)``; the encoder's input for it is the mean of its halves, x."""
    torch.manual_seed(0)
    enc = build_encoder("scff-cifar", width=1 / 16).double().eval()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    pos = pair_rows(x, x, shift=1)[:3]
    assert torch.equal(pos, x)
    for a, b in zip(enc(x), enc(pos)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ the encoder


def test_scff_cifar_layers_by_hand():
    enc = build_encoder("scff-cifar")
    convs = [next(m for m in b if isinstance(m, nn.Conv2d)) for b in enc.blocks]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (3, 96, (5, 5)), (96, 384, (3, 3)), (384, 1536, (3, 3))]
    assert [c.padding for c in convs] == [(0, 0)] * 3  # the padding is the reflect pad before the norm
    assert [b[0].padding for b in enc.blocks] == [(2, 2, 2, 2), (1, 1, 1, 1), (1, 1, 1, 1)]
    assert all(isinstance(b[0], nn.ReflectionPad2d) and isinstance(b[1], StandardNorm) for b in enc.blocks)
    assert [type(b[3]) for b in enc.blocks] == [Triangle, Triangle, nn.ReLU]
    assert [type(b[4]) for b in enc.blocks] == [nn.MaxPool2d, nn.MaxPool2d, nn.AvgPool2d]
    # 96*3*25 + 96, 384*96*9 + 384, 1536*384*9 + 1536
    assert sum(p.numel() for p in enc.parameters()) == 7296 + 332160 + 5309952 == 5649408
    assert enc.feature_shapes((3, 32, 32)) == [(96, 16, 16), (384, 8, 8), (1536, 4, 4)]
    assert default_grids("scff-cifar", shapes=enc.feature_shapes((3, 32, 32))) == [8, 4, 2]
    half = build_encoder("scff-cifar", width=0.5, in_channels=1)
    assert sum(p.numel() for p in half.parameters()) == (48 * 25 + 48) + (192 * 48 * 9 + 192) + (768 * 192 * 9 + 768)


def test_first_layer_starts_at_twice_the_references_init():
    """Layer 1 reads the halves' mean, so its weights start at 2 x the reference's Xavier-uniform draw
    (bound sqrt(6 / (fan_in + fan_out))) and its bias at 2 x torch's default; the layers above are as drawn."""
    torch.manual_seed(0)
    enc = build_encoder("scff-cifar")
    convs = [next(m for m in b if isinstance(m, nn.Conv2d)) for b in enc.blocks]
    for k, (c, scale) in enumerate(zip(convs, (2.0, 1.0, 1.0))):
        fan_in, fan_out = c.in_channels * 9 if k else 3 * 25, c.out_channels * (9 if k else 25)
        bound = scale * math.sqrt(6 / (fan_in + fan_out))
        assert c.weight.abs().max() <= bound and c.weight.abs().max() > 0.9 * bound
        assert c.bias.abs().max() <= scale / math.sqrt(fan_in)
    assert convs[0].bias.abs().max() > 1 / math.sqrt(75)  # only reachable when doubled


def test_triangle_and_standard_norm_by_hand():
    x = torch.tensor([[[[1.0]], [[-2.0]], [[4.0]]]], dtype=torch.float64)  # channels 1, -2, 4; mean 1
    torch.testing.assert_close(Triangle()(x), torch.tensor([[[[0.0]], [[0.0]], [[3.0]]]], dtype=torch.float64))
    y = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]], dtype=torch.float64)  # mean 3, unbiased var (4+1+0+9)/3
    want = (y - 3) / (1e-10 + math.sqrt(14 / 3))
    torch.testing.assert_close(StandardNorm()(y), want, rtol=0, atol=1e-15)


def test_the_encoder_maps_rows_independently():
    """Per-sample norm, per-position triangle: a row's output does not depend on the other rows (what
    micro-batching needs, and why SCFF's norm is not BatchNorm)."""
    torch.manual_seed(0)
    enc = build_encoder("scff-cifar", width=1 / 16).double()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(enc(x)[-1][:2], enc(x[:2])[-1], rtol=0, atol=1e-12)


def test_one_step_on_scff_cifar_trains_every_layer():
    torch.manual_seed(0)
    enc = build_encoder("scff-cifar", width=1 / 16)
    rule = build_rule("scff", enc.feature_shapes((3, 16, 16)))
    maker = VIEW_MAKERS.get(rule.view_maker)(16, MEAN, STD)
    x = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    before = [p.detach().clone() for p in enc.parameters()]
    from localssl.builder import build_optimizer
    losses = train_step(enc, rule, build_optimizer(enc, rule, lr=1e-3, weight_decay=0.0), maker.batch(x))
    assert len(losses) == 3 and all(torch.isfinite(v) for v in losses)
    assert all(not torch.equal(a, p) for a, p in zip(before, enc.parameters()))


# ------------------------------------------------------------- command line


@pytest.mark.parametrize("encoder,width", [("scff-cifar", "0.0625"), ("vgg6", "0.0625")])
def test_train_and_probe_from_the_command_line(tmp_path, encoder, width):
    out = tmp_path / "run"
    assert main(["train", "--rule", "scff", "--encoder", encoder, "--width", width, "--dataset", "shapes10",
                 "--subset", "32", "--batch-size", "8", "--max-steps", "2", "--amp", "off", "--no-progress",
                 "--out", str(out), "--rule-opt", "positive=views"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    n_blocks = 3 if encoder == "scff-cifar" else 6
    assert all(math.isfinite(rows[-1][f"loss_{k}"]) for k in range(1, n_blocks + 1))
    assert "positive: views" in (out / "config.yaml").read_text()
    assert main(["probe", str(out), "--train-subset", "40", "--test-subset", "20", "--epochs-fast", "1",
                 "--protocols", "fast", "--amp", "off"]) == 0
    result = json.loads((out / "probe.json").read_text())
    assert result["rule"] == "scff" and result["encoder"] == encoder
    assert 0.0 <= result["fast_all"]["test_acc"] <= 1.0


# ------------------------------------------------------------- bench / compare


def test_bench_views_reach_every_layout_and_scff_steps_on_them():
    """The bench (and so `localssl compare`'s speed and memory) steps every rule on the same random rows:
    unchanged for the two-row layout, view 2 beside view 1 for channels, read as pair rows for SCFF."""
    from localssl.reports.bench.common import build_state, in_layout, random_views

    v = random_views(3, 8, torch.device("cpu"), channels_last=False, seed=0)
    assert in_layout(v, ViewLayout()) is v
    ch = in_layout(v, ViewLayout(2, "channels"))
    assert ch.x.shape == (3, 6, 8, 8) and torch.equal(ch.x[:, 3:], v[3:]) and ch.images == 3
    pairs = in_layout(v, PAIRS_LAYOUT)
    assert pairs.x is v and pairs.layout == PAIRS_LAYOUT and pairs.images == 3
    with pytest.raises(ValueError, match="two views per image"):
        in_layout(v, ViewLayout(3, "rows"))
    state = build_state("scff", "scff-cifar", 1 / 16, 16, torch.device("cpu"), None, False, seed=0)
    losses = state.step(random_views(4, 16, torch.device("cpu"), channels_last=False, seed=0))
    assert len(losses) == 3 and all(torch.isfinite(x) for x in losses)
