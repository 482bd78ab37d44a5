"""One call that evaluates a frozen encoder: :func:`run_probe` (METHODS 2.5).

METHODS 2.5 asks for the all-layer linear probe, the last-layer globally
pooled probe (CLAPP-2021 style) and a kNN accuracy, and always for the same
probes on a *random-init* encoder of the same shape (:func:`random_init_like`):
wide random conv features reach far above chance, so a trained encoder's
number means something only against that baseline.

Protocols (any subset, in ``protocols``):

- ``"fast"``: features extracted once without augmentation, standardised,
  one linear layer (Adam) on ``"all"`` and on ``"last"`` -> ``fast_all``,
  ``fast_last``.
- ``"blocks"``: one linear probe per block on that block's globally pooled
  output, with the recipe of ``fast_last`` (same epochs, lr, batch,
  standardisation, seed), so block L's number is ``fast_last``'s and the
  blocks compare with each other and with it -> ``fast_block_1`` ..
  ``fast_block_L``. Blockwise SSL reports this probe per ResNet stage
  (METHODS 5.1): it shows where in the network a rule's features are
  best, which the last block alone hides for a local rule. Shares the
  feature pass with ``"fast"``.
- ``"knn"``: weighted kNN (k=200, T=0.1) on ``"last"`` (and ``"all"`` if
  ``knn_features`` asks) -> ``knn_last`` / ``knn_all``. Shares the
  feature pass with ``"fast"``.
- ``"paper"``: the paper's linear probe (reference ``eval_ssl.py``): raw
  features, one linear layer, RandomResizedCrop (0.08-1) + flip every epoch,
  centre-cropped test after every epoch -> ``paper`` with
  ``test_acc_final``, ``test_acc_best``, ``best_epoch``, ``test_acc_curve``
  (``test_acc`` = final).
- ``"paper-bn"``: ours, not the paper's: the same loop with BatchNorm1d in
  front of the linear layer and a pad-4 crop + flip -> ``paper-bn``.

The result is a flat, JSON-serialisable dict; accuracies are fractions in
[0, 1]. The encoder is handed back unchanged: same parameters, same
training flag, same device, no gradients.
"""
from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from localssl.evaluation.features import as_grids, extract_features, feature_dims
from localssl.evaluation.knn import KNN_K, KNN_TEMPERATURE, knn_accuracy
from localssl.evaluation.linear import linear_probe, paper_bn_linear_probe, paper_linear_probe, seeded

if TYPE_CHECKING:
    from localssl.data import ImageArray

ProbeResult = dict[str, Any]
"""The JSON-serialisable dict that :func:`run_probe` returns."""

PROTOCOLS = ("fast", "blocks", "knn", "paper", "paper-bn")


def block_key(k: int) -> str:
    """The result key of the ``blocks`` probe of block ``k`` (0-based): ``fast_block_{k + 1}``."""
    return f"fast_block_{k + 1}"


def random_init_like(encoder: nn.Module, seed: int = 0) -> nn.Module:
    """An untrained copy of ``encoder``: same architecture and shapes, fresh weights.

    A deep copy on which every module that has ``reset_parameters`` (conv,
    linear, norm layers) is re-initialised with PyTorch's default scheme,
    under ``seed`` (the caller's RNG stream is left untouched). This is the
    baseline of METHODS 2.5. Because ``reset_parameters`` is PyTorch's own
    default initialisation, ``torch.manual_seed(s); build_encoder(...)`` and
    ``random_init_like(enc, s)`` draw the same weights: pass the run's
    training seed to probe the very initialisation that training started
    from, or another seed for an independent draw. Warns if some parameter belongs to a module
    without ``reset_parameters`` and therefore keeps its trained value.
    """
    clone = copy.deepcopy(encoder)
    p = next(clone.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    reset: set[int] = set()
    with seeded(seed, device):
        for m in clone.modules():
            if callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
                reset.update(id(q) for q in m.parameters(recurse=False))
    kept = [name for name, q in clone.named_parameters() if id(q) not in reset]
    if kept:
        warnings.warn(f"random_init_like: no reset_parameters() for {kept}; they keep the trained values",
                      stacklevel=2)
    return clone


def _labels(data, which: str) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(data.labels), dtype=torch.int64)
    if len(y) != len(data.images):
        raise ValueError(f"{which}: {len(data.images)} images but {len(y)} labels")
    if len(y) == 0:
        raise ValueError(f"{which}: no samples")
    unlabelled = int((y < 0).sum())
    if unlabelled:
        raise ValueError(f"{which}: {unlabelled} unlabelled samples (label -1); probe on a labelled split")
    return y


