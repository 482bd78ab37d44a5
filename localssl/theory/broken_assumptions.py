"""Theorem 3.1 with broken assumptions (``broken``) and which layout choice moves it (``ablation``).

METHODS 3: default (non-orthogonal) init and ReLU, compared with the
orthogonal linear control, in the authors' layout (:data:`BROKEN_LAYOUTS`,
their weights replayed by :mod:`.authors`) or the earlier ``one-pair`` one;
:func:`broken_ablation` changes one choice of the authors' layout at a time.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from .authors import AuthorsDraw, _AuthorsFitter, authors_draw
from .common import AUTHORS_LAM, AUTHORS_SEED, DEFAULT_LAM, _one_thread, _seed_list, _summ
from .loss import _check_negative
from .network import LinearNet, compare_gradients, init_weights
from .report import TheoryResult
from .views import _batches, make_views, mnist_quadrant_batches, synthetic_views

__all__ = ["ABLATION_DEFAULT", "ABLATION_VARIANTS", "AUTHORS_FIGURES", "BROKEN_FITS", "BROKEN_LAYOUTS",
           "BROKEN_SETTINGS", "DRAWS", "broken", "broken_ablation"]

#: The authors' single-run figures (METHODS 3): MNIST patches, 196 -> 128 x 6,
#: logistic f, mean cosine(local dW^l, BP dW^l) over 32 batches, layers 1..6.
AUTHORS_FIGURES: dict[str, list[float]] = {
    "default": [0.250, 0.313, 0.403, 0.552, 0.711, 1.000],
    "relu-orthogonal": [0.198, 0.373, 0.506, 0.607, 0.670, 1.000],
}


BROKEN_SETTINGS = {
    # name: (init, relu)
    "orthogonal": ("orthogonal", False),
    "default": ("default", False),
    "relu-orthogonal": ("orthogonal", True),
    "relu-default": ("default", True),
}

#: Presets of :func:`broken` (METHODS 3). ``authors``: both columns of every
#: image (a batch of bs images = 2 bs pairs), L2 0.005 per B, the next row of
#: the projected batch as negative, the BP model's weights in the authors'
#: draw order. ``one-pair``: our earlier setting (one pair per image, the
#: columns alternating, L2 0.01 per B, negative scored with the context's B,
#: plain float64 init).
BROKEN_LAYOUTS: dict[str, dict[str, Any]] = {
    "authors": dict(columns="both", lam=AUTHORS_LAM, negative="projected", draw="authors"),
    "one-pair": dict(columns="alternate", lam=DEFAULT_LAM, negative="context-b", draw="plain"),
}
#: Where the weights of :func:`broken` come from (see :func:`authors_draw`).
DRAWS = ("authors", "authors-layerwise", "plain")
BROKEN_FITS = ("newton", "lbfgs", "lbfgs32")


def _broken_weights(widths: Sequence[int], init: str, seed: int, draw: str) -> tuple[list[Tensor], AuthorsDraw | None]:
    if draw == "plain":
        return init_weights(widths, init, seed), None
    if draw not in DRAWS:
        raise ValueError(f"unknown draw {draw!r}; valid: {', '.join(DRAWS)}")
    d = authors_draw(widths, init, seed)
    return (d.bp if draw == "authors" else d.layerwise), d


def _broken_batches(mnist_dir: str | Path | None, columns: str, n_batches: int, batch_size: int, dim: int,
                    preprocess: str) -> tuple[list[Tensor], str]:
    if columns == "both":
        if mnist_dir is not None:
            return (mnist_quadrant_batches(mnist_dir, n_batches, batch_size, preprocess=preprocess),
                    f"MNIST quadrants ({n_batches * batch_size} train images; a batch stacks "
                    f"[TL x {batch_size}, TR x {batch_size} | BL x {batch_size}, BR x {batch_size}]: "
                    f"{2 * batch_size} pairs; preprocess={preprocess})")
        v1, v2 = synthetic_views(2 * n_batches * batch_size, dim)
        return (list(_batches(v1, v2, 2 * batch_size)),
                f"synthetic Gaussian views ({2 * batch_size} pairs per batch, dim={dim}, noise 0.5, data seed 0)")
    v1, v2, data = make_views(mnist_dir=mnist_dir, n_samples=n_batches * batch_size, dim=dim,
                              preprocess=preprocess, columns=columns)
    return list(_batches(v1, v2, batch_size)), data


def _broken_run(net: LinearNet, batches: Sequence[Tensor], fitter: Any, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per batch and layer: cosine(local, BP) and |dW_bp|."""
    cos, norms = [], []
    for x in batches:
        errs = compare_gradients(net, x, fitter=fitter, **kw).errors()
        cos.append([e["cosine"] for e in errs])
        norms.append([e["norm_bp"] for e in errs])
    return np.array(cos), np.array(norms)


