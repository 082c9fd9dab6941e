"""The command-line options every method shares, written once: the teacher, the student,
evaluation data and normalisation, the run's output folder, and how a run ends (student
checkpoint + TorchScript export, the student check, summary.json). Each method's
``cli_distill`` builds its parser from these, so the same thing has the same flag in every
method, and its own hyper-parameters from its config dataclass (:func:`add_config_args`).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from .. import _run
from .._run import UsageError


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def shape_arg(s: str):
    try:
        t = tuple(int(v) for v in s.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 1,16,16), got {s!r}") from None
    if not t or any(v < 1 for v in t):
        raise argparse.ArgumentTypeError(f"expected positive sizes C,H,W (e.g. 1,16,16), got {s!r}")
    return t


def add_teacher_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", required=required, metavar="PATH",
                   help="TorchScript file, torch.export program (.pt2), fastkd teacher checkpoint, or state_dict "
                        "(then give --teacher-model); 'digits', 'fmnist' and 'fmnist-bn' are the bundled teachers")
    g.add_argument("--teacher-model", metavar="ARCH",
                   help="architecture of a state_dict teacher: a fastkd model name, torchvision:NAME, timm:NAME "
                        "or package.module:factory")
    g.add_argument("--trust-teacher-file", action="store_true",
                   help="allow a teacher saved whole with torch.save(model): loading it runs code from the file, "
                        "so only for files you made or trust")
    g.add_argument("--num-classes", type=int, help="teacher output width (read from the file or the model when "
                   "possible)")
    g.add_argument("--input-shape", type=shape_arg, metavar="C,H,W",
                   help="one input's shape, e.g. 3,32,32 (read from fastkd checkpoints and .pt2 programs)")


def resolve_teacher(a, device):
    """The teacher of the parsed options, its info, number of classes and input shape; what
    the file does not say is asked for with one line naming the option."""
    from fastkd._run import UsageError
    from fastkd.teachers import load_teacher

    in_ch = a.input_shape[0] if a.input_shape else None
    spec = a.teacher_model
    kw = student_kwargs(spec, a.input_shape) if (spec and a.input_shape) else {}
    if a.num_classes is not None and a.num_classes < 2:
        raise UsageError(f"--num-classes must be an integer >= 2, got {a.num_classes}")
    teacher, info = load_teacher(a.teacher, model=spec, num_classes=a.num_classes, in_channels=in_ch,
                                 trust=getattr(a, "trust_teacher_file", False), **kw)
    shape = a.input_shape or (tuple(info["input_shape"]) if info.get("input_shape") else None)
    if shape is None:
        raise UsageError(f"--input-shape C,H,W is required for this teacher ({info['model']}: its file does not "
                         "record the input shape)")
    if info.get("input_shape") and a.input_shape and tuple(info["input_shape"]) != tuple(a.input_shape):
        raise UsageError(f"--input-shape {','.join(map(str, a.input_shape))} differs from the teacher's recorded "
                         f"{','.join(map(str, info['input_shape']))}")
    num_classes = a.num_classes or info.get("num_classes")
    try:  # the teacher must take this shape; its output width gives the number of classes
        with torch.no_grad():
            out = teacher(torch.zeros((2, *shape)))
    except Exception as e:
        raise UsageError(f"--input-shape {','.join(map(str, shape))}: the teacher rejects inputs of this shape "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise UsageError(f"--teacher {a.teacher}: the model must return (N, classes) logits, got "
                         f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
    if num_classes is not None and out.shape[1] != num_classes:
        raise UsageError(f"--num-classes {num_classes} differs from the teacher's output width {out.shape[1]}")
    return teacher.to(device), info, int(out.shape[1]), tuple(shape)


def pixel_range(mean, std) -> tuple[float, float]:
    """The normalised values of black (0) and white (1) pixels over all channels: the clamp
    that keeps synthetic inputs inside what a normalised image can be."""
    n = max(len(mean), len(std))
    ms = list(mean) * n if len(mean) == 1 else list(mean)
    ss = list(std) * n if len(std) == 1 else list(std)
    return (min(-m / s for m, s in zip(ms, ss)), max((1.0 - m) / s for m, s in zip(ms, ss)))


def export_torchscript(model, input_shape, path: str, log=None) -> str | None:
    """Write ``model`` as TorchScript (traced on a zero batch of ``input_shape``) so it loads
    with ``torch.jit.load`` and no fastkd; None (and a line saying why) when tracing fails."""
    import warnings

    was = model.training
    model.eval()
    try:
        p0 = next(iter(model.parameters()), None)
        x = torch.zeros((2, *input_shape), device=p0.device if p0 is not None else "cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, x, check_trace=False)
            traced.save(path)
        return path
    except Exception as e:  # a model tracing cannot follow: the checkpoint still has it
        (log or _log)(f"no TorchScript export ({type(e).__name__}: {' '.join(str(e).split())[:120]})")
        return None
    finally:
        model.train(was)


def student_kwargs(name: str, input_shape) -> dict:
    """Constructor arguments a zoo model needs for inputs of ``input_shape`` (cnn, mlp: the side)."""
    if ":" not in name and name.startswith(("cnn", "mlp")) and len(input_shape) == 3:
        return {"input_size": int(input_shape[-1])}
    return {}


# --------------------------------------------------------------------------- student
def add_student_args(p: argparse.ArgumentParser, *, default: str | None = None, training: bool = True,
                     epochs: int = 30, batch_size: int = 256, lr: float = 0.5) -> None:
    from .. import models

    g = p.add_argument_group("student")
    g.add_argument("--student", required=default is None, default=default, metavar="ARCH",
                   help=f"student model: a fastkd model ({', '.join(models.names())}), torchvision:NAME, timm:NAME "
                        "or package.module:factory" + (f" (default: {default})" if default else ""))
    if training:
        g.add_argument("--epochs", type=int, default=epochs, help="student epochs (%(default)s)")
        g.add_argument("--student-batch-size", type=int, default=batch_size, help="(%(default)s)")
        g.add_argument("--student-lr", type=float, default=lr, help="peak SGD lr, one-cycle (%(default)s)")


def build_student(a, num_classes: int, shape) -> torch.nn.Module:
    """The student of ``--student`` for the teacher's classes and inputs; one line naming the
    flag when it cannot be built or cannot take the inputs (checked before any work)."""
    from .. import models

    try:
        student = models.build(a.student, num_classes=num_classes, in_channels=shape[0],
                               **student_kwargs(a.student, shape))
        with torch.no_grad():
            student.eval()(torch.zeros((2, *shape)))
    except Exception as e:
        raise UsageError(f"--student {a.student} cannot take the teacher's inputs of shape "
                         f"{','.join(map(str, shape))}: {' '.join(str(e).split())[:200]}") from None
    return student.train()


# --------------------------------------------------------------------------- evaluation data
def add_eval_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    g = p.add_argument_group("evaluation data and normalisation")
    g.add_argument("--eval-data", default=default, metavar="PATH|digits|fmnist",
                   help="labelled images to evaluate teacher and student on: an image folder (one subfolder per "
                        "class, as torchvision's ImageFolder), an .npz or a .pt file (images and labels), or "
                        "'digits' / 'fmnist' (the bundled sets' test splits, at the teacher's input size); "
                        "8-bit images are scaled to [0, 1] and normalised with --mean/--std (default: the test "
                        "split for the bundled teachers, none otherwise; 'none': no evaluation)"
                        + (f" (default: {default})" if default else ""))
    g.add_argument("--mean", type=float, nargs="+", metavar="M",
                   help="per-channel mean the teacher's inputs are normalised with, (x - mean) / std, e.g. "
                        "0.4914 0.4822 0.4465; also the synthesis clamp (the normalised pixel range) unless "
                        "--clamp is given")
    g.add_argument("--std", type=float, nargs="+", metavar="S", help="per-channel std of that normalisation")


def check_eval_args(p: argparse.ArgumentParser, a) -> None:
    if (a.mean is None) != (a.std is None):
        p.error("--mean and --std go together (the teacher's input normalisation)")
    if a.std is not None and any(v <= 0 for v in a.std):
        p.error(f"--std values must be > 0, got {' '.join(f'{v:g}' for v in a.std)}")


def normalization(a, shape) -> dict | None:
    """``{"mean": [...], "std": [...]}`` of --mean/--std, checked against the channels."""
    if a.mean is None:
        return None
    for flag, v in (("--mean", a.mean), ("--std", a.std)):
        if len(v) not in (1, shape[0]):
            raise UsageError(f"{flag}: give 1 or {shape[0]} values (the teacher's input channels), got {len(v)}")
    return {"mean": list(a.mean), "std": list(a.std)}


def load_eval(a, shape, num_classes: int):
    """``(x, y)`` of --eval-data (None without it), checked against the teacher's inputs
    and classes before any work."""
    from .. import data

    src = a.eval_data
    if src is None:  # a bundled teacher is evaluated on its data set's test split by default
        src = {"digits": "digits", "fmnist": "fmnist", "fmnist-bn": "fmnist"}.get(getattr(a, "teacher", None))
        a.eval_data = src
    if not src or src == "none":
        return None
    if src in ("digits", "fmnist"):
        if len(shape) != 3 or shape[0] != 1 or shape[1] != shape[2]:
            raise UsageError(f"--eval-data {src}: the bundled sets are 1-channel square images; the teacher takes "
                             f"{','.join(map(str, shape))}")
        try:
            _, _, x, y = data.digits(shape[-1]) if src == "digits" else data.fmnist(shape[-1])
        except FileNotFoundError as e:
            raise UsageError(f"--eval-data fmnist: {e}") from None
    else:
        x, y = data.load_labelled(src, input_shape=shape, mean=a.mean, std=a.std)
    if int(y.max()) >= num_classes or int(y.min()) < 0:
        raise UsageError(f"--eval-data {src}: labels run from {int(y.min())} to {int(y.max())} but the teacher has "
                         f"{num_classes} classes")
    return x, y


# --------------------------------------------------------------------------- the run
def add_run_args(p: argparse.ArgumentParser, out: str, *, seed: bool = True) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--out", default=out, help="output folder (%(default)s); a finished run's folder is refused "
                   "without --overwrite, an unfinished one resumes where the method can")
    g.add_argument("--overwrite", action="store_true", help="replace the results of a finished run in --out")
    if seed:
        g.add_argument("--seed", type=int, default=0, help="(%(default)s)")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--quiet", action="store_true", help="no progress lines")


def positive(p: argparse.ArgumentParser, a, *names) -> None:
    """One line naming the flag for a count that is not a positive integer."""
    for n in names:
        v = getattr(a, n, None)
        if v is not None and v < 1:
            p.error(f"--{n.replace('_', '-')} must be a positive integer, got {v}")


def finish(a, *, method: str, student, teacher, shape, num_classes: int, check_x, what: str, summary: dict,
           normalize: dict | None = None, log=None, smoke: bool = False, teacher_labels=None,
           path: str = "student.pt") -> int:
    """End a run: write the student (checkpoint + TorchScript), check it against the teacher
    (a collapsed student raises after everything is written), write summary.json with the
    run record, and say where things are and how to load them. ``smoke``: a smoke test of the
    pipeline at a budget too small to learn anything; a collapsed student is only a warning.
    ``teacher_labels``: the teacher's known answers on ``check_x`` (a black-box teacher is not
    queried again). ``summary`` is completed in place."""
    from ..distill import StudentCollapsedError
    from ..teachers import save_teacher

    log = log or _log
    path = save_teacher(student, os.path.join(a.out, path), name=a.student, num_classes=num_classes,
                        in_channels=shape[0], input_shape=shape, kwargs=student_kwargs(a.student, shape),
                        normalize=normalize, method=method)
    script = export_torchscript(student, shape, os.path.splitext(path)[0] + ".torchscript.pt", log=log)
    summary.update(method=method, student=a.student, student_path=path, student_torchscript=script)
    try:
        summary["student_check"] = _run.finish_student(student, teacher, check_x, what=what, log=log,
                                                       teacher_labels=teacher_labels)
    except StudentCollapsedError as e:
        if not smoke:
            summary["status"] = f"failed: {e}"
            raise
        log(f"warning (smoke test): {e}")
        summary["status"] = "smoke test"
    finally:
        summary["run"] = _run.run_record(getattr(a, "seed", summary.get("seed")))
        summary.setdefault("status", "ok")
        _run.write_summary(a.out, summary)
    print(f"student written to {path}; load it with fastkd.teachers.load_teacher({path!r})"
          + (f", or without fastkd: torch.jit.load({script!r})" if script else ""))
    return 0


# --------------------------------------------------------------------------- config dataclasses
def add_config_args(p: argparse.ArgumentParser, cfg, title: str, skip=()) -> None:
    """One option per field of the config dataclass ``cfg`` (its values are the defaults):
    ``--field-name``. Booleans take true/false, tuples as many values as they hold, fields
    defaulting to None the type named by ``metadata["type"]`` (and ``metadata["nargs"]``).
    A field's ``metadata`` may give ``help``, ``choices`` and extra ``flags`` (other names)."""
    g = p.add_argument_group(title)
    for f in dataclasses.fields(cfg):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        v = getattr(cfg, f.name)
        md = f.metadata
        flags = ["--" + f.name.replace("_", "-")] + list(md.get("flags", ()))
        helptext = md.get("help", "")
        kw: dict = {"default": v, "dest": f.name}
        if isinstance(v, bool):
            kw.update(type=_bool, metavar="BOOL")
        elif isinstance(v, tuple):
            kw.update(type=type(v[0]), nargs=len(v), default=list(v))
        elif v is None:
            kw.update(type=md.get("type", str))
            if "nargs" in md:
                kw["nargs"] = md["nargs"]
        else:
            kw.update(type=type(v))
        if "choices" in md:
            kw["choices"] = md["choices"]
        if "metavar" in md:
            kw["metavar"] = md["metavar"]
        shown = " ".join(map(str, v)) if isinstance(v, tuple) else v
        kw["help"] = (helptext + " " if helptext else "") + f"(default: {shown})"
        g.add_argument(*flags, **kw)


