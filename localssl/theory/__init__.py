"""Theory of local vs BP self-supervised learning in deep linear networks (METHODS 3).

- :mod:`.metrics`: :func:`cosine` (exact for tiny vectors) and :func:`grad_errors`;
- :mod:`.common`: float64, the default and the authors' L2 on B and seed, one-thread runs;
- :mod:`.loss`: the unified local loss (METHODS 2): :func:`unified_loss`, :func:`scores`;
- :mod:`.fit`: exact fitting of B (:func:`fit_b`) and the authors' float32 fit
  (:func:`fit_b_authors`);
- :mod:`.network`: :class:`LinearNet`, :func:`init_weights` and the local-vs-BP
  gradient comparison (:func:`compare_gradients`);
- :mod:`.views`: synthetic views or the authors' MNIST patches and batches;
- :mod:`.authors`: the replay of the authors' draw order (:func:`authors_draw`);
- :mod:`.experiments`: ``theorem31``, ``dfb``, ``projection``;
- :mod:`.broken_assumptions`: ``broken`` (by default in the authors' layout)
  and ``ablation``;
- :mod:`.linear`: all of the above under one name (where ``localssl.cli`` imports from);
- :mod:`.conv`: Proposition 3.5 on a linear CNN (``conv``), also with one channel map B at every
  position (CLAPP++'s ``b_structure=shared``);
- :mod:`.rank`: Theorem 3.1 with a rank limit on B (``rank``; CLAPP++'s ``b_rank``);
- :mod:`.cli`: :func:`run_theory` and the ``localssl theory`` subcommand
  (:func:`add_theory_parser`, :func:`theory_main`).
"""
from .authors import AuthorsDraw, authors_draw
from .broken_assumptions import AUTHORS_FIGURES, BROKEN_LAYOUTS, broken, broken_ablation
from .cli import EXPERIMENTS, add_theory_parser, run_theory, theory_main
from .common import AUTHORS_LAM, AUTHORS_SEED
from .conv import (
    ConvNet,
    conv,
    distance_from_shared,
    orthogonal_conv_kernel,
    shared_fitter,
    shared_projection,
    unrolled_operator,
)
from .experiments import dfb, projection, theorem31
from .fit import fit_b, fit_b_authors
from .loss import LOSS_FUNCTIONS, NEGATIVES, fit_objective, other_view, scores, unified_loss
from .metrics import cosine, grad_errors
from .network import GradientComparison, LinearNet, compare_gradients, init_weights
from .rank import fit_b_rank, rank, rank_cosine_closed_form, truncate
from .report import TheoryResult
from .views import mnist_patch_views, mnist_quadrant_batches, synthetic_views

__all__ = [
    "AUTHORS_FIGURES",
    "AUTHORS_LAM",
    "AUTHORS_SEED",
    "BROKEN_LAYOUTS",
    "EXPERIMENTS",
    "LOSS_FUNCTIONS",
    "NEGATIVES",
    "AuthorsDraw",
    "ConvNet",
    "GradientComparison",
    "LinearNet",
    "TheoryResult",
    "add_theory_parser",
    "authors_draw",
    "broken",
    "broken_ablation",
    "compare_gradients",
    "conv",
    "cosine",
    "dfb",
    "distance_from_shared",
    "fit_b",
    "fit_b_authors",
    "fit_b_rank",
    "fit_objective",
    "grad_errors",
    "init_weights",
    "mnist_patch_views",
    "mnist_quadrant_batches",
    "orthogonal_conv_kernel",
    "other_view",
    "projection",
    "rank",
    "rank_cosine_closed_form",
    "run_theory",
    "scores",
    "shared_fitter",
    "shared_projection",
    "synthetic_views",
    "theorem31",
    "theory_main",
    "truncate",
    "unified_loss",
    "unrolled_operator",
]
