"""Loading and saving teachers; the bundled digits teacher.

A teacher file is one of:

* TorchScript (``torch.jit.save``): loaded as is, no model name needed;
* a fastkd checkpoint (:func:`save_teacher`): a dict holding the model name, its
  constructor arguments and the state_dict;
* a plain ``state_dict``: give the model name (``model=``, ``--teacher-model`` on the
  command line), ``num_classes`` and ``in_channels``.

``load_teacher("digits")`` returns the bundled digits teacher (a ``cnn`` trained by
:func:`fastkd.distill.train_teacher` with seed 0, shipped in ``fastkd/assets``).
``load_teacher("fmnist")`` and ``load_teacher("fmnist-bn")`` return the bundled
Fashion-MNIST teachers (the CAKE paper's LeNet-5, and a BatchNorm CNN for TA-DFKD and
the BN prior), trained on 32x32 ``fastkd.data.fmnist`` by :func:`train_fmnist_teacher`
with the recipe in :data:`FMNIST_TEACHERS`; their test accuracy is in the checkpoint.
"""
from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["load_teacher", "save_teacher", "infer_shapes", "ExportedTeacher", "digits_teacher", "fmnist_teacher", "train_fmnist_teacher",
           "DIGITS_TEACHER_PATH", "FMNIST_TEACHERS", "TEACHER_FORMAT"]

TEACHER_FORMAT = "fastkd.teacher/1"
_ASSETS = os.path.join(os.path.dirname(__file__), "assets")
DIGITS_TEACHER_PATH = os.path.join(_ASSETS, "digits_cnn.pt")

#: The bundled Fashion-MNIST teachers: name -> (zoo model, constructor kwargs, training recipe
#: for :func:`fastkd.distill.train_teacher`, asset file). Both read 1x32x32 inputs.
FMNIST_TEACHERS = {
    "fmnist": ("lenet5", {}, dict(epochs=15, batch_size=128, lr=2e-3, weight_decay=1e-4, augment=False, seed=0),
               "fmnist_lenet5.pt"),
    "fmnist-bn": ("cnn_bn", {"input_size": 32},
                  dict(epochs=15, batch_size=128, lr=2e-3, weight_decay=1e-4, augment=False, seed=0),
                  "fmnist_cnn_bn.pt"),
}


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


class ExportedTeacher(nn.Module):
    """A ``torch.export`` program (.pt2) as a module: its graph runs as exported (in the mode it
    was exported in; ``train()``/``eval()`` only set the flag), and a program exported for a
    fixed batch size is called in slices of that size (the last one padded)."""

    def __init__(self, program) -> None:
        super().__init__()
        self.program = program.module()
        names = set(program.graph_signature.user_inputs)
        vals = [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder" and n.name in names]
        if len(vals) != 1 or vals[0] is None:
            raise ValueError(f"load_teacher: the exported program takes {len(vals)} inputs; a teacher takes one "
                             "batch of inputs")
        shape = tuple(vals[0].shape)
        self.input_shape = tuple(int(d) for d in shape[1:]) if all(isinstance(d, int) for d in shape[1:]) else None
        self.fixed_batch = int(shape[0]) if isinstance(shape[0], int) else None
        outs = [n for n in program.graph.nodes if n.op == "output"][0].args[0]
        out = outs[0].meta.get("val") if isinstance(outs, (tuple, list)) and outs else None
        self.num_classes = int(out.shape[-1]) if out is not None and isinstance(out.shape[-1], int) else None

    def train(self, mode: bool = True):
        self.training = mode  # the exported graph keeps the mode it was exported in
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.fixed_batch
        if b is None or x.shape[0] == b:
            return self.program(x)
        outs = []
        for i in range(0, x.shape[0], b):
            xb = x[i:i + b]
            n = xb.shape[0]
            if n < b:
                xb = torch.cat([xb, xb[-1:].expand(b - n, *xb.shape[1:])])
            outs.append(self.program(xb)[:n])
        return torch.cat(outs)


def _is_exported(path: str) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith(("serialized_exported_program.json", "/models/model.json")) or "/models/" in n
                   for n in z.namelist()) and not _is_torchscript(path)


