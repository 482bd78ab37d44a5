"""``localssl export RUN``: a run's backbone as one weights file and a small JSON of its architecture.

The folder it writes (default ``RUN/export/``) holds
- ``encoder.safetensors`` (or ``encoder.pt`` with ``--format pt``): the
  encoder's state dict alone, no rule heads, no optimizer state. safetensors
  is a header of names, dtypes and shapes followed by raw bytes, so loading
  one runs no code (a pickle-based ``.pt`` needs ``weights_only=True`` for
  that, which only recent torch versions default to);
- ``encoder.json``: what rebuilds the module (encoder name, width, its
  options, input channels), what it expects (image size, mean, std), what it
  gives (every block's output shape at that size), and where it came from
  (the run's rule and step, the checkpoint's SHA-256, the localssl version;
  the weights file's SHA-256).

`load_exported` rebuilds the module from the JSON and loads the weights,
checking each against the other: a weights file whose bytes, tensor names or
shapes do not match the JSON is refused, naming the file and the key. Both
files are written atomically (temp file + rename), the JSON last, so a
folder with a JSON always has the weights it describes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from localssl.atomic import atomic_file
from localssl.backbone import as_backbone, run_preprocessing
from localssl.engine.checkpoint import checkpoint_sha256, load_weights, read_checkpoint, read_run_encoder, save_atomic
from localssl.models import BlockEncoder, Preprocessing, build_encoder

EXPORT_JSON = "encoder.json"
#: Weights file of each export format.
WEIGHTS = {"safetensors": "encoder.safetensors", "pt": "encoder.pt"}
#: What ``format`` in encoder.json says: a reader of another kind of JSON stops at once.
FORMAT = "localssl-encoder"
#: Version of the JSON's layout; a reader refuses a newer one rather than misread it.
SCHEMA = 1


class ExportError(ValueError):
    """An export folder that cannot be written or read; the message names the file and the key."""


def export_run(run_dir: str | Path, out: str | Path | None = None, checkpoint: str | Path | None = None,
               fmt: str = "safetensors") -> Path:
    """Write the encoder of run ``run_dir`` to ``out`` (default ``run_dir/export``); returns ``out``."""
    from localssl import __version__

    if fmt not in WEIGHTS:
        raise ExportError(f"unknown export format {fmt!r}; valid: {', '.join(WEIGHTS)}")
    run = read_run_encoder(run_dir, checkpoint)
    pre = run_preprocessing(run)
    encoder, cfg = run.encoder, run.config
    size = pre.image_size
    shapes = encoder.feature_shapes((pre.channels, size, size)) if size is not None else None
    # Contiguous CPU copies: safetensors stores raw row-major bytes (a channels_last view would be refused).
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}
    out = Path(out) if out is not None else Path(run_dir) / "export"
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS[fmt]
    if fmt == "safetensors":
        from safetensors.torch import save

        with atomic_file(weights) as fh:
            fh.write(save(tensors, metadata={"format": "pt", "localssl": __version__}))
    else:
        save_atomic(tensors, weights)
    meta = {
        "format": FORMAT,
        "schema": SCHEMA,
        "encoder": cfg.encoder,
        "width": cfg.width,
        "encoder_options": cfg.encoder_options,
        "in_channels": pre.channels,
        "image_size": size,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "preprocessing": pre.steps,
        "block_shapes": [list(s) for s in shapes] if shapes is not None else None,
        "pooled_features": int(shapes[-1][0]) if shapes is not None else None,
        "weights": {"file": weights.name, "format": fmt, "sha256": checkpoint_sha256(weights),
                    "tensors": len(tensors)},
        "rule": cfg.rule,
        "step": run.record["step"],
        "dataset": cfg.dataset,
        "checkpoint": run.record["file"],
        "checkpoint_sha256": run.record["sha256"],
        "localssl_version": __version__,
        "torch_version": str(torch.__version__),
    }
    with atomic_file(out / EXPORT_JSON, "w") as fh:
        fh.write(json.dumps(meta, indent=2) + "\n")
    return out


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# The keys load_exported reads, and what each must hold.
_CHECKS: dict[str, tuple[str, Any]] = {
    "encoder": ("a name", lambda v: isinstance(v, str)),
    "width": ("a number > 0", lambda v: _number(v) and v > 0),
    "encoder_options": ("a mapping or null", lambda v: v is None or isinstance(v, dict)),
    "in_channels": ("an integer >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "image_size": ("an integer >= 1 or null",
                   lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)),
    "mean": ("a list of numbers", lambda v: isinstance(v, list) and all(_number(x) for x in v)),
    "std": ("a list of numbers", lambda v: isinstance(v, list) and all(_number(x) for x in v)),
    "block_shapes": ("a list of [C, H, W] or null", lambda v: v is None or (
        isinstance(v, list) and all(isinstance(s, list) and all(isinstance(d, int) for d in s) for s in v))),
    "weights": ("a mapping with file, format and sha256", lambda v: isinstance(v, dict) and all(
        isinstance(v.get(k), str) for k in ("file", "format", "sha256"))),
}


def read_export_json(folder: str | Path) -> dict[str, Any]:
    """The checked contents of ``folder/encoder.json``; `ExportError` naming the file and the key otherwise."""
    path = Path(folder) / EXPORT_JSON
    if not path.is_file():
        raise ExportError(f"no {EXPORT_JSON} in {folder} (write one with `localssl export RUN --out {folder}`)")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path} is not JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ExportError(f"{path} is not a localssl encoder export (its 'format' is not {FORMAT!r})")
    if not isinstance(meta.get("schema"), int) or meta["schema"] > SCHEMA:
        raise ExportError(f"{path}: key 'schema' is {meta.get('schema')!r}; this localssl reads up to {SCHEMA}")
    for key, (what, ok) in _CHECKS.items():
        if key not in meta:
            raise ExportError(f"{path}: key {key!r} is missing")
        if not ok(meta[key]):
            raise ExportError(f"{path}: key {key!r} must be {what}, got {meta[key]!r}")
    w = meta["weights"]
    if w["format"] not in WEIGHTS:
        raise ExportError(f"{path}: key 'weights.format' is {w['format']!r}; valid: {', '.join(WEIGHTS)}")
    if Path(w["file"]).name != w["file"] or w["file"] in ("", ".", ".."):
        raise ExportError(f"{path}: key 'weights.file' must name a file beside it, got {w['file']!r}")
    return meta


def _read_weights(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    """The tensors of an export's weights file, read without running code."""
    if fmt == "pt":
        return read_checkpoint(path, require=())[0]  # weights_only, every failure one line naming the file
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{path} cannot be read as safetensors: {e}") from None


