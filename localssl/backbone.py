"""A run's trained encoder as a backbone for use elsewhere: ``localssl.load_encoder(run_dir)``.

The encoder comes back as the `BlockEncoder` that trained: ``encoder(x)``
returns every block's output (a local rule's blocks are each a usable
feature level), ``encoder.pooled(x)`` the last block's output averaged over
positions (N, C), and ``encoder.preprocessing`` what ``x`` must be (image
size, channels, mean, std; ``encoder.preprocessing(images_uint8_nhwc)``
applies it). Frozen by default (``eval()``, no gradients), as for linear
probes and feature extraction; ``trainable=True`` leaves it in train mode
with gradients on, for fine-tuning.

    import localssl
    enc = localssl.load_encoder("runs/c10-loco")
    x = enc.preprocessing(images)        # uint8 (N, 32, 32, 3) -> normalised float (N, 3, 32, 32)
    feats = enc.pooled(x)                # (N, 512) for ResNet-18 at width 1
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from localssl.engine.checkpoint import CheckpointError, RunEncoder, read_run_encoder
from localssl.models import BlockEncoder, Preprocessing


def run_preprocessing(run: RunEncoder) -> Preprocessing:
    """The input the run's encoder was trained on, from its config and its checkpoint's ``data`` entry.

    The image size is the training images' (recorded in the checkpoint), else
    the run's ``resize``, else the data set's published size; mean/std are
    the run's saved normalisation, else the data set's published values.
    """
    from localssl.data import dataset_spec

    cfg = run.config
    try:
        spec = dataset_spec(cfg.dataset)
    except KeyError:  # a data set this version does not know: the run's own fields must say everything
        spec = None
    mean = cfg.mean if cfg.mean else (spec.mean if spec else None)
    std = cfg.std if cfg.std else (spec.std if spec else None)
    if mean is None or std is None:
        raise CheckpointError(f"{run.path}: entry 'config' records no mean/std and {cfg.dataset!r} has no published "
                              "ones: the encoder's preprocessing is unknown")
    size = _image_size(run.data, run.path)
    if size is None:
        size = cfg.resize if cfg.resize is not None else (spec.image_size if spec else None)
    try:
        return Preprocessing(image_size=size, channels=len(mean), mean=tuple(float(m) for m in mean),
                             std=tuple(float(s) for s in std))
    except ValueError as e:
        raise CheckpointError(f"{run.path}: entry 'config': {e}") from None


def _image_size(data: dict[str, Any] | None, path: Path) -> int | None:
    """The side of the training images in the checkpoint's ``data`` entry (``image_shape`` = H, W, C)."""
    if not data or "image_shape" not in data:
        return None
    shape = data["image_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
        raise CheckpointError(f"{path}: entry 'data': image_shape must be [H, W, C] positive integers, got {shape!r}")
    h, w, _ = shape
    return h if h == w else None  # non-square images: no one side to state


def load_encoder(run_dir: str | Path, checkpoint: str | Path | None = None, trainable: bool = False,
                 device: str = "cpu") -> BlockEncoder:
    """The trained encoder of run folder ``run_dir`` (its ``checkpoint.pt``, or ``checkpoint``).

    Frozen unless ``trainable``: ``eval()`` and ``requires_grad_(False)``.
    ``encoder(x)`` returns every block's output, ``encoder.pooled(x)`` the
    globally pooled last block (N, C), ``encoder.preprocessing`` the input it
    expects (`Preprocessing`). A damaged or mismatched checkpoint is a
    `CheckpointError` naming the file and the entry.
    """
    run = read_run_encoder(run_dir, checkpoint, device)
    return as_backbone(run.encoder, run_preprocessing(run), trainable)


def as_backbone(encoder: BlockEncoder, preprocessing: Preprocessing, trainable: bool) -> BlockEncoder:
    """``encoder`` frozen (eval, no gradients) or trainable (train mode, gradients), with its preprocessing."""
    encoder.preprocessing = preprocessing
    encoder.train(trainable)
    encoder.requires_grad_(trainable)
    return encoder


__all__ = ["as_backbone", "load_encoder", "run_preprocessing"]
