"""Deep linear networks: when does a local rule compute the BP gradient? (METHODS 3)

Everything here runs in float64 on the CPU (the exceptions are named in
:mod:`.authors` and :func:`.fit.fit_b_authors`). This module gathers the
pieces under one name (``localssl.theory.linear``, where ``localssl.cli``
and older code import them from); each lives in the module of its job:

- :mod:`.common`: float64, the default and the authors' L2 on B and seed, one-thread runs;
- :mod:`.loss`: the unified local loss (METHODS 2) and its two negatives;
- :mod:`.fit`: B at its optimum for fixed W (exact Newton, L-BFGS, the authors' float32 fit);
- :mod:`.network`: :class:`LinearNet`, :func:`init_weights` and the local-vs-BP
  gradient comparison (Theorem 3.1's mechanism);
- :mod:`.views`: synthetic Gaussian views, the authors' MNIST patches and batches;
- :mod:`.authors`: the replay of the authors' draw order and warm-started B fits;
- :mod:`.experiments`: ``theorem31``, ``dfb``, ``projection``;
- :mod:`.broken_assumptions`: ``broken`` and its ``ablation``.
"""
from __future__ import annotations

from typing import Any

from .authors import AuthorsDraw, authors_draw
from .broken_assumptions import (
    ABLATION_DEFAULT,
    ABLATION_VARIANTS,
    AUTHORS_FIGURES,
    BROKEN_FITS,
    BROKEN_LAYOUTS,
    BROKEN_SETTINGS,
    DRAWS,
    broken,
    broken_ablation,
)
from .common import AUTHORS_LAM, AUTHORS_SEED, DEFAULT_LAM, DTYPE, single_thread
from .common import _one_thread as _one_thread  # used by .conv
from .common import _seed_list as _seed_list  # used by .conv
from .experiments import dfb, projection, theorem31
from .fit import fit_b, fit_b_authors
from .loss import LOSS_FUNCTIONS, NEGATIVES, fit_objective, other_view, scores, unified_loss
from .network import GradientComparison, LayeredNet, LinearNet, compare_gradients, init_weights
from .views import (
    MNIST_MEAN,
    MNIST_PREPROCESS,
    MNIST_STD,
    make_views,
    mnist_patch_views,
    mnist_quadrant_batches,
    synthetic_views,
)

__all__ = [
    "ABLATION_DEFAULT",
    "ABLATION_VARIANTS",
    "AUTHORS_FIGURES",
    "AUTHORS_LAM",
    "AUTHORS_SEED",
    "BROKEN_FITS",
    "BROKEN_LAYOUTS",
    "BROKEN_SETTINGS",
    "DEFAULT_LAM",
    "DRAWS",
    "DTYPE",
    "LOSS_FUNCTIONS",
    "MNIST_MEAN",
    "MNIST_PREPROCESS",
    "MNIST_STD",
    "NEGATIVES",
    "AuthorsDraw",
    "GradientComparison",
    "LayeredNet",
    "LinearNet",
    "add_theory_parser",
    "authors_draw",
    "broken",
    "broken_ablation",
    "compare_gradients",
    "dfb",
    "fit_b",
    "fit_b_authors",
    "fit_objective",
    "init_weights",
    "make_views",
    "mnist_patch_views",
    "mnist_quadrant_batches",
    "other_view",
    "projection",
    "scores",
    "single_thread",
    "synthetic_views",
    "theorem31",
    "theory_main",
    "unified_loss",
]


# ---------------------------------------------------------------------------
# CLI hooks (implemented in .cli; re-exported here, imported lazily because
# .cli imports this module)
# ---------------------------------------------------------------------------


def add_theory_parser(subparsers: Any) -> Any:
    """Add the ``localssl theory`` subcommand; see :func:`localssl.theory.cli.add_theory_parser`."""
    from .cli import add_theory_parser as _add

    return _add(subparsers)


def theory_main(args: Any) -> int:
    """Run ``localssl theory``; see :func:`localssl.theory.cli.theory_main`."""
    from .cli import theory_main as _main

    return _main(args)