def load_exported(folder: str | Path, trainable: bool = False, device: str = "cpu") -> BlockEncoder:
    """The encoder of an export folder, rebuilt from its ``encoder.json`` and loaded with its weights.

    The same module as `localssl.load_encoder` gives for the run (frozen
    unless ``trainable``, ``preprocessing`` set). Refused, naming the file
    and the key: a JSON that is not an export or lacks a key; weights whose
    SHA-256 is not the JSON's; tensors whose names or shapes differ from the
    module the JSON describes; block output shapes that differ from the
    JSON's ``block_shapes``.
    """
    meta = read_export_json(folder)
    json_path = Path(folder) / EXPORT_JSON
    w = meta["weights"]
    weights_path = Path(folder) / w["file"]
    if not weights_path.is_file():
        raise ExportError(f"{json_path}: key 'weights.file' names {w['file']!r}, which is not in {folder}")
    digest = checkpoint_sha256(weights_path)
    if digest != w["sha256"]:
        raise ExportError(f"{weights_path} is not the file {json_path.name} describes: its SHA-256 is "
                          f"{digest[:12]}..., key 'weights.sha256' says {w['sha256'][:12]}...")
    try:
        encoder = build_encoder(meta["encoder"], meta["width"], meta["in_channels"], meta["encoder_options"])
        pre = Preprocessing(image_size=meta["image_size"], channels=meta["in_channels"],
                            mean=tuple(float(x) for x in meta["mean"]), std=tuple(float(x) for x in meta["std"]))
    except (KeyError, ValueError) as e:  # an unknown encoder, bad options, mean/std not one per channel
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise ExportError(f"{json_path}: {msg}") from None
    load_weights(encoder, _read_weights(weights_path, w["format"]), weights_path, "encoder",
                 built_from=json_path.name)
    if meta["image_size"] is not None and meta["block_shapes"] is not None:
        size = meta["image_size"]
        built = [list(s) for s in encoder.feature_shapes((meta["in_channels"], size, size))]
        if built != meta["block_shapes"]:
            k = next((i for i, (a, b) in enumerate(zip(built, meta["block_shapes"])) if a != b), min(
                len(built), len(meta["block_shapes"])))
            said = meta["block_shapes"][k] if k < len(meta["block_shapes"]) else "nothing"
            got = built[k] if k < len(built) else "nothing"
            raise ExportError(f"{json_path}: key 'block_shapes' says block {k + 1} outputs {said} at {size}px, "
                              f"but the encoder it describes outputs {got}")
    return as_backbone(encoder.to(device), pre, trainable)


__all__ = ["EXPORT_JSON", "WEIGHTS", "ExportError", "export_run", "load_exported", "read_export_json"]
