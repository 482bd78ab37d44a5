"""Patch rules and patched encoders (METHODS 5.3): GIM's CPC, CLAPP 2021's hinge, the mosaic of patch maps.

- the losses against Python loops over every (step, image, position) on fixed float64 tensors and fixed
  draws, including which context positions have a target ``k + skip`` rows below;
- CLAPP's either-or update: its draws are reproducible from a seed, p of them positive, and exactly one of
  a sample's two terms acts (its gradient is the one term's, not the sum);
- the rules' objectives are the pure losses on their own draws (same seed);
- patched encoders: untile(tile(x)) == x, patch (i, j) is the image's window (i s, j s), pooling the mosaic
  per tile == pooling each patch's own output, and no information crosses patches inside any block;
- GIM's encoder (3 modules, 16/8/4 px per-patch maps, grayscale first), the view maker, the builder's
  grids and refusals, and a few-step `localssl train` + `localssl probe`.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from localssl.builder import build_model
from localssl.cli import main
from localssl.config import ConfigError, TrainConfig
from localssl.data.augment import VIEW_MAKERS, ViewLayout
from localssl.models import build_encoder, patchify
from localssl.models.patches import tile, to_patches, untile
from localssl.rules import build_rule
from localssl.rules.patch_losses import (
    clapp_hinge,
    cpc_info_nce,
    draw_cpc_negatives,
    draw_other_images,
    draw_updates,
    offsets,
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _codes(b=3, c=4, y=5, x=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, c, y, x, generator=g, dtype=torch.float64)
    weights = [0.5 * torch.randn(c, c, generator=g, dtype=torch.float64) for _ in range(3)]
    return z, weights, g


def _dot(u, v):
    return sum(float(a) * float(b) for a, b in zip(u, v))


# ----------------------------------------------------------------------------- which rows are predicted


def test_offsets_leave_a_context_row():
    assert offsets(7, 5, 1) == [2, 3, 4, 5, 6]  # GIM's 7x7 grid: steps 1..5 reach 2..6 rows down
    assert offsets(7, 5, 0) == [1, 2, 3, 4, 5]
    assert offsets(4, 5, 1) == [2, 3]
    assert offsets(3, 5, 1) == [2]
    assert offsets(2, 5, 1) == [] and offsets(1, 5, 0) == []


# ----------------------------------------------------------------------------- CPC (GIM) by hand


def _cpc_by_hand(c, z, weights, skip, negatives):
    """CPC InfoNCE with a Python loop over steps, images, rows, columns and negatives."""
    B, _, Y, X = z.shape
    per_step = []
    for k, (w, neg) in enumerate(zip(weights, negatives), start=1):
        off = k + skip
        targets = [(b, y, x) for b in range(B) for y in range(off, Y) for x in range(X)]  # (b, y, x) order
        terms = []
        p = 0
        for b in range(B):
            for y in range(Y):
                for x in range(X):
                    if y + off >= Y:
                        continue  # no target this far below: this context position takes no part
                    ctx = c[b, :, y, x]
                    pos = _dot(ctx, w @ z[b, :, y + off, x])
                    scores = [pos] + [_dot(ctx, w @ z[targets[int(j)][0], :, targets[int(j)][1], targets[int(j)][2]])
                                      for j in neg[p]]
                    top = max(scores)
                    terms.append(-(pos - top - math.log(sum(math.exp(s - top) for s in scores))))
                    p += 1
        assert p == len(targets)  # one context position per target
        per_step.append(sum(terms) / len(terms))
    return sum(per_step) / len(per_step)


@pytest.mark.parametrize("skip", [0, 1])
def test_cpc_info_nce_equals_the_loop(skip):
    z, weights, g = _codes()
    c = torch.randn(z.shape, generator=g, dtype=torch.float64)
    offs = offsets(z.shape[2], 3, skip)
    targets = [z.shape[0] * (z.shape[2] - o) * z.shape[3] for o in offs]
    negatives = [torch.randint(t, (t, 4), generator=g) for t in targets]
    got = cpc_info_nce(c, z, weights[: len(offs)], skip, negatives)
    want = _cpc_by_hand(c, z, weights[: len(offs)], skip, negatives)
    assert got.dtype == torch.float64
    assert abs(float(got) - want) < 1e-12 * max(1.0, abs(want))


def test_cpc_reads_contexts_above_and_targets_below_only():
    """With skip 1 and offsets 2, 3 on 5 rows: contexts are rows 0..2, targets rows 2..4; nothing else matters."""
    z, weights, g = _codes()
    c = torch.randn(z.shape, generator=g, dtype=torch.float64, requires_grad=True)
    zt = z.clone().requires_grad_()
    negatives = draw_cpc_negatives(z.shape, [2, 3], 5)
    cpc_info_nce(c, zt, weights[:2], 1, negatives).backward()
    assert c.grad[:, :, 3:].abs().max() == 0 and c.grad[:, :, :3].abs().min() > 0
    assert zt.grad[:, :, :2].abs().max() == 0 and zt.grad[:, :, 2:].abs().sum() > 0


def test_cpc_negatives_are_uniform_over_every_target():
    torch.manual_seed(0)
    (neg,) = draw_cpc_negatives((4, 8, 7, 7), [2], 16)
    assert neg.shape == (4 * 5 * 7, 16)
    counts = torch.bincount(neg.flatten(), minlength=140).double()
    assert int(neg.min()) >= 0 and int(neg.max()) < 140
    # 2240 draws over 140 targets: 16 each on average; a chi-square far above its 139 dof would mean non-uniform.
    assert float(((counts - 16) ** 2 / 16).sum()) < 2 * 139


# ----------------------------------------------------------------------------- CLAPP 2021 by hand


def _hinge_by_hand(c, z, weights, skip, other, positive, negatives=None):
    B, _, Y, X = z.shape
    per_step = []
    for k, w in enumerate(weights, start=1):
        off = k + skip
        targets = [(b, y, x) for b in range(B) for y in range(off, Y) for x in range(X)]
        l_pos, l_neg = [], []
        for b in range(B):
            lp, ln = [], []
            for y in range(Y - off):  # the context rows with a target off rows below
                for x in range(X):
                    ctx = c[b, :, y, x]
                    lp.append(max(0.0, 1 - _dot(ctx, w @ z[b, :, y + off, x])))
                    if negatives is None:
                        # the negative: the same target position (y + off, x) of another image
                        ln.append(max(0.0, 1 + _dot(ctx, w @ z[int(other[b]), :, y + off, x])))
                        continue
                    p = (b * (Y - off) + y) * X + x  # this context's row of the drawn indices
                    for j in negatives[k - 1][p]:
                        tb, ty, tx = targets[int(j)]
                        ln.append(max(0.0, 1 + _dot(ctx, w @ z[tb, :, ty, tx])))
            l_pos.append(sum(lp) / len(lp))
            l_neg.append(sum(ln) / len(ln))
        if positive is None:
            per_step.append(sum(l_pos) / B + sum(l_neg) / B)
        else:
            pos = [lp for lp, m in zip(l_pos, positive) if m]
            neg = [ln for ln, m in zip(l_neg, positive) if not m]
            per_step.append((sum(pos) / len(pos) if pos else 0.0) + (sum(neg) / len(neg) if neg else 0.0))
    return sum(per_step) / len(per_step)


@pytest.mark.parametrize("positive", [None, [True, False, True], [False, False, False]])
def test_clapp_hinge_equals_the_loop(positive):
    z, weights, g = _codes()
    c = 0.3 * torch.randn(z.shape, generator=g, dtype=torch.float64)
    other = torch.tensor([2, 0, 1])
    mask = None if positive is None else torch.tensor(positive)
    got = clapp_hinge(c, z, weights[:2], 1, other, mask)
    want = _hinge_by_hand(c, z, weights[:2], 1, other, positive)
    assert abs(float(got) - want) < 1e-12 * max(1.0, abs(want))
    # CLAPP-s as the reference's script: 3 negatives per position drawn from every image and position.
    negatives = [torch.randint(3 * (5 - o) * 2, (3 * (5 - o) * 2, 3), generator=g) for o in (2, 3)]
    got = clapp_hinge(c, z, weights[:2], 1, None, mask, negatives)
    want = _hinge_by_hand(c, z, weights[:2], 1, None, positive, negatives)
    assert abs(float(got) - want) < 1e-12 * max(1.0, abs(want))
    with pytest.raises(ValueError, match="either negative_image"):
        clapp_hinge(c, z, weights[:2], 1, other, mask, negatives)


def test_other_images_are_never_the_image_itself():
    torch.manual_seed(0)
    draws = torch.stack([draw_other_images(5) for _ in range(400)])
    assert (draws != torch.arange(5)).all()
    # each image's negative is uniform over the 4 others
    for b in range(5):
        counts = torch.bincount(draws[:, b], minlength=5)
        assert counts[b] == 0 and counts.sum() == 400 and int(counts.min()) == 0
        assert sorted(int(v) for v in counts)[1] > 60  # 100 expected per other image
    with pytest.raises(ValueError, match=">= 2 images"):
        draw_other_images(1)


def test_either_or_updates_are_seeded_and_positive_with_probability_p():
    torch.manual_seed(7)
    a = draw_updates(10_000, 0.5)
    torch.manual_seed(7)
    assert torch.equal(a, draw_updates(10_000, 0.5))  # deterministic given the seed
    assert abs(float(a.double().mean()) - 0.5) < 0.02
    torch.manual_seed(7)
    assert abs(float(draw_updates(10_000, 0.2).double().mean()) - 0.2) < 0.02


def test_exactly_one_hinge_term_acts_per_sample():
    """Either-or mode: a sample's context gradient is its positive term's alone or its negative term's alone.

    Small codes keep every hinge term active, so the terms' gradients are
    -W z+ / (n+ Y') and +W z- / (n- Y') per context position (one step, one column).
    """
    z, weights, g = _codes(b=4, c=3, y=4, x=1)
    z = 0.05 * z
    c = (0.05 * torch.randn(z.shape, generator=g, dtype=torch.float64)).requires_grad_()
    other = torch.tensor([1, 2, 3, 0])
    positive = torch.tensor([True, False, False, True])
    w, off = weights[0], 2
    clapp_hinge(c, z, [w], 0, other, positive)  # skip 0, k = 1: offset 1 (check it is defined)
    c.grad = None
    clapp_hinge(c, z, [w], 1, other, positive).backward()  # skip 1, k = 1: offset 2
    rows = z.shape[2] - off
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    for b in range(4):
        pos_term = torch.stack([-(w @ z[b, :, y + off, 0]) / (n_pos * rows) for y in range(rows)], dim=1)
        neg_term = torch.stack([(w @ z[int(other[b]), :, y + off, 0]) / (n_neg * rows) for y in range(rows)], dim=1)
        got = c.grad[b, :, :rows, 0]
        want, not_want = (pos_term, neg_term) if positive[b] else (neg_term, pos_term)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
        assert (got - (pos_term + neg_term)).abs().max() > 1e-3 * not_want.abs().max()


# ----------------------------------------------------------------------------- the rules on their draws


def _patched_vgg(size=64, patch=16, stride=8):
    """VGG-6 (width 1/32) on 16 px patches at stride 8 (per-patch maps 16, 8, 8, 4, 2, 1)."""
    torch.manual_seed(0)
    enc = patchify(build_encoder("vgg6", width=1 / 32, in_channels=3), patch, stride, 3)
    return enc, enc.feature_shapes((3, size, size))


def test_rule_objectives_are_the_losses_on_their_draws():
    enc, shapes = _patched_vgg(size=64)  # 7x7 patches of 16 px at stride 8
    grids = enc.grids_at(64)
    assert grids == [7] * 6
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        outs = enc(x)
    for name in ("gim", "clapp2021"):
        for opts in ({}, {"synchronous": True}, {"asymmetric": False}, {"negatives": 4}):
            rule = build_rule(name, shapes, opts if name == "clapp2021" else {}, grids=grids)
            z = rule.represent(2, outs[2])
            assert z.shape == (4, shapes[2][0], 7, 7)
            torch.manual_seed(3)
            got = rule.objective(2, z)
            torch.manual_seed(3)
            w = [list(side) for side in rule.predictors[2]]
            if name == "gim":
                want = cpc_info_nce(z, z, w[0], 1, draw_cpc_negatives(z.shape, [2, 3, 4, 5, 6], 16))
            else:
                n = rule.options.negatives
                other = draw_other_images(4) if n == 0 else None
                anywhere = draw_cpc_negatives(z.shape, [2, 3, 4, 5, 6], n) if n else None
                pos = None if rule.options.synchronous else draw_updates(4, 0.5)
                want = clapp_hinge(z, z, w[0], 1, other, pos, anywhere)
                if rule.options.asymmetric:
                    want = want + clapp_hinge(z, z, w[1], 1, other, pos, anywhere)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_asymmetric_predictors_train_opposite_sides():
    """u1 = sg(z) W1 c moves the context only, u2 = z W2 sg(c) the target only (``--asymmetric_W_pred``)."""
    enc, shapes = _patched_vgg(size=64)
    rule = build_rule("clapp2021", shapes, {"synchronous": True, "steps": 1}, grids=enc.grids_at(64))
    z = rule.represent(0, enc(torch.randn(4, 3, 64, 64))[0]).detach().double().requires_grad_()
    rule = rule.double()
    w1, w2 = rule.predictors[0][0][0], rule.predictors[0][1][0]
    other = torch.tensor([1, 2, 3, 0])
    ctx_side = torch.autograd.grad(clapp_hinge(z.detach(), z, [w1], 1, other), z)[0]
    tgt_side = torch.autograd.grad(clapp_hinge(z, z.detach(), [w2], 1, other), z)[0]
    # Offset 2 on 7 rows: the targets are rows 2..6, the contexts rows 0..4.
    assert ctx_side[:, :, :2].abs().max() == 0 and ctx_side[:, :, 2:].abs().sum() > 0
    assert tgt_side[:, :, 5:].abs().max() == 0 and tgt_side[:, :, :5].abs().sum() > 0


def test_rules_refuse_grids_without_rows_below():
    shapes = build_encoder("vgg6", width=1 / 32).feature_shapes((3, 32, 32))  # maps 32 .. 2
    rule = build_rule("gim", shapes, {}, grids=[8, 4, 4, 4, 2, 2])
    assert "block 5 pools to 2 row(s)" in rule.unsupported()
    assert build_rule("gim", shapes, {"skip": 0}, grids=[8, 4, 4, 4, 2, 2]).unsupported() is None
    cfg = TrainConfig(rule="clapp2021", encoder="vgg6", width=1 / 32)
    with pytest.raises(ConfigError, match="rule clapp2021 on encoder vgg6: block 5 pools to 2 row"):
        build_model(cfg, 3, 32)
    with pytest.raises(ConfigError, match="32px images from shapes10: a 32x32 input is smaller than one 40px patch"):
        build_model(TrainConfig(rule="gim", encoder="gim-resnet", encoder_options={"patch": 40}), 3, 32)
    with pytest.raises(ConfigError, match="negatives must be >= 1"):
        build_model(TrainConfig(rule="gim", encoder="gim-resnet", rule_options={"negatives": 0}), 3, 96)


def test_views_too_few_rows_for_the_steps_name_the_option():
    enc, shapes = _patched_vgg(size=64)
    rule = build_rule("gim", shapes, {}, grids=enc.grids_at(64))  # steps reach 6 rows down on 7 rows
    h = enc(torch.randn(2, 3, 32, 32))[0]  # 32 px: 3 rows of patches
    with pytest.raises(ValueError, match="too few for steps=5"):
        rule.loss(0, h)


# ----------------------------------------------------------------------------- patched encoders


def test_tile_and_untile_are_inverse_and_patches_are_the_windows():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2 * 3 * 4, 5, 2, 3, generator=g)
    m = tile(y, 3, 4)
    assert m.shape == (2, 5, 6, 12)
    back, gy, gx = untile(m, 2, 3)
    assert (gy, gx) == (3, 4) and torch.equal(back, y)
    assert torch.equal(tile(*untile(m, 2, 3)), m)
    # tile (i, j) of image b is patch b * 12 + i * 4 + j
    assert torch.equal(m[1, :, 2:4, 3:6], y[1 * 12 + 1 * 4 + 1])
    x = torch.randn(2, 3, 20, 20, generator=g)
    p, gy, gx = to_patches(x, 8, 4)
    assert (gy, gx) == (4, 4) and p.shape == (2 * 16, 3, 8, 8)
    assert torch.equal(p[1 * 16 + 2 * 4 + 3], x[1, :, 8:16, 12:20])


@pytest.mark.parametrize("which, size, patch, stride", [("vgg", 40, 16, 8), ("gim", 24, 8, 4), ("gim", 24, 8, 8)])
def test_pooling_the_mosaic_per_tile_is_pooling_each_patch(which, size, patch, stride):
    if which == "vgg":
        enc, _ = _patched_vgg(size, patch, stride)
    else:
        torch.manual_seed(0)
        enc = build_encoder("gim-resnet", width=1 / 16, options={"patch": patch, "patch_stride": stride})
    inner = [b.inner for b in enc.blocks]
    enc.eval()
    x = torch.randn(2, 3, size, size)
    outs = enc(x)
    gy = gx = (size - patch) // stride + 1
    h = torch.stack([x[b, :, i * stride:i * stride + patch, j * stride:j * stride + patch]
                     for b in range(2) for i in range(gy) for j in range(gx)])
    for k, block in enumerate(inner):
        h = block(h)  # every patch alone, as a batch of small images
        th, tw = enc.tiles[k]
        assert h.shape[-2:] == (th, tw) and outs[k].shape[-2:] == (gy * th, gx * tw)
        pooled = F.avg_pool2d(outs[k], (th, tw))  # (2, C, gy, gx)
        per_patch = h.mean(dim=(2, 3)).view(2, gy, gx, -1).permute(0, 3, 1, 2)
        torch.testing.assert_close(pooled, per_patch, rtol=1e-5, atol=1e-6)
    # The global average of the mosaic (the probes' pooled features) is the mean of the patch codes (GIM's probe).
    torch.testing.assert_close(enc.pooled(x), h.mean(dim=(2, 3)).view(2, gy * gx, -1).mean(1), rtol=1e-5, atol=1e-6)


def test_no_information_crosses_patches_inside_a_block():
    torch.manual_seed(0)
    enc = build_encoder("gim-resnet", width=1 / 16, options={"patch": 8, "patch_stride": 4})
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        base = enc(x)
        # Pixel (0, 0) lies in patch (0, 0) only: only tile (0, 0) of every block changes.
        x2 = x.clone()
        x2[0, :, 0, 0] += 5.0
        for k, out in enumerate(enc(x2)):
            th, tw = enc.tiles[k]
            diff = (out - base[k]).abs().sum(1)[0]
            assert diff[:th, :tw].sum() > 0 and diff[th:].sum() == 0 and diff[:, tw:].sum() == 0
        # A later block: change tile (1, 2) of its input mosaic; only its output tile (1, 2) moves.
        for k in (1, 2):
            ih, iw = enc.tiles[k - 1]
            m = base[k - 1].clone()
            m[:, :, ih:2 * ih, 2 * iw:3 * iw] += 1.0
            diff = (enc.blocks[k](m) - base[k]).abs().sum(1)[0]
            th, tw = enc.tiles[k]
            inside = diff[th:2 * th, 2 * tw:3 * tw].sum()
            assert inside > 0 and math.isclose(float(diff.sum()), float(inside), rel_tol=1e-6)


def test_gim_resnet_is_the_reference_architecture():
    enc = build_encoder("gim-resnet", width=1.0, in_channels=3)
    assert len(enc) == 3 and enc.tiles == [(16, 16), (8, 8), (4, 4)]
    assert [b.out_channels for b in enc.blocks] == [256, 512, 1024]
    assert [sum(1 for m in b.inner if hasattr(m, "conv3")) for b in enc.blocks] == [3, 4, 6]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())
    assert enc.grids_at(64) == [7, 7, 7] and enc.grids_at(96) == [11, 11, 11]
    assert [s[1:] for s in enc.feature_shapes((3, 64, 64))] == [(112, 112), (56, 56), (28, 28)]
    plain = build_encoder("gim-resnet", width=1 / 16, options={"patch": 0})
    assert not hasattr(plain, "tiles") and plain.grids_at(64) is None


def test_vgg6_patches_is_clapps_encoder():
    """CLAPP 2021's VGG-like encoder (VGG-6's layers, one module each) on 16 px patches at stride 8, colour."""
    torch.manual_seed(0)
    enc = build_encoder("vgg6-patches", width=1 / 32)
    torch.manual_seed(0)
    ref = patchify(build_encoder("vgg6", width=1 / 32), 16, 8, 3)
    assert enc.tiles == [(16, 16), (8, 8), (8, 8), (4, 4), (2, 2), (1, 1)] and enc.grids_at(64) == [7] * 6
    x = torch.randn(2, 3, 64, 64)
    for a, b in zip(enc(x), ref(x)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="vgg6 cannot encode a 8px patch"):
        build_encoder("vgg6-patches", width=1 / 32, options={"patch": 8, "patch_stride": 4})
    with pytest.raises(ConfigError, match="patch_stride >= 1"):
        build_encoder("vgg6-patches", options={"patch_stride": 0})


@pytest.mark.parametrize("name", ["gim-resnet", "vgg6-patches"])
def test_grayscale_is_the_luma_of_rgb(name):
    opts = {"patch": 16, "patch_stride": 16, "grayscale": True}
    torch.manual_seed(0)
    rgb = build_encoder(name, width=1 / 16, in_channels=3, options=opts)
    torch.manual_seed(0)
    gray = build_encoder(name, width=1 / 16, in_channels=1, options=opts)
    x = torch.rand(2, 3, 32, 32)
    luma = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]
    for a, b in zip(rgb(x), gray(luma)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_patch_view_maker():
    maker = VIEW_MAKERS.get("patches")(96, [0.5] * 3, [0.25] * 3, crop=64)
    x = torch.randint(0, 256, (5, 96, 96, 3), dtype=torch.uint8)
    batch = maker.batch(x)
    assert batch.layout == ViewLayout(1, "rows") and batch.x.shape == (5, 3, 64, 64)
    # A crop: every view is a 64x64 window of its image, maybe flipped (normalised back to 0..255).
    raw = (batch.x * 0.25 + 0.5) * 255
    img = x[0].permute(2, 0, 1).float()
    windows = [img[:, i:i + 64, j:j + 64] for i in range(33) for j in range(33)]
    assert any(torch.allclose(raw[0], w, atol=1e-3) or torch.allclose(raw[0], w.flip(-1), atol=1e-3) for w in windows)
    with pytest.raises(ValueError, match="crop=40 px does not fit the 32 px images"):
        VIEW_MAKERS.get("patches")(32, [0.5], [0.25], crop=40)
    assert VIEW_MAKERS.get("patches")(32, [0.5], [0.25], crop=32, padding=4)(x[:, :32, :32, :1]).shape == (5, 1, 32, 32)


# ----------------------------------------------------------------------------- smoke: train, then probe


@pytest.mark.parametrize("rule", ["gim", "clapp2021"])
def test_train_and_probe_a_patch_rule(tmp_path, rule):
    out = tmp_path / rule
    rc = main(["train", "--rule", rule, "--encoder", "gim-resnet", "--width", "0.0625",
               "--encoder-opt", "patch=8", "patch_stride=4", "--rule-opt", "crop=32", "crop_padding=4",
               "--dataset", "shapes10", "--subset", "32", "--batch-size", "8", "--max-steps", "2", "--amp", "off",
               "--no-progress", "--threads", "1", "--out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and all(math.isfinite(rows[-1][f"loss_{k}"]) for k in (1, 2, 3))
    rc = main(["probe", str(out), "--train-subset", "40", "--test-subset", "40", "--epochs-fast", "1",
               "--protocols", "fast", "blocks"])
    assert rc == 0
    probe = json.loads((out / "probe.json").read_text())
    assert probe["grids"] == [7, 7, 7] and probe["rule"] == rule
    assert 0.0 <= probe["fast_last"]["test_acc"] <= 1.0


def test_bench_steps_a_one_view_rule_on_view_1_of_each_image():
    # The bench (and compare's speed and memory) hands a one-view rule the first B of its 2B random rows:
    # B images per step, as for every other rule.
    from localssl.data.augment import ViewLayout
    from localssl.reports.bench.common import build_state, in_layout, random_views

    v = random_views(3, 32, torch.device("cpu"), channels_last=False, seed=0)
    one = in_layout(v, ViewLayout(1, "rows"))
    assert torch.equal(one.x, v[:3]) and one.images == 3
    state = build_state("gim", "vgg6-patches", 1 / 16, 64, torch.device("cpu"), None, False, seed=0)
    losses = state.step(random_views(4, 64, torch.device("cpu"), channels_last=False, seed=0))
    assert len(losses) == 6 and all(torch.isfinite(x) for x in losses)
