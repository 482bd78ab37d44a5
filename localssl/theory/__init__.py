"""Theory of local vs BP self-supervised learning in deep linear networks (METHODS 3).

- :mod:`.metrics`: :func:`cosine` (exact for tiny vectors) and :func:`grad_errors`;
- :mod:`.linear`: the unified local loss (METHODS 2), exact fitting of B,
  local-vs-BP gradient comparison, and the experiments ``theorem31``,
  ``broken`` (by default in the authors' layout, :func:`authors_draw`),
  ``ablation``, ``dfb``, ``projection`` (synthetic views or the authors'
  MNIST patches);
- :mod:`.conv`: Proposition 3.5 on a linear CNN (``conv``);
- :mod:`.cli`: :func:`run_theory` and the ``localssl theory`` subcommand
  (:func:`add_theory_parser`, :func:`theory_main`).
"""
from .cli import EXPERIMENTS, add_theory_parser, run_theory, theory_main
from .conv import ConvNet, conv, orthogonal_conv_kernel, unrolled_operator
from .linear import (
    AUTHORS_FIGURES,
    AUTHORS_LAM,
    AUTHORS_SEED,
    BROKEN_LAYOUTS,
    LOSS_FUNCTIONS,
    NEGATIVES,
    AuthorsDraw,
    GradientComparison,
    LinearNet,
    authors_draw,
    broken,
    broken_ablation,
    compare_gradients,
    dfb,
    fit_b,
    fit_b_authors,
    fit_objective,
    init_weights,
    mnist_patch_views,
    mnist_quadrant_batches,
    other_view,
    projection,
    scores,
    synthetic_views,
    theorem31,
    unified_loss,
)
from .metrics import cosine, grad_errors
from .report import TheoryResult

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
    "fit_b",
    "fit_b_authors",
    "fit_objective",
    "grad_errors",
    "init_weights",
    "mnist_patch_views",
    "mnist_quadrant_batches",
    "orthogonal_conv_kernel",
    "other_view",
    "projection",
    "run_theory",
    "scores",
    "synthetic_views",
    "theorem31",
    "theory_main",
    "unified_loss",
    "unrolled_operator",
]
