"""Tests of localssl.evaluation: features, kNN, linear probes, run_probe (METHODS 2.5).

Everything runs on a VGG-6 at width 1/16 (8..64 channels) and a few hundred
synthetic 32 px images, so the file takes seconds on a CPU.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from localssl.data.augment import CropFlip, Preprocess, ResizedCropFlip
from localssl.evaluation import (
    PAPER_CROP_RATIO,
    PAPER_CROP_SCALE,
    CenterCropPreprocess,
    extract_features,
    feature_dims,
    knn_accuracy,
    knn_predict,
    linear_probe,
    make_paper_bn_head,
    make_paper_head,
    paper_bn_linear_probe,
    paper_linear_probe,
    random_init_like,
    run_probe,
)
from localssl.evaluation import linear as linear_mod
from localssl.models import build_encoder, default_grids

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
GRIDS = default_grids("vgg6")  # 8, 4, 4, 4, 2, 2 at 32 px (METHODS 2.2)
COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])


def colour_images(n: int, seed: int, random_labels: bool = False, size: int = 32) -> SimpleNamespace:
    """An ImageArray-like set where the class is the mean colour (plus pixel noise).

    A random conv encoder keeps the mean colour in its pooled features, so a
    linear probe on them must reach ~100%; with ``random_labels`` the labels
    are independent of the images and no probe can beat chance on test.
    """
    rng = np.random.default_rng(seed)
    colour = rng.integers(0, 4, n)
    img = COLOURS[colour][:, None, None, :] + rng.normal(0, 30, (n, size, size, 3))
    labels = rng.integers(0, 4, n) if random_labels else colour
    return SimpleNamespace(images=np.clip(img, 0, 255).astype(np.uint8), labels=labels.astype(np.int64),
                           classes=["r", "g", "b", "y"])


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return build_encoder("vgg6", width=1 / 16)


@pytest.fixture(scope="module")
def data():
    return colour_images(160, seed=1), colour_images(80, seed=2)


def without_timings(r: dict) -> dict:
    r = json.loads(json.dumps(r))
    r.pop("seconds")
    r.pop("timings")
    for key in ("paper", "paper-bn"):
        r.get(key, {}).pop("train_seconds", None)
        r.get(key, {}).pop("test_seconds", None)
    return r


# ----------------------------------------------------------------- features


def test_all_features_are_every_block_pooled_to_its_grid(encoder, data):
    images = data[0].images[:10]
    feats = extract_features(encoder, images, Preprocess(MEAN, STD), grids=GRIDS, batch_size=4)
    shapes = encoder.feature_shapes((3, 32, 32))
    expected_dim = sum(c * g * g for (c, _, _), g in zip(shapes, GRIDS))
    assert feats["all"].shape == (10, expected_dim)
    assert feats["last"].shape == (10, shapes[-1][0])
    assert feats["all"].dtype == feats["last"].dtype == torch.float32
    assert feature_dims(encoder, (3, 32, 32), GRIDS)["all"] == expected_dim
    # Reference: the whole forward at once, adaptive pooling, channel-major flatten.
    with torch.no_grad():
        outs = encoder(Preprocess(MEAN, STD)(torch.from_numpy(images)))
    ref_all = torch.cat([F.adaptive_avg_pool2d(h, g).flatten(1) for h, g in zip(outs, GRIDS)], 1)
    torch.testing.assert_close(feats["all"], ref_all, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feats["last"], outs[-1].mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)


def test_full_width_vgg6_gives_the_papers_32768_dims():
    enc = build_encoder("vgg6")  # shapes only; no image goes through it
    dims = feature_dims(enc, (3, 32, 32), GRIDS)
    assert dims["per_block"] == [8192, 4096, 4096, 8192, 4096, 4096]  # METHODS 2.2
    assert dims["all"] == 32768 and dims["last"] == 1024


def test_features_do_not_depend_on_batching_or_input_type(encoder, data):
    images = data[0].images[:9]
    pre = Preprocess(MEAN, STD)
    a = extract_features(encoder, images, pre, grids=GRIDS, batch_size=256)
    ro = images.copy()
    ro.flags.writeable = False  # like the read-only memmap of the data cache
    b = extract_features(encoder, ro, pre, grids=GRIDS, batch_size=4)
    c = extract_features(encoder, torch.from_numpy(images), pre, grids=GRIDS, batch_size=2, keys=("last",))
    torch.testing.assert_close(a["all"], b["all"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["last"], c["last"], rtol=1e-5, atol=1e-6)
    assert set(c) == {"last"}


def test_bf16_autocast_still_returns_close_float32_features(encoder, data):
    images = data[0].images[:4]
    pre = Preprocess(MEAN, STD)
    f32 = extract_features(encoder, images, pre, grids=GRIDS)["all"]
    bf16 = extract_features(encoder, images, pre, grids=GRIDS, amp=True)["all"]
    assert bf16.dtype == torch.float32
    rel = (bf16 - f32).norm() / f32.norm()
    assert 0 < rel < 0.05


def test_a_grid_that_does_not_divide_the_block_output_is_a_clear_error(encoder, data):
    pre = Preprocess(MEAN, STD)
    with pytest.raises(ValueError, match=r"block 6: pooling grid 3 does not divide .*2x2"):
        extract_features(encoder, data[0].images[:2], pre, grids=[8, 4, 4, 4, 2, 3])
    # 16 px input: the last block's output is 1x1, which the reference grid 2 cannot cover.
    with pytest.raises(ValueError, match=r"block 6: pooling grid 2 .*1x1"):
        extract_features(encoder, data[0].images[:2, :16, :16], pre, grids=GRIDS)
    with pytest.raises(ValueError, match="6 blocks"):
        extract_features(encoder, data[0].images[:2], pre, grids=[8, 4])
    with pytest.raises(ValueError, match="uint8"):
        extract_features(encoder, data[0].images[:2].astype(np.float32), pre, grids=GRIDS)


# ----------------------------------------------------------------------- kNN


def knn_reference(train_x, train_y, test_x, k, t, num_classes):
    """Brute force, one test sample at a time, in float64 numpy."""
    tr = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    preds = []
    for q in test_x:
        sim = tr @ (q / np.linalg.norm(q))
        nn_idx = np.argsort(-sim, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for i in nn_idx:
            votes[train_y[i]] += np.exp(sim[i] / t)
        preds.append(int(np.argmax(votes)))
    return np.array(preds)


@pytest.mark.parametrize("k", [1, 7, 200])
def test_knn_matches_brute_force(k):
    g = torch.Generator().manual_seed(k)
    train_x, test_x = torch.randn(40, 5, generator=g), torch.randn(13, 5, generator=g)
    train_y = torch.randint(0, 3, (40,), generator=g)
    pred = knn_predict(train_x, train_y, test_x, k=k, temperature=0.1, num_classes=3, chunk_size=4)
    ref = knn_reference(train_x.double().numpy(), train_y.numpy(), test_x.double().numpy(), min(k, 40), 0.1, 3)
    np.testing.assert_array_equal(pred.numpy(), ref)
    # The vote is invariant to the feature scale (cosine similarity).
    pred2 = knn_predict(train_x * 7, train_y, test_x * 0.01, k=k, num_classes=3, chunk_size=100)
    np.testing.assert_array_equal(pred2.numpy(), pred.numpy())


def test_knn_separable_clusters_and_random_labels():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    ytr, yte = torch.randint(0, 4, (400,), generator=g), torch.randint(0, 4, (400,), generator=g)
    xtr = centres[ytr] + torch.randn(400, 16, generator=g)
    xte = centres[yte] + torch.randn(400, 16, generator=g)
    assert knn_accuracy(xtr, ytr, xte, yte, k=20) > 0.97
    shuffled = ytr[torch.randperm(400, generator=g)]
    assert abs(knn_accuracy(xtr, shuffled, xte, yte, k=20) - 0.25) < 0.1


# ------------------------------------------------------------- linear probes


def test_fast_linear_probe_separable_and_random_labels():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=g)
    ytr, yte = torch.randint(0, 4, (300,), generator=g), torch.randint(0, 4, (300,), generator=g)
    # Offset and scale that standardisation has to undo.
    xtr = (centres[ytr] + 0.5 * torch.randn(300, 32, generator=g)) * 5 + 2
    xte = (centres[yte] + 0.5 * torch.randn(300, 32, generator=g)) * 5 + 2
    r = linear_probe(xtr, ytr, xte, yte, epochs=30, lr=1e-2, batch_size=100)
    assert r["train_acc"] > 0.97 and r["test_acc"] > 0.95
    assert r["dim"] == 32 and r["epochs"] == 30
    rand = linear_probe(xtr, torch.randint(0, 4, (300,), generator=g), xte, yte, epochs=30, lr=1e-2,
                        batch_size=100)
    assert rand["test_acc"] < 0.4  # chance is 0.25


def test_center_crop_preprocess_takes_the_centre():
    x = torch.arange(8 * 8, dtype=torch.uint8).view(1, 8, 8, 1).contiguous()
    out = CenterCropPreprocess(4, [0.0], [1.0])(x)
    expected = x[:, 2:6, 2:6, :].permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(out, expected)
    same = CenterCropPreprocess(8, [0.0], [1.0])(x)
    torch.testing.assert_close(same, x.permute(0, 3, 1, 2).float() / 255)


def test_paper_probe_with_a_centre_crop_smaller_than_the_image(encoder, data):
    train, test = data
    # 24 px crops: blocks output 24, 12, 12, 6, 3, 1 -> grids that divide them.
    r = paper_linear_probe(encoder, train.images, train.labels, test.images, test.labels, mean=MEAN, std=STD,
                           grids=[4, 2, 2, 2, 1, 1], epochs=2, crop_size=24, seed=0)
    assert r["crop_size"] == 24 and r["normalization"] == "none"
    assert r["test_acc"] > 0.9
    # The reference grids do not fit 24 px: block 4's output is 6x6.
    with pytest.raises(ValueError, match="block 4: pooling grid 4 does not divide .*6x6"):
        paper_linear_probe(encoder, train.images, train.labels, test.images, test.labels, mean=MEAN, std=STD,
                           grids=GRIDS, epochs=1, crop_size=24)


NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def test_paper_head_is_one_linear_layer_with_bias_and_nothing_in_front():
    head = make_paper_head(12, 3)
    assert [type(m) for m in head.modules()] == [nn.Linear]  # no BatchNorm/LayerNorm/standardisation
    assert head.bias is not None and head.bias.shape == (3,)
    # Raw features: the logits are affine in the input, so scaling the
    # features scales the logits minus the bias (a normalising layer would
    # make them scale-invariant instead). float64: exact up to rounding.
    head = head.double()
    x = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(head(x), x @ head.weight.T + head.bias, rtol=0, atol=1e-12)
        torch.testing.assert_close(head(7 * x) - head.bias, 7 * (head(x) - head.bias), rtol=1e-12, atol=1e-12)
    # paper-bn (ours) is the one with the BatchNorm.
    assert any(isinstance(m, nn.BatchNorm1d) for m in make_paper_bn_head(12, 3).modules())


def _spy(monkeypatch, name: str) -> list:
    built = []
    real = getattr(linear_mod, name)
    monkeypatch.setattr(linear_mod, name, lambda *a: built.append(real(*a)) or built[-1])
    return built


def test_the_paper_probe_trains_the_bare_linear_head_and_paper_bn_the_batchnorm_one(encoder, data, monkeypatch):
    train, test = data
    heads = _spy(monkeypatch, "make_paper_head")
    bn_heads = _spy(monkeypatch, "make_paper_bn_head")
    kw = dict(mean=MEAN, std=STD, grids=GRIDS, epochs=1, seed=0)
    r = paper_linear_probe(encoder, train.images[:40], train.labels[:40], test.images[:8], test.labels[:8], **kw)
    assert len(heads) == 1 and not bn_heads
    assert not any(isinstance(m, NORM_LAYERS) for m in heads[0].modules())
    assert r["normalization"] == "none" and r["augmentation"] == "random_resized_crop+hflip"
    assert r["crop_scale"] == [0.08, 1.0] and r["crop_ratio"] == [3 / 4, 4 / 3]
    rb = paper_bn_linear_probe(encoder, train.images[:40], train.labels[:40], test.images[:8], test.labels[:8], **kw)
    assert len(bn_heads) == 1 and len(heads) == 1
    assert rb["normalization"] == "batchnorm1d_no_affine" and rb["augmentation"] == "pad_crop+hflip"
    assert rb["padding"] == 4


def marker_images(n: int, size: int) -> torch.Tensor:
    """uint8 NHWC images whose channel 0 is 3x and channel 1 is 3y (pixel coordinates)."""
    ramp = 3 * torch.arange(size, dtype=torch.uint8)
    img = torch.zeros(size, size, 3, dtype=torch.uint8)
    img[..., 0] = ramp.view(1, -1)
    img[..., 1] = ramp.view(-1, 1)
    return img.expand(n, -1, -1, -1).contiguous()


def crop_boxes(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Width, height and flip of each crop, read back from the augmented marker images.

    Bilinear resizing reproduces a linear ramp, and at the output's border
    pixels it samples the crop's first and last pixels exactly (upsampling
    clamps the half-pixel source index to the crop), so the min and max of
    the ramp are the crop's first and last pixel coordinates.
    """
    x = (out[:, 0] * 255 / 3).round()
    y = (out[:, 1] * 255 / 3).round()
    w = x.amax(dim=(1, 2)) - x.amin(dim=(1, 2)) + 1
    h = y.amax(dim=(1, 2)) - y.amin(dim=(1, 2)) + 1
    flipped = x[:, 0, 0] > x[:, 0, -1]
    return w, h, flipped


