"""Student distillation, evaluation and the digits teacher recipe.

* :func:`train_student` -- train a student on soft targets: a
  :class:`fastkd.synthesis.SyntheticDataset`, an ``(inputs, probs)`` pair, or unlabelled
  inputs (a tensor or any DataLoader) labelled by ``teacher`` on the fly. Defaults follow
  the CAKE paper: SGD (momentum 0.9, nesterov) lr 0.5 with a one-cycle schedule, weight
  decay 5e-4, batch 256, 30 epochs, soft-target cross-entropy at temperature 1.
  Under ``torch.distributed`` (e.g. ``torchrun``) it shards every epoch across ranks
  and wraps the student in DistributedDataParallel.
* :func:`evaluate` -- top-1 accuracy on a labelled DataLoader or ``(x, y)`` pair.
* :func:`train_teacher` -- the recipe of the digits default teacher (supervised, with
  +-1 pixel shift augmentation).
* :func:`teacher_probs` -- teacher probabilities of a tensor of inputs, in batches.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import _dist
from ._progress import Progress
from .nn.kd import kd_loss, soft_cross_entropy

__all__ = ["History", "train_student", "evaluate", "check_student", "StudentCollapsedError", "train_teacher", "teacher_probs",
           "distributed_info"]


@dataclass
class History:
    """What :func:`train_student` / :func:`train_teacher` did, epoch by epoch.

    ``epochs`` holds one dict per epoch: epoch, loss (mean training loss), lr (at the end
    of the epoch), seconds, and eval_acc when eval data was given.
    """
    epochs: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def final_accuracy(self):
        for e in reversed(self.epochs):
            if e.get("eval_acc") is not None:
                return e["eval_acc"]
        return None

    @property
    def losses(self) -> list:
        return [e["loss"] for e in self.epochs]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["final_accuracy"] = self.final_accuracy
        return d


# --------------------------------------------------------------------------- helpers
def distributed_info():
    """(rank, world_size) when torch.distributed is initialised, else (0, 1)."""
    return _dist.info()


def _device_of(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def teacher_probs(teacher: nn.Module, inputs: torch.Tensor, batch_size: int = 1024,
                  device=None) -> torch.Tensor:
    """softmax(teacher(x)) for a tensor of inputs, in eval mode, in batches (float32, CPU)."""
    dev = _device_of(teacher, device)
    was = teacher.training
    teacher.eval()
    out = []
    try:
        for i in range(0, inputs.shape[0], batch_size):
            logits = teacher(inputs[i:i + batch_size].to(dev))
            out.append(torch.softmax(logits.float(), 1).cpu())
    finally:
        teacher.train(was)
    return torch.cat(out) if out else torch.empty(0)


def _xy_batches(data, batch_size: int) -> Iterable:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        for i in range(0, x.shape[0], batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
        return
    if isinstance(data, torch.utils.data.DataLoader):
        for b in data:
            if not isinstance(b, (tuple, list)) or len(b) < 2:
                raise ValueError("evaluate: the DataLoader must yield (inputs, labels) batches")
            yield b[0], b[1]
        return
    raise TypeError(f"evaluate: data must be a DataLoader of (inputs, labels) or an (x, y) tuple of "
                    f"tensors, got {type(data).__name__}")


@torch.no_grad()
def evaluate(model: nn.Module, data, *, device=None, batch_size: int = 1024) -> float:
    """Top-1 accuracy (0..1) of ``model`` on ``data``: a DataLoader yielding (inputs, labels)
    or a tuple ``(x, y)`` of tensors. The model is put in eval mode and restored."""
    dev = _device_of(model, device)
    was = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in _xy_batches(data, batch_size):
            pred = model(x.to(dev)).argmax(1).cpu()
            correct += (pred == y.cpu()).sum().item()
            total += y.shape[0]
    finally:
        model.train(was)
    if total == 0:
        raise ValueError("evaluate: data holds no samples")
    return correct / total


class StudentCollapsedError(RuntimeError):
    """The trained student predicts one class for (almost) every input: it learned nothing."""


@torch.no_grad()
def check_student(student: nn.Module, teacher: nn.Module | None, inputs: torch.Tensor, *, what: str = "the inputs",
                  collapse: float = 0.9, batch_size: int = 1024, teacher_labels: torch.Tensor | None = None) -> dict:
    """Is the trained student usable? Compares its predictions with the teacher's on ``inputs``
    (held-out data when there is some, else up to a few thousand synthetic inputs).

    Returns ``{"agreement", "student_top_class", "student_top_fraction", "teacher_top_fraction",
    "warnings"}``. ``warnings`` (strings) names a student that agrees with the teacher on less
    than half of the inputs, or predicts one class for more than half of them. Raises
    :class:`StudentCollapsedError` when the student predicts one class for at least
    ``collapse`` (90 %) of the inputs while the teacher does not (its top class is under half):
    a student at chance, which a run must not report as a success.

    ``teacher_labels``: the teacher's top-1 answers on ``inputs`` when they are known already
    (a black-box teacher's paid answers); the teacher is then not called."""
    if inputs.shape[0] == 0:
        raise ValueError("check_student: inputs holds no samples")
    if teacher is None and teacher_labels is None:
        raise ValueError("check_student: give the teacher or its answers (teacher_labels)")
    sdev = _device_of(student, None)
    tdev = _device_of(teacher, None) if teacher is not None else None
    was = student.training
    student.eval()
    sp, tp = [], []
    try:
        for i in range(0, inputs.shape[0], batch_size):
            xb = inputs[i:i + batch_size]
            sp.append(student(xb.to(sdev)).argmax(1).cpu())
            if teacher_labels is None:
                tp.append(teacher(xb.to(tdev)).argmax(1).cpu())
    finally:
        student.train(was)
    s_pred = torch.cat(sp)
    t_pred = torch.cat(tp) if teacher_labels is None else teacher_labels.reshape(-1).long().cpu()
    if t_pred.shape != s_pred.shape:
        raise ValueError(f"check_student: {t_pred.numel()} teacher_labels for {s_pred.numel()} inputs")
    n = s_pred.numel()
    s_counts, t_counts = torch.bincount(s_pred), torch.bincount(t_pred)
    top = int(s_counts.argmax())
    out = {"agreement": float((s_pred == t_pred).float().mean()), "student_top_class": top,
           "student_top_fraction": float(s_counts.max()) / n, "teacher_top_fraction": float(t_counts.max()) / n,
           "checked_on": what, "samples": n, "warnings": []}
    if out["student_top_fraction"] >= collapse and out["teacher_top_fraction"] < 0.5:
        raise StudentCollapsedError(
            f"the student predicts class {top} for {100 * out['student_top_fraction']:.0f}% of {what} (the "
            f"teacher's most frequent class: {100 * out['teacher_top_fraction']:.0f}%): it learned nothing. "
            "Usual causes: a synthetic set that does not cover the classes (check the sample grid and the "
            "synthesis' teacher agreement), too few samples or epochs, a student learning rate too large")
    if out["agreement"] < 0.5:
        out["warnings"].append(f"the student agrees with the teacher on only {100 * out['agreement']:.0f}% of "
                               f"{what}")
    if out["student_top_fraction"] > 0.5 and out["teacher_top_fraction"] <= 0.5:
        out["warnings"].append(f"the student predicts class {top} for {100 * out['student_top_fraction']:.0f}% "
                               f"of {what}")
    return out


# --------------------------------------------------------------------------- training data
class _TensorSource:
    """Inputs (+ optional probs) held as tensors; batches by a seeded permutation,
    sharded across ranks (every rank sees the same permutation, takes a disjoint slice)."""

    def __init__(self, inputs, probs, batch_size, generator, rank, world):
        self.inputs, self.probs = inputs, probs
        self.batch_size, self.gen, self.rank, self.world = batch_size, generator, rank, world

    def __len__(self):
        n = self.inputs.shape[0] // self.world
        return max(1, math.ceil(n / self.batch_size))

    def __iter__(self):
        n = self.inputs.shape[0]
        perm = torch.randperm(n, generator=self.gen)
        per = n // self.world  # equal shard per rank keeps DDP's collectives in step
        if per == 0:
            raise ValueError(f"train_student: {n} samples cannot be split over {self.world} ranks")
        perm = perm[self.rank * per:(self.rank + 1) * per]
        for i in range(0, per, self.batch_size):
            idx = perm[i:i + self.batch_size]
            yield self.inputs[idx], (None if self.probs is None else self.probs[idx])


class _LoaderSource:
    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for b in self.loader:
            x = b[0] if isinstance(b, (tuple, list)) else b
            if not isinstance(x, torch.Tensor):
                raise TypeError("train_student: DataLoader batches must be tensors or tuples whose first "
                                f"element is the input tensor, got {type(x).__name__}")
            yield x, None


def _make_source(data, teacher, batch_size, gen, rank, world):
    from .synthesis.dataset import SyntheticDataset

    if isinstance(data, SyntheticDataset):
        return _TensorSource(data.inputs, data.probs, batch_size, gen, rank, world)
    if isinstance(data, torch.Tensor):
        if teacher is None:
            raise ValueError("train_student: data is a tensor of inputs, so teacher is required to label it")
        return _TensorSource(data, None, batch_size, gen, rank, world)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, p = data
        if p.dim() != 2 or p.shape[0] != x.shape[0]:
            raise ValueError(f"train_student: data=(inputs, probs) needs probs of shape (N, K) with N = "
                             f"{x.shape[0]}, got {tuple(p.shape)}")
        return _TensorSource(x, p, batch_size, gen, rank, world)
    if isinstance(data, torch.utils.data.DataLoader):
        if teacher is None:
            raise ValueError("train_student: data is a DataLoader of inputs, so teacher is required to label them")
        return _LoaderSource(data)
    raise TypeError("train_student: data must be a SyntheticDataset, a tensor of inputs, an (inputs, probs) "
                    f"pair of tensors or a DataLoader, got {type(data).__name__}")


# --------------------------------------------------------------------------- student
def train_student(student: nn.Module, data, *, teacher: nn.Module | None = None, epochs: int = 30,
                  batch_size: int = 256, lr: float = 0.5, momentum: float = 0.9,
                  weight_decay: float = 5e-4, schedule: str = "onecycle", temperature: float = 1.0,
                  loss: str = "soft_ce", amp: bool | None = None, eval_data=None, eval_every: int = 1,
                  device=None, seed: int | None = 0, progress: bool = True,
                  distributed: bool | None = None, augment: str | None = None,
                  log: Callable[[str], None] | None = None, checkpoint: str | None = None,
                  name: str = "student") -> History:
    """Distill ``student`` on ``data``; returns a :class:`History`.

    Args:
        student: the model to train (trained in place; moved to ``device``).
        data: a :class:`~fastkd.synthesis.SyntheticDataset` (uses its stored teacher
            probabilities), an ``(inputs, probs)`` pair of tensors, a tensor of inputs or a
            DataLoader of inputs (batches ``x`` or ``(x, ...)``): the last two are labelled
            by ``teacher`` (a tensor once up front, a loader batch by batch).
        teacher: the teacher, needed only for unlabelled data (put in eval mode, frozen).
        epochs, batch_size: training length (defaults: 30 epochs, batch 256).
        lr, momentum, weight_decay: SGD (nesterov) hyper-parameters (0.5, 0.9, 5e-4).
        schedule: "onecycle" (peak ``lr``), "cosine" or "constant".
        temperature: tau of the soft targets (1.0).
        loss: "soft_ce" (soft-target cross-entropy) or "kl" (Hinton KL), both tau^2-scaled; or
            "logit_l1": mean absolute difference of the mean-centred logits (the teacher's
            taken as its log-probabilities, equal to its logits up to a constant; ``temperature``
            is not used).
        amp: bf16 autocast; default on for CUDA devices, off on the CPU.
        eval_data: DataLoader of (x, y) or (x, y) tensors to evaluate on every
            ``eval_every`` epochs and after the last one.
        device: default: the student's device.
        seed: seeds the batch order (None: nondeterministic).
        progress: print one line per epoch (rank 0 only).
        distributed: use DistributedDataParallel; default: when torch.distributed is
            initialised with more than one process.
        augment: None, or a "+"-joined list of transforms applied to every batch, which
            is then relabelled by ``teacher`` (its answers on the transformed inputs replace
            the stored ones): "shift" (random per-sample translation by up to one pixel,
            edges replicated; "shift2" up to two), "flip" (horizontal flip of half the
            samples), "mixup" (each sample blended with another of the batch, weight
            ~ U(0, 1)). E.g. "shift+flip+mixup". Data-free: it only needs the teacher and
            the (synthetic) inputs. Needs ``teacher`` and (N, C, H, W) inputs.
        log: where progress lines go (default: print to stderr).
        checkpoint: a file written after every epoch (student, optimiser, schedule, random
            states, history); a call that finds one from the same configuration resumes
            after its last epoch and reaches the same weights as an uninterrupted run. It is
            removed when training completes. One from another configuration is an error.
        name: what the progress lines call the model ("student", "noise baseline", ...).
    """
    op = "train_student"
    aug_ops = parse_augment(augment, op)
    if aug_ops and teacher is None:
        raise ValueError(f"{op}: augment={augment!r} relabels the augmented inputs, so teacher is required")
    if not isinstance(student, nn.Module):
        raise TypeError(f"{op}: student must be an nn.Module, got {type(student).__name__}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"{op}: teacher must be an nn.Module or None, got {type(teacher).__name__}")
    for arg, v in (("epochs", epochs), ("batch_size", batch_size), ("eval_every", eval_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{op}: {arg} must be a positive int, got {v!r}")
    if not lr > 0:
        raise ValueError(f"{op}: lr must be > 0, got {lr!r}")
    if schedule not in ("onecycle", "cosine", "constant"):
        raise ValueError(f"{op}: schedule must be 'onecycle', 'cosine' or 'constant', got {schedule!r}")
    if loss not in LOSSES:
        raise ValueError(f"{op}: loss must be one of {', '.join(map(repr, LOSSES))}, got {loss!r}")
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0):
        raise ValueError(f"{op}: temperature must be a positive number, got {temperature!r}")


    dev = _device_of(student, device)
    rank, world = distributed_info()
    use_ddp = (world > 1) if distributed is None else bool(distributed)
    if use_ddp and world == 1 and distributed:
        raise RuntimeError(f"{op}: distributed=True but torch.distributed is not initialised "
                           "(run under torchrun or call torch.distributed.init_process_group)")
    show = progress and rank == 0
    use_amp = (dev.type == "cuda") if amp is None else bool(amp)

    gen = torch.Generator()
    gen.manual_seed(int(seed) if seed is not None else int(torch.empty((), dtype=torch.int64).random_()))
    aug_gen = torch.Generator()
    aug_gen.manual_seed(gen.initial_seed() + 0x9E3779B9)
    source = _make_source(data, teacher, batch_size, gen, rank if use_ddp else 0, world if use_ddp else 1)
    if isinstance(data, torch.Tensor):  # label once
        source.probs = teacher_probs(teacher, data, device=_device_of(teacher, dev))
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    student.to(dev)
    model: nn.Module = student
    if use_ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(student, device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=momentum, nesterov=momentum > 0,
                          weight_decay=weight_decay)
    steps_per_epoch = len(source)
    total = epochs * steps_per_epoch
    if schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    elif schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    else:
        sched = None
    crit = {"soft_ce": soft_cross_entropy, "kl": kd_loss, "logit_l1": _logit_l1}[loss]

    hist = History(config=dict(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                               weight_decay=weight_decay, schedule=schedule, temperature=temperature,
                               loss=loss, amp=use_amp, seed=seed, augment=augment,
                               world_size=world if use_ddp else 1,
                               num_parameters=sum(p.numel() for p in student.parameters())))
    t_start = time.perf_counter()
    start = 0
    ckey = None
    if checkpoint is not None:
        ckey = dict(hist.config, num_samples=_num_samples(data), student=type(student).__name__)
        start = _resume(checkpoint, ckey, student, opt, sched, gen, aug_gen, hist, dev, op)
        if start and show:
            (log or (lambda m: print(m, file=sys.stderr, flush=True)))(
                f"distill [{name}]: resuming after epoch {start} of {epochs} from {checkpoint}")
    bar = Progress(epochs - start, f"distill [{name}]", enabled=show, unit="epoch", min_interval=0.0, write=log)
    for ep in range(start, epochs):
        t0 = time.perf_counter()
        model.train()
        tot, cnt = 0.0, 0
        for x, p in source:
            x = x.to(dev, non_blocking=True)
            if aug_ops:
                if x.dim() != 4:
                    raise ValueError(f"{op}: augment={augment!r} needs (N, C, H, W) inputs, got shape "
                                     f"{tuple(x.shape)}")
                x, p = apply_augment(x, aug_ops, aug_gen), None
            tlog = None
            if p is None:
                with torch.no_grad():
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
                        t_logits = teacher(x)
                    p = torch.softmax(t_logits.float(), 1)
                    if loss == "logit_l1":  # the exact log-probabilities: p may underflow
                        tlog = torch.log_softmax(t_logits.float(), 1)
            p = p.to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
                s = model(x)
            l = crit(s.float(), p, temperature, target="probs") if tlog is None else _centred_l1(s.float(), tlog)
            lv = l.item()
            if not math.isfinite(lv):
                raise FloatingPointError(f"{op}: the training loss is {lv} in epoch {ep + 1} ("
                                         f"{_nonfinite_cause(x, p, s)}); the student is not usable")
            opt.zero_grad(set_to_none=True)
            l.backward()
            opt.step()
            if sched is not None:
                sched.step()
            tot += lv * x.shape[0]
            cnt += x.shape[0]
        rec = {"epoch": ep + 1, "loss": tot / max(cnt, 1), "lr": opt.param_groups[0]["lr"],
               "seconds": time.perf_counter() - t0}
        if eval_data is not None and ((ep + 1) % eval_every == 0 or ep + 1 == epochs):
            rec["eval_acc"] = evaluate(student, eval_data, device=dev)
        hist.epochs.append(rec)
        if checkpoint is not None and rank == 0 and ep + 1 < epochs:
            _save_checkpoint(checkpoint, ckey, ep + 1, student, opt, sched, gen, aug_gen, hist)
        if show:
            info = f"loss {rec['loss']:.4f}" + (f" acc {100 * rec['eval_acc']:.2f}%" if "eval_acc" in rec else "")
            bar.update(1, info)
    bar.close()
    hist.seconds = time.perf_counter() - t_start
    if checkpoint is not None and rank == 0 and os.path.exists(checkpoint):
        os.remove(checkpoint)  # finished: the trained student is the caller's to save
    return hist


CHECKPOINT_FORMAT = "fastkd.student-checkpoint/1"

#: The student losses of :func:`train_student`.
LOSSES = ("soft_ce", "kl", "logit_l1")


def _centred_l1(s: torch.Tensor, t_log: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the mean-centred student logits ``s`` and teacher
    log-probabilities ``t_log`` (its logits up to a per-row constant)."""
    return ((s - s.mean(1, keepdim=True)) - (t_log - t_log.mean(1, keepdim=True))).abs().mean()


def _logit_l1(s: torch.Tensor, p: torch.Tensor, temperature: float = 1.0, target: str = "probs") -> torch.Tensor:
    """``_centred_l1`` against stored teacher probabilities ``p`` (probabilities below
    1e-30 count as 1e-30)."""
    return _centred_l1(s, torch.log(p.clamp_min(1e-30)))


def _num_samples(data) -> int | None:
    try:
        return len(data) if not isinstance(data, (tuple, list)) else int(data[0].shape[0])
    except TypeError:  # a loader without a length
        return None


def _save_checkpoint(path, key, epoch, student, opt, sched, gen, aug_gen, hist) -> None:
    obj = {"format": CHECKPOINT_FORMAT, "key": key, "epoch": epoch,
           "student": {k: v.detach().cpu() for k, v in student.state_dict().items()},
           "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched is not None else None,
           "gen": gen.get_state(), "aug_gen": aug_gen.get_state(), "torch_rng": torch.get_rng_state(),
           "epochs": hist.epochs}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _resume(path, key, student, opt, sched, gen, aug_gen, hist, dev, op) -> int:
    """Load a checkpoint of the same configuration; returns the epoch to continue from."""
    if not os.path.exists(path):
        return 0
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{op}: checkpoint {path!r} does not load ({type(e).__name__}); remove it") from e
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{op}: checkpoint {path!r} is not a fastkd student checkpoint")
    if obj["key"] != key:
        diff = sorted(k for k in set(key) | set(obj["key"]) if key.get(k) != obj["key"].get(k))
        raise ValueError(f"{op}: checkpoint {path!r} was written by a run with another configuration "
                         f"(differs in {', '.join(diff)}); remove it or use another folder")
    student.load_state_dict(obj["student"])
    student.to(dev)
    opt.load_state_dict(obj["optimizer"])
    if sched is not None and obj["scheduler"] is not None:
        sched.load_state_dict(obj["scheduler"])
    gen.set_state(obj["gen"])
    aug_gen.set_state(obj["aug_gen"])
    torch.set_rng_state(obj["torch_rng"])
    hist.epochs.extend(obj["epochs"])
    return int(obj["epoch"])


def _nonfinite_cause(x: torch.Tensor, p: torch.Tensor, s: torch.Tensor) -> str:
    """Name why a training loss is not finite: the inputs, the targets or the student."""
    if not bool(torch.isfinite(x).all()):
        return "the training inputs hold NaN or Inf"
    m = float(x.abs().max()) if x.numel() else 0.0
    if not bool(torch.isfinite(p).all()):
        return "the teacher's probabilities hold NaN or Inf"
    if m > 1e3:
        return f"the training inputs reach |x| = {m:.3g}, far outside any normalised data: a runaway synthetic set"
    if not bool(torch.isfinite(s).all()):
        return "the student's outputs hold NaN or Inf: its learning rate is too large for this data"
    return "the loss overflowed: lower the learning rate"


# --------------------------------------------------------------------------- augmentation
AUGMENTS = ("shift", "shift2", "flip", "mixup")


def parse_augment(augment, op: str = "augment") -> tuple[str, ...]:
    """``None`` / "none" -> (); "shift+flip" -> ("shift", "flip"); anything else raises."""
    if augment is None or augment == "none":
        return ()
    parts = tuple(augment.split("+")) if isinstance(augment, str) else ()
    if not parts or any(a not in AUGMENTS for a in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"{op}: augment must be None or a '+'-joined list of distinct transforms from "
                         f"{AUGMENTS} (e.g. 'shift+flip+mixup'), got {augment!r}")
    return parts


def apply_augment(x: torch.Tensor, ops: Sequence[str], gen: torch.Generator) -> torch.Tensor:
    """Apply the transforms of :func:`parse_augment` to an (N, C, H, W) batch, in order."""
    n, dev = x.shape[0], x.device
    for a in ops:
        if a in ("shift", "shift2"):
            x = _shift_augment(x, gen, max_shift=1 if a == "shift" else 2)
        elif a == "flip":
            m = (torch.rand(n, generator=gen) < 0.5).to(dev).view(n, 1, 1, 1)
            x = torch.where(m, x.flip(-1), x)
        elif a == "mixup":
            lam = torch.rand(n, generator=gen).to(dev, x.dtype).view(n, 1, 1, 1)
            perm = torch.randperm(n, generator=gen).to(dev)
            x = lam * x + (1 - lam) * x[perm]
    return x


# --------------------------------------------------------------------------- teacher
def _shift_augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random per-sample translation by up to ``max_shift`` pixels (edges replicated)."""
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, mode="replicate")
    dev = x.device
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen).to(dev)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen).to(dev)
    rows = (dy.view(n, 1) + torch.arange(h, device=dev).view(1, h))  # (n, h)
    cols = (dx.view(n, 1) + torch.arange(w, device=dev).view(1, w))  # (n, w)
    idx_n = torch.arange(n, device=dev).view(n, 1, 1)
    out = pad.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


def train_teacher(model: nn.Module | None = None, *, data=None, size: int = 8, epochs: int = 40,
                  batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 1e-4,
                  augment: bool = False, seed: int = 0, device=None, progress: bool = True,
                  log: Callable[[str], None] | None = None):
    """Train a teacher with real labels; the recipe of the digits default.

    Args:
        model: the network (default: ``models.create("cnn")`` for 10 classes, 1 channel).
        data: ``(x_train, y_train, x_test, y_test)`` tensors (default: :func:`fastkd.data.digits`
            at ``size``).
        epochs, batch_size, lr, weight_decay: AdamW with a cosine schedule.
        augment: random +-1 pixel shifts of the training images.
        seed: seeds initialisation (when ``model`` is None) and batch order.

    Returns:
        ``(model, history)``; ``history.final_accuracy`` is the test accuracy.
    """

    from . import data as _data
    from . import models

    torch.manual_seed(seed)
    if data is None:
        data = _data.digits(size)
    x_tr, y_tr, x_te, y_te = data
    if model is None:
        model = models.create("cnn", num_classes=int(y_tr.max()) + 1, in_channels=x_tr.shape[1], input_size=x_tr.shape[-1])
    dev = _device_of(model, device)
    model.to(dev)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(x_tr.shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    hist = History(config=dict(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                               augment=augment, seed=seed))
    t_start = time.perf_counter()
    bar = Progress(epochs, "teacher", enabled=progress, unit="epoch", min_interval=1.0, write=log)
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(x_tr.shape[0], generator=gen)
        tot = 0.0
        for i in range(0, x_tr.shape[0], batch_size):
            idx = perm[i:i + batch_size]
            xb = x_tr[idx]
            if augment:
                xb = _shift_augment(xb, gen)
            out = model(xb.to(dev))
            l = F.cross_entropy(out, y_tr[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            l.backward()
            opt.step()
            sched.step()
            tot += l.item() * idx.numel()
        rec = {"epoch": ep + 1, "loss": tot / x_tr.shape[0], "lr": opt.param_groups[0]["lr"]}
        if ep + 1 == epochs:
            rec["eval_acc"] = evaluate(model, (x_te, y_te), device=dev)
        hist.epochs.append(rec)
        bar.update(1, f"loss {rec['loss']:.4f}" + (f" test acc {100 * rec['eval_acc']:.2f}%"
                                                   if "eval_acc" in rec else ""))
    bar.close()
    hist.seconds = time.perf_counter() - t_start
    model.eval()
    return model, hist