def run_probe(
    encoder: nn.Module,
    train: ImageArray,
    test: ImageArray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    grids: int | Sequence[int] | None = None,
    protocols: Sequence[str] = ("fast", "knn"),
    fast_epochs: int = 100,
    fast_lr: float = 1e-3,
    fast_weight_decay: float = 0.0,
    fast_batch_size: int = 256,
    knn_k: int = KNN_K,
    knn_temperature: float = KNN_TEMPERATURE,
    knn_features: Sequence[str] = ("last",),
    paper_epochs: int = 30,
    paper_options: dict | None = None,
    paper_bn_options: dict | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str = "cpu",
    amp: bool = False,
    progress: bool = False,
) -> ProbeResult:
    """Evaluate a frozen ``BlockEncoder`` on labelled train/test image arrays.

    Args:
        encoder: the encoder to evaluate (left unchanged).
        train, test: ``ImageArray``-like objects with uint8 ``images`` (N, H, W, C)
            and int64 ``labels`` (N,), all >= 0; ``classes`` is used for the
            number of classes when present.
        mean, std: per-channel normalisation of the data set (as in pre-training).
        grids: pooling grid per block (METHODS 2.2); default
            ``default_grids(encoder.name)``.
        protocols: any of ``"fast"``, ``"blocks"``, ``"knn"``, ``"paper"``, ``"paper-bn"``.
        fast_epochs, fast_lr, fast_weight_decay, fast_batch_size: fast linear
            probes (``fast`` and ``blocks``).
        knn_k, knn_temperature, knn_features: kNN (InstDisc: k=200, T=0.1), on
            ``"last"`` and/or ``"all"``.
        paper_epochs: epochs of the ``paper`` and ``paper-bn`` protocols (the
            paper: 300, ``linear.PAPER_EPOCHS``).
        paper_options: extra keyword arguments of :func:`paper_linear_probe`
            (``lr``, ``batch_size``, ``crop_size``, ``crop_scale``, ...).
        paper_bn_options: extra keyword arguments of
            :func:`paper_bn_linear_probe` (``padding``, ``test_every_epoch``, ...).
        batch_size: images per encoder forward pass.
        seed: makes every protocol deterministic.
        device, amp: where the encoder runs; bf16 autocast.
        progress: tqdm bars.

    Returns:
        e.g. ``{"fast_all": {"train_acc", "test_acc", ...}, "fast_last": {...},
        "fast_block_1": {...}, ..., "knn_last": {"test_acc", "k", "temperature"}, "paper": {"test_acc_final",
        "test_acc_best", "best_epoch", "test_acc_curve", "test_acc", ...}, "paper-bn": {...},
        "feature_dims": {"all", "last", "per_block"[, "block_dims"]}, "grids", "num_train",
        "num_test", "num_classes", "seed", "seconds", "timings"}``.
    """
    t_start = time.perf_counter()
    protocols = list(dict.fromkeys(protocols))
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ValueError(f"unknown probe protocols {unknown or protocols}; valid: {list(PROTOCOLS)}")
    bad_knn = [k for k in knn_features if k not in ("all", "last")]
    if bad_knn:
        raise ValueError(f"knn_features must be among 'all', 'last', got {bad_knn}")
    from localssl.data.augment import Preprocess
    from localssl.models import default_grids

    if grids is None:
        grids = default_grids(getattr(encoder, "name", "custom"), len(encoder.blocks))
    grids = as_grids(grids, len(encoder.blocks))
    train_y, test_y = _labels(train, "train"), _labels(test, "test")
    classes = getattr(train, "classes", None)
    num_classes = len(classes) if classes else int(max(int(train_y.max()), int(test_y.max()))) + 1
    if int(train_y.max()) >= num_classes or int(test_y.max()) >= num_classes:
        raise ValueError(f"labels exceed the {num_classes} classes of the data set")
    h, w, c = train.images.shape[1:]
    if tuple(test.images.shape[1:]) != (h, w, c):
        raise ValueError(f"train images are {h}x{w}x{c} but test images {tuple(test.images.shape[1:])}")
    device = torch.device(device)

    dims = feature_dims(encoder, (c, h, w), grids)  # fails early, naming the block, if a grid does not fit
    result: ProbeResult = {
        "protocols": protocols,
        "feature_dims": {"all": dims["all"], "last": dims["last"], "per_block": dims["per_block"],
                         **({"block_dims": dims["block_dims"]} if "blocks" in protocols else {})},
        "grids": grids,
        "num_train": len(train_y),
        "num_test": len(test_y),
        "num_classes": num_classes,
        "seed": seed,
        "amp": amp,
    }
    timings: dict[str, float] = {}

    keys: list[str] = []
    if "fast" in protocols:
        keys += ["all", "last"]
    if "knn" in protocols:
        keys += list(knn_features)
    if "blocks" in protocols:
        keys.append("blocks")
    keys = [k for k in ("all", "last", "blocks") if k in keys]
    if keys:
        t = time.perf_counter()
        pre = Preprocess(mean, std)
        kw = dict(grids=grids, batch_size=batch_size, device=device, amp=amp, keys=keys, progress=progress)
        ftrain = extract_features(encoder, train.images, pre, **kw)
        ftest = extract_features(encoder, test.images, pre, **kw)
        timings["features"] = time.perf_counter() - t

        if "fast" in protocols:
            t = time.perf_counter()
            for k in ("all", "last"):
                result[f"fast_{k}"] = linear_probe(
                    ftrain[k], train_y, ftest[k], test_y, num_classes=num_classes, epochs=fast_epochs,
                    lr=fast_lr, weight_decay=fast_weight_decay, batch_size=fast_batch_size, seed=seed,
                    device=device,
                )
            timings["fast"] = time.perf_counter() - t
        if "blocks" in protocols:
            t = time.perf_counter()
            start = 0
            for k, dim in enumerate(dims["block_dims"]):
                cols = slice(start, start + dim)
                start += dim
                result[block_key(k)] = linear_probe(
                    ftrain["blocks"][:, cols].contiguous(), train_y, ftest["blocks"][:, cols].contiguous(), test_y,
                    num_classes=num_classes, epochs=fast_epochs, lr=fast_lr, weight_decay=fast_weight_decay,
                    batch_size=fast_batch_size, seed=seed, device=device,
                )
            timings["blocks"] = time.perf_counter() - t
        if "knn" in protocols:
            t = time.perf_counter()
            for k in knn_features:
                acc = knn_accuracy(ftrain[k], train_y, ftest[k], test_y, k=knn_k, temperature=knn_temperature,
                                   num_classes=num_classes, device=device)
                result[f"knn_{k}"] = {"test_acc": acc, "k": min(knn_k, len(train_y)),
                                      "temperature": knn_temperature, "dim": int(ftrain[k].shape[1])}
            timings["knn"] = time.perf_counter() - t
        del ftrain, ftest

    augmented = {"paper": (paper_linear_probe, paper_options), "paper-bn": (paper_bn_linear_probe, paper_bn_options)}
    for name, (probe_fn, options) in augmented.items():
        if name not in protocols:
            continue
        t = time.perf_counter()
        opts = dict(options or {})
        opts.setdefault("epochs", paper_epochs)
        result[name] = probe_fn(
            encoder, train.images, train_y, test.images, test_y, mean=mean, std=std, grids=grids,
            num_classes=num_classes, seed=seed, device=device, amp=amp, progress=progress, **opts,
        )
        timings[name] = time.perf_counter() - t

    result["timings"] = timings
    result["seconds"] = time.perf_counter() - t_start
    return result


__all__ = ["PROTOCOLS", "ProbeResult", "block_key", "random_init_like", "run_probe"]
