"""localssl: local self-supervised learning rules next to end-to-end BP-SSL.

Every layer (or block) learns from its own loss and no gradient crosses a
block; the same trainer runs end-to-end backprop baselines on equal terms.

A trained backbone, for use elsewhere:
- ``localssl.load_encoder(run_dir)``: the run's encoder, frozen (or
  ``trainable=True``), with ``encoder.preprocessing`` and ``encoder.pooled``
  (`localssl.backbone`);
- ``localssl.load_exported(folder)``: the same module from a folder that
  ``localssl export RUN`` wrote (safetensors + JSON, `localssl.export`).
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Imported on first use: `import localssl` stays light (no torch), as the command line's start needs.
_LAZY = {"load_encoder": "localssl.backbone", "load_exported": "localssl.export", "export_run": "localssl.export"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'localssl' has no attribute {name!r}")
