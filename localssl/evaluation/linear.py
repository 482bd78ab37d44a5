"""Linear probes on a frozen encoder: fast, paper and paper-bn protocols (METHODS 2.5).

*Fast* protocol (:func:`linear_probe`): features are extracted once, without
augmentation, standardised with the training mean and std, and one linear
layer is fitted with Adam and cross-entropy. Cheap enough to run after every
pre-training run and on the random-init baseline; it is the number to use
for comparing rules quickly, not the number to compare with the paper.

*Paper* protocol (:func:`paper_linear_probe`), as the reference
``eval_ssl.py`` does it (METHODS 2.5): frozen encoder in eval mode; features
= every block average-pooled to its grid and concatenated (32,768 dims for
VGG-6 at full width), raw: no BatchNorm or other normalisation in front of
one ``nn.Linear`` with bias; Adam, lr 1e-3, weight decay 0, batch 32,
cross-entropy, 300 epochs in the paper (``PAPER_EPOCHS``; the default here
is lower because that is days of compute on a CPU, and every result records
the epochs it used); every epoch each training image gets a fresh
RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, resized to the image side)
and horizontal flip (:class:`~localssl.data.augment.ResizedCropFlip`), so the
images go through the frozen encoder again each epoch; test on a centre
crop, after every epoch; both the final and the best test accuracy are
recorded (which of the two the paper's table quotes is not known).

*Paper-bn* protocol (:func:`paper_bn_linear_probe`): **ours, not the
paper's**. The same loop with a ``BatchNorm1d`` without affine parameters
in front of the linear layer (as in MAE's linear probing) and a pad-4 random
crop + flip (:class:`~localssl.data.augment.CropFlip`). The concatenated
features mix layers whose scales differ by orders of magnitude, and Adam at
lr 1e-3 on raw features would mostly fit the largest layers; the BatchNorm
puts every dimension on one scale. Useful as a second read-out, but its
numbers are not comparable with the paper's. Its running
statistics use a cumulative average (``momentum=None``): the encoder is
frozen, so the feature distribution does not drift and an equal-weight
average over all training batches is the best estimate; they normalise the
test features.

All accuracies are fractions in [0, 1].
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from localssl.evaluation.features import (
    _as_uint8_tensor,
    as_grids,
    encode,
    feature_dims,
    frozen,
    iter_features,
)

PAPER_EPOCHS = 300  # METHODS 2.5
PAPER_BATCH_SIZE = 32
PAPER_LR = 1e-3
PAPER_CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop of the reference probe, also on CIFAR-10
PAPER_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision's default, which the reference keeps


def _to_device_or_stay(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Move ``x`` to ``device`` once if it fits; otherwise leave it where it is.

    Moving the whole feature matrix once avoids a host-to-device copy of every
    mini-batch in every epoch; if the accelerator is out of memory the caller
    streams mini-batches from host memory instead (same result, slower).
    """
    device = torch.device(device)
    if x.device == device:
        return x
    try:
        return x.to(device)
    except torch.OutOfMemoryError:
        return x


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu"):
    """Seed torch's global RNGs for the block and restore them after.

    The probes draw the linear layer's initialisation, the mini-batch order
    and (through kornia) the crop/flip parameters from the global RNG; forking
    it makes a probe deterministic given ``seed`` without disturbing the
    caller's random stream (e.g. a training run that probes on the side).
    """
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def standardization(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of ``x`` (float64 accumulation).

    Constant dimensions (std < eps, e.g. a ReLU unit that never fires) get
    std 1: they are then 0 on the training set and do not blow up a test
    sample that happens to differ.
    """
    mean = torch.zeros(x.shape[1], dtype=torch.float64)
    sq = torch.zeros(x.shape[1], dtype=torch.float64)
    for start in range(0, len(x), 4096):  # chunks: no float64 copy of the whole matrix
        c = x[start:start + 4096].to("cpu", torch.float64)
        mean += c.sum(0)
        sq += (c * c).sum(0)
    n = max(len(x), 1)
    mean /= n
    var = (sq / n - mean * mean).clamp_min(0)
    std = var.sqrt()
    std = torch.where(std < eps, torch.ones_like(std), std)
    return mean.float(), std.float()


@torch.no_grad()
def predict(
    model: nn.Module,
    x: torch.Tensor,
    *,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Argmax class of ``model((x - mean) / std)``, batched; int64 CPU tensor."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].to(device, torch.float32)
        if mean is not None:
            xb = (xb - mean.to(device)) / std.to(device)
        out.append(model(xb).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def _accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    # An exact ratio of integers (a float32 mean would print as 0.7300000190734863).
    return int((pred == y.cpu()).sum()) / len(y) if len(y) else float("nan")


def fit_linear(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int,
    epochs: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    standardize: bool = True,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[nn.Linear, torch.Tensor | None, torch.Tensor | None, float]:
    """Fit one linear layer on fixed features with Adam and cross-entropy.

    Standardisation (train mean/std) is applied per mini-batch, so the
    feature matrix (N x 32,768 floats at full width) is never copied.
    Deterministic given ``seed`` (initialisation and mini-batch order).

    Returns ``(layer, mean, std, final_epoch_loss)``; mean/std are ``None``
    when ``standardize`` is false. The layer is in eval mode on ``device``.
    """
    if x.dim() != 2 or len(x) != len(y):
        raise ValueError(f"expected features (N, D) and N labels, got {tuple(x.shape)} and {len(y)}")
    if len(x) == 0:
        raise ValueError("cannot fit a linear probe on zero samples")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    device = torch.device(device)
    y = torch.as_tensor(y, dtype=torch.int64)
    if (y < 0).any() or (y >= num_classes).any():
        raise ValueError(f"labels must lie in 0..{num_classes - 1} (drop unlabelled samples first)")
    mean, std = standardization(x) if standardize else (None, None)
    x_dev = _to_device_or_stay(x, device)
    y_dev = y.to(x_dev.device)
    mean_d = mean.to(device) if mean is not None else None
    std_d = std.to(device) if std is not None else None
    with seeded(seed, device):
        layer = nn.Linear(x.shape[1], num_classes).to(device)
        opt = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=weight_decay)
        layer.train()
        last_loss = math.nan
        for _ in range(epochs):
            perm = torch.randperm(len(x), device=x_dev.device)
            total, count = 0.0, 0
            for idx in perm.split(batch_size):
                xb = x_dev[idx].to(device, torch.float32)
                if mean_d is not None:
                    xb = (xb - mean_d) / std_d
                loss = F.cross_entropy(layer(xb), y_dev[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
            last_loss = total / count
    layer.eval()
    return layer, mean, std, last_loss


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    num_classes: int | None = None,
    epochs: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    standardize: bool = True,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict:
    """The *fast* protocol on fixed features: fit on train, report train and test top-1.

    Returns ``{"train_acc", "test_acc", "train_loss", "epochs", "lr",
    "weight_decay", "batch_size", "dim"}`` (JSON-serialisable).
    """
    train_y = torch.as_tensor(train_y, dtype=torch.int64)
    test_y = torch.as_tensor(test_y, dtype=torch.int64)
    if num_classes is None:
        num_classes = int(max(int(train_y.max()), int(test_y.max()) if len(test_y) else 0)) + 1
    layer, mean, std, loss = fit_linear(
        train_x, train_y, num_classes=num_classes, epochs=epochs, lr=lr, weight_decay=weight_decay,
        batch_size=batch_size, standardize=standardize, seed=seed, device=device,
    )
    train_acc = _accuracy(predict(layer, train_x, mean=mean, std=std, device=device), train_y)
    test_acc = _accuracy(predict(layer, test_x, mean=mean, std=std, device=device), test_y)
    return {"train_acc": train_acc, "test_acc": test_acc, "train_loss": loss, "epochs": epochs, "lr": lr,
            "weight_decay": weight_decay, "batch_size": batch_size, "dim": int(train_x.shape[1])}


class CenterCropPreprocess(nn.Module):
    """uint8 NHWC -> centre crop of side ``size`` -> normalised float NCHW.

    The test-time transform of METHODS 2.5. When ``size`` equals the image
    side (32 px CIFAR-10 probed at 32 px) the crop is the identity.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        from localssl.data.augment import Preprocess

        self.size = int(size)
        self.normalize = Preprocess(mean, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1], x.shape[2]
        if self.size > h or self.size > w:
            raise ValueError(f"centre crop {self.size} is larger than the {h}x{w} images")
        top, left = (h - self.size) // 2, (w - self.size) // 2
        return self.normalize(x[:, top:top + self.size, left:left + self.size, :])


def make_paper_head(dim: int, num_classes: int) -> nn.Linear:
    """The paper's head: one linear layer with bias on the raw features, nothing in front (METHODS 2.5)."""
    return nn.Linear(dim, num_classes, bias=True)


def make_paper_bn_head(dim: int, num_classes: int) -> nn.Sequential:
    """The ``paper-bn`` head (ours): BatchNorm1d without affine + one linear layer (module docstring)."""
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, momentum=None), nn.Linear(dim, num_classes))


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _augmented_probe(
    encoder: nn.Module,
    train_images,
    train_labels,
    test_images,
    test_labels,
    *,
    make_head: Callable[[int, int], nn.Module],
    make_augment: Callable[[int], nn.Module],
    mean: Sequence[float],
    std: Sequence[float],
    grids: int | Sequence[int],
    num_classes: int | None,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    crop_size: int | None,
    feature_batch_size: int,
    test_every_epoch: bool,
    seed: int,
    device: torch.device | str,
    amp: bool,
    progress: bool,
    desc: str,
) -> dict:
    """The loop that ``paper`` and ``paper-bn`` share: augment, encode, step a head; test.

    ``make_augment(crop_size)`` maps uint8 NHWC batches to normalised encoder
    inputs of side ``crop_size``; ``make_head(dim, num_classes)`` builds the
    head (under the seed, so its initialisation is reproducible). Returns the
    measurements; the callers add the description of their protocol.
    """
    device = torch.device(device)
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    train_y = torch.as_tensor(np.asarray(train_labels), dtype=torch.int64)
    test_y = torch.as_tensor(np.asarray(test_labels), dtype=torch.int64)
    if len(train_y) != len(train_images) or len(test_y) != len(test_images):
        raise ValueError("images and labels differ in length")
    if len(train_y) == 0 or len(test_y) == 0:
        raise ValueError("the probe needs train and test samples")
    if (train_y < 0).any() or (test_y < 0).any():
        raise ValueError("probe labels must be >= 0 (drop unlabelled samples first)")
    if num_classes is None:
        num_classes = int(max(int(train_y.max()), int(test_y.max()))) + 1
    h, w, c = train_images.shape[1:]
    crop_size = min(h, w) if crop_size is None else int(crop_size)
    if crop_size > min(h, w):
        raise ValueError(f"crop_size {crop_size} is larger than the {h}x{w} images")
    # A multiple of the optimizer batch, so optimizer batches never straddle chunks.
    feature_batch_size = max(batch_size, (feature_batch_size // batch_size) * batch_size)

    train_aug = make_augment(crop_size).to(device)
    test_pre = CenterCropPreprocess(crop_size, mean, std).to(device)
    n = len(train_y)
    train_seconds = test_seconds = 0.0
    test_curve: list[float] = []
    loss_curve: list[float] = []
    with frozen(encoder, device), seeded(seed, device):
        dims = feature_dims(encoder, (c, crop_size, crop_size), grids)  # fails early on a bad grid
        grids = as_grids(grids, len(dims["per_block"]))
        head = make_head(dims["all"], num_classes).to(device)
        # BatchNorm cannot normalise a batch of one; a plain linear head can
        # (the reference keeps the last, partial batch of every epoch).
        min_batch = 2 if _has_batchnorm(head) else 1
        opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)

        def _eval(images, labels) -> float:
            head.eval()
            correct = 0
            for rows, feats in iter_features(encoder, images, test_pre, grids=grids,
                                             batch_size=feature_batch_size, device=device, amp=amp,
                                             keys=("all",)):
                with torch.no_grad():
                    pred = head(feats["all"]).argmax(1).cpu()
                correct += int((pred == labels[rows]).sum())
            # An exact ratio over samples (the reference averages per-batch
            # accuracies, which weighs a partial last batch like a full one).
            return correct / len(labels)

        epoch_iter = range(epochs)
        if progress:
            from tqdm import tqdm

            epoch_iter = tqdm(epoch_iter, desc=desc, leave=False)
        acc_aug = math.nan
        for epoch in epoch_iter:
            t0 = time.perf_counter()
            head.train()
            perm = torch.randperm(n)
            total_loss, correct, seen = 0.0, 0, 0
            for chunk in perm.split(feature_batch_size):
                batch = train_images[chunk] if isinstance(train_images, torch.Tensor) else train_images[chunk.numpy()]
                x = _as_uint8_tensor(batch).to(device, non_blocking=True)
                yb_all = train_y[chunk].to(device)
                with torch.no_grad():  # fresh crops and flips for every sample, every epoch
                    feats = encode(encoder, train_aug(x), grids, keys=("all",), amp=amp)["all"]
                for sub in torch.arange(len(chunk)).split(batch_size):
                    if len(sub) < min_batch:
                        continue
                    logits = head(feats[sub.to(device)])
                    yb = yb_all[sub.to(device)]
                    loss = F.cross_entropy(logits, yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total_loss += float(loss.detach()) * len(sub)
                    correct += int((logits.argmax(1) == yb).sum())
                    seen += len(sub)
            loss_curve.append(total_loss / max(seen, 1))
            acc_aug = correct / max(seen, 1)
            train_seconds += time.perf_counter() - t0
            if test_every_epoch or epoch == epochs - 1:
                # The reference tests after every epoch and keeps both the
                # final and the best accuracy (METHODS 2.5).
                t0 = time.perf_counter()
                test_curve.append(_eval(test_images, test_y))
                test_seconds += time.perf_counter() - t0
                if progress:
                    epoch_iter.set_postfix(test_acc=f"{test_curve[-1]:.4f}")
        train_acc = _eval(train_images, train_y)
    out = {
        "test_acc": test_curve[-1], "test_acc_final": test_curve[-1], "train_acc": train_acc,
        "train_acc_augmented": acc_aug, "train_loss": loss_curve[-1], "train_loss_curve": loss_curve,
        "epochs": epochs, "reference_epochs": PAPER_EPOCHS, "lr": lr, "batch_size": batch_size,
        "weight_decay": weight_decay, "optimizer": "adam", "crop_size": crop_size, "test_transform": "center_crop",
        "dim": dims["all"], "train_seconds": train_seconds, "test_seconds": test_seconds,
    }
    if test_every_epoch:
        best = max(range(len(test_curve)), key=test_curve.__getitem__)  # the first epoch that reaches the max
        out.update({"test_acc_best": test_curve[best], "best_epoch": best + 1, "test_acc_curve": test_curve})
    return out


def paper_linear_probe(
    encoder: nn.Module,
    train_images,
    train_labels,
    test_images,
    test_labels,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    grids: int | Sequence[int],
    num_classes: int | None = None,
    epochs: int = 30,
    lr: float = PAPER_LR,
    batch_size: int = PAPER_BATCH_SIZE,
    weight_decay: float = 0.0,
    crop_size: int | None = None,
    crop_scale: tuple[float, float] = PAPER_CROP_SCALE,
    crop_ratio: tuple[float, float] = PAPER_CROP_RATIO,
    feature_batch_size: int = 256,
    test_every_epoch: bool = True,
    seed: int = 0,
    device: torch.device | str = "cpu",
    amp: bool = False,
    progress: bool = False,
) -> dict:
    """The paper's linear probe (``paper``, METHODS 2.5) on uint8 (N, H, W, C) images.

    Every epoch, each training image gets a fresh random resized crop
    (area ``crop_scale`` = 0.08-1, aspect ``crop_ratio`` = 3/4-4/3, resized to
    ``crop_size``, default the image side) and a random horizontal flip
    (:class:`~localssl.data.augment.ResizedCropFlip`), goes through the frozen
    encoder, and the concatenated grid-pooled features of all blocks train
    one ``nn.Linear`` (with bias, no normalisation in front) with Adam (lr
    1e-3, weight decay 0, batch 32) and cross-entropy. After every epoch the
    test set (centre crop of side ``crop_size``: the identity when it equals
    the image side) is classified. ``epochs=PAPER_EPOCHS`` (300) is the
    paper's run length.

    ``feature_batch_size`` images are augmented and encoded at once and then
    split into optimizer batches of ``batch_size``: the encoder is frozen and
    augmentation is per-sample, so this is the same computation as encoding
    32 images at a time, just faster.

    Returns (JSON-serialisable; accuracies are fractions in [0, 1]):
    ``test_acc_final`` (after the last epoch), ``test_acc_best`` (max over
    epochs), ``best_epoch`` (1-based, first epoch reaching the max),
    ``test_acc_curve`` (one value per epoch), ``test_acc`` (= final, for
    older readers), ``train_acc`` (centre crops, after training),
    ``train_acc_augmented`` and ``train_loss`` (running values of the last
    epoch), ``train_loss_curve``, and the protocol: ``epochs``,
    ``reference_epochs`` (300), ``lr``, ``batch_size``, ``weight_decay``,
    ``optimizer``, ``crop_size``, ``augmentation``, ``crop_scale``,
    ``crop_ratio``, ``test_transform``, ``normalization`` (``"none"``),
    ``dim``, ``train_seconds``, ``test_seconds``. With
    ``test_every_epoch=False`` the test set is classified once, at the end,
    and the best/curve keys are absent.
    """
    from localssl.data.augment import ResizedCropFlip

    out = _augmented_probe(
        encoder, train_images, train_labels, test_images, test_labels, make_head=make_paper_head,
        make_augment=lambda size: ResizedCropFlip(size, mean, std, scale=crop_scale, ratio=crop_ratio),
        mean=mean, std=std, grids=grids, num_classes=num_classes, epochs=epochs, lr=lr, batch_size=batch_size,
        weight_decay=weight_decay, crop_size=crop_size, feature_batch_size=feature_batch_size,
        test_every_epoch=test_every_epoch, seed=seed, device=device, amp=amp, progress=progress,
        desc="paper probe",
    )
    out.update({"augmentation": "random_resized_crop+hflip", "crop_scale": list(crop_scale),
                "crop_ratio": list(crop_ratio), "normalization": "none"})
    return out


def paper_bn_linear_probe(
    encoder: nn.Module,
    train_images,
    train_labels,
    test_images,
    test_labels,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    grids: int | Sequence[int],
    num_classes: int | None = None,
    epochs: int = 30,
    lr: float = PAPER_LR,
    batch_size: int = PAPER_BATCH_SIZE,
    weight_decay: float = 0.0,
    crop_size: int | None = None,
    padding: int = 4,
    feature_batch_size: int = 256,
    test_every_epoch: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
    amp: bool = False,
    progress: bool = False,
) -> dict:
    """The ``paper-bn`` probe: *ours*, not the paper's (module docstring).

    The loop of :func:`paper_linear_probe` with a BatchNorm1d(affine=False) +
    Linear head and a random crop of side ``crop_size`` after ``padding`` px
    of reflect padding + horizontal flip
    (:class:`~localssl.data.augment.CropFlip`). By default the test set is
    classified once, after training (``test_acc`` = ``test_acc_final``);
    ``test_every_epoch=True`` adds ``test_acc_best``, ``best_epoch`` and
    ``test_acc_curve``. Same keys as :func:`paper_linear_probe` otherwise,
    with ``padding``, ``augmentation`` = ``"pad_crop+hflip"`` and
    ``normalization`` = ``"batchnorm1d_no_affine"``.
    """
    from localssl.data.augment import CropFlip

    out = _augmented_probe(
        encoder, train_images, train_labels, test_images, test_labels, make_head=make_paper_bn_head,
        make_augment=lambda size: CropFlip(size, mean, std, padding=padding),
        mean=mean, std=std, grids=grids, num_classes=num_classes, epochs=epochs, lr=lr, batch_size=batch_size,
        weight_decay=weight_decay, crop_size=crop_size, feature_batch_size=feature_batch_size,
        test_every_epoch=test_every_epoch, seed=seed, device=device, amp=amp, progress=progress,
        desc="paper-bn probe",
    )
    out.update({"augmentation": "pad_crop+hflip", "padding": padding, "normalization": "batchnorm1d_no_affine"})
    return out


__all__ = [
    "PAPER_EPOCHS", "PAPER_BATCH_SIZE", "PAPER_LR", "PAPER_CROP_SCALE", "PAPER_CROP_RATIO", "fit_linear",
    "linear_probe", "paper_linear_probe", "paper_bn_linear_probe", "predict", "standardization",
    "CenterCropPreprocess", "make_paper_head", "make_paper_bn_head", "seeded",
]
