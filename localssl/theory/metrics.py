"""Gradient comparison metrics (METHODS 3, "two practical notes").

Gradients in the broken-assumption experiments can have norms around 1e-8
(and smaller: ReLU with default init at depth). ``F.cosine_similarity``
clamps each norm at eps = 1e-8, which turns two *equal* tiny vectors into a
cosine far below 1. :func:`cosine` therefore computes dot / (|a| |b|) in
float64 with no clamp, after rescaling both vectors by their largest
element so that neither underflow nor overflow can occur, and handles exact
zero vectors explicitly.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["cosine", "grad_errors"]


def _unit_scale(v: Tensor) -> tuple[Tensor, float]:
    v = v.detach().reshape(-1).to(torch.float64)
    m = float(v.abs().max()) if v.numel() else 0.0
    return (v / m if m > 0 else v), m


def _norm(v: Tensor) -> float:
    """Euclidean norm in float64 that neither underflows nor overflows (scaled by max-abs)."""
    u, m = _unit_scale(v)
    return m * float(torch.linalg.vector_norm(u)) if m > 0 else 0.0


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two tensors (flattened), exact for any scale.

    Computed in float64 as ``<a, b> / (|a| |b|)`` after dividing each vector by
    its max-abs entry (which leaves the cosine unchanged), so vectors of norm
    1e-9 or 1e-200 give the same answer as unit vectors. Conventions for exact
    zeros: both zero -> 1.0 (identical); exactly one zero -> 0.0.
    """
    if a.numel() != b.numel():
        raise ValueError(f"cosine: sizes differ ({a.numel()} vs {b.numel()})")
    ua, ma = _unit_scale(a)
    ub, mb = _unit_scale(b)
    if ma == 0.0 and mb == 0.0:
        return 1.0
    if ma == 0.0 or mb == 0.0:
        return 0.0
    if not (math.isfinite(ma) and math.isfinite(mb)):
        return float("nan")
    c = float(torch.dot(ua, ub) / (torch.linalg.vector_norm(ua) * torch.linalg.vector_norm(ub)))
    return max(-1.0, min(1.0, c))


def grad_errors(local: Tensor, bp: Tensor) -> dict[str, float]:
    """Compare a local weight gradient with the BP one (METHODS 3, Theorem 3.1 check).

    Returns
    - ``cosine``: :func:`cosine` of the flattened gradients;
    - ``max_rel_err``: max over elements of ``|local - bp| / |bp|``, element by
      element (elements where both are exactly 0 count as 0, where only bp is 0
      as inf);
    - ``max_err_over_max``: ``max |local - bp| / max |bp|`` (robust to
      near-zero BP entries);
    - ``frob_err``: ``|local - bp|_F`` and ``rel_frob_err``: that over ``|bp|_F``;
    - ``norm_local``, ``norm_bp``: Frobenius norms.
    """
    a = local.detach().to(torch.float64)
    b = bp.detach().to(torch.float64)
    diff = (a - b).abs()
    babs = b.abs()
    with torch.no_grad():
        rel = torch.where(babs > 0, diff / babs.clamp_min(torch.finfo(torch.float64).tiny),
                          torch.where(diff > 0, torch.full_like(diff, math.inf), torch.zeros_like(diff)))
    bmax = float(babs.max()) if b.numel() else 0.0
    frob = _norm(a - b)
    nb = _norm(b)
    return {
        "cosine": cosine(a, b),
        "max_rel_err": float(rel.max()) if rel.numel() else 0.0,
        "max_err_over_max": float(diff.max()) / bmax if bmax > 0 else (0.0 if float(diff.max()) == 0 else math.inf),
        "frob_err": frob,
        "rel_frob_err": frob / nb if nb > 0 else (0.0 if frob == 0 else math.inf),
        "norm_local": _norm(a),
        "norm_bp": nb,
    }
