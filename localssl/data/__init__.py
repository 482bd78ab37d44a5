"""Data sets as uint8 arrays: official-format loaders, the decode-once cache, ``shapes10``.

>>> from localssl.data import load_dataset, dataset_spec
>>> train = load_dataset("cifar10", "../shared/data", "train")   # decoded once, then memmapped
>>> spec = dataset_spec("cifar10")                                # image size, mean/std, splits

Registered data sets: ``cifar10``, ``stl10``, ``tinyimagenet``, ``imagefolder``
and ``shapes10`` (generated, no files). ``resize=S`` works for all of them
(decoded once at that size); ``imagefolder`` takes size, channels (grayscale
stays one channel) and mean/std from its own images. ``mnist.py`` (an IDX reader for the
theory experiments) is imported when present, so any loader it registers
shows up too. Augmentation lives in `localssl.data.augment` (not imported
here, so that loading data does not import kornia).

A new data set subclasses `DatasetLoader` (a `DatasetSpec` plus a `plan`
that finds the files and returns a `Plan` whose ``build`` lists the items as a
`Source`) and registers an instance: ``DATASETS.register("name")(Loader())``.
The cache, ``max_items`` and error handling then come for free.
"""

from __future__ import annotations

import importlib
import importlib.util

from localssl.data import cifar10, imagefolder, shapes, stl10, tinyimagenet
from localssl.data.archive import UnsafeArchiveError
from localssl.data.base import (
    DATASETS,
    DatasetError,
    DatasetLoader,
    DatasetNotFoundError,
    DatasetSpec,
    ImageArray,
    Plan,
    Source,
    channel_stats,
    dataset_spec,
    load_dataset,
    parse_size,
    resize_images,
    select_balanced,
)
from localssl.data.cache import default_cache_dir
from localssl.data.cifar10 import CIFAR10_CLASSES
from localssl.data.download import download_file
from localssl.data.extract import safe_extract
from localssl.data.safepickle import UnsafePickleError
from localssl.data.shapes import SHAPES10_CLASSES, make_shapes10

# mnist.py is written separately; import it when it is there (errors inside
# it surface rather than hiding a data set it may register).
if importlib.util.find_spec("localssl.data.mnist") is not None:
    importlib.import_module("localssl.data.mnist")

__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "SHAPES10_CLASSES",
    "DatasetError",
    "DatasetLoader",
    "DatasetNotFoundError",
    "DatasetSpec",
    "ImageArray",
    "Plan",
    "Source",
    "UnsafeArchiveError",
    "UnsafePickleError",
    "channel_stats",
    "cifar10",
    "dataset_spec",
    "default_cache_dir",
    "download_file",
    "imagefolder",
    "load_dataset",
    "make_shapes10",
    "parse_size",
    "resize_images",
    "safe_extract",
    "select_balanced",
    "shapes",
    "stl10",
    "tinyimagenet",
]
