"""Theory of local vs BP self-supervised learning in deep linear networks (METHODS 3).

- :mod:`.metrics`: :func:`cosine` (exact for tiny vectors) and :func:`grad_errors`;
- :mod:`.linear`: the unified local loss (METHODS 2), exact fitting of B,
  local-vs-BP gradient comparison, and the experiments ``theorem31``,
  ``broken``, ``dfb``, ``projection`` (synthetic views or the authors' MNIST
  patches);
- :mod:`.conv`: Proposition 3.5 on a linear CNN (``conv``);
- :mod:`.cli`: :func:`run_theory` and the ``localssl theory`` subcommand
  (:func:`add_theory_parser`, :func:`theory_main`).
"""
from .cli import EXPERIMENTS, add_theory_parser, run_theory, theory_main
from .conv import ConvNet, conv, orthogonal_conv_kernel, unrolled_operator
from .linear import (
    AUTHORS_FIGURES,
    LOSS_FUNCTIONS,
    GradientComparison,
    LinearNet,
    broken,
    compare_gradients,
    dfb,
    fit_b,
    fit_objective,
    init_weights,
    mnist_patch_views,
    other_view,
    projection,
    synthetic_views,
    theorem31,
    unified_loss,
)
from .metrics import cosine, grad_errors
from .report import TheoryResult

__all__ = [
    "AUTHORS_FIGURES",
    "EXPERIMENTS",
    "LOSS_FUNCTIONS",
    "ConvNet",
    "GradientComparison",
    "LinearNet",
    "TheoryResult",
    "add_theory_parser",
    "broken",
    "compare_gradients",
    "conv",
    "cosine",
    "dfb",
    "fit_b",
    "fit_objective",
    "grad_errors",
    "init_weights",
    "mnist_patch_views",
    "orthogonal_conv_kernel",
    "other_view",
    "projection",
    "run_theory",
    "synthetic_views",
    "theorem31",
    "theory_main",
    "unified_loss",
    "unrolled_operator",
]
