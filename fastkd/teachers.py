"""Loading and saving teachers; the bundled digits teacher.

A teacher file is one of:

* TorchScript (``torch.jit.save``): loaded as is, no model name needed;
* a fastkd checkpoint (:func:`save_teacher`): a dict holding the model name, its
  constructor arguments and the state_dict;
* a plain ``state_dict``: give the model name (``model=``, ``--teacher-model`` on the
  command line), ``num_classes`` and ``in_channels``.

``load_teacher("digits")`` returns the bundled digits teacher (a ``cnn`` trained by
:func:`fastkd.distill.train_teacher` with seed 0, shipped in ``fastkd/assets``).
"""
from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["load_teacher", "save_teacher", "digits_teacher", "DIGITS_TEACHER_PATH", "TEACHER_FORMAT"]

TEACHER_FORMAT = "fastkd.teacher/1"
DIGITS_TEACHER_PATH = os.path.join(os.path.dirname(__file__), "assets", "digits_cnn.pt")


def save_teacher(model: nn.Module, path: str, *, name: str, num_classes: int, in_channels: int,
                 input_shape=None, kwargs: dict | None = None, **extra) -> str:
    """Write a fastkd teacher checkpoint (model name + constructor arguments + state_dict)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    obj = {"format": TEACHER_FORMAT, "model": name, "num_classes": num_classes, "in_channels": in_channels,
           "kwargs": dict(kwargs or {}), "input_shape": list(input_shape) if input_shape else None,
           "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    obj.update(extra)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def _is_torchscript(path: str) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def load_teacher(path: str, *, model: str | None = None, num_classes: int | None = None,
                 in_channels: int | None = None, map_location="cpu", **model_kwargs):
    """Load a teacher; returns ``(module, info)`` with the module in eval mode.

    ``info`` holds what is known about it: model name, num_classes, in_channels,
    input_shape (None when unknown) and the checkpoint's recorded test accuracy.
    """
    from . import models

    if path == "digits":
        path = DIGITS_TEACHER_PATH
        if not os.path.exists(path):  # pragma: no cover - broken installation
            raise FileNotFoundError(f"load_teacher: the bundled digits teacher is missing ({path}); "
                                    "reinstall fastkd or train one with fastkd.distill.train_teacher")
    if not isinstance(path, str) or not os.path.exists(path):
        raise FileNotFoundError(f"load_teacher: teacher file {path!r} does not exist")
    if _is_torchscript(path):
        m = torch.jit.load(path, map_location=map_location)
        m.eval()
        return m, {"model": "torchscript", "num_classes": num_classes, "in_channels": in_channels,
                   "input_shape": None, "test_accuracy": None}
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"load_teacher: {path!r} is neither TorchScript nor a state_dict / fastkd checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if isinstance(obj, dict) and obj.get("format") == TEACHER_FORMAT:
        name = obj["model"]
        nc = obj["num_classes"]
        ic = obj["in_channels"]
        kw = dict(obj.get("kwargs") or {})
        kw.update(model_kwargs)
        m = models.create(name, num_classes=nc, in_channels=ic, **kw)
        m.load_state_dict(obj["state_dict"])
        m.eval()
        return m, {"model": name, "num_classes": nc, "in_channels": ic, "input_shape": obj.get("input_shape"),
                   "test_accuracy": obj.get("test_accuracy")}
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if model is None or num_classes is None or in_channels is None:
            raise ValueError(f"load_teacher: {path!r} is a plain state_dict; give the model name "
                             f"(--teacher-model, one of {models.names()}), num_classes and in_channels")
        m = models.create(model, num_classes=num_classes, in_channels=in_channels, **model_kwargs)
        try:
            m.load_state_dict(obj)
        except RuntimeError as e:
            raise ValueError(f"load_teacher: the state_dict in {path!r} does not fit model {model!r} with "
                             f"num_classes={num_classes}, in_channels={in_channels}: "
                             f"{str(e).splitlines()[0]}") from e
        m.eval()
        return m, {"model": model, "num_classes": num_classes, "in_channels": in_channels, "input_shape": None,
                   "test_accuracy": None}
    raise ValueError(f"load_teacher: {path!r} holds a {type(obj).__name__}, not a teacher (expected TorchScript, "
                     "a fastkd teacher checkpoint or a state_dict)")


def digits_teacher():
    """The bundled digits teacher and its info (see :func:`load_teacher`)."""
    return load_teacher("digits")
