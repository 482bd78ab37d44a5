"""Evaluation of frozen encoders: linear probes (fast, blocks, paper and paper-bn protocols) and kNN.

METHODS 2.5. ``run_probe`` is the entry point; ``random_init_like`` gives the
random-init baseline that every result is reported against.
"""
from localssl.evaluation.features import encode, extract_features, feature_dims, frozen, pool_to_grid
from localssl.evaluation.knn import KNN_K, KNN_TEMPERATURE, knn_accuracy, knn_predict
from localssl.evaluation.linear import (
    PAPER_BATCH_SIZE,
    PAPER_CROP_RATIO,
    PAPER_CROP_SCALE,
    PAPER_EPOCHS,
    PAPER_LR,
    CenterCropPreprocess,
    fit_linear,
    linear_probe,
    make_paper_bn_head,
    make_paper_head,
    paper_bn_linear_probe,
    paper_linear_probe,
)
from localssl.evaluation.probe import PROTOCOLS, ProbeResult, block_key, random_init_like, run_probe

__all__ = [
    "extract_features", "encode", "feature_dims", "frozen", "pool_to_grid",
    "knn_predict", "knn_accuracy", "KNN_K", "KNN_TEMPERATURE",
    "fit_linear", "linear_probe", "paper_linear_probe", "paper_bn_linear_probe", "CenterCropPreprocess",
    "make_paper_head", "make_paper_bn_head",
    "PAPER_EPOCHS", "PAPER_BATCH_SIZE", "PAPER_LR", "PAPER_CROP_SCALE", "PAPER_CROP_RATIO",
    "run_probe", "random_init_like", "ProbeResult", "PROTOCOLS", "block_key",
]