@_one_thread
def broken(*, f: str = "logistic", seeds: int | Sequence[int] = 5, mnist_dir: str | Path | None = None,
           n_batches: int | None = None, batch_size: int = 32, width: int | None = None, depth: int = 6,
           in_dim: int | None = None, layout: str = "authors", lam: float | None = None,
           negative: str | None = None, columns: str | None = None, draw: str | None = None,
           authors_seed: int | None = AUTHORS_SEED, shared_b: bool = False,
           settings: Sequence[str] = tuple(BROKEN_SETTINGS), preprocess: str = "normalize",
           fit: str = "newton") -> TheoryResult:
    """Theorem 3.1 with broken assumptions: default init, ReLU (orthogonal / default init).

    ``layout`` (:data:`BROKEN_LAYOUTS`): ``"authors"`` (default: their
    experiment as read in their scripts, METHODS 3) or ``"one-pair"``;
    ``lam`` (per B), ``negative``, ``columns`` (``"both"`` or one pair per
    image: ``"alternate"``, ``"left"``, ``"right"``) and ``draw``
    (:data:`DRAWS`) override single choices of the layout. ``batch_size``
    is images per batch (2 pairs each with ``columns="both"``).
    ``fit``: ``"newton"`` (exact B), ``"lbfgs"`` (float64, from B = 0) or
    ``"lbfgs32"`` (the authors' warm-started float32 L-BFGS, 3 refits).

    Per setting and layer: cosine(local dW^l, BP dW^l) averaged over batches,
    then mean and std over the init seeds ``seeds`` (``cosine_mean``,
    ``cosine_std_seeds``), the same for ``authors_seed`` alone
    (``cosine_seed42``: the authors' single run), and the mean over seeds of
    the std over batches. ``orthogonal`` (linear) is the control where the
    theorem holds. With ``mnist_dir``: 32 batches, 196 -> 128 x 6, and the
    authors' figures as reference; otherwise synthetic 64-d views.
    """
    t0 = time.perf_counter()
    if layout not in BROKEN_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(BROKEN_LAYOUTS)}")
    if fit not in BROKEN_FITS:
        raise ValueError(f"unknown fit {fit!r}; valid: {', '.join(BROKEN_FITS)}")
    lay = dict(BROKEN_LAYOUTS[layout])
    for key, val in dict(lam=lam, negative=negative, columns=columns, draw=draw).items():
        if val is not None:
            lay[key] = val
    _check_negative(lay["negative"])
    if lay["draw"] not in DRAWS:
        raise ValueError(f"unknown draw {lay['draw']!r}; valid: {', '.join(DRAWS)}")
    unknown = [s for s in settings if s not in BROKEN_SETTINGS]
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; valid: {', '.join(BROKEN_SETTINGS)}")
    seed_list = _seed_list(seeds)
    if not seed_list and authors_seed is None:
        raise ValueError("broken needs init seeds (seeds >= 1) or authors_seed")
    if mnist_dir is not None:
        width, in_dim, n_batches = width or 128, in_dim or 196, n_batches or 32
    else:
        width, n_batches = width or 64, n_batches or 8
        in_dim = in_dim or width
    batches, data = _broken_batches(mnist_dir, lay["columns"], n_batches, batch_size, in_dim, preprocess)
    widths = [in_dim] + [width] * depth
    res = TheoryResult("broken", primary="cosine_mean",
                       config=dict(f=f, layout=layout, seeds=seed_list, authors_seed=authors_seed,
                                   n_batches=n_batches, batch_size=batch_size,
                                   pairs_per_batch=batches[0].shape[0] // 2, widths=widths, lam=lay["lam"],
                                   negative=lay["negative"], draw=lay["draw"], shared_b=shared_b, fit=fit,
                                   data=data))
    kw = dict(f=f, lam=lay["lam"], negative=lay["negative"], shared_b=shared_b,
              fit="newton" if fit == "lbfgs32" else fit)
    seed42 = f"cosine_seed{authors_seed}"
    if authors_seed is not None:
        res.secondary.append(seed42)
    for name in settings:
        init, relu = BROKEN_SETTINGS[name]
        runs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for seed in dict.fromkeys(seed_list + ([authors_seed] if authors_seed is not None else [])):
            weights, drawn = _broken_weights(widths, init, seed, lay["draw"])
            fitter = (_AuthorsFitter(drawn, widths, f=f, lam=lay["lam"], negative=lay["negative"], shared=shared_b)
                      if fit == "lbfgs32" else None)
            runs[seed] = _broken_run(LinearNet(weights, relu=relu), batches, fitter, **kw)
        if seed_list:
            per_seed = [runs[s][0].mean(0) for s in seed_list]
            m, s = _summ(per_seed)
            res.add(name, "cosine_mean", m)
            res.add(name, "cosine_std_seeds", s)
        if authors_seed is not None:
            res.add(name, seed42, runs[authors_seed][0].mean(0))
        used = seed_list or [authors_seed]
        res.add(name, "cosine_std_batches", np.mean([runs[s][0].std(0) for s in used], 0))
        res.add(name, "median|dW_bp|", np.median([np.median(runs[s][1], 0) for s in used], 0))
        if len(seed_list) > 1:
            res.per_seed[name] = [list(map(float, runs[s][0].mean(0))) for s in seed_list]
    if mnist_dir is not None and depth == 6:
        res.reference = {k: v for k, v in AUTHORS_FIGURES.items() if k in settings}
    if lay["columns"] == "both":
        res.notes.append("Both columns of every image: row i's positive is the patch below it, its negative "
                         "the next row of the batch (wrapping at the end).")
    res.notes.append(f"negative={lay['negative']}: " + (
        "the next row of the *projected* batch (B_{g(i+1)}' z_{i+1}) . c_i, the authors'"
        if lay["negative"] == "projected" else "z_{i+1} . (B_{g(i)} c_i), scored with the context's B"))
    res.notes.append({"authors": "W = the authors' BP model's initial weights (they freeze W; its '3 epochs' "
                                 "refit B only), replayed from torch.manual_seed(seed) in their draw order.",
                      "authors-layerwise": "W = the authors' layerwise model's initial weights (drawn first "
                                           "from the seed; they overwrite them with the BP model's).",
                      "plain": "W = init_weights(seed) in float64."}[lay["draw"]])
    res.notes.append("ReLU is applied at every layer, including the top. Default init = nn.Linear's "
                     "kaiming-uniform U(-1/sqrt(fan_in), 1/sqrt(fan_in)).")
    if fit == "lbfgs32":
        res.notes.append("fit=lbfgs32: B fitted as the authors run it (float32 L-BFGS, default tolerances, "
                         "warm-started, 3 refits per batch); gradients then compared in float64.")
    res.runtime_s = time.perf_counter() - t0
    return res