def test_paper_augmentation_is_a_random_resized_crop_of_scale_008_to_1_and_a_flip():
    size, n = 64, 512
    aug = ResizedCropFlip(size, [0.0] * 3, [1.0] * 3)
    # The modules and their parameters ...
    crop, flip = aug.augment
    assert type(crop).__name__ == "RandomResizedCrop" and type(flip).__name__ == "RandomHorizontalFlip"
    assert crop._param_generator.scale == PAPER_CROP_SCALE == (0.08, 1.0)
    assert crop._param_generator.ratio == PAPER_CROP_RATIO == (3 / 4, 4 / 3)
    assert crop.flags["size"] == (size, size) and flip.p == 0.5
    # ... and what they do, on images that encode pixel coordinates.
    torch.manual_seed(0)
    out = aug(marker_images(n, size))
    assert out.shape == (n, 3, size, size)
    w, h, flipped = crop_boxes(out)
    # torchvision/kornia draw area s*H*W (s in scale) and ratio r, then round
    # w = sqrt(s*H*W*r) and h = sqrt(s*H*W/r) to integers: each is within
    # 0.5 of its real value, which bounds the area and the ratio.
    hw = size * size
    assert ((w + 0.5) * (h + 0.5) >= 0.08 * hw).all() and (w * h <= hw).all()
    assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all() and ((w - 0.5) / (h + 0.5) <= 4 / 3).all()
    # The area fraction is drawn uniformly in [0.08, 1]: P(s < 0.12) = 0.043
    # per crop, so 512 crops without one would have probability < 1e-9;
    # likewise for s > 0.9 (the top of the range is thinned by the crops that
    # do not fit the image and are redrawn, far from enough to matter).
    area = w * h / hw
    assert area.min() < 0.12 and area.max() > 0.9
    assert (w / h).max() > 1.2 and (w / h).min() < 1 / 1.2  # aspect ratios drawn, not only squares
    # Flip p = 0.5: 512 draws give 256 +- 11 (one std); 5 std either side.
    assert abs(int(flipped.sum()) - n // 2) < 5 * 11.4
    # The pad-4 crop of paper-bn never cuts below (64 - 8) / 64 of each side.
    w2, h2, _ = crop_boxes(CropFlip(size, [0.0] * 3, [1.0] * 3)(marker_images(64, size)))
    assert (w2 * h2 / hw).min() >= ((size - 8) / size) ** 2


def test_resized_crop_flip_rejects_a_bad_scale():
    with pytest.raises(ValueError, match="crop scale"):
        ResizedCropFlip(32, MEAN, STD, scale=(0.5, 0.1))


def test_paper_probe_records_final_and_best_test_accuracy_of_every_epoch(encoder):
    # Random labels: the test accuracy wanders from epoch to epoch, so the
    # best and the final differ in general.
    train, test = colour_images(96, seed=5, random_labels=True), colour_images(80, seed=6, random_labels=True)
    kw = dict(mean=MEAN, std=STD, grids=GRIDS, seed=3)
    r = paper_linear_probe(encoder, train.images, train.labels, test.images, test.labels, epochs=5, **kw)
    curve = r["test_acc_curve"]
    assert len(curve) == r["epochs"] == 5 and r["reference_epochs"] == 300
    assert all(0 <= a <= 1 and (a * 80).is_integer() for a in curve)
    assert len(set(curve)) > 1  # the check below is not vacuous
    assert r["test_acc_final"] == curve[-1] == r["test_acc"]  # test_acc = final, for older readers
    assert r["test_acc_best"] == max(curve) >= r["test_acc_final"]
    assert curve[r["best_epoch"] - 1] == r["test_acc_best"]  # the first epoch that reaches the best
    assert all(a < r["test_acc_best"] for a in curve[:r["best_epoch"] - 1])
    assert len(r["train_loss_curve"]) == 5 and r["train_loss"] == r["train_loss_curve"][-1]
    # Entry k is the test accuracy of the head after epoch k: a run stopped
    # after 2 epochs ends where this one stood after 2 (same seed, same draws).
    short = paper_linear_probe(encoder, train.images, train.labels, test.images, test.labels, epochs=2, **kw)
    assert short["test_acc_curve"] == curve[:2] and short["test_acc_final"] == curve[1]
    # paper-bn tests once, after training, unless asked to test every epoch.
    bn = paper_bn_linear_probe(encoder, train.images, train.labels, test.images, test.labels, epochs=2, **kw)
    assert "test_acc_best" not in bn and "test_acc_curve" not in bn and bn["test_acc"] == bn["test_acc_final"]
    bn_every = paper_bn_linear_probe(encoder, train.images, train.labels, test.images, test.labels, epochs=2,
                                     test_every_epoch=True, **kw)
    assert bn_every["test_acc_curve"][-1] == bn["test_acc_final"] and bn_every["test_acc_best"] == max(
        bn_every["test_acc_curve"])


# ------------------------------------------------------------------ run_probe


def test_run_probe_reads_the_class_from_mean_colour(encoder, data):
    train, test = data
    r = run_probe(encoder, train, test, mean=MEAN, std=STD, grids=GRIDS,
                  protocols=("fast", "knn", "paper", "paper-bn"), fast_epochs=20, paper_epochs=2, knn_k=20,
                  knn_features=("last", "all"), seed=0)
    json.dumps(r)  # the CLI writes it as JSON
    assert r["num_train"] == 160 and r["num_test"] == 80 and r["num_classes"] == 4
    assert r["feature_dims"]["all"] == feature_dims(encoder, (3, 32, 32), GRIDS)["all"]
    assert r["fast_all"]["train_acc"] > 0.97 and r["fast_all"]["test_acc"] > 0.95
    assert r["knn_all"]["test_acc"] > 0.95
    assert r["paper"]["test_acc_final"] > 0.9 and r["paper"]["normalization"] == "none"
    assert r["paper-bn"]["test_acc"] > 0.9 and r["paper-bn"]["normalization"] == "batchnorm1d_no_affine"
    assert r["paper"]["epochs"] == r["paper-bn"]["epochs"] == 2
    for key in ("fast_last", "knn_last"):
        assert 0.0 <= r[key]["test_acc"] <= 1.0
    assert r["seconds"] > 0


class _Mask(nn.Module):
    """Keeps the left half of the map: its global mean is then the left half's brightness."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros_like(h)
        mask[..., : h.shape[-1] // 2] = 1
        return h * mask


def test_the_blocks_probe_reads_each_block_alone(monkeypatch):
    """Block 1 holds the class only in *where* the bright half is (global pooling loses it), block 2 turns
    that into its mean (informative), block 3 zeroes everything: only block 2's probe reads the class."""
    from localssl.models.blocks import BlockEncoder

    rng = np.random.default_rng(0)

    def halves(n: int) -> SimpleNamespace:
        y = rng.integers(0, 2, n)
        img = np.full((n, 8, 8, 3), 50, np.uint8)
        img[y == 0, :, :4] = 200  # class 0: bright left half; class 1: bright right half, the same mean
        img[y == 1, :, 4:] = 200
        return SimpleNamespace(images=img, labels=y.astype(np.int64), classes=["left", "right"])

    train, test = halves(64), halves(64)
    enc = BlockEncoder([nn.Identity(), _Mask(), nn.Conv2d(3, 3, 1).requires_grad_(False)])
    nn.init.zeros_(enc.blocks[2].weight)
    nn.init.zeros_(enc.blocks[2].bias)
    fits = []
    real_fit = linear_mod.fit_linear
    monkeypatch.setattr(linear_mod, "fit_linear", lambda x, *a, **k: fits.append(x.shape) or real_fit(x, *a, **k))
    r = run_probe(enc, train, test, mean=MEAN, std=STD, grids=1, protocols=("fast", "blocks"), fast_epochs=30,
                  seed=0)
    chance = max(np.mean(test.labels == c) for c in (0, 1))  # a constant feature predicts one class
    assert r["fast_block_1"]["test_acc"] == pytest.approx(chance)
    assert r["fast_block_2"]["test_acc"] == 1.0
    assert r["fast_block_3"]["test_acc"] == pytest.approx(chance)
    assert "fast_block_4" not in r
    # The recipe of fast_last: the last block's probe is the last-layer probe, number for number.
    assert r["fast_block_3"] == r["fast_last"]
    assert r["feature_dims"]["block_dims"] == [3, 3, 3]
    # One probe per block on that block's 3 pooled channels, after fast's two (all layers, last layer).
    assert fits == [(64, 9), (64, 3), (64, 3), (64, 3), (64, 3)]


def test_run_probe_is_at_chance_on_random_labels(encoder):
    train, test = colour_images(160, seed=3, random_labels=True), colour_images(200, seed=4, random_labels=True)
    r = run_probe(encoder, train, test, mean=MEAN, std=STD, grids=GRIDS, protocols=("fast", "knn"),
                  fast_epochs=20, knn_k=20, knn_features=("last", "all"), seed=0)
    for key in ("fast_all", "fast_last", "knn_last", "knn_all"):
        assert r[key]["test_acc"] < 0.42, (key, r[key])  # chance 0.25; 200 test samples


def test_probing_leaves_the_encoder_unchanged(data):
    torch.manual_seed(1)
    enc = build_encoder("vgg6", width=1 / 16)
    enc.train()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    modes = []
    hooks = [b.register_forward_pre_hook(lambda m, _: modes.append(m.training)) for b in enc.blocks]
    rng_before = torch.get_rng_state()
    run_probe(enc, data[0], data[1], mean=MEAN, std=STD, grids=GRIDS, protocols=("fast", "knn", "paper"),
              fast_epochs=2, paper_epochs=1)
    for h in hooks:
        h.remove()
    assert modes and not any(modes)  # eval mode during every forward (METHODS 2.5)
    assert enc.training  # and handed back in the mode it came in
    for k, v in enc.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in enc.parameters())
    assert all(p.requires_grad for p in enc.parameters())
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's random stream is untouched


