"""Checkpoints: everything needed to continue, written atomically.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts,
so it loads with ``torch.load(weights_only=True)``: no pickled objects, no
code runs when a user opens one. It is written to a temporary file in the
same folder and renamed over the old one, so a crash mid-write never leaves a
broken checkpoint behind.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from localssl.atomic import atomic_file

CHECKPOINT = "checkpoint.pt"
ENCODER = "encoder.pt"


class CheckpointError(ValueError):
    pass


def save_atomic(obj: Any, path: str | Path) -> None:
    with atomic_file(path) as fh:
        torch.save(obj, fh)


def read_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, record) of a checkpoint; the record says which checkpoint it was.

    ``record = {"file", "step", "sha256"}`` identifies the exact bytes that
    were loaded: a probe stores it so that ``localssl report`` can tell
    whether a result still describes the run (a resumed or retrained run has
    another checkpoint). Hash and load read the same open file, so a trainer
    replacing the checkpoint meanwhile (an atomic rename: a new inode) cannot
    make them disagree.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    with open(path, "rb") as fh:
        digest = _sha256(fh)
        fh.seek(0)
        try:
            state = torch.load(fh, map_location=map_location, weights_only=True)
        except Exception as e:  # torch raises several types for a damaged file
            raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "encoder" not in state:
        raise CheckpointError(f"{path} is not a localssl checkpoint (no 'encoder' entry)")
    return state, {"file": path.name, "step": state.get("step"), "sha256": digest}


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return read_checkpoint(path, map_location)[0]


def _sha256(fh: Any) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def checkpoint_sha256(path: str | Path) -> str:
    """SHA-256 of a checkpoint file, as `read_checkpoint` records it."""
    with open(path, "rb") as fh:
        return _sha256(fh)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_encoder_from_run(run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu"):
    """(encoder with trained weights, TrainConfig) of a run folder."""
    encoder, cfg, _ = read_encoder_from_run(run_dir, checkpoint, device)
    return encoder, cfg


def read_encoder_from_run(run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu"):
    """(encoder, TrainConfig, checkpoint record: see `read_checkpoint`) of a run folder."""
    from localssl.config import TrainConfig, from_dict
    from localssl.data import dataset_spec
    from localssl.models import build_encoder

    run_dir = Path(run_dir)
    path = Path(checkpoint) if checkpoint is not None else run_dir / CHECKPOINT
    state, record = read_checkpoint(path, map_location=device)
    cfg = from_dict(TrainConfig, state["config"])
    # The saved normalisation has one value per input channel (imagefolder: 1 for grayscale data).
    channels = len(cfg.mean) if cfg.mean else dataset_spec(cfg.dataset).channels
    encoder = build_encoder(cfg.encoder, cfg.width, channels, cfg.encoder_options)  # saved resolved by train
    encoder.load_state_dict(state["encoder"])
    return encoder.to(device), cfg, record