#: Variants of :func:`broken_ablation`: one choice of the ``authors`` layout changed at a time.
ABLATION_VARIANTS: dict[str, dict[str, Any]] = {
    "authors": {},
    "lam=0.01": dict(lam=DEFAULT_LAM),
    "neg=context-b": dict(negative="context-b"),
    "one-pair/image": dict(columns="alternate"),
    "one-pair layout": dict(layout="one-pair"),
    "draw=plain": dict(draw="plain"),
    "draw=layerwise": dict(draw="authors-layerwise"),
}
#: The variants :func:`broken_ablation` runs by default (the draws only reshuffle W: same distribution).
ABLATION_DEFAULT = ("authors", "lam=0.01", "neg=context-b", "one-pair/image", "one-pair layout")


@_one_thread
def broken_ablation(*, f: str = "logistic", seeds: int | Sequence[int] = 5, mnist_dir: str | Path | None = None,
                    n_batches: int | None = None, settings: Sequence[str] = ("default", "relu-orthogonal"),
                    variants: Sequence[str] = ABLATION_DEFAULT, lbfgs32: bool = True,
                    preprocess: str = "normalize") -> TheoryResult:
    """Which choice of the authors' layout moves :func:`broken`'s cosines, and by how much.

    Each variant changes one choice of ``layout="authors"``
    (:data:`ABLATION_VARIANTS`); rows ``"<setting> <variant>"`` hold
    ``cosine_mean`` / ``cosine_std_seeds`` over ``seeds`` and
    ``cosine_seed42``. With ``lbfgs32`` a last row fits B as the authors run
    it (float32 L-BFGS, warm-started, 3 refits), for seed 42 only (it is
    ~15x slower than the exact fit). About 5 minutes on one core.
    """
    unknown = [v for v in variants if v not in ABLATION_VARIANTS]
    if unknown:
        raise ValueError(f"unknown ablation variant(s) {unknown}; valid: {', '.join(ABLATION_VARIANTS)}")
    t0 = time.perf_counter()
    res = TheoryResult("ablation", primary="cosine_mean", config=dict(f=f, seeds=_seed_list(seeds)))
    res.secondary.append(f"cosine_seed{AUTHORS_SEED}")
    runs = [(v, ABLATION_VARIANTS[v], seeds) for v in variants]
    if lbfgs32:
        runs.append(("fit=lbfgs32", dict(fit="lbfgs32"), []))
    res.config["variants"] = {}
    for name, over, sd in runs:
        r = broken(f=f, seeds=sd, mnist_dir=mnist_dir, n_batches=n_batches, settings=settings,
                   preprocess=preprocess, **over)
        for setting in settings:
            for metric, vals in r.metrics[setting].items():
                if metric in ("cosine_mean", "cosine_std_seeds", f"cosine_seed{AUTHORS_SEED}"):
                    res.add(f"{setting} {name}", metric, vals)
            if setting in r.reference and name == "authors":
                res.reference[f"{setting} {name}"] = r.reference[setting]
        res.config.setdefault("variants", {})[name] = over
        if name == "authors":
            res.config["authors_layout"] = {k: r.config[k] for k in ("lam", "negative", "draw", "fit", "data")}
    res.notes.append("Each row changes one choice of the authors' layout (config: variants); 'one-pair "
                     "layout' changes all of them (our earlier default); fit=lbfgs32 is for seed 42 only.")
    res.runtime_s = time.perf_counter() - t0
    return res
