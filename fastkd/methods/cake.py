"""CAKE and LAKE on the command line: ``fastkd distill --method cake|lake`` and
``fastkd demo [--method cake|lake]``.

Also importable: :func:`run_demo` (the demo as a function returning its summary) and
:func:`noise_baseline` (the no-skill baseline every result is compared with).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from fastkd import _dist
from fastkd._run import Parser as _Parser
from fastkd.distill import LOSSES
from fastkd.methods._cli import add_config_args, config_from, pixel_range, positive, student_kwargs
from fastkd.methods.baselines import noise_baseline

METHODS = ["cake", "lake"]

#: The bundled default (``fastkd demo``): sized to finish within 5 minutes on a 2-core CPU.
DEMO = dict(size=8, num_samples=12800, batch_size=100, steps=25, w_cls=1e3, w_contr=1e1, w_tv=1e5, lr=(1e-2, 1e-5),
            schedule="loglinear", student="cnn_half", epochs=30, student_batch_size=64, student_lr=0.1,
            augment="shift", clamp=False)

#: ``fastkd demo --data fmnist``: the CAKE paper's Fashion-MNIST row (LeNet-5 -> LeNet-5-Half,
#: 32x32), aimed at a few minutes on a 2-core CPU. docs/cake.md has the ablation behind these
#: values and the measured accuracies and times.
FMNIST_DEMO = dict(size=32, num_samples=20000, batch_size=100, steps=12, w_cls=1e3, w_contr=1.0, w_tv=1e5,
                   lr=(1.0, 1e-2), schedule="loglinear", student="lenet5_half", epochs=30, student_batch_size=128,
                   student_lr=0.05, augment="shift", clamp=True, student_init="teacher", prior="silhouette")

#: Demo configurations by data set.
DEMOS = {"digits": DEMO, "fmnist": FMNIST_DEMO}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


_BACKENDS = ["auto", "cuda", "triton", "cpp", "torch"]


@dataclass
class CAKEConfig:
    """Hyper-parameters of CAKE / LAKE (:func:`run`): the synthesis (:func:`fastkd.synthesis.cake`)
    and the student's training (:func:`fastkd.distill.train_student`). Every field is an option
    of `fastkd distill --method cake|lake` (and the synthesis fields of `fastkd synthesize`)."""
    num_samples: int = field(default=6400, metadata={"help": "samples to synthesise"})
    batch_size: int = field(default=100, metadata={"help": "samples per synthesis batch"})
    steps: int = field(default=200, metadata={"help": "gradient steps per batch"})
    w_cls: float = field(default=1e3, metadata={"help": "weight of the classification term"})
    w_contr: float = field(default=1e1, metadata={"help": "weight of the cross-class contrastive term"})
    w_tv: float = field(default=1e5, metadata={"help": "weight of the total-variation prior"})
    lr: tuple = field(default=(1e-1, 1e-5), metadata={"help": "step size of the first and the last batch",
                                                      "metavar": ("START", "END")})
    schedule: str = field(default="loglinear", metadata={
        "help": "how log(step size) goes from START to END across batches", "choices": ["loglinear", "cosine"]})
    prior: str = field(default="normal", metadata={
        "help": "initial inputs: N(0, I), U(-1, 1), or one smooth random object per image on a black background "
                "(silhouette: needs the pixel range, from --clamp or --mean/--std)",
        "choices": ["normal", "uniform", "silhouette"]})
    clamp: tuple | None = field(default=None, metadata={
        "help": "keep the inputs in [LO, HI] after every step: the normalised values of black and white for image "
                "teachers (fastkd.data.fmnist_info()['pixel_range'] for the bundled Fashion-MNIST; --mean/--std set "
                "it; default: no clamp)", "type": float, "nargs": 2, "metavar": ("LO", "HI")})
    bn_prior_weight: float = field(default=0.0, metadata={
        "help": "weight of the optional BatchNorm-statistics prior (teachers with BatchNorm)"})
    backend: str = field(default="auto", metadata={"help": "backend of the fused ops", "choices": _BACKENDS})
    epochs: int = field(default=30, metadata={"help": "student epochs"})
    student_batch_size: int = field(default=256, metadata={"help": "student batch size"})
    student_lr: float = field(default=0.5, metadata={"help": "peak SGD lr of the student (one-cycle)"})
    temperature: float = field(default=1.0, metadata={"help": "temperature of the soft targets"})
    loss: str = field(default="soft_ce", metadata={"help": "student loss", "choices": list(LOSSES)})
    augment: str = field(default="shift", metadata={
        "help": "teacher-relabelled augmentation of every student batch (image inputs only): a '+'-joined list of "
                "shift (up to 1 pixel), shift2 (up to 2), flip (horizontal), mixup (blend with another sample); "
                "none: train on the synthetic samples as they are"})
    student_init: str = field(default="scratch", metadata={
        "help": "the student's starting weights: scratch (its own initialisation) or teacher (the teacher's "
                "channels of largest weight norm, for a student of the teacher's family at a smaller width, e.g. "
                "lenet5 -> lenet5_half; see fastkd.models.init_from_teacher)", "choices": ["scratch", "teacher"]})
    seed: int = field(default=0, metadata={"help": "batch b of the synthesis depends on (seed, b); seeds the student"})

    def validate(self) -> "CAKEConfig":
        from fastkd.distill import parse_augment

        for k in ("num_samples", "batch_size", "steps", "epochs", "student_batch_size"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"cake: {k} must be a positive integer, got {v!r}")
        if len(self.lr) != 2 or not all(v > 0 for v in self.lr):
            raise ValueError(f"cake: lr START END must be positive step sizes, got {self.lr!r}")
        if self.clamp is not None and (len(self.clamp) != 2 or not self.clamp[0] < self.clamp[1]):
            raise ValueError(f"cake: clamp LO HI needs LO < HI, got {self.clamp!r}")
        if not self.student_lr > 0:
            raise ValueError(f"cake: student_lr must be > 0, got {self.student_lr!r}")
        if self.augment != "none":
            parse_augment(self.augment, "cake: augment")
        return self

    def synthesis_kwargs(self) -> dict:
        return dict(num_samples=self.num_samples, batch_size=self.batch_size, steps=self.steps, w_cls=self.w_cls,
                    w_contr=self.w_contr, w_tv=self.w_tv, lr=tuple(self.lr), schedule=self.schedule,
                    prior=self.prior, bn_prior_weight=self.bn_prior_weight, backend=self.backend,
                    clamp=tuple(self.clamp) if self.clamp else None)


#: The student-training fields of :class:`CAKEConfig` (not options of `fastkd synthesize`).
_STUDENT_FIELDS = ("epochs", "student_batch_size", "student_lr", "temperature", "loss", "augment", "student_init",
                   "seed")
Config = CAKEConfig


def add_synthesis_args(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """Options of the CAKE/LAKE synthesis (`fastkd synthesize`), from :class:`CAKEConfig`."""
    import dataclasses

    add_config_args(p, dataclasses.replace(CAKEConfig(), **(defaults or {})), "synthesis (CAKE/LAKE)",
                    skip=_STUDENT_FIELDS)


def synthesis_kwargs(a) -> dict:
    """The synthesis arguments of parsed options (one line naming the flag when one cannot work)."""
    from fastkd._run import UsageError
    from fastkd.methods._cli import _flag_message

    try:
        return config_from(a, CAKEConfig, **{k: getattr(CAKEConfig(), k) for k in _STUDENT_FIELDS}
                           ).validate().synthesis_kwargs()
    except ValueError as e:
        raise UsageError(_flag_message(e)) from None


_device = _dist.device
_init_distributed = _dist.init_from_env
_rank = _dist.rank


# --------------------------------------------------------------------------- pieces
def save_sample_grid(ds, path: str, per_class: int = 8, title: str | None = None) -> str:
    """PNG grid of synthesized samples: one row per class, ``per_class`` columns spread over
    the step-size schedule (early to late batches)."""
    from fastkd.viz import save_image_grid

    k = ds.num_classes
    cells, titles = [], []
    blank = torch.full_like(ds.inputs[0], float("nan")) if len(ds) else None
    for c in range(k):
        idx = torch.nonzero(ds.labels == c).flatten()
        pick = idx[torch.linspace(0, len(idx) - 1, per_class).long()] if len(idx) else idx
        for j in range(per_class):
            cells.append(ds.inputs[pick[j]] if j < len(pick) else blank)
            titles.append(str(c) if j == 0 else "")
    return save_image_grid(torch.stack(cells), path, ncols=per_class, titles=titles,
                           title=title or "synthesized samples (rows: intended class)")


def _fmt_table(rows) -> str:
    w = max(len(r[0]) for r in rows)
    out = [f"{'':<{w}}  {'test acc':>9}  {'seconds':>8}  note"]
    for name, acc, sec, note in rows:
        a = f"{100 * acc:8.2f}%" if acc is not None else f"{'-':>9}"
        s = f"{sec:8.1f}" if sec is not None else f"{'-':>8}"
        out.append(f"{name:<{w}}  {a}  {s}  {note}")
    return "\n".join(out)


# --------------------------------------------------------------------------- demo
def run_demo(method: str = "cake", *, data: str = "digits", out_dir: str = "fastkd_out/demo", seed: int = 0,
             train_teacher: bool = False, num_samples: int | None = None, steps: int | None = None,
             epochs: int | None = None, augment: str | None = "default", reference: bool = False,
             baseline: bool = True, device=None, progress: bool = True, threads: int | None = None,
             data_root: str | None = None) -> dict:
    """A bundled default end to end; returns (and writes) the JSON summary.

    ``data="digits"`` (:data:`DEMO`): the bundled digits CNN teacher (or one trained now
    with ``train_teacher=True``), student ``cnn_half``. ``data="fmnist"``
    (:data:`FMNIST_DEMO`): the CAKE paper's Fashion-MNIST row, the bundled LeNet-5 teacher
    (or one trained now), student ``lenet5_half``; needs the Fashion-MNIST files
    (:func:`fastkd.data.fmnist`, ``data_root``). Synthesis: CAKE/LAKE; the student is
    distilled on the synthetic set; baseline: the same student recipe on teacher-labelled
    N(0, I) inputs; ``reference=True`` adds the eager authors' loop at the same budget.
    ``augment``: the student's teacher-relabelled augmentation
    (:func:`fastkd.distill.train_student`; the configuration's by default, None to train on
    the synthetic samples as they are); the baseline and the reference get the same recipe.
    Only the test split is touched, for evaluation.
    """
    from fastkd import data as _data
    from fastkd import distill, models
    from fastkd.synthesis import cake
    from fastkd.teachers import digits_teacher, fmnist_teacher, train_fmnist_teacher

    if method not in METHODS:
        raise ValueError(f"run_demo: method must be one of {METHODS}, got {method!r}")
    if data not in DEMOS:
        raise ValueError(f"run_demo: data must be one of {sorted(DEMOS)}, got {data!r}")
    if threads:
        torch.set_num_threads(threads)
    dev = _device(device)
    cfg = dict(DEMOS[data])
    cfg.update({k: v for k, v in dict(num_samples=num_samples, steps=steps, epochs=epochs).items() if v is not None})
    if augment != "default":
        cfg["augment"] = None if augment in (None, "none") else augment
    t_all = time.perf_counter()
    timings = {}
    if data == "digits":
        _, _, x_te, y_te = _data.digits(cfg["size"])  # evaluation only
        info = _data.digits_info(cfg["size"])
    else:
        _, _, x_te, y_te = _data.fmnist(cfg["size"], root=data_root)  # evaluation only
        info = _data.fmnist_info(cfg["size"], root=data_root)
    test = (x_te, y_te)

    t0 = time.perf_counter()
    if data == "digits":
        teacher = (distill.train_teacher(size=cfg["size"], seed=seed, progress=progress, device=dev)[0]
                   if train_teacher else digits_teacher()[0])
    else:
        teacher = (train_fmnist_teacher("fmnist", root=data_root, device=dev, progress=progress)[0]
                   if train_teacher else fmnist_teacher("fmnist")[0])
    teacher_name = "cnn" if data == "digits" else "lenet5"
    teacher.to(dev).eval()
    timings["teacher"] = time.perf_counter() - t0
    t_acc = distill.evaluate(teacher, test)
    _log(f"demo [{method}, {data}]: teacher {teacher_name} ({models.num_parameters(teacher)} parameters): test "
         f"accuracy {100 * t_acc:.2f}%; seed {seed}; config {json.dumps({k: v for k, v in cfg.items()})}")

    syn_kw = dict(num_classes=10, input_shape=info["input_shape"], num_samples=cfg["num_samples"],
                  batch_size=cfg["batch_size"], steps=cfg["steps"], w_cls=cfg["w_cls"], w_contr=cfg["w_contr"],
                  w_tv=cfg["w_tv"], lr=cfg["lr"], schedule=cfg["schedule"], seed=seed,
                  clamp=info["pixel_range"] if cfg.get("clamp") else None, prior=cfg.get("prior", "normal"))
    t0 = time.perf_counter()
    ds = cake(teacher, langevin=(method == "lake"), progress=progress, **syn_kw)
    timings["synthesis"] = time.perf_counter() - t0
    os.makedirs(out_dir, exist_ok=True)
    grid = save_sample_grid(ds, os.path.join(out_dir, f"samples_{method}.png" if data == "digits"
                                             else f"samples_{method}_{data}.png"),
                            title=f"{method.upper()} samples for the {data} teacher (rows: class 0-9)")

    train_kw = dict(epochs=cfg["epochs"], batch_size=cfg["student_batch_size"], lr=cfg["student_lr"],
                    augment=cfg["augment"])

    def student():
        torch.manual_seed(seed)
        m = models.create(cfg["student"], num_classes=10, in_channels=1,
                          **student_kwargs(cfg["student"], info["input_shape"])).to(dev)
        if cfg.get("student_init") == "teacher":
            models.init_from_teacher(m, teacher)
        return m

    t0 = time.perf_counter()
    s = student()
    h = distill.train_student(s, ds, teacher=teacher, eval_data=test, seed=seed, progress=progress,
                              eval_every=cfg["epochs"], **train_kw)
    timings["student"] = time.perf_counter() - t0
    rows = [(f"teacher ({teacher_name})", t_acc, timings["teacher"], "bundled checkpoint" if not train_teacher else "trained now"),
            (f"student {cfg['student']} [{method}]", h.final_accuracy, timings["synthesis"] + timings["student"],
             f"{ds.meta['throughput_sample_steps_per_s']:.0f} sample-steps/s")]
    summary = {"method": method, "data": data, "seed": seed, "config": cfg, "device": str(dev),
               "torch_threads": torch.get_num_threads(), "teacher_accuracy": t_acc,
               "student_accuracy": h.final_accuracy, "teacher_agreement": ds.teacher_agreement(),
               "synthesis_throughput_sample_steps_per_s": ds.meta["throughput_sample_steps_per_s"],
               "student_parameters": models.num_parameters(s), "teacher_parameters": models.num_parameters(teacher),
               "sample_grid": grid}
    if reference:
        from fastkd.synthesis.reference import authors_loop

        t0 = time.perf_counter()
        ref = authors_loop(teacher, langevin=(method == "lake"), progress=progress,
                           **{k: v for k, v in syn_kw.items() if k not in ("clamp", "prior")})  # their loop: no clamp, N(0, I)
        timings["reference_synthesis"] = time.perf_counter() - t0
        sr = student()
        hr = distill.train_student(sr, ref, teacher=teacher, eval_data=test, seed=seed, progress=progress,
                                   eval_every=cfg["epochs"], **train_kw)
        timings["reference_student"] = time.perf_counter() - t0 - timings["reference_synthesis"]
        rows.append((f"student [authors' loop, {method}]", hr.final_accuracy,
                     timings["reference_synthesis"] + timings["reference_student"],
                     f"{ref.meta['throughput_sample_steps_per_s']:.0f} sample-steps/s"))
        summary.update(reference_accuracy=hr.final_accuracy,
                       reference_throughput_sample_steps_per_s=ref.meta["throughput_sample_steps_per_s"])
    if baseline:
        t0 = time.perf_counter()
        hb = noise_baseline(teacher, student(), num_samples=cfg["num_samples"], input_shape=info["input_shape"],
                            eval_data=test, seed=seed, progress=progress, eval_every=cfg["epochs"],
                            clamp=syn_kw["clamp"], prior=syn_kw["prior"], **train_kw)
        timings["baseline"] = time.perf_counter() - t0
        what = ("the prior's draws" if syn_kw["prior"] != "normal" else "N(0,I) inputs") + (
            ", clamped" if syn_kw["clamp"] else "")
        rows.append((f"baseline ({what})", hb.final_accuracy, timings["baseline"], "no-skill reference"))
        summary["baseline_accuracy"] = hb.final_accuracy
    timings["total"] = time.perf_counter() - t_all
    summary["seconds"] = timings
    rows.append(("total", None, timings["total"], ""))
    table = _fmt_table(rows)
    summary["table"] = table
    path = os.path.join(out_dir, f"summary_{method}.json" if data == "digits" else f"summary_{method}_{data}.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print(table)
    print(f"sample grid: {grid}\nsummary: {path}")
    return summary


# --------------------------------------------------------------------------- CLI
def _demo_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="fastkd demo",
        description="CAKE/LAKE end to end on the bundled digits default: load the bundled teacher (a small CNN "
                    "trained on scikit-learn's digits), synthesise data from it without any real image, distil a "
                    "half-width student, and compare it on the held-out test split with the teacher and with the "
                    "no-skill baseline (the same student distilled on teacher-labelled Gaussian noise). Prints a "
                    "table, writes a sample-grid PNG and a JSON summary.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", choices=METHODS, default="cake", help="cake (implicit noise) or lake (Langevin)")
    p.add_argument("--data", choices=sorted(DEMOS), default="digits",
                   help="digits: scikit-learn's bundled 8x8 digits; fmnist: Fashion-MNIST 32x32 (the CAKE paper's "
                        "LeNet-5 -> LeNet-5-Half row; needs the IDX files, see --data-root)")
    p.add_argument("--data-root", help="folder of the Fashion-MNIST IDX files (default: "
                                       "/usr/share/datasets/fashion-mnist, from apt-get install dataset-fashion-mnist)")
    p.add_argument("--out", default="fastkd_out/demo", help="folder for the PNG and the JSON summary")
    p.add_argument("--seed", type=int, default=0, help="seed of synthesis and student training")
    p.add_argument("--num-samples", type=int, help="synthetic samples (default: the data set's demo configuration, "
                   f"digits {DEMO['num_samples']}, fmnist {FMNIST_DEMO['num_samples']})")
    p.add_argument("--steps", type=int, help="synthesis steps per batch (default: digits "
                   f"{DEMO['steps']}, fmnist {FMNIST_DEMO['steps']})")
    p.add_argument("--epochs", type=int, help=f"student epochs (default: digits {DEMO['epochs']}, fmnist "
                                              f"{FMNIST_DEMO['epochs']})")
    p.add_argument("--train-teacher", action="store_true", help="train the teacher now instead of loading the "
                   "bundled checkpoint (digits: about a minute; fmnist: a few minutes)")
    p.add_argument("--reference", action="store_true", help="also run the eager authors' loop at the same budget")
    p.add_argument("--no-baseline", action="store_true", help="skip the noise baseline")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--augment", type=_augment_arg, default="default",
                   help="teacher-relabelled augmentation of the student's batches: a '+'-joined list of shift, "
                        "shift2, flip, mixup, or none (default: the data set's configuration, digits "
                        f"{DEMO['augment']}, fmnist {FMNIST_DEMO['augment']})")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _augment_arg(v: str) -> str:
    from fastkd.distill import parse_augment

    if v == "default":
        return v
    try:
        parse_augment(v, "--augment")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None
    return v


def _positive(a, p, *names) -> None:
    positive(p, a, *names)


def cli_demo(argv) -> int:
    p = _demo_parser()
    a = p.parse_args(argv)
    _positive(a, p, "num_samples", "steps", "epochs")
    if a.data == "fmnist":
        from fastkd import data as _data

        try:
            _data.fmnist_info(32, root=a.data_root)
        except (FileNotFoundError, ValueError) as e:
            p.error(str(e))
    run_demo(a.method, data=a.data, data_root=a.data_root, out_dir=a.out, seed=a.seed, train_teacher=a.train_teacher, num_samples=a.num_samples,
             steps=a.steps, epochs=a.epochs, augment=a.augment, reference=a.reference, baseline=not a.no_baseline, device=a.device,
             progress=not a.quiet, threads=a.threads)
    return 0


DEFAULT_STUDENT = None  # --student is required
DESCRIPTION = ("Distil a student from a teacher without its data: synthesise a data set with CAKE (or LAKE: explicit "
               "Langevin noise), then train the student on the teacher's soft labels of it.")


def run(teacher, student, *, config: CAKEConfig, input_shape, num_classes: int, eval_data=None, device=None,
        progress: bool = True, log=None, out_dir: str | None = None, method: str = "cake", normalize=None,
        dataset=None, **_) -> dict:
    """CAKE (or LAKE, ``method="lake"``): synthesise (into ``out_dir/synthetic``, resumable), or
    take ``dataset``, then distil ``student`` (trained in place) on the teacher's soft labels.
    ``normalize`` ({"mean", "std"}) gives the clamp when ``config.clamp`` is None."""
    from fastkd import distill
    from fastkd.synthesis import cake

    if config.student_init == "teacher":  # before any synthesis: a student it cannot start fails at once
        from fastkd import models
        from fastkd._run import UsageError

        try:
            models.init_from_teacher(student, teacher)
        except (TypeError, ValueError) as e:
            raise UsageError(f"--student-init teacher (student_init='teacher'): {e}") from None
    syn_kw = config.synthesis_kwargs()
    if normalize and syn_kw["clamp"] is None:
        syn_kw["clamp"] = pixel_range(normalize["mean"], normalize["std"])
    if dataset is None and syn_kw["prior"] == "silhouette" and (syn_kw["clamp"] is None or len(input_shape) != 3):
        from fastkd._run import UsageError

        raise UsageError("--prior silhouette draws objects on a black background: it needs image inputs and the pixel "
                         "range, from --clamp LO HI or --mean/--std" + (f" (input shape {tuple(input_shape)})"
                                                                        if len(input_shape) != 3 else ""))
    if dataset is not None:
        ds = dataset
    else:
        ds = cake(teacher, num_classes=num_classes, input_shape=input_shape, langevin=(method == "lake"),
                  seed=config.seed, device=device, progress=progress,
                  out_dir=os.path.join(out_dir, "synthetic") if out_dir else None, **syn_kw)
    image = len(input_shape) == 3
    h = distill.train_student(student, ds, epochs=config.epochs, batch_size=config.student_batch_size,
                              lr=config.student_lr, temperature=config.temperature, loss=config.loss,
                              eval_data=eval_data, seed=config.seed, progress=progress, device=device,
                              augment=None if config.augment == "none" or not image else config.augment,
                              teacher=teacher if config.augment != "none" else None,
                              checkpoint=os.path.join(out_dir, "student_checkpoint.pt") if out_dir else None)
    grid = None
    if out_dir is not None and _dist.rank() == 0 and image and input_shape[0] in (1, 3):
        try:
            grid = save_sample_grid(ds, os.path.join(out_dir, "samples.png"))
        except ImportError:
            _log("matplotlib is not installed: no sample grid written")
    return {"summary": {"synthesis": {k: v for k, v in ds.meta.items()
                                      if isinstance(v, (int, float, str, list, type(None)))},
                        "student_history": h.to_dict(), "samples_png": grid},
            "check": (ds.inputs, "the synthetic inputs")}


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="PATH", help="use this synthetic data set (a .pt file or a synthesis out "
                   "folder) instead of synthesising")
    p.add_argument("--eval-digits", action="store_true", help="the same as --eval-data digits")
    p.epilog = ("example: fastkd distill --method cake --teacher teacher.pt2 --student torchvision:resnet18 "
                "--mean 0.49 0.48 0.45 --std 0.25 0.24 0.26 --eval-data test_images/ --out runs/cifar. "
                "Under torchrun (e.g. torchrun --nproc-per-node 2 -m fastkd distill ...), synthesis batches are "
                "shared between the processes and the student trains with DistributedDataParallel.")


def run_kwargs(a) -> dict:
    from fastkd._run import UsageError
    from fastkd.synthesis import SyntheticDataset

    if a.eval_digits:
        if a.eval_data:
            raise UsageError("--eval-data and --eval-digits: give one of them")
        a.eval_data = "digits"
    if a.data:
        if not os.path.exists(a.data):
            raise UsageError(f"--data {a.data} does not exist (a synthetic data set: .pt file or synthesis folder)")
        return {"dataset": SyntheticDataset.load(a.data)}
    return {}


def cli_distill(argv) -> int:
    """``fastkd distill --method cake|lake``: the shared command line of the method contract."""
    from fastkd.methods._cli import distill_cli

    return distill_cli(sys.modules[__name__], argv)
