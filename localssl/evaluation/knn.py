"""Weighted k-nearest-neighbour classifier on frozen features (METHODS 2.5).

The InstDisc protocol (Wu, Xiong, Yu, Lin 2018, "Unsupervised Feature
Learning via Non-Parametric Instance Discrimination", section 3.4), used by
most SSL papers as a training-free complement to the linear probe:
features are L2-normalised, the k = 200 training samples with the highest
cosine similarity s_i to a test sample vote for their class with weight
exp(s_i / T), T = 0.1, and the class with the largest summed weight wins.

Memory stays bounded: test samples are processed in chunks, so only a
(chunk, N_train) similarity matrix exists at a time, and the training
features are not copied to normalise them (their norms are divided out of
each chunk's similarities instead).
"""
from __future__ import annotations

import torch

from localssl.evaluation.linear import _to_device_or_stay

KNN_K = 200
KNN_TEMPERATURE = 0.1


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    *,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    num_classes: int | None = None,
    chunk_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Predicted class of every test sample, as an int64 CPU tensor (N_test,).

    ``k`` is capped at the number of training samples. Ties in the vote go to
    the lowest class index (``argmax``), which is deterministic.
    """
    if train_features.dim() != 2 or test_features.dim() != 2:
        raise ValueError("features must be 2-D (N, D)")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train and test features differ in dimension: {train_features.shape[1]} vs {test_features.shape[1]}"
        )
    if len(train_features) != len(train_labels):
        raise ValueError(f"{len(train_features)} train features but {len(train_labels)} labels")
    if len(train_features) == 0:
        raise ValueError("kNN needs at least one training sample")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = torch.device(device)
    labels = torch.as_tensor(train_labels, dtype=torch.int64).to(device)
    if (labels < 0).any():
        raise ValueError("kNN training labels must be >= 0 (drop unlabelled samples first)")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    k = min(k, len(labels))

    train = _to_device_or_stay(train_features.float(), device)
    # 1 / ||x_i||, clamped so that an all-zero feature (a dead ReLU unit
    # everywhere) gives similarity 0 rather than NaN.
    inv_norm = train.norm(dim=1).clamp_min(1e-12).reciprocal().to(device)
    preds = []
    for start in range(0, len(test_features), chunk_size):
        q = test_features[start:start + chunk_size].to(device, torch.float32)
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sim = (q @ train.to(device).T) * inv_norm  # cosine similarity (chunk, N_train)
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(q), num_classes, device=device)
        votes.scatter_add_(1, labels[top_idx], weights)
        preds.append(votes.argmax(dim=1).cpu())
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    num_classes: int | None = None,
    chunk_size: int = 256,
    device: torch.device | str = "cpu",
) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of the weighted kNN classifier."""
    test_labels = torch.as_tensor(test_labels, dtype=torch.int64)
    if num_classes is None:
        num_classes = int(max(int(torch.as_tensor(train_labels).max()), int(test_labels.max()))) + 1
    pred = knn_predict(train_features, train_labels, test_features, k=k, temperature=temperature,
                       num_classes=num_classes, chunk_size=chunk_size, device=device)
    return int((pred == test_labels).sum()) / len(pred) if len(pred) else float("nan")