def config_from(a, cls, **extra):
    """The config dataclass ``cls`` from the parsed options (fields without an option keep
    their defaults; tuple fields become tuples again; ``extra`` overrides)."""
    kw = {}
    for f in dataclasses.fields(cls):
        if hasattr(a, f.name):
            v = getattr(a, f.name)
            kw[f.name] = tuple(v) if isinstance(v, list) else v
    kw.update(extra)
    return cls(**kw)


def _flag_message(e: Exception) -> str:
    """``"method: field_name must ..."`` -> ``"--field-name must ..."``."""
    msg = str(e)
    head, sep, rest = msg.partition(": ")
    body = rest if sep and " " not in head else msg
    name, _, tail = body.partition(" ")
    return f"--{name.replace('_', '-')} {tail}" if name.isidentifier() else msg


def distill_cli(mod, argv) -> int:
    """``fastkd distill --method NAME`` for a method module that follows the contract:

    * ``METHOD`` (or ``METHODS``, a list), and a docstring whose first paragraph describes it;
    * ``Config``: a dataclass of its hyper-parameters (every field becomes an option; an
      optional ``validate()`` raises ValueError naming the field);
    * ``run(teacher, student, *, config, input_shape, num_classes, eval_data, device, progress,
      log, out_dir, method) -> dict``: the algorithm. It trains ``student`` in place and
      returns ``{"summary": {...JSON-able results...}, "check": (inputs, "what they are")}``;
      ``check`` are the inputs the student is checked on when there is no ``--eval-data``.

    Optional hooks: ``DEFAULT_STUDENT``; ``add_options(p)`` for options that are not
    hyper-parameters; ``load_teacher(args, device) -> (teacher, info, classes, shape)`` for
    teachers the shared ``--teacher`` does not cover; ``run_kwargs(args) -> dict`` for extra
    arguments of ``run`` from those options. Everything else (teacher, student, evaluation
    data, normalisation, output folder, student checkpoint and export, the student check,
    summary.json) is shared, with the same flags in every method.
    """
    from .. import _dist

    names = list(getattr(mod, "METHODS", None) or [mod.METHOD])
    doc = getattr(mod, "DESCRIPTION", None) or (mod.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    p = _run.Parser(prog=f"fastkd distill --method {'|'.join(names)}", description=doc)
    p.add_argument("--method", choices=names, default=names[0])
    add_teacher_args(p, required=not hasattr(mod, "load_teacher"))
    add_student_args(p, default=getattr(mod, "DEFAULT_STUDENT", None), training=False)
    add_eval_args(p)
    fields = {f.name for f in dataclasses.fields(mod.Config)}
    add_run_args(p, f"fastkd_out/{names[0]}", seed="seed" not in fields)
    add_config_args(p, mod.Config(), f"{names[0]} hyper-parameters")
    if hasattr(mod, "add_options"):
        mod.add_options(p)
    a = p.parse_args(argv)
    check_eval_args(p, a)
    try:
        cfg = config_from(a, mod.Config)
        if hasattr(cfg, "validate"):
            cfg.validate()
    except ValueError as e:
        p.error(_flag_message(e))
    extra = mod.run_kwargs(a) if hasattr(mod, "run_kwargs") else {}
    _run.claim_out_dir(a.out, a.overwrite)
    _dist.init_from_env()
    dev = _dist.device(a.device)
    teacher, info, k, shape = mod.load_teacher(a, dev) if hasattr(mod, "load_teacher") else resolve_teacher(a, dev)
    teacher = teacher.to(dev)
    normalize = normalization(a, shape)
    eval_data = load_eval(a, shape, k)
    seed = getattr(cfg, "seed", getattr(a, "seed", 0))
    torch.manual_seed(seed)
    student = build_student(a, k, shape).to(dev)
    log = (lambda s: None) if a.quiet else _log
    res = mod.run(teacher, student, config=cfg, input_shape=shape, num_classes=k, eval_data=eval_data, device=dev,
                  progress=not a.quiet, log=log, out_dir=a.out, method=a.method, normalize=normalize, **extra)
    if _dist.rank() != 0:
        return 0
    summary = dict(res.get("summary") or {}, teacher=a.teacher, seed=seed,
                   config={k2: (list(v) if isinstance(v, tuple) else v) for k2, v in dataclasses.asdict(cfg).items()})
    if eval_data is not None:
        from ..distill import evaluate

        summary.setdefault("teacher_accuracy", evaluate(teacher, eval_data))
        summary.setdefault("student_accuracy", evaluate(student, eval_data))
        print(f"teacher {100 * summary['teacher_accuracy']:.2f}%  student {100 * summary['student_accuracy']:.2f}%")
        check_x, what = eval_data[0], "the held-out inputs"
    else:
        check_x, what = res["check"]
    return finish(a, method=a.method, student=student, teacher=teacher, shape=shape, num_classes=k,
                  check_x=check_x, what=what, summary=summary, normalize=normalize, log=_log,
                  smoke=getattr(a, "smoke", False))


def _bool(s: str) -> bool:
    v = s.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
