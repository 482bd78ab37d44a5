"""`localssl demo`: the pipeline at a toy budget, the printed table, and the data it trains on.

No test asserts an accuracy: a 2-step run on 64 images says nothing about
the rules. What is checked is that the table has every row and column, that
its numbers are the ones measured (probes, speed, memory), and that
``shapes10``'s labels describe its images.
"""
from __future__ import annotations

import json
from collections import deque

import numpy as np
import pytest

from localssl.data.shapes import SHAPES10_CLASSES, make_shapes10
from localssl.reports.demo import PROBES, RANDOM_INIT, format_table, run_demo, training_speed

HEADS = ("lin. all", "lin. last", "kNN last", "train img/s", "vs BP", "act. MiB/step")


def _table(text: str) -> tuple[str, dict[str, list[str]]]:
    """The head line and the rows (encoder -> its fields) of the printed table."""
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if line and set(line) == {"-"})
    rows = {}
    for line in lines[rule + 1:]:
        if not line.strip():
            break
        rows[line.split()[0]] = line.split()
    return lines[rule - 1], rows


@pytest.fixture(scope="module")
def toy_demo(tmp_path_factory):
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = run_demo(out, epochs=1, width=1 / 16, subset=64, progress=False, probe_epochs=2, probe_subset=50)
    return out, result, printed.getvalue()


def test_demo_table_has_every_row_and_column(toy_demo):
    out, result, printed = toy_demo
    assert set(result["accuracy"]) == {"clapp++", "bp-infonce", RANDOM_INIT}
    head, rows = _table(printed)
    for h in HEADS:
        assert h in head
    assert set(rows) == set(result["accuracy"])
    # Trained rules have every figure; the end-to-end rule is the reference of both ratios.
    assert rows["bp-infonce"][1] == "end-to-end" and rows["bp-infonce"][-3::2] == ["1.00x", "1.00x"]
    assert rows["clapp++"][1:4] == ["local,", "6", "blocks"] and "-" not in rows["clapp++"]
    assert rows[RANDOM_INIT][1] == "untrained" and rows[RANDOM_INIT][-4:] == ["-"] * 4
    for word in ("budget:", "64 images seen", "precision: fp32", "hardware:", "wall time:"):
        assert word in printed
    assert (out / "demo.png").stat().st_size > 1000


def test_demo_numbers_are_the_measured_ones(toy_demo):
    out, result, _ = toy_demo
    saved = json.loads((out / "results.json").read_text())
    assert saved["accuracy_percent"] == result["accuracy"]
    for name, path in (("clapp++", out / "clapp++" / "probe.json"), ("bp-infonce", out / "bp-infonce" / "probe.json"),
                       (RANDOM_INIT, out / "probe-random-init.json")):
        probe = json.loads(path.read_text())
        assert result["accuracy"][name] == {label: 100 * probe[k]["test_acc"] for k, label in PROBES.items()}
        assert probe["num_test"] == 50  # the same probe subset for every encoder
    runs = saved["runs"]
    assert runs["clapp++"]["steps"] == runs["bp-infonce"]["steps"] == 2  # 64 images, batch 32, 1 epoch
    local, bp = runs["clapp++"]["memory"], runs["bp-infonce"]["memory"]
    assert local["local"] and not bp["local"] and local["groups"] == 6 and bp["groups"] == 1
    # The local step holds one block's graph at a time (one peak per group); BP holds all blocks at
    # once, so its peak is at least the largest block's, which bounds the local one from below.
    assert len(local["group_peaks"]) == 6 and len(bp["group_peaks"]) == 1
    assert local["floor_bytes"] <= local["peak_saved_activation_bytes"] < bp["peak_saved_activation_bytes"]
    assert local["peak_saved_activation_bytes"] == max(local["group_peaks"])


def _info(**kw):
    info = {"dataset": "shapes10", "pretrain_images": 5000, "steps_per_epoch": 156, "epochs": 2, "steps": 312,
            "batch_size": 32, "images_seen": 9984, "lr": 1e-3, "width": 0.125, "encoder": "vgg6", "amp": "off",
            "precision": "None", "seed": 0, "probe_epochs": 60, "probe_train": 5000, "probe_test": 1000,
            "feature_dims": {"all": 4096, "last": 128}, "knn_k": 200, "reference": "bp",
            "env": {"cpu": "test cpu", "cpu_count": 2, "torch_threads": 2, "torch": "x"}}
    return info | kw


