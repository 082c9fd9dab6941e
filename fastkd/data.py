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
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["digits", "digits_loaders", "digits_info", "fmnist", "fmnist_info", "FMNIST_DEFAULT_ROOT", "DIGITS_NUM_CLASSES", "DIGITS_SPLIT_SEED",
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


def _check_size(size, op: str = "digits", what: str = "the image side after upsampling") -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise ValueError(f"{op}: size must be an int >= 8 ({what}), got {size!r}")


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


# --------------------------------------------------------------------------- Fashion-MNIST
#: Where Debian's ``dataset-fashion-mnist`` package puts the four IDX files.
FMNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FMNIST_NUM_CLASSES = 10
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")
_FMNIST_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
                 "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
_FMNIST_INSTALL = ("apt-get install dataset-fashion-mnist (puts the IDX files in "
                   f"{FMNIST_DEFAULT_ROOT}), or pass root= / --data-root a folder holding "
                   "train-images-idx3-ubyte[.gz] and the three other IDX files")


def _read_idx(path: str) -> np.ndarray:
    """One IDX file (the MNIST container: big-endian magic, dims, then the array), gzipped or not.

    Written here rather than taken from torchvision because torchvision is not a
    dependency of fastkd and the format is a 4-byte header plus a raw array.
    """
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"fmnist: {path} is not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
    if raw[2] not in dtypes:
        raise ValueError(f"fmnist: {path} has an unknown IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    arr = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"fmnist: {path} is truncated: header says {tuple(dims)} "
                         f"({int(np.prod(dims))} values), file holds {arr.size}")
    return arr.reshape(tuple(int(d) for d in dims))


def _find_fmnist(root: str | None) -> dict:
    """Paths of the four IDX files: ``root`` itself, or torchvision's ``root/FashionMNIST/raw``."""
    import os

    roots = [root] if root is not None else [os.environ.get("FASTKD_FMNIST_ROOT") or FMNIST_DEFAULT_ROOT]
    for r in list(roots):
        roots += [os.path.join(r, "FashionMNIST", "raw"), os.path.join(r, "raw")]
    for r in roots:
        found = {}
        for key, stem in _FMNIST_FILES.items():
            for cand in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
                p = os.path.join(r, cand)
                if os.path.isfile(p):
                    found[key] = p
                    break
        if len(found) == 4:
            return found
    where = root if root is not None else roots[0]
    raise FileNotFoundError(f"fmnist: the Fashion-MNIST IDX files are not in {where!r}; {_FMNIST_INSTALL}")


@functools.lru_cache(maxsize=4)
def _fmnist_cached(root: str | None, size: int):
    files = _find_fmnist(root)
    arrays = {k: _read_idx(p) for k, p in files.items()}
    x_tr = torch.from_numpy(arrays["train_images"].astype(np.float32) / 255.0).unsqueeze(1)
    x_te = torch.from_numpy(arrays["test_images"].astype(np.float32) / 255.0).unsqueeze(1)
    y_tr = torch.from_numpy(arrays["train_labels"].astype(np.int64))
    y_te = torch.from_numpy(arrays["test_labels"].astype(np.int64))
    if x_tr.shape[1:] != (1, 28, 28) or x_te.shape[1:] != (1, 28, 28) or len(y_tr) != len(x_tr) \
            or len(y_te) != len(x_te):
        raise ValueError(f"fmnist: unexpected IDX contents in {files['train_images']!r}: images "
                         f"{tuple(x_tr.shape)} / {tuple(x_te.shape)}, labels {len(y_tr)} / {len(y_te)}")
    if size == 32:  # the paper's fmnist-32: zero padding by 2 pixels
        x_tr, x_te = F.pad(x_tr, (2, 2, 2, 2)), F.pad(x_te, (2, 2, 2, 2))
    elif size != 28:
        x_tr = F.interpolate(x_tr, size=(size, size), mode="bilinear", align_corners=False)
        x_te = F.interpolate(x_te, size=(size, size), mode="bilinear", align_corners=False)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    x_tr = (x_tr - mean) / std
    x_te = (x_te - mean) / std
    return x_tr.contiguous(), y_tr, x_te.contiguous(), y_te, mean, std


def _check_fmnist_size(size) -> None:
    _check_size(size, "fmnist", "32: the paper's zero-padded fmnist-32, 28: the original")


def fmnist(size: int = 32, *, root: str | None = None):
    """Fashion-MNIST as tensors ``(x_train, y_train, x_test, y_test)`` (60,000 / 10,000 images).

    Read from the IDX files in ``root`` (default: :data:`FMNIST_DEFAULT_ROOT`, Debian's
    ``dataset-fashion-mnist``; the environment variable ``FASTKD_FMNIST_ROOT`` overrides
    it; torchvision's ``root/FashionMNIST/raw`` layout is found too). ``size=32`` pads
    the 28x28 images with 2 black pixels per side (the CAKE paper's ``fmnist-32``); other
    sizes resample bilinearly. Pixels are scaled to [0, 1] and normalised with the
    training split's mean and std; :func:`fmnist_info` gives both and the pixel range.
    """
    _check_fmnist_size(size)
    out = _fmnist_cached(root, size)
    return tuple(t.clone() for t in out[:4])


def fmnist_info(size: int = 32, *, root: str | None = None) -> dict:
    """num_classes, input_shape, class names, mean/std (in [0, 1] pixel units) and
    ``pixel_range``: the normalised values of black and white, the range real images span."""
    _check_fmnist_size(size)
    *_, mean, std = _fmnist_cached(root, size)
    return {"num_classes": FMNIST_NUM_CLASSES, "input_shape": (1, size, size), "mean": mean, "std": std,
            "classes": FMNIST_CLASSES, "pixel_range": ((0.0 - mean) / std, (1.0 - mean) / std)}


# --------------------------------------------------------------------------- your own data
_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
_X_KEYS = ("x", "images", "inputs", "data")
_Y_KEYS = ("y", "labels", "targets")


def _normalize(x: torch.Tensor, mean, std, what: str) -> torch.Tensor:
    if mean is None and std is None:
        return x
    c = x.shape[1]
    m = torch.as_tensor(mean if mean is not None else [0.0] * c, dtype=torch.float32)
    s = torch.as_tensor(std if std is not None else [1.0] * c, dtype=torch.float32)
    for name, v in (("--mean", m), ("--std", s)):
        if v.numel() not in (1, c):
            raise ValueError(f"{name}: give 1 or {c} values for the {c}-channel images of {what}, got {v.numel()}")
    if bool((s <= 0).any()):
        raise ValueError(f"--std values must be > 0, got {s.tolist()}")
    return (x - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1)


def _read_folder(path: str):
    from PIL import Image

    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))
    if not classes:
        raise ValueError(f"{path}: an image folder needs one subfolder per class (as torchvision's ImageFolder); "
                         "found none")
    xs, ys = [], []
    for label, c in enumerate(classes):
        for root, _, files in sorted(os.walk(os.path.join(path, c))):
            for f in sorted(files):
                if f.lower().endswith(_IMAGE_EXT):
                    with Image.open(os.path.join(root, f)) as im:
                        if im.mode not in ("L", "RGB"):
                            im = im.convert("RGB" if im.mode in ("RGBA", "P", "CMYK", "YCbCr", "LA") else "L")
                        a = np.asarray(im)
                    xs.append(a)
                    ys.append(label)
    if not xs:
        raise ValueError(f"{path}: no image files ({', '.join(_IMAGE_EXT)}) in its class subfolders")
    shapes = {a.shape for a in xs}
    if len(shapes) > 1:
        raise ValueError(f"{path}: the images differ in size or channels ({sorted(shapes)[:3]}...); resize them to "
                         "the teacher's input size first")
    x = np.stack(xs)
    return x, np.asarray(ys, dtype=np.int64), classes


