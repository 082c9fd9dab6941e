"""TA-DFKD: teacher-agnostic data-free distillation (generator, no class prior, GMM selection).

A generator G(z) is trained against the frozen teacher T and the student S; the teacher
acts as a lenient expert that only *filters* the generated samples instead of imposing
a class prior on the generator:

* generator loss (one step per iteration)::

      adv_weight * (1 - JS(softmax(T(x)/tau), softmax(S(x)/tau)) / ln 2)   # maximise disagreement
    + bn_weight  * sum over T's BN layers of ||mu - mu_run|| + ||var - var_run||  (fastkd.ops.bn_stats_loss)
    + tv_weight  * per-sample sum of squared neighbour differences         (fastkd.ops.tv_loss, p=2)
    + l2_weight  * per-sample ||x||_2
    [+ class_prior_weight * (CE(T(x), argmax T(x)) - ie_weight * H(mean softmax T(x)))]  # DAFL, off

* selection: per generated sample, the teacher's cross-entropy against its own argmax,
  min-max normalised over the batch, fitted with a 2-component 1-D Gaussian mixture on
  the device (:func:`fastkd.ops.gmm_select`); samples whose posterior for the low-loss
  component exceeds ``threshold`` are kept;
* student: ``student_steps`` SGD steps per generator step on fresh generated batches,
  L1 between the student's and the teacher's logits on the selected samples; cosine
  learning-rate schedules for both optimisers.

Defaults (:class:`TADFKDConfig`) follow the paper's recipe (GUIDE.md, section 2), with the
generator scaled to the image size (DAFL generator: linear to (2 ngf, size/4, size/4),
two upsampling conv blocks, tanh, affine-free BatchNorm). For the 16x16 digits default the
noise dimension and width are reduced (``nz=256, ngf=32``, instead of 1000 / 64 for
32x32 CIFAR) so that a run takes minutes on a CPU.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._run import Parser as _Parser
from .._progress import Progress
from ..nn.bn_stats import BNStatsLoss

METHOD = "tadfkd"

__all__ = ["METHOD", "TADFKDConfig", "Generator", "distill", "selection_scores", "cli_distill", "cli_demo",
           "save_sample_grid"]


@dataclass
class TADFKDConfig:
    """Hyper-parameters of :func:`distill` (defaults: the recipe of the digits default)."""
    iterations: int = 400          # generator steps
    student_steps: int = 10        # student steps per generator step
    batch_size: int = 128
    nz: int = 256                  # noise dimension (paper: 1000 at 32x32)
    ngf: int = 32                  # generator width (paper: 64 at 32x32)
    lr_g: float = 1e-3             # Adam, betas (0.5, 0.999)
    lr_s: float = 0.05             # SGD momentum 0.9, cosine schedule
    momentum: float = 0.9
    weight_decay: float = 5e-4
    temperature: float = 3.0       # of the JS disagreement
    adv_weight: float = 1.0
    bn_weight: float = 10.0
    tv_weight: float = 1.5e-5
    l2_weight: float = 1e-5
    class_prior_weight: float = 0.0   # > 0: DAFL-style class prior (for comparison only)
    ie_weight: float = 5.0            # DAFL information-entropy weight inside the class prior
    select: bool = True
    threshold: float = 0.5
    gmm_max_iter: int = 10
    gmm_tol: float = 1e-2
    seed: int = 0
    eval_every: int = 50           # generator steps between test evaluations (0: only at the end)
    backend: str = "auto"          # for the fused ops

    def validate(self) -> "TADFKDConfig":
        pos_int = ("iterations", "student_steps", "batch_size", "nz", "ngf", "gmm_max_iter")
        for k in pos_int:
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"tadfkd: {k} must be an int >= 1, got {v!r}")
        if self.batch_size < 2:
            raise ValueError(f"tadfkd: batch_size must be >= 2 (the selection fits a mixture), got {self.batch_size}")
        for k in ("lr_g", "lr_s", "temperature"):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"tadfkd: {k} must be > 0, got {v!r}")
        for k in ("adv_weight", "bn_weight", "tv_weight", "l2_weight", "class_prior_weight", "ie_weight",
                  "weight_decay", "momentum", "gmm_tol"):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"tadfkd: {k} must be >= 0, got {v!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"tadfkd: threshold must be in [0, 1], got {self.threshold!r}")
        return self


class Generator(nn.Module):
    """DAFL/DFAD-style generator: z (nz) -> image (channels, size, size), batch-normalised output.

    Linear to 2*ngf x size/4 x size/4, BN, [upsample x2, conv3, BN, LeakyReLU] with 2*ngf then
    ngf channels, conv3 to ``channels``, tanh, BatchNorm without affine parameters (the output
    has zero mean, unit variance per channel over the batch, like normalised data).
    """

    def __init__(self, nz: int = 256, ngf: int = 32, size: int = 16, channels: int = 1) -> None:
        super().__init__()
        if size % 4 != 0 or size < 4:
            raise ValueError(f"Generator: size must be a multiple of 4, got {size}")
        self.nz, self.size, self.channels = nz, size, channels
        self.init = size // 4
        self.l1 = nn.Linear(nz, 2 * ngf * self.init ** 2)
        self.net = nn.Sequential(
            nn.BatchNorm2d(2 * ngf),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, 2 * ngf, 3, padding=1, bias=False), nn.BatchNorm2d(2 * ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, 3, padding=1, bias=False), nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, channels, 3, padding=1), nn.Tanh(),
            nn.BatchNorm2d(channels, affine=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.l1(z).view(z.shape[0], -1, self.init, self.init)
        return self.net(h)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        dev = self.l1.weight.device
        z = torch.randn(n, self.nz, generator=generator, device="cpu").to(dev)
        return self(z)


def selection_scores(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Teacher cross-entropy against its own argmax, min-max normalised over the batch (N,)."""
    t = teacher_logits.detach().float()
    ce = torch.logsumexp(t, 1) - t.max(1).values
    lo, hi = ce.min(), ce.max()
    return (ce - lo) / (hi - lo).clamp_min(1e-12)