def test_format_table_ratios_and_gains():
    labels = list(PROBES.values())
    accs = {"loc": dict(zip(labels, [70.0, 40.0, 35.5])), "bp": dict(zip(labels, [80.0, 60.0, 50.0])),
            RANDOM_INIT: dict(zip(labels, [60.0, 30.0, 20.0]))}
    mem = {"local": True, "groups": 6, "views": 64, "floor_bytes": 2**20, "group_peaks": [3 * 2**20]}
    results = {"loc": {"images_per_s": 150.0, "memory": mem | {"peak_saved_activation_bytes": 3 * 2**20}},
               "bp": {"images_per_s": 300.0, "memory": mem | {"local": False, "groups": 1,
                                                              "peak_saved_activation_bytes": 6 * 2**20}},
               RANDOM_INIT: {}}
    text = format_table(accs, results, _info(), {"total": 61.0, "training": 50.0, "probes": 10.0, "memory": 1.0})
    _, rows = _table(text)
    assert rows["loc"][-4:] == ["150", "0.50x", "3.00", "0.50x"]
    assert rows["bp"][-4:] == ["300", "1.00x", "6.00", "1.00x"]
    assert rows[RANDOM_INIT][-4:] == ["-"] * 4
    assert "loc vs random-init (points, lin. all / lin. last / kNN last): +10.0, +10.0, +15.5" in text
    assert "floor (largest block alone) 1.00 MiB = 0.17x BP" in text
    assert "wall time: 1m01.0s" in text and "2 epochs x 156 steps x 32 images = 312 steps" in text
    assert "bf16 autocast" in format_table(accs, results, _info(amp="auto", precision="torch.bfloat16"))


def test_training_speed_is_the_median_window():
    rows = [{"step": 10, "images_per_s": 5.0}, {"step": 20, "images_per_s": 300.0},
            {"step": 30, "images_per_s": 200.0}, {"step": 40, "loss": 1.0}]
    assert training_speed(rows, {"images_per_s": 1.0}) == 200.0
    assert training_speed(rows[:2], {"images_per_s": 1.0}) == 152.5
    assert training_speed(rows[:1], {"images_per_s": 7.0}) == 7.0  # one window: the run's own mean


# ---------------------------------------------------------------------------- the data the demo trains on


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean image, each as an array of (row, col)."""
    seen = np.zeros_like(mask)
    comps = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
        comps.append(np.array(pixels))
    return comps


def _foreground(img: np.ndarray) -> np.ndarray:
    """Shape pixels: far from the background colour, read on the image border (the shapes stay inside).

    The generator keeps foreground and background at least 120 apart (RGB
    distance); the background varies by its gradient (<= 15 per channel)
    and the noise (<= 8), so half-way (60) separates them.
    """
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).astype(np.float32)
    bg = np.median(border, axis=0)
    return np.linalg.norm(img.astype(np.float32) - bg, axis=-1) > 60


def test_shapes10_labels_describe_the_images():
    x, y = make_shapes10(60, seed=3)
    assert x.shape == (60, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.bincount(y, minlength=10).tolist() == [6] * 10
    x2, y2 = make_shapes10(60, seed=3)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    checked = set()
    for img, label in zip(x, y):
        name = SHAPES10_CLASSES[label]
        fg = _foreground(img)
        parts = _components(fg)
        holes = [c for c in _components(~fg) if c.min() > 0 and c.max() < 31]  # background not reaching the border
        if name in ("disk", "square", "diamond", "triangle", "plus", "x"):
            assert len(parts) == 1 and not holes, name
        elif name == "ring":
            assert len(parts) == 1 and len(holes) == 1, name
        elif name in ("hbars", "vbars"):
            assert len(parts) == 3, name
            rows_span = [np.ptp(p[:, 0]) for p in parts]
            cols_span = [np.ptp(p[:, 1]) for p in parts]
            wide = all(c > r for r, c in zip(rows_span, cols_span))
            tall = all(r > c for r, c in zip(rows_span, cols_span))
            assert wide if name == "hbars" else tall, name
        else:
            assert name == "checker" and len(parts) >= 2, name
        checked.add(name)
    assert checked == set(SHAPES10_CLASSES)
