"""The bundled default data: scikit-learn's handwritten digits (``load_digits``).

1,797 grey 8x8 images of the digits 0-9, shipped inside scikit-learn (no download).
fastkd uses a fixed, stratified train/test split (seed 0, 30% of each class held out: 1,258 train, 539 test
images), upsamples the images bilinearly to ``size`` x ``size`` (default 16) and
normalises them with the training split's pixel mean and standard deviation, so that
the N(0, I) input prior of the synthesis is on the data's scale.

Data-free methods never touch the training split: only the teacher is trained on it
(:func:`fastkd.distill.train_teacher`) and only the test split is used to evaluate
students.

    from fastkd import data
    x_tr, y_tr, x_te, y_te = data.digits(size=16)           # tensors
    train_loader, test_loader = data.digits_loaders(batch_size=256)
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["digits", "digits_loaders", "digits_info", "DIGITS_NUM_CLASSES", "DIGITS_SPLIT_SEED",
           "DIGITS_TEST_FRACTION", "DEFAULT_SIZE"]

DIGITS_NUM_CLASSES = 10
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.3
DEFAULT_SIZE = 16


def _load_raw():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - environment problem
        raise ImportError("fastkd.data.digits needs scikit-learn (it ships the digits data set): "
                          "pip install scikit-learn") from e
    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def _split_indices(y: np.ndarray, test_fraction: float, seed: int):
    """Stratified split: the same indices on every machine (numpy's legacy RandomState)."""
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@functools.lru_cache(maxsize=8)
def _digits_cached(size: int, test_fraction: float, seed: int):
    images, labels = _load_raw()
    tr, te = _split_indices(labels, test_fraction, seed)
    x = torch.from_numpy(images).unsqueeze(1)  # (N, 1, 8, 8), values 0..16
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.from_numpy(labels)
    mean = x[tr].mean()
    std = x[tr].std()
    x = (x - mean) / std
    return x[tr].contiguous(), y[tr].contiguous(), x[te].contiguous(), y[te].contiguous(), float(mean), float(std)


def _check_size(size) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise ValueError(f"digits: size must be an int >= 8 (the image side after upsampling), got {size!r}")


def digits(size: int = DEFAULT_SIZE, *, test_fraction: float = DIGITS_TEST_FRACTION,
           seed: int = DIGITS_SPLIT_SEED):
    """The digits split as tensors ``(x_train, y_train, x_test, y_test)``.

    x are float32 of shape (N, 1, size, size), normalised with the training split's
    pixel mean/std; y are int64 class indices. The split is fixed by ``seed`` and
    ``test_fraction`` (defaults give 1,258 train / 539 test). Returns fresh clones.
    """
    _check_size(size)
    if not (0.0 < float(test_fraction) < 1.0):
        raise ValueError(f"digits: test_fraction must be in (0, 1), got {test_fraction!r}")
    out = _digits_cached(size, float(test_fraction), int(seed))
    return tuple(t.clone() for t in out[:4])


def digits_info(size: int = DEFAULT_SIZE) -> dict:
    """num_classes, input_shape and the normalisation (mean, std in raw 0..16 pixel units)."""
    _check_size(size)
    *_, mean, std = _digits_cached(size, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    return {"num_classes": DIGITS_NUM_CLASSES, "input_shape": (1, size, size), "mean": mean, "std": std}


def digits_loaders(batch_size: int = 256, size: int = DEFAULT_SIZE, *, shuffle_seed: int = 0,
                   test_batch_size: int = 1024):
    """``(train_loader, test_loader)`` DataLoaders over :func:`digits` (train shuffled, seeded)."""
    x_tr, y_tr, x_te, y_te = digits(size)
    g = torch.Generator().manual_seed(shuffle_seed)
    train = DataLoader(TensorDataset(x_tr, y_tr), batch_size=batch_size, shuffle=True, generator=g)
    test = DataLoader(TensorDataset(x_te, y_te), batch_size=test_batch_size, shuffle=False)
    return train, test
