"""Data-free synthesis: CAKE / LAKE (:func:`cake`, :func:`lake`) and the
:class:`SyntheticDataset` they return. The eager re-implementation of the authors' loop
(the reference of the benchmark and the accuracy study) is in
:mod:`fastkd.synthesis.reference`."""
from .dataset import SyntheticDataset
from .cake_synthesis import (DEFAULTS, ShardMismatchError, cake, class_prior_labels, lake, load_shards,
                             silhouette_prior, step_sizes)

__all__ = ["SyntheticDataset", "cake", "lake", "silhouette_prior", "load_shards", "step_sizes", "class_prior_labels",
           "ShardMismatchError", "DEFAULTS"]
