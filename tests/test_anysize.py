"""Any image size, any channel count: a 28x28 grayscale ImageFolder end to end (issue 9).

The archive is written here (10 classes, PNG, train/test splits in a
``.tar.gz``); ``train`` runs through the CLI for clapp++ and clapp++global
without ``--grids``, then ``probe`` and ``probe --random-init``. Also: the
grid-fitting rule, the one error that lists every block whose grid does not
fit, ``--resize``, resume with the saved grids, and SimCLR views on one channel.
"""
from __future__ import annotations

import io
import json
import math
import tarfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from localssl.cli import main
from localssl.config import ConfigError, TrainConfig, check_grids, load_yaml
from localssl.data import load_dataset
from localssl.data.augment import SimCLRViews
from localssl.engine.trainer import train
from localssl.models import DEFAULT_GRIDS, build_encoder, default_grids, fit_grid, grid_choices

SIDE = 28
CLASSES = 10


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALSSL_CACHE", str(tmp_path / "cache"))


def _gray_images(split: str) -> dict[str, np.ndarray]:
    """{member name: (28, 28) uint8}: class k is brighter than class k-1, plus noise."""
    rng = np.random.default_rng(0 if split == "train" else 1)
    n = 4 if split == "train" else 2
    out = {}
    for k in range(CLASSES):
        for i in range(n):
            img = np.clip(rng.normal(30 + 20 * k, 25, (SIDE, SIDE)), 0, 255).astype(np.uint8)
            out[f"digits/{split}/c{k}/{i:03d}.png"] = img
    return out


@pytest.fixture
def gray_archive(tmp_path) -> Path:
    path = tmp_path / "gray28.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for split in ("train", "test"):
            for name, img in _gray_images(split).items():
                buf = io.BytesIO()
                Image.fromarray(img, mode="L").save(buf, format="PNG")
                info = tarfile.TarInfo(name)
                info.size = buf.tell()
                tf.addfile(info, io.BytesIO(buf.getvalue()))
    return path


def _exact_stats(images: np.ndarray) -> tuple[float, float]:
    """Mean and population std of one channel in the 0..1 scale, each correctly rounded from exact sums."""
    x = [int(v) for v in images.reshape(-1)]
    m = len(x)
    mean = Fraction(sum(x), 255 * m)
    var = Fraction(sum(v * v for v in x) * m - sum(x) ** 2, 255 * 255 * m * m)
    return float(mean), math.sqrt(float(var))


def _train_cli(archive: Path, out: Path, rule: str, *extra: str) -> int:
    return main(["train", "--rule", rule, "--dataset", "imagefolder", "--data-dir", str(archive), "--width", "0.125",
                 "--batch-size", "8", "--max-steps", "2", "--amp", "off", "--no-progress",
                 "--out", str(out), *extra])


# ---------------------------------------------------------------------------- the grid rule


def test_fitted_grids_are_the_papers_where_they_fit_else_the_largest_divisor_below():
    for name in DEFAULT_GRIDS:
        for size in (16, 28, 32, 40, 64, 96, 224):
            enc = build_encoder(name, 1 / 32, 3)
            try:
                shapes = enc.feature_shapes((3, size, size))
            except RuntimeError:
                continue  # too small for this encoder's pools
            grids = default_grids(name, shapes=shapes)
            for g, ref, (_, h, w) in zip(grids, DEFAULT_GRIDS[name], shapes):
                assert h % g == 0 and w % g == 0 and g <= ref
                # the largest divisor at or below the reference: no valid grid lies between
                assert all(d <= g for d in grid_choices(h, w) if d <= ref)
                if h % ref == 0:
                    assert g == ref
    # The paper's sizes give the paper's grids exactly (METHODS 2.2).
    enc = build_encoder("vgg6", 1 / 32, 3)
    for size in (32, 64, 96):
        assert default_grids("vgg6", shapes=enc.feature_shapes((3, size, size))) == [8, 4, 4, 4, 2, 2]
    # 28 px: maps 28, 14, 14, 7, 3, 1.
    assert default_grids("vgg6", shapes=enc.feature_shapes((3, 28, 28))) == [7, 2, 2, 1, 1, 1]
    assert fit_grid(8, 28) == 7 and fit_grid(4, 7) == 1 and fit_grid(2, 1) == 1
    assert default_grids("vgg6") == DEFAULT_GRIDS["vgg6"]  # no shapes: the reference grids
    with pytest.raises(ValueError, match="6 reference grids but 2"):
        default_grids("vgg6", shapes=[(4, 8, 8), (4, 4, 4)])