def _pick(obj: dict, keys, path: str, what: str):
    for k in keys:
        if k in obj:
            return obj[k]
    raise ValueError(f"{path}: no {what} array; expected one of the keys {', '.join(keys)} (found: "
                     f"{', '.join(map(str, obj.keys()))})")


def load_labelled(path: str, *, input_shape, mean=None, std=None, flag: str = "--eval-data"):
    """Your own labelled images, for evaluation (or unlabelled edge data: the labels are then
    ignored): ``(x, y)`` tensors with x of shape (N, *input_shape).

    ``path`` is an image-folder tree (one subfolder per class, sorted names give the labels,
    as torchvision's ImageFolder), an ``.npz`` file or a ``.pt`` file (a dict, or an
    ``(images, labels)`` pair). Arrays may be NCHW or NHWC. Integer images (0..255) are scaled
    to [0, 1] and then normalised with ``mean``/``std`` (per channel, as the teacher was
    trained); float arrays are taken as the teacher's inputs as they are. Channels and size
    must match ``input_shape``: one error naming ``flag`` otherwise, before any work.
    """
    if not isinstance(path, str) or not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path!r} does not exist")
    if os.path.isdir(path):
        x, y, _ = _read_folder(path)
    elif path.endswith(".npz"):
        with np.load(path) as z:
            obj = {k: z[k] for k in z.files}
        x, y = _pick(obj, _X_KEYS, path, "images"), _pick(obj, _Y_KEYS, path, "labels")
    elif path.endswith((".pt", ".pth")):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, (tuple, list)) and len(obj) == 2:
            x, y = obj
        elif isinstance(obj, dict):
            x, y = _pick(obj, _X_KEYS, path, "images"), _pick(obj, _Y_KEYS, path, "labels")
        else:
            raise ValueError(f"{flag} {path}: expected a dict with images and labels or an (images, labels) pair, "
                             f"got {type(obj).__name__}")
    else:
        raise ValueError(f"{flag} {path}: expected an image folder, an .npz or a .pt file")
    x = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    y = torch.as_tensor(np.asarray(y)).long().view(-1) if not isinstance(y, torch.Tensor) else y.long().view(-1)
    c, h, w = (tuple(input_shape) + (1, 1))[:3] if len(input_shape) == 3 else (None, None, None)
    if x.dim() == 3 and c == 1:
        x = x.unsqueeze(1)
    if x.dim() == 4 and c is not None and x.shape[1] != c and x.shape[-1] == c:
        x = x.permute(0, 3, 1, 2)
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(f"{flag} {path}: the images have shape {tuple(x.shape[1:])} (C,H,W) but the teacher takes "
                         f"{tuple(input_shape)}; resize or convert them first")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{flag} {path}: {x.shape[0]} images but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError(f"{flag} {path}: holds no images")
    if x.dtype == torch.uint8 or not x.is_floating_point():
        x = x.float() / 255.0
        x = _normalize(x, mean, std, path)
    return x.float().contiguous(), y
