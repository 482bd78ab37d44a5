"""Checkpoints: everything needed to continue, written atomically.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts,
so it loads with ``torch.load(weights_only=True)``: no pickled objects, no
code runs when a user opens one. It is written to a temporary file in the
same folder and renamed over the old one, so a crash mid-write never leaves a
broken checkpoint behind. Reading one checks its entries and their types
before anyone uses them, and its tensors against the model its config
builds, so a damaged, foreign or mismatched file is one error naming the file
and the entry.
"""
from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from localssl.atomic import atomic_file

if TYPE_CHECKING:
    from localssl.config import TrainConfig

CHECKPOINT = "checkpoint.pt"
ENCODER = "encoder.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or used; the message names the file and the entry."""


def save_atomic(obj: Any, path: str | Path) -> None:
    with atomic_file(path) as fh:
        torch.save(obj, fh)


# The entries a checkpoint holds and the types they must have: what `load_checkpoint` checks before any
# caller indexes one, so a damaged or foreign file is named with its bad entry, not a bare KeyError.
ENTRY_TYPES: dict[str, type] = {"encoder": dict, "rule": dict, "optimizer": dict, "step": int, "epoch": int,
                                "rng": dict, "config": dict, "env": dict, "data": dict}
_KIND = {dict: "a dict", int: "an integer"}


def _unreadable(e: BaseException) -> str:
    """One line on why torch could not load a file. Its own messages span lines and advise
    ``weights_only=False`` or allow-listing the object, the two things never to do with a file that failed so."""
    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:  # weights-only unpickling met a reference to Python code: the file asks to build an object
        return (f"it asks to build the Python object {found.group(1)}, and a localssl checkpoint holds only tensors, "
                "numbers, strings, lists and dicts: refused, nothing in it was run")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    reason = next((ln for ln in reversed(lines) if "weights_only" not in ln and "documentation" not in ln), "")
    reason = re.split(r"\.\s", reason, maxsplit=1)[0][:200]  # its first sentence: the rest is advice
    return (f"damaged, truncated or not a plain-data PyTorch file ({type(e).__name__}"
            f"{': ' + reason if reason else ''}); nothing in it was run")


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", require: tuple[str, ...] = ("encoder",)
) -> dict[str, Any]:
    """The checkpoint dict at ``path``, loaded with ``weights_only=True`` (no code runs).

    Every entry in ``require`` must be present, and every known entry
    (`ENTRY_TYPES`) has its type; anything else is a `CheckpointError` that
    names the file and the entry.
    """
    return read_checkpoint(path, map_location, require)[0]