def test_grids_that_do_not_fit_are_one_error_listing_every_failing_block():
    enc = build_encoder("vgg6", 1 / 32, 1)
    shapes = enc.feature_shapes((1, SIDE, SIDE))
    grids = [8, 4, 4, 4, 2, 2]
    with pytest.raises(ConfigError) as info:
        check_grids("vgg6", grids, shapes, SIDE)
    msg = str(info.value)
    assert msg.count("does not fit") == 6  # every block at 28 px, in one message
    for k, (g, (_, h, w)) in enumerate(zip(grids, shapes)):
        assert f"block {k + 1}: grid {g} does not fit its {h}x{w} map (use one of {grid_choices(h, w)})" in msg
    assert "--grids " + " ".join(map(str, default_grids("vgg6", shapes=shapes))) in msg
    # Only the failing blocks are listed.
    ok = default_grids("vgg6", shapes=shapes)
    with pytest.raises(ConfigError) as info:
        check_grids("vgg6", [*ok[:3], 4, *ok[4:]], shapes, SIDE)
    assert str(info.value).count("does not fit") == 1 and "block 4: grid 4" in str(info.value)
    assert check_grids("vgg6", None, shapes, SIDE) == ok


def test_cli_train_with_grids_that_do_not_fit_says_so_once(gray_archive, tmp_path, capsys):
    rc = _train_cli(gray_archive, tmp_path / "bad", "clapp++", "--grids", "8", "4", "4", "4", "2", "2")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1
    assert all(f"block {k}:" in err for k in range(1, 7)) and "block 0" not in err
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()


# ---------------------------------------------------------------------------- end to end


def test_28px_grayscale_imagefolder_trains_and_probes_without_grids(gray_archive, tmp_path):
    train_imgs = np.stack(list(_gray_images("train").values()))
    mean, std = _exact_stats(train_imgs)
    for rule in ("clapp++", "clapp++global"):
        out = tmp_path / rule
        assert _train_cli(gray_archive, out, rule) == 0
        cfg = load_yaml(TrainConfig, out / "config.yaml")
        shapes = build_encoder("vgg6", 0.125, 1).feature_shapes((1, SIDE, SIDE))
        # Saved resolved: the grids fitted to the 28 px maps, the data's own normalisation.
        assert cfg.grids == default_grids("vgg6", shapes=shapes)
        assert cfg.mean == [mean] and cfg.std == [std]
        weights = torch.load(out / "encoder.pt", weights_only=True)
        assert weights["blocks.0.0.weight"].shape[1] == 1  # single-channel data, single-channel encoder

        assert main(["probe", str(out), "--protocols", "fast", "knn", "--epochs-fast", "2", "--batch-size", "16"]) == 0
        assert main(["probe", str(out), "--random-init", "--protocols", "knn", "--batch-size", "16"]) == 0
        for name in ("probe.json", "probe-random-init.json"):
            result = json.loads((out / name).read_text())
            assert result["grids"] == cfg.grids and result["mean"] == [mean] and result["std"] == [std]
            assert result["image_size"] == SIDE and result["num_classes"] == CLASSES
            assert result["num_test"] == 2 * CLASSES and 0 <= result["knn_last"]["test_acc"] <= 1
        assert json.loads((out / "probe.json").read_text())["random_init"] is False


