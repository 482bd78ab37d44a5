"""The identity of a run's data: what `--resume` compares instead of the folder it was read from.

A data set moved to another folder (or disk, or machine) is still the same
data, and a folder path says nothing about what is in it now. So a
checkpoint records the data it was trained on: name, split, number and
shape of the images, class count, and a fingerprint of the class names, all
the labels and up to `SAMPLE` evenly spaced images. Hashing a sample keeps
this cheap for a memory-mapped ImageNet-size cache (a few MB read), and a
different data set, subset, resize or labelling changes it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from localssl.config import ConfigError, shown
from localssl.data import ImageArray

SAMPLE = 1024


def data_identity(data: ImageArray) -> dict[str, Any]:
    """Name, split, size, image shape, classes and a content fingerprint of ``data`` (plain values)."""
    n = len(data)
    idx = np.unique(np.linspace(0, n - 1, num=min(n, SAMPLE)).round().astype(np.int64)) if n else np.arange(0)
    h = hashlib.sha256()
    h.update(json.dumps(list(data.classes)).encode())
    h.update(np.ascontiguousarray(data.labels, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(data.images[idx]).tobytes())
    return {"dataset": data.name, "split": data.split, "images": n, "image_shape": list(data.image_shape),
            "classes": len(data.classes), "fingerprint": h.hexdigest()[:24]}


def check_same_data(saved: dict[str, Any], now: dict[str, Any], checkpoint: Path, data_dir: str | None) -> None:
    """Refuse a resume on other data than the checkpoint's, naming every field that differs."""
    diff = [k for k, v in now.items() if saved.get(k) != v]
    if not diff:
        return
    what = "; ".join(f"{k}: run has {shown(saved.get(k))}, here {shown(now[k])}" for k in diff)
    if diff == ["fingerprint"]:
        what += " (as many images of the same size, but other pixels or labels)"
    raise ConfigError(f"cannot resume: --data-dir {data_dir} does not hold the data {checkpoint} was trained on: "
                      f"{what}")


__all__ = ["data_identity", "check_same_data"]