def infer_shapes(state_dict: dict) -> dict:
    """Best guesses from a state_dict: ``num_classes`` (rows of the last weight matrix) and
    ``in_channels`` (input channels of the first convolution); None where unknown."""
    ws = [(k, v) for k, v in state_dict.items() if isinstance(v, torch.Tensor) and k.endswith("weight")]
    mats = [v for _, v in ws if v.dim() == 2]
    convs = [v for _, v in ws if v.dim() == 4]
    return {"num_classes": int(mats[-1].shape[0]) if mats else None,
            "in_channels": int(convs[0].shape[1]) if convs else None}


def load_teacher(path: str, *, model: str | None = None, num_classes: int | None = None,
                 in_channels: int | None = None, map_location="cpu", trust: bool = False, **model_kwargs):
    """Load a teacher; returns ``(module, info)`` with the module in eval mode.

    ``path`` is a bundled name (``"digits"``, ``"fmnist"``, ``"fmnist-bn"``) or a file:

    * TorchScript (``torch.jit.save``);
    * a ``torch.export`` program (``torch.export.save``, .pt2): input shape and number of
      classes are read from it;
    * a fastkd checkpoint (:func:`save_teacher`);
    * a ``state_dict`` with ``model`` naming the architecture (see
      :func:`fastkd.models.build`: a zoo name, ``"torchvision:<name>"``, ``"timm:<name>"`` or
      ``"package.module:factory"``); num_classes and in_channels are read from the weights
      when not given;
    * a whole pickled module (``torch.save(model)``) only with ``trust=True``: unpickling runs
      code from the file, so only for files you made or trust.

    ``info`` holds what is known: model name, num_classes, in_channels, input_shape (None
    when unknown) and the checkpoint's recorded test accuracy.
    """
    from . import models

    if path == "digits":
        path = DIGITS_TEACHER_PATH
        if not os.path.exists(path):  # pragma: no cover - broken installation
            raise FileNotFoundError(f"load_teacher: the bundled digits teacher is missing ({path}); "
                                    "reinstall fastkd or train one with fastkd.distill.train_teacher")
    elif path in FMNIST_TEACHERS:
        name = path
        path = os.path.join(_ASSETS, FMNIST_TEACHERS[name][3])
        if not os.path.exists(path):  # pragma: no cover - broken installation
            raise FileNotFoundError(f"load_teacher: the bundled {name} teacher is missing ({path}); reinstall "
                                    f"fastkd or train it with fastkd.teachers.train_fmnist_teacher({name!r})")
    if not isinstance(path, str) or not os.path.exists(path):
        raise FileNotFoundError(f"load_teacher: teacher file {path!r} does not exist")
    if _is_torchscript(path):
        m = torch.jit.load(path, map_location=map_location)
        m.eval()
        return m, {"model": "torchscript", "num_classes": num_classes, "in_channels": in_channels,
                   "input_shape": None, "test_accuracy": None}
    if _is_exported(path):
        try:
            m = ExportedTeacher(torch.export.load(path))
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"load_teacher: {path!r} looks like a torch.export program but does not load with "
                             f"this torch ({torch.__version__}): {type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]}") from e
        m.to(map_location)
        shape = m.input_shape
        return m, {"model": "torch.export", "num_classes": num_classes or m.num_classes,
                   "in_channels": in_channels or (shape[0] if shape else None), "input_shape": shape,
                   "test_accuracy": None}
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        if not trust:
            raise ValueError(f"load_teacher: {path!r} is not TorchScript, a torch.export program or a state_dict; "
                             "if it is a whole module saved with torch.save(model), loading it runs code from the "
                             "file: pass trust=True (--trust-teacher-file) if you made it or trust it") from e
        try:
            obj = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as e2:
            raise ValueError(f"load_teacher: {path!r} does not load ({type(e2).__name__}: "
                             f"{' '.join(str(e2).split())[:200]})") from e2
        if not isinstance(obj, nn.Module):
            raise ValueError(f"load_teacher: {path!r} holds a {type(obj).__name__}, not a module")
        obj.eval()
        return obj, {"model": "pickled module", "num_classes": num_classes, "in_channels": in_channels,
                     "input_shape": None, "test_accuracy": None}
    if isinstance(obj, dict) and obj.get("format") == TEACHER_FORMAT:
        name = obj["model"]
        nc = obj["num_classes"]
        ic = obj["in_channels"]
        kw = dict(obj.get("kwargs") or {})
        kw.update(model_kwargs)
        m = models.build(name, num_classes=nc, in_channels=ic, **kw)
        m.load_state_dict(obj["state_dict"])
        m.eval()
        return m, {"model": name, "num_classes": nc, "in_channels": ic, "input_shape": obj.get("input_shape"),
                   "test_accuracy": obj.get("test_accuracy"), "normalize": obj.get("normalize")}
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        guess = infer_shapes(obj)
        num_classes = num_classes or guess["num_classes"]
        in_channels = in_channels or guess["in_channels"]
        if model is None or num_classes is None or in_channels is None:
            raise ValueError(f"load_teacher: {path!r} is a plain state_dict; give its architecture "
                             f"(--teacher-model: a fastkd model ({', '.join(models.names())}), torchvision:NAME, "
                             "timm:NAME or package.module:factory)"
                             + ("" if num_classes else ", --num-classes") + ("" if in_channels else ", --input-shape"))
        m = models.build(model, num_classes=num_classes, in_channels=in_channels, **model_kwargs)
        try:
            m.load_state_dict(obj)
        except RuntimeError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            raise ValueError(f"load_teacher: the state_dict in {path!r} does not fit model {model!r} with "
                             f"num_classes={num_classes}, in_channels={in_channels}: "
                             f"{' '.join(lines[:3])[:400]}") from e
        m.eval()
        return m, {"model": model, "num_classes": num_classes, "in_channels": in_channels, "input_shape": None,
                   "test_accuracy": None}
    raise ValueError(f"load_teacher: {path!r} holds a {type(obj).__name__}, not a teacher (expected TorchScript, "
                     "a torch.export program, a fastkd teacher checkpoint or a state_dict)")