def test_resize_trains_at_the_new_size_and_probe_follows_the_run(gray_archive, tmp_path):
    out = tmp_path / "r32"
    assert _train_cli(gray_archive, out, "clapp++", "--resize", "32") == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["resize"] == 32 and cfg["grids"] == [8, 4, 4, 4, 2, 2]  # the paper's grids fit 32 px
    resized = load_dataset("imagefolder", gray_archive, "train", resize=32)
    assert resized.images.shape == (4 * CLASSES, 32, 32, 1)
    assert cfg["mean"] == list(resized.channel_stats()[0])  # statistics of the resized images
    assert main(["probe", str(out), "--protocols", "knn", "--batch-size", "16"]) == 0
    assert json.loads((out / "probe.json").read_text())["image_size"] == 32
    # --resize and --grids override the run's; the run's grids at a size they do not fit say so.
    assert main(["probe", str(out), "--protocols", "knn", "--resize", "28", "--grids", "7", "2", "2", "1", "1", "1",
                 "--out", str(tmp_path / "p28.json")]) == 0
    p28 = json.loads((tmp_path / "p28.json").read_text())
    assert p28["image_size"] == 28 and p28["grids"] == [7, 2, 2, 1, 1, 1]
    with pytest.raises(ConfigError, match=r"the run's pooling grids \[8, 4, 4, 4, 2, 2\] do not fit .*28px"):
        from localssl.config import ProbeConfig
        from localssl.evaluation.run import probe_run

        probe_run(ProbeConfig(run=str(out), protocols=["knn"], resize=28))


def test_resume_keeps_the_saved_grids_and_normalisation(gray_archive, tmp_path):
    base = dict(rule="clapp++", dataset="imagefolder", data_dir=str(gray_archive), width=0.125,
                batch_size=8, amp="off", progress=False, out=str(tmp_path / "run"), checkpoint_every=1)
    train(TrainConfig(**base, max_steps=1))
    saved = load_yaml(TrainConfig, tmp_path / "run" / "config.yaml")
    # Left unset on resume (the Python API's defaults): the run's resolved values are used.
    train(TrainConfig(**base, max_steps=2), resume=True)
    again = load_yaml(TrainConfig, tmp_path / "run" / "config.yaml")
    assert (again.grids, again.mean, again.std) == (saved.grids, saved.mean, saved.std)
    with pytest.raises(ConfigError, match="grids: run has"):
        train(TrainConfig(**base, max_steps=3, grids=[1] * 6), resume=True)


# ---------------------------------------------------------------------------- one channel views


def test_simclr_views_on_one_channel_jitter_brightness_and_contrast_only():
    views = SimCLRViews(16, [0.5], [0.25], jitter_p=1.0)
    jitters = [m for m in views.augment if type(m).__name__ == "ColorJitter"]
    assert len(jitters) == 1 and not [m for m in views.augment if type(m).__name__ == "RandomGrayscale"]
    j = jitters[0]
    assert (j.brightness, j.contrast, j.saturation, j.hue) == (0.8, 0.8, 0.0, 0.0)
    # What it does to one channel: brightness (add) and contrast (scale by a positive factor)
    # only, each followed by a clamp to [0, 1]: a non-decreasing map, affine wherever no clamp
    # bit, i.e. away from the output's lowest and highest values.
    torch.manual_seed(0)
    x = torch.rand(8, 1, 16, 16)
    y = j(x)
    moved = 0
    for xi, yi in zip(x, y):
        order = torch.argsort(xi.flatten())
        assert (yi.flatten()[order].diff() >= 0).all()
        keep = (yi > yi.min()) & (yi < yi.max())
        assert keep.sum() >= 16
        a = torch.stack([xi[keep], torch.ones_like(xi[keep])], dim=1).double()
        coef = torch.linalg.lstsq(a, yi[keep].double().unsqueeze(1)).solution
        # float32 ops on values <= ~2: residuals of a few ulps (6e-8 each)
        assert (a @ coef - yi[keep].double().unsqueeze(1)).abs().max() < 1e-5
        moved += bool((coef[0] - 1).abs() > 1e-3 or coef[1].abs() > 1e-3)
    assert moved > 0
    u8 = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 16, 16, 1), dtype=np.uint8))
    out = views(u8)
    assert out.shape == (8, 1, 16, 16) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="1 channel.*normalisation has 3"):
        SimCLRViews(16, [0.5] * 3, [0.25] * 3).normalize(u8)