def test_run_probe_is_deterministic_given_a_seed(encoder, data):
    kw = dict(mean=MEAN, std=STD, grids=GRIDS, protocols=("fast", "knn", "paper"), fast_epochs=3, paper_epochs=1)
    a = run_probe(encoder, *data, seed=5, **kw)
    torch.rand(10)  # the global RNG state must not matter
    b = run_probe(encoder, *data, seed=5, **kw)
    assert without_timings(a) == without_timings(b)
    c = run_probe(encoder, *data, seed=6, **kw)
    assert c["fast_last"]["train_loss"] != a["fast_last"]["train_loss"]


def test_run_probe_rejects_bad_input(encoder, data):
    train, test = data
    with pytest.raises(ValueError, match="unknown probe protocols"):
        run_probe(encoder, train, test, mean=MEAN, std=STD, grids=GRIDS, protocols=("linear",))
    unlabelled = SimpleNamespace(images=train.images, labels=np.full(len(train.labels), -1), classes=[])
    with pytest.raises(ValueError, match="unlabelled"):
        run_probe(encoder, unlabelled, test, mean=MEAN, std=STD, grids=GRIDS)


def test_random_init_like_gives_fresh_weights_of_the_same_shapes(encoder):
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    a, b, c = random_init_like(encoder, 10), random_init_like(encoder, 10), random_init_like(encoder, 11)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == before.keys()
    for k, v in before.items():
        assert sa[k].shape == v.shape
        assert not torch.equal(sa[k], v), k  # new weights
        assert torch.equal(sa[k], sb[k]), k  # seeded
        assert not torch.equal(sa[k], sc[k]), k
        assert torch.equal(encoder.state_dict()[k], v)  # the original is untouched
    assert all(pa.data_ptr() != pe.data_ptr() for pa, pe in zip(a.parameters(), encoder.parameters()))
    assert type(a) is type(encoder) and a.name == encoder.name