def read_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", require: tuple[str, ...] = ("encoder",)
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, record) of a checkpoint, checked as `load_checkpoint` checks it.

    ``record = {"file", "step", "sha256"}`` identifies the exact bytes that
    were loaded: a probe stores it so that ``localssl report`` can tell
    whether a result still describes the run (a resumed or retrained run has
    another checkpoint). Hash and load read the same open file, so a trainer
    replacing the checkpoint meanwhile (an atomic rename: a new inode) cannot
    make them disagree.
    """
    from localssl.config import shown

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:  # what a write that never started leaves; torch says only "EOFError"
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    with open(path, "rb") as fh:
        digest = _sha256(fh)
        fh.seek(0)
        try:
            with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
                warnings.simplefilter("ignore")
                state = torch.load(fh, map_location=map_location, weights_only=True)
        except Exception as e:  # torch raises several types for a damaged file
            raise CheckpointError(f"checkpoint {path} cannot be read: {_unreadable(e)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a localssl checkpoint (it holds a {type(state).__name__}, "
                              "not a dict of entries)")
    missing = [k for k in require if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a complete localssl checkpoint: it has no {missing[0]!r} entry"
                              + (f" (nor {', '.join(map(repr, missing[1:]))})" if missing[1:] else ""))
    for key, kind in ENTRY_TYPES.items():
        value = state.get(key)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise CheckpointError(f"{path}: entry {key!r} must be {_KIND[kind]}, got {shown(value)}")
    if isinstance(state.get("step"), int) and state["step"] < 0:
        raise CheckpointError(f"{path}: entry 'step' must be >= 0, got {state['step']}")
    return state, {"file": path.name, "step": state.get("step"), "sha256": digest}


def _sha256(fh: Any) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def checkpoint_sha256(path: str | Path) -> str:
    """SHA-256 of a checkpoint file, as `read_checkpoint` records it."""
    with open(path, "rb") as fh:
        return _sha256(fh)


def checkpoint_config(state: dict[str, Any], path: str | Path) -> TrainConfig:
    """The `TrainConfig` saved in a checkpoint, its errors prefixed with the file."""
    from localssl.config import ConfigError, TrainConfig, from_dict

    try:
        return from_dict(TrainConfig, state["config"])
    except KeyError:
        raise CheckpointError(f"{path} is not a complete localssl checkpoint: it has no 'config' entry") from None
    except ConfigError as e:
        raise CheckpointError(f"{path}: entry 'config': {e}") from None


def load_weights(module: torch.nn.Module, weights: Any, path: str | Path, entry: str,
                 built_from: str = "the checkpoint's config") -> None:
    """``module.load_state_dict(weights)``, after checking that names and shapes match.

    ``module`` was built from ``built_from`` (the checkpoint's own config, or
    an export's JSON), so a mismatch means the tensors and that description
    disagree; the error names the file, the entry and the first mismatched
    key with both shapes (torch's own lists every key, over many lines).
    """
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path}: entry {entry!r} must map names to tensors")
    own = module.state_dict()
    for key, t in own.items():
        if key not in weights:
            raise CheckpointError(f"{path}: entry {entry!r} has no {key!r}, which the {entry} built from "
                                  f"{built_from} has: the tensors do not match {built_from}")
        if tuple(weights[key].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{path}: entry {entry!r} does not match {built_from}: {key!r} has shape "
                f"{tuple(weights[key].shape)} in the file but {tuple(t.shape)} in the {entry} built from the config"
            )
    extra = [k for k in weights if k not in own]
    if extra:
        raise CheckpointError(f"{path}: entry {entry!r} holds {extra[0]!r}, which the {entry} built from "
                              f"{built_from} does not have: the tensors do not match {built_from}")
    module.load_state_dict(weights)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class RunEncoder:
    """A run's encoder with its trained weights, and what they came from.

    ``record``: the checkpoint's identity (`read_checkpoint`); ``data``: its
    ``data`` entry (the training images' name, shape and fingerprint; None in
    checkpoints of earlier versions).
    """

    encoder: torch.nn.Module
    config: TrainConfig
    record: dict[str, Any]
    data: dict[str, Any] | None
    path: Path


def load_encoder_from_run(run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu"):
    """(encoder with trained weights, TrainConfig) of a run folder."""
    run = read_run_encoder(run_dir, checkpoint, device)
    return run.encoder, run.config


def read_encoder_from_run(run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu"):
    """(encoder, TrainConfig, checkpoint record: see `read_checkpoint`) of a run folder."""
    run = read_run_encoder(run_dir, checkpoint, device)
    return run.encoder, run.config, run.record


def read_run_encoder(run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu") -> RunEncoder:
    """The encoder of a run folder (its ``checkpoint.pt``, or ``checkpoint``), rebuilt from the checkpoint's
    config and loaded with its weights, checked entry by entry; the one reader behind every other."""
    from localssl.data import dataset_spec
    from localssl.models import build_encoder

    run_dir = Path(run_dir)
    path = Path(checkpoint) if checkpoint is not None else run_dir / CHECKPOINT
    state, record = read_checkpoint(path, map_location=device, require=("encoder", "config"))
    cfg = checkpoint_config(state, path)
    try:
        # The saved normalisation has one value per input channel (imagefolder: 1 for grayscale data).
        channels = len(cfg.mean) if cfg.mean else dataset_spec(cfg.dataset).channels
        encoder = build_encoder(cfg.encoder, cfg.width, channels, cfg.encoder_options)
    except (KeyError, ValueError) as e:  # an unknown encoder or data set, an impossible width
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise CheckpointError(f"{path}: entry 'config': {msg}") from None
    load_weights(encoder, state["encoder"], path, "encoder")
    return RunEncoder(encoder.to(device), cfg, record, state.get("data"), path)