def _js_disagreement(t_logits, s_logits, tau):
    p = F.softmax(t_logits / tau, 1)
    q = F.softmax(s_logits / tau, 1)
    m = (0.5 * (p + q)).clamp_min(1e-12)
    js = 0.5 * (p * (p.clamp_min(1e-12).log() - m.log())).sum(1) + \
        0.5 * (q * (q.clamp_min(1e-12).log() - m.log())).sum(1)
    return 1.0 - js.mean() / math.log(2.0)


def distill(teacher: nn.Module, student: nn.Module, *, config: TADFKDConfig | None = None,
            image_shape=(1, 16, 16), eval_data=None, device=None,
            progress: bool = True, log=None) -> dict:
    """Run TA-DFKD; trains ``student`` in place and returns a summary dict.

    Args:
        teacher: the classifier; put in eval mode and frozen (its parameters stop requiring
            grad). Needs BatchNorm layers when ``bn_weight > 0``.
        student: the model to train.
        config: :class:`TADFKDConfig`.
        image_shape: (channels, H, W) of the teacher's inputs; H == W, a multiple of 4.
        eval_data: optional (x, y) tensors (the test split of the teacher's data set) to
            report the student's accuracy every ``eval_every`` generator steps.
    Returns a dict with the config, the final test accuracy (if ``eval_data``), a history of
    losses / selection rates / accuracies and the trained generator (key ``"generator"``).
    """
    from ..distill import evaluate

    cfg = (config or TADFKDConfig()).validate()
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module):
        raise TypeError("tadfkd: teacher and student must be nn.Modules")
    c, h, w = image_shape
    if h != w:
        raise ValueError(f"tadfkd: square images only, got image_shape {tuple(image_shape)}")
    dev = torch.device(device) if device is not None else next(teacher.parameters()).device
    torch.manual_seed(cfg.seed)
    gen_rng = torch.Generator().manual_seed(cfg.seed + 1)
    teacher = teacher.to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = student.to(dev)
    G = Generator(cfg.nz, cfg.ngf, h, c).to(dev)
    try:
        bn = BNStatsLoss(teacher, backend=cfg.backend) if cfg.bn_weight > 0 else None
    except ValueError as e:
        raise ValueError(f"tadfkd: {e} (bn_weight=0, --bn-weight 0 on the command line)") from None
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr_g, betas=(0.5, 0.999))
    opt_s = torch.optim.SGD(student.parameters(), lr=cfg.lr_s, momentum=cfg.momentum,
                            weight_decay=cfg.weight_decay)
    sched_g = torch.optim.lr_scheduler.CosineAnnealingLR(opt_g, cfg.iterations)
    sched_s = torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, cfg.iterations * cfg.student_steps)
    hist: list[dict] = []
    bar = Progress(cfg.iterations, "tadfkd", enabled=progress, unit="it", min_interval=5.0)
    t0 = time.perf_counter()
    try:
        for it in range(cfg.iterations):
            # ---- generator step
            G.train()
            student.eval()
            z = torch.randn(cfg.batch_size, cfg.nz, generator=gen_rng).to(dev)
            x = G(z)
            t_logits = teacher(x)
            s_logits = student(x)
            l_adv = _js_disagreement(t_logits, s_logits, cfg.temperature)
            l_bn = bn() if bn is not None else x.new_zeros(())
            l_tv = ops.tv_loss(x, p=2, reduction="sum", backend=cfg.backend) / x.shape[0]
            l_l2 = x.flatten(1).norm(dim=1).mean()
            loss_g = cfg.adv_weight * l_adv + cfg.bn_weight * l_bn + cfg.tv_weight * l_tv + cfg.l2_weight * l_l2
            if cfg.class_prior_weight > 0:
                ce = F.cross_entropy(t_logits, t_logits.argmax(1))
                pm = F.softmax(t_logits, 1).mean(0)
                ent = -(pm * pm.clamp_min(1e-12).log()).sum()
                loss_g = loss_g + cfg.class_prior_weight * (ce - cfg.ie_weight * ent)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            sched_g.step()
            # ---- student steps on selected samples: one generated pool of student_steps x
            # batch_size samples per generator step, one teacher pass and one mixture fit over
            # it, then student_steps minibatches of the kept samples
            student.train()
            with torch.no_grad():
                pool = cfg.student_steps * cfg.batch_size
                z = torch.randn(pool, cfg.nz, generator=gen_rng).to(dev)
                xs = G(z)  # train mode: the same batch statistics as in the generator step
                if bn is not None:
                    with bn.paused():
                        ts = teacher(xs)
                else:
                    ts = teacher(xs)
                if cfg.select:
                    mask = ops.gmm_select(selection_scores(ts), threshold=cfg.threshold,
                                          max_iter=cfg.gmm_max_iter, tol=cfg.gmm_tol, nan_policy="omit",
                                          backend=cfg.backend if cfg.backend in ("torch", "triton") else "auto")
                    xs, ts = xs[mask], ts[mask]
                perm = torch.randperm(xs.shape[0], generator=gen_rng).to(dev)
                xs, ts = xs[perm], ts[perm]
            kept = xs.shape[0]
            loss_s_sum = 0.0
            n_steps = 0
            for xb, tb in zip(xs.chunk(cfg.student_steps), ts.chunk(cfg.student_steps)):
                if xb.shape[0] < 2:  # BatchNorm students need 2 samples
                    continue
                loss_s = F.l1_loss(student(xb), tb)
                opt_s.zero_grad(set_to_none=True)
                loss_s.backward()
                opt_s.step()
                loss_s_sum += loss_s.item()
                n_steps += 1
            for _ in range(cfg.student_steps):
                sched_s.step()
            rec = {"iter": it + 1, "loss_g": loss_g.item(), "adv": l_adv.item(), "bn": l_bn.item(),
                   "tv": l_tv.item(), "loss_s": loss_s_sum / max(1, n_steps),
                   "selected": kept / pool}
            last = it + 1 == cfg.iterations
            if eval_data is not None and (last or (cfg.eval_every and (it + 1) % cfg.eval_every == 0)):
                rec["test_acc"] = evaluate(student, eval_data, device=dev)
            hist.append(rec)
            info = f"loss_s {rec['loss_s']:.3f} bn {rec['bn']:.3f} kept {100 * rec['selected']:.0f}%"
            bar.update(1, info)
            if "test_acc" in rec and progress:
                say(f"tadfkd: iteration {it + 1}/{cfg.iterations}: student test acc {100 * rec['test_acc']:.2f}%"
                    f" (kept {100 * rec['selected']:.0f}% of generated samples)")
    finally:
        bar.close()
        if bn is not None:
            bn.remove()
    secs = time.perf_counter() - t0
    accs = [r["test_acc"] for r in hist if "test_acc" in r]
    return {"method": METHOD, "config": asdict(cfg), "seconds": secs,
            "final_test_acc": accs[-1] if accs else None, "history": hist, "generator": G}