def digits_teacher():
    """The bundled digits teacher and its info (see :func:`load_teacher`)."""
    return load_teacher("digits")


def fmnist_teacher(name: str = "fmnist"):
    """A bundled Fashion-MNIST teacher and its info: ``"fmnist"`` (LeNet-5, the CAKE paper's
    teacher) or ``"fmnist-bn"`` (a CNN with BatchNorm). Inputs: 1x32x32 images normalised
    as :func:`fastkd.data.fmnist` does."""
    if name not in FMNIST_TEACHERS:
        raise ValueError(f"fmnist_teacher: name must be one of {sorted(FMNIST_TEACHERS)}, got {name!r}")
    return load_teacher(name)


def train_fmnist_teacher(name: str = "fmnist", *, path: str | None = None, root: str | None = None,
                         device=None, progress: bool = True):
    """Train a Fashion-MNIST teacher with its recipe in :data:`FMNIST_TEACHERS` (this is how
    the bundled ones were made); returns ``(model, history)`` and writes a teacher checkpoint
    (with its test accuracy) to ``path`` when given. Needs the Fashion-MNIST files
    (:func:`fastkd.data.fmnist`); a few minutes on a CPU."""
    from . import data, distill, models

    if name not in FMNIST_TEACHERS:
        raise ValueError(f"train_fmnist_teacher: name must be one of {sorted(FMNIST_TEACHERS)}, got {name!r}")
    arch, kwargs, recipe, _ = FMNIST_TEACHERS[name]
    d = data.fmnist(32, root=root)
    torch.manual_seed(recipe["seed"])
    model = models.create(arch, num_classes=10, in_channels=1, **kwargs)
    model, hist = distill.train_teacher(model, data=d, device=device, progress=progress, **recipe)
    if path is not None:
        save_teacher(model, path, name=arch, num_classes=10, in_channels=1, input_shape=(1, 32, 32), kwargs=kwargs,
                     test_accuracy=hist.final_accuracy, data="fmnist-32", recipe=recipe)
    return model, hist
