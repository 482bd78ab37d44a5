"""Linear probes on a frozen encoder: the fast protocol and the paper's (METHODS 2.5).

*Fast* protocol (:func:`linear_probe`): features are extracted once, without
augmentation, standardised with the training mean and std, and one linear
layer is fitted with Adam and cross-entropy. Cheap enough to run after every
pre-training run and on the random-init baseline; it is the number to use
for comparing rules quickly, not the number to compare with the paper.

*Paper* protocol (:func:`paper_linear_probe`), as in METHODS 2.5: frozen
encoder in eval mode; features = every block average-pooled to its grid and
concatenated (32,768 dims for VGG-6 at full width); one linear layer; Adam,
lr 1e-3, batch 32, 300 epochs in the paper (``PAPER_EPOCHS``; the default here
is lower because that is days of compute on a CPU); random crop + horizontal
flip (:class:`~localssl.data.augment.CropFlip`) applied afresh to the uint8
images every epoch, so the features go through the frozen encoder again each
epoch; test on a centre crop.

Feature normalisation in the paper protocol *(inferred: the paper does not
say)*: a ``BatchNorm1d`` without affine parameters in front of the linear
layer (as in MAE's linear probing). The concatenated features mix layers
whose scales differ by orders of magnitude, and Adam at lr 1e-3 on raw
features would mostly fit the largest layers. Batch statistics follow the
augmented features the layer is trained on, and need no extra pass over the
data. The running statistics use a cumulative average (``momentum=None``):
the encoder is frozen, so the feature distribution does not drift and an
equal-weight average over all training batches is the best estimate; they
normalise the test features.

All accuracies are fractions in [0, 1].
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence

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


def make_paper_head(dim: int, num_classes: int) -> nn.Sequential:
    """BatchNorm1d without affine (see the module docstring) + one linear layer."""
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, momentum=None), nn.Linear(dim, num_classes))


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
    padding: int = 4,
    feature_batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str = "cpu",
    amp: bool = False,
    progress: bool = False,
) -> dict:
    """The paper's linear probe (METHODS 2.5) on uint8 (N, H, W, C) images.

    Every epoch, each training image gets a fresh random crop of side
    ``crop_size`` (default: the image side; after ``padding`` px of reflect
    padding) and a random horizontal flip, goes through the frozen encoder,
    and the concatenated grid-pooled features of all blocks train a
    BatchNorm1d(affine=False) + Linear head with Adam (lr 1e-3, batch 32).
    Test images are centre-cropped to ``crop_size``. ``epochs=PAPER_EPOCHS``
    (300) reproduces the paper.

    ``feature_batch_size`` images are augmented and encoded at once and then
    split into optimizer batches of ``batch_size``: the encoder is frozen and
    augmentation is per-sample, so this is the same computation as encoding
    32 images at a time, just faster.

    Returns ``{"train_acc", "test_acc", "train_acc_augmented", "train_loss",
    "epochs", ...}``: ``train_acc`` is measured on centre crops after
    training, ``train_acc_augmented`` is the running accuracy of the last
    epoch on the augmented batches.
    """
    from localssl.data.augment import CropFlip

    device = torch.device(device)
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    train_y = torch.as_tensor(np.asarray(train_labels), dtype=torch.int64)
    test_y = torch.as_tensor(np.asarray(test_labels), dtype=torch.int64)
    if len(train_y) != len(train_images) or len(test_y) != len(test_images):
        raise ValueError("images and labels differ in length")
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

    train_aug = CropFlip(crop_size, mean, std, padding=padding).to(device)
    test_pre = CenterCropPreprocess(crop_size, mean, std).to(device)
    n = len(train_y)
    t0 = time.perf_counter()
    with frozen(encoder, device), seeded(seed, device):
        dims = feature_dims(encoder, (c, crop_size, crop_size), grids)  # fails early on a bad grid
        grids = as_grids(grids, len(dims["per_block"]))
        head = make_paper_head(dims["all"], num_classes).to(device)
        opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
        epoch_iter = range(epochs)
        if progress:
            from tqdm import tqdm

            epoch_iter = tqdm(epoch_iter, desc="paper probe", leave=False)
        loss_avg = acc_aug = math.nan
        for _ in epoch_iter:
            head.train()
            perm = torch.randperm(n)
            total_loss, correct, seen = 0.0, 0, 0
            for chunk in perm.split(feature_batch_size):
                batch = train_images[chunk] if isinstance(train_images, torch.Tensor) else train_images[chunk.numpy()]
                x = _as_uint8_tensor(batch).to(device, non_blocking=True)
                yb_all = train_y[chunk].to(device)
                with torch.no_grad():
                    feats = encode(encoder, train_aug(x), grids, keys=("all",), amp=amp)["all"]
                for sub in torch.arange(len(chunk)).split(batch_size):
                    if len(sub) < 2:
                        continue  # BatchNorm cannot normalise a batch of one
                    logits = head(feats[sub.to(device)])
                    yb = yb_all[sub.to(device)]
                    loss = F.cross_entropy(logits, yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total_loss += float(loss.detach()) * len(sub)
                    correct += int((logits.argmax(1) == yb).sum())
                    seen += len(sub)
            loss_avg = total_loss / max(seen, 1)
            acc_aug = correct / max(seen, 1)
        train_seconds = time.perf_counter() - t0

        head.eval()

        def _eval(images, labels) -> float:
            correct = 0
            for rows, feats in iter_features(encoder, images, test_pre, grids=grids,
                                             batch_size=feature_batch_size, device=device, amp=amp,
                                             keys=("all",)):
                with torch.no_grad():
                    pred = head(feats["all"]).argmax(1).cpu()
                correct += int((pred == labels[rows]).sum())
            return correct / max(len(labels), 1)

        test_acc = _eval(test_images, test_y)
        train_acc = _eval(train_images, train_y)
    return {
        "train_acc": train_acc, "test_acc": test_acc, "train_acc_augmented": acc_aug, "train_loss": loss_avg,
        "epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay,
        "crop_size": crop_size, "padding": padding, "normalization": "batchnorm1d_no_affine",
        "dim": dims["all"], "train_seconds": train_seconds,
    }


__all__ = [
    "PAPER_EPOCHS", "PAPER_BATCH_SIZE", "PAPER_LR", "fit_linear", "linear_probe", "paper_linear_probe",
    "predict", "standardization", "CenterCropPreprocess", "make_paper_head", "seeded",
]
