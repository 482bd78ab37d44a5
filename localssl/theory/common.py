"""What every deep-linear-network module shares (METHODS 3): precision, L2 on B, seeds, threads.

Everything here runs in float64 on the CPU (``DTYPE``; the exceptions are
named where they occur: the authors' float32 draws and fit). ``lam`` is
the L2 penalty per B matrix; ``AUTHORS_LAM`` and ``AUTHORS_SEED`` are the
authors' choices (METHODS 3). :func:`single_thread` runs the tiny
tensors of these experiments on one thread.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import numpy as np
import torch

__all__ = ["AUTHORS_LAM", "AUTHORS_SEED", "DEFAULT_LAM", "DTYPE", "single_thread"]

DTYPE = torch.float64
DEFAULT_LAM = 0.01
#: The authors' L2 on B: ``b_decay * (|B_1|^2 + |B_2|^2) / 2`` with b_decay 0.01, i.e. 0.005 per B (METHODS 3).
AUTHORS_LAM = 0.005
#: The authors' single run: torch.manual_seed(42) before the models are built (METHODS 3).
AUTHORS_SEED = 42


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block, then restore the previous setting.

    Every tensor here is tiny (64 x 64 matmuls, 64-d solves): threading buys
    nothing, and on a shared, busy CPU the OpenMP threads of such small ops
    wait on each other, which measured 20x slower (16.6 s vs 0.7 s for one
    seed of ``broken`` with 2 threads on 2 loaded cores).
    """
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _one_thread(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with single_thread():
            return fn(*args, **kwargs)

    return wrapper


def _seed_list(seeds: int | Sequence[int]) -> list[int]:
    return list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]


def _summ(per_seed: list[list[float]]) -> tuple[list[float], list[float]]:
    """Mean and (population) std over seeds, per layer."""
    a = np.asarray(per_seed, dtype=np.float64)
    return a.mean(0).tolist(), a.std(0).tolist()