def noise_baseline(teacher: nn.Module, student: nn.Module, *, config: TADFKDConfig | None = None,
                   image_shape=(1, 16, 16), eval_data=None, device=None) -> float | None:
    """The no-skill baseline: the same student recipe (L1 on logits, same number of steps
    and schedule) on N(0, I) inputs instead of generated ones. Returns the test accuracy."""
    from ..distill import evaluate
    from .baselines import noise_inputs

    cfg = (config or TADFKDConfig()).validate()
    dev = torch.device(device) if device is not None else next(teacher.parameters()).device
    torch.manual_seed(cfg.seed)
    rng = torch.Generator().manual_seed(cfg.seed + 1)
    teacher = teacher.to(dev).eval()
    student = student.to(dev).train()
    opt = torch.optim.SGD(student.parameters(), lr=cfg.lr_s, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps = cfg.iterations * cfg.student_steps
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        x = noise_inputs(cfg.batch_size, image_shape, seed=0, generator=rng).to(dev)
        with torch.no_grad():
            t = teacher(x)
        loss = F.l1_loss(student(x), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return evaluate(student, eval_data, device=dev) if eval_data is not None else None


def save_sample_grid(G: Generator, teacher: nn.Module, path: str, n: int = 64, seed: int = 0,
                     title: str = "") -> str:
    """PNG grid of ``n`` generated samples, each titled with the teacher's class and whether
    the GMM selection keeps it."""
    from ..viz import save_image_grid

    G.train()  # batch statistics, as during distillation
    with torch.no_grad():
        x = G.sample(max(n, 2), torch.Generator().manual_seed(seed))
        t = teacher(x)
        keep = ops.gmm_select(selection_scores(t), nan_policy="omit")
    x, t, keep = x[:n].cpu(), t[:n].cpu(), keep[:n].cpu()
    return save_image_grid(x, path, titles=[f"{int(t[i].argmax())}{'' if keep[i] else ' x'}" for i in range(n)],
                           colors=["black" if keep[i] else "red" for i in range(n)],
                           title=title or "TA-DFKD generated samples (teacher class; red x = rejected by the GMM)")


# --------------------------------------------------------------------------- CLI
def _summary(res: dict, extra: dict) -> dict:
    out = {k: v for k, v in res.items() if k != "generator"}
    out.update(extra)
    return out


def _digits_teacher(name: str, size: int, seed: int, cache_dir: str, progress: bool, log, epochs: int = 40):
    """Train (or load from ``cache_dir``) a digits teacher of architecture ``name``."""
    from .. import data, models
    from ..distill import evaluate, train_teacher

    tag = "" if epochs == 40 else f"_e{epochs}"
    path = os.path.join(cache_dir, f"digits_{name}_s{size}{tag}_seed{seed}.pt")
    x_tr, y_tr, x_te, y_te = data.digits(size)
    model = models.create(name, num_classes=10, in_channels=1, input_size=size)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.eval()
    else:
        log(f"training the digits teacher {name!r} (seed {seed}, {epochs} epochs); cached at {path}")
        torch.manual_seed(seed)
        model = models.create(name, num_classes=10, in_channels=1)
        model, _ = train_teacher(model, data=(x_tr, y_tr, x_te, y_te), epochs=epochs, seed=seed,
                                 progress=progress, log=log)
        os.makedirs(cache_dir, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval(), evaluate(model, (x_te, y_te))


def _default_cache() -> str:
    return os.environ.get("FASTKD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fastkd"))


# The method contract (fastkd.methods._cli.distill_cli serves `fastkd distill --method tadfkd`).
Config = TADFKDConfig
DEFAULT_STUDENT = "cnn_half"


def run(teacher: nn.Module, student: nn.Module, *, config: TADFKDConfig, input_shape, num_classes: int,
        eval_data=None, device=None, progress: bool = True, log=None, out_dir: str | None = None, **_) -> dict:
    """:func:`distill`, the sample grid, and what the student is checked on without eval data."""
    res = distill(teacher, student, config=config, image_shape=input_shape, eval_data=eval_data, device=device,
                  progress=progress, log=log)
    grid = save_sample_grid(res["generator"], teacher, os.path.join(out_dir, "samples.png")) if out_dir else None
    acc = res["final_test_acc"]
    if log is not None:
        log(f"tadfkd: student test acc {'n/a' if acc is None else f'{100 * acc:.2f}%'} ({res['seconds']:.0f} s)"
            + (f"; samples: {grid}" if grid else ""))
    G = res["generator"].train()
    with torch.no_grad():
        x = G.sample(1024, torch.Generator().manual_seed(1)).cpu()
    return {"summary": _summary(res, {"samples_png": grid}), "check": (x, "generated inputs")}


def add_options(p: argparse.ArgumentParser) -> None:
    from ._cli import shape_arg

    p.set_defaults(teacher="digits:cnn_bn")
    p.add_argument("--image-shape", dest="input_shape", type=shape_arg, help=argparse.SUPPRESS)  # older name
    p.add_argument("--eval", dest="eval_data", help=argparse.SUPPRESS)  # older name of --eval-data
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # set by `fastkd demo --quick`
    g = p.add_argument_group("digits teachers")
    g.add_argument("--teacher-epochs", type=int, default=40,
                   help="--teacher digits:ARCH trains (once, then cached) a digits teacher of that fastkd "
                        "architecture for this many epochs; the default teacher is digits:cnn_bn")
    g.add_argument("--cache", default=_default_cache(), help="where digits teachers are cached")


def load_teacher(a, device):
    """``--teacher digits:ARCH`` (a digits teacher trained once and cached), or any teacher the
    shared ``--teacher`` takes; a bundled teacher's test split is the default eval data."""
    from .. import models
    from .._run import UsageError
    from ._cli import resolve_teacher

    if a.teacher_epochs < 1:
        raise UsageError(f"--teacher-epochs must be a positive integer, got {a.teacher_epochs}")
    if not a.teacher.startswith("digits:"):
        if a.eval_data is None and a.teacher in ("fmnist", "fmnist-bn"):
            a.eval_data = "fmnist"
        return resolve_teacher(a, device)
    shape = a.input_shape or (1, 16, 16)
    if len(shape) != 3 or shape[0] != 1 or shape[1] != shape[2]:
        raise UsageError(f"--input-shape {','.join(map(str, shape))}: a digits teacher takes 1,S,S images")
    arch = a.teacher.split(":", 1)[1]
    if arch not in models.names():
        raise UsageError(f"--teacher digits:{arch}: unknown fastkd architecture; one of {', '.join(models.names())}")
    say = (lambda s: None) if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    teacher, _acc = _digits_teacher(arch, shape[1], 0, a.cache, not a.quiet, say, epochs=a.teacher_epochs)
    if a.eval_data is None:
        a.eval_data = "digits"
    return teacher, {"model": arch}, 10, tuple(shape)


def cli_distill(argv) -> int:
    """``fastkd distill --method tadfkd``: the shared command line of the method contract."""
    from ._cli import distill_cli

    return distill_cli(sys.modules[__name__], argv)


def cli_demo(argv) -> int:
    p = _Parser(prog="fastkd demo --method tadfkd",
                                description="TA-DFKD end to end on the bundled digits default: trains (or "
                                            "loads) a BatchNorm CNN teacher, distills cnn_half without data, "
                                            "writes a sample grid PNG and a JSON summary.")
    p.add_argument("--method", default=METHOD)
    p.add_argument("--data", choices=["digits", "fmnist"], default="digits",
                   help="digits (a digits teacher trained or loaded from the cache) or fmnist (the bundled "
                        "Fashion-MNIST BatchNorm teacher, 32x32, student lenet5_half; needs apt-get install "
                        "dataset-fashion-mnist)")
    p.add_argument("--teacher-arch", default="cnn_bn", help="cnn_bn, cnn_deep or resnet8 (default: %(default)s)")
    p.add_argument("--size", type=int, default=8,
                   help="digits image side (default: %(default)s, the native resolution: minutes on a CPU)")
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/tadfkd-demo")
    p.add_argument("--quick", action="store_true", help="a few iterations only (smoke test)")
    args, rest = p.parse_known_args(argv)
    iters = 3 if args.quick else args.iterations
    extra = ["--student-steps", "2", "--eval-every", "0", "--teacher-epochs", "1", "--smoke"] if args.quick else []
    if args.data == "fmnist":
        return cli_distill(["--teacher", "fmnist-bn", "--eval-data", "fmnist", "--student", "lenet5_half",
                            "--out", args.out, "--overwrite", "--input-shape", "1,32,32", "--batch-size",
                            str(16 if args.quick else args.batch_size), "--iterations", str(iters),
                            "--seed", str(args.seed)] + extra[:4] + extra[-1:] + rest)
    return cli_distill(["--teacher", f"digits:{args.teacher_arch}", "--out", args.out, "--overwrite",
                        "--input-shape", f"1,{args.size},{args.size}", "--batch-size",
                        str(16 if args.quick else args.batch_size),
                        "--iterations", str(iters), "--seed", str(args.seed)] + extra + rest)
