"""CAKE / LAKE data synthesis: ``fastkd.synthesis.cake``.

Synthesises a data set from a frozen, differentiable teacher and no data (Braun, Mundt,
Kersting, "Deep Classifier Mimicry without Data Access"). Every mini-batch starts from
the input prior, draws labels in groups of distinct classes, and takes ``steps``
gradient steps on the inputs against

    w_cls * L_cls + w_contr * L_contr + w_tv * L_tv  (+ bn_prior_weight * L_bn)

with :class:`fastkd.nn.CAKELoss` (``L_cls``: cross-entropy of the teacher's logits
against the drawn labels; ``L_contr``: :func:`fastkd.ops.cross_class_contrastive` over
pairs of different labels inside a group; normalised like the authors' code, so their
weights mean the same) and the TV prior's gradient added inside the fused
:func:`fastkd.ops.langevin_step_`. CAKE takes plain gradient steps (its noise is implicit:
the step size changes from batch to batch); LAKE (``langevin=True``) adds
``sqrt(2 * lr) * N(0, I)`` after each step (explicit Langevin dynamics).

The step size is constant inside a batch and decays across batches from ``lr[0]`` to
``lr[1]`` (log-linearly, or by a cosine in log space), so the data set covers the
decision boundary at several scales.

Batch ``b`` depends only on ``(seed, b)`` (its prior draw, labels and noise are seeded
by both), which makes three things exact:

* resuming: with ``out_dir`` every finished batch is written at once (one file per
  batch, written under a temporary name and renamed) and a rerun skips what exists,
  redoing at most the batch that was in flight;
* sharding: under ``torch.distributed`` (e.g. ``torchrun``) rank r does the batches
  b with b % world_size == r; the union is what one process would produce;
* reproducibility: the same seed gives the same data set on the same machine.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .. import _dist, ops
from .._progress import Progress
from ..nn.cake import CAKELoss
from .dataset import MANIFEST, SHARD_FORMAT, ShardMismatchError, SyntheticDataset, _shard_path, load_shards

__all__ = ["cake", "lake", "silhouette_prior", "step_sizes", "class_prior_labels", "load_shards", "ShardMismatchError",
           "DEFAULTS"]

_SHARD_RE = re.compile(r"^batch_(\d{6})\.pt$")

#: Defaults of :func:`cake` (the authors' weights, normalisation and step schedule).
DEFAULTS = dict(batch_size=100, steps=200, w_cls=1e3, w_contr=1e1, w_tv=1e5, lr=(1e-1, 1e-5),
                schedule="loglinear")


def step_sizes(num_batches: int, start: float, end: float, schedule: str = "loglinear") -> list[float]:
    """Per-batch step sizes from ``start`` (first batch) to ``end`` (last batch).

    "loglinear": geometric interpolation; "cosine": cosine annealing of log(lr).
    """
    if num_batches == 1:
        return [float(start)]
    a, b = math.log(start), math.log(end)
    out = []
    for i in range(num_batches):
        t = i / (num_batches - 1)
        if schedule == "cosine":
            t = 0.5 * (1.0 - math.cos(math.pi * t))
        out.append(math.exp(a + (b - a) * t))
    return out


def class_prior_labels(batch_size: int, num_classes: int, generator: torch.Generator,
                       group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and group ids of one batch: consecutive groups of ``group_size`` (default
    ``num_classes``) samples, each group's labels drawn without repetition (a random
    permutation of the classes, cut to the group's size)."""
    gs = group_size or num_classes
    labels, groups = [], []
    g = 0
    while sum(t.numel() for t in labels) < batch_size:
        take = min(gs, batch_size - sum(t.numel() for t in labels))
        perm = torch.randperm(num_classes, generator=generator)
        if take <= num_classes:
            lab = perm[:take]
        else:  # groups larger than the class count: repeat permutations
            reps = [perm] + [torch.randperm(num_classes, generator=generator)
                             for _ in range(math.ceil(take / num_classes) - 1)]
            lab = torch.cat(reps)[:take]
        labels.append(lab)
        groups.append(torch.full((take,), g, dtype=torch.int64))
        g += 1
    return torch.cat(labels), torch.cat(groups)


def _batch_seed(seed: int, b: int, salt: int = 0) -> int:
    h = hashlib.blake2b(f"{seed}:{b}:{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 62) - 1)


def silhouette_prior(lo: float, hi: float, *, grid: int = 4, margin: int | None = None) -> Callable:
    """A prior of objects on a background: image inputs (N, C, H, W) that are ``lo`` (the
    normalised value of black) except for one smooth random shape per sample, filled with a
    level drawn from the upper 70 % of [lo, hi] plus pixel noise of (hi - lo) / 6.

    The shape is where a (grid x grid) N(0, 1) field, upsampled bicubically to the image
    inside a ``margin`` (default: 1/16 of the side, 2 pixels at 32), exceeds a threshold drawn
    from U(-0.3, 0.3); it is shared across channels, the level is drawn per channel. Domain
    knowledge only (photographed objects on an empty background, the pixel range), no data:
    ``cake(..., prior="silhouette", clamp=(lo, hi))`` builds it from the clamp. Returns a
    callable ``(shape, generator) -> tensor`` for :func:`cake`'s ``prior``.
    """
    if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo < hi):
        raise ValueError(f"silhouette_prior: needs lo < hi (the pixel range), got ({lo!r}, {hi!r})")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"silhouette_prior: grid must be a positive int, got {grid!r}")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, int) or margin < 0):
        raise ValueError(f"silhouette_prior: margin must be None or an int >= 0, got {margin!r}")
    lo, hi = float(lo), float(hi)

    def draw(shape, gen):
        if len(shape) != 4:
            raise ValueError(f"silhouette prior: needs image inputs (N, C, H, W), got shape {tuple(shape)}")
        n, c, h, w = shape
        m = round(min(h, w) / 16) if margin is None else margin
        ih, iw = h - 2 * m, w - 2 * m
        if ih < 1 or iw < 1:
            raise ValueError(f"silhouette prior: margin {m} leaves no image inside {h}x{w}")
        z = F.interpolate(torch.randn((n, 1, grid, grid), generator=gen), size=(ih, iw), mode="bicubic",
                          align_corners=False)
        inside = z > (torch.rand((n, 1, 1, 1), generator=gen) * 0.6 - 0.3)
        level = lo + (hi - lo) * (0.3 + 0.7 * torch.rand((n, c, 1, 1), generator=gen))
        fill = level + (hi - lo) / 6 * torch.randn((n, c, ih, iw), generator=gen)
        x = torch.where(inside, fill, torch.full_like(fill, lo))
        return F.pad(x, (m, m, m, m), value=lo).clamp_(lo, hi)

    draw.__qualname__ = f"silhouette(lo={lo:.4g}, hi={hi:.4g}, grid={grid}, margin={margin})"
    return draw


def _draw_prior(prior, shape, gen: torch.Generator) -> torch.Tensor:
    if prior == "normal":
        return torch.randn(shape, generator=gen)
    if prior == "uniform":
        return torch.rand(shape, generator=gen) * 2.0 - 1.0
    x = prior(tuple(shape), gen)
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(shape) or not x.dtype.is_floating_point:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"cake: the prior callable must return a float tensor of shape {tuple(shape)}, got {got}")
    return x.float().cpu()


def teacher_fingerprint(teacher: nn.Module) -> str:
    """A hash of the teacher's parameters and buffers (identifies the teacher of a run)."""
    h = hashlib.sha1()
    for k, v in sorted(teacher.state_dict().items()):
        h.update(k.encode())
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(str(t.dtype).encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class _BNPrior:
    """DeepInversion BN-statistics term: sum over BatchNorm layers of
    ||mean_batch - running_mean||_2 + ||var_batch - running_var||_2."""

    def __init__(self, teacher: nn.Module) -> None:
        self.layers = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                       and m.running_mean is not None]
        self.terms: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, mod, inp, out):
        x = inp[0].float()
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        self.terms.append(torch.linalg.vector_norm(mean - mod.running_mean.float())
                          + torch.linalg.vector_norm(var - mod.running_var.float()))

    def take(self) -> torch.Tensor:
        t = torch.stack(self.terms).sum()
        self.terms = []
        return t

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------- checks
def _pos_int(name, v, minimum=1):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"cake: {name} must be an int >= {minimum}, got {v!r}")
    return v


def _nonneg(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"cake: {name} must be a finite number >= 0, got {v!r}")
    return float(v)


def _validate(teacher, num_classes, input_shape, num_samples, batch_size, steps, w_cls, w_contr, w_tv,
              lr, schedule, prior, bn_prior_weight, group_size, clamp):
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"cake: teacher must be an nn.Module (any differentiable classifier, TorchScript "
                        f"included), got {type(teacher).__name__}")
    _pos_int("num_classes", num_classes, 2)
    if (not isinstance(input_shape, (tuple, list, torch.Size)) or len(input_shape) == 0
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in input_shape)):
        raise ValueError(f"cake: input_shape must be a tuple of positive ints without the batch dimension, "
                         f"e.g. (1, 16, 16), got {input_shape!r}")
    _pos_int("num_samples", num_samples)
    _pos_int("batch_size", batch_size)
    _pos_int("steps", steps)
    for n, v in (("w_cls", w_cls), ("w_contr", w_contr), ("w_tv", w_tv), ("bn_prior_weight", bn_prior_weight)):
        _nonneg(n, v)
    if w_tv > 0 and len(input_shape) != 3:
        raise ValueError(f"cake: the TV prior (w_tv > 0) needs image inputs, input_shape (C, H, W); got "
                         f"{tuple(input_shape)} (set w_tv=0 for other inputs)")
    if (not isinstance(lr, (tuple, list)) or len(lr) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                       for v in lr)):
        raise ValueError(f"cake: lr must be a (start, end) pair of positive step sizes, got {lr!r}")
    if schedule not in ("loglinear", "cosine"):
        raise ValueError(f"cake: schedule must be 'loglinear' or 'cosine', got {schedule!r}")
    if not (prior in ("normal", "uniform", "silhouette") or callable(prior)):
        raise ValueError(f"cake: prior must be 'normal', 'uniform', 'silhouette' or a callable (shape, generator) "
                         f"-> tensor, got {prior!r}")
    if prior == "silhouette" and (clamp is None or len(input_shape) != 3):
        raise ValueError("cake: prior='silhouette' draws objects on the background value clamp[0] of image inputs: it "
                         "needs clamp=(lo, hi), the pixel range (--clamp LO HI), and input_shape (C, H, W); got "
                         f"clamp={clamp!r}, input_shape={tuple(input_shape)}")
    if group_size is not None:
        _pos_int("group_size", group_size, 2)
    if clamp is not None:
        if (not isinstance(clamp, (tuple, list)) or len(clamp) != 2
                or not all(isinstance(v, (int, float)) for v in clamp) or not clamp[0] < clamp[1]):
            raise ValueError(f"cake: clamp must be None or a (lo, hi) pair with lo < hi, got {clamp!r}")


def _probe(teacher, num_classes, input_shape, device):
    """Run the teacher on two prior-shaped inputs: catch a wrong shape or width early."""
    x = torch.zeros((2, *input_shape), device=device)
    try:
        with torch.no_grad():
            out = teacher(x)
    except Exception as e:  # the teacher rejects this input shape
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cake: the teacher rejects inputs of input_shape {tuple(input_shape)} "
                         f"(batch of 2 on {device}): {type(e).__name__}: {msg}") from e
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"cake: the teacher must return a logits tensor, got {type(out).__name__} "
                        "(wrap it so that forward returns the (N, num_classes) logits)")
    if out.dim() != 2 or out.shape[0] != 2:
        raise ValueError(f"cake: the teacher must return logits of shape (N, num_classes); for a batch of 2 "
                         f"it returned shape {tuple(out.shape)}")
    if out.shape[1] != num_classes:
        raise ValueError(f"cake: the teacher's output width is {out.shape[1]} but num_classes is {num_classes}")


# --------------------------------------------------------------------------- shards
def _existing_shards(out_dir: str) -> dict[int, str]:
    out = {}
    for name in os.listdir(out_dir):
        m = _SHARD_RE.match(name)
        if m:
            out[int(m.group(1))] = os.path.join(out_dir, name)
    return out


def _prepare_out_dir(out_dir: str, manifest: dict, rank: int) -> set[int]:
    """Check (or create) the manifest; return the batch indices already finished."""
    path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"cake: out_dir {out_dir!r} exists and is not a folder")
    os.makedirs(out_dir, exist_ok=True)
    existing = _existing_shards(out_dir)
    if os.path.exists(path):
        with open(path) as f:
            try:
                old = json.load(f)
            except json.JSONDecodeError as e:
                raise ShardMismatchError(f"cake: {path} is not a readable fastkd manifest ({e}); "
                                         "use another out_dir") from e
        if old.get("key") != manifest["key"]:
            diff = sorted(k for k in set(old.get("config", {})) | set(manifest["config"])
                          if old.get("config", {}).get(k) != manifest["config"].get(k))
            if old.get("teacher") != manifest["teacher"]:
                diff.append("teacher (another model or other weights)")
            raise ShardMismatchError(
                f"cake: out_dir {out_dir!r} holds {len(existing)} shard(s) of another run (it differs in: "
                f"{', '.join(diff) or 'format'}); nothing was overwritten. Use another out_dir, or delete "
                "this one to start over.")
    else:
        if existing:
            raise ShardMismatchError(f"cake: out_dir {out_dir!r} holds {len(existing)} batch_*.pt file(s) but "
                                     f"no {MANIFEST}; they are not this run's. Use another out_dir.")
        if rank == 0:
            tmp = path + f".tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(manifest, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
    done = set()
    for b, p in existing.items():
        if b >= manifest["num_batches"]:
            continue
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception:  # a torn or foreign file: redo that batch
            continue
        if isinstance(obj, dict) and obj.get("key") == manifest["key"] and obj.get("batch") == b:
            done.add(b)
    return done


def _write_shard(out_dir: str, b: int, key: str, x, p, y, seconds: float, lr: float | None = None,
                 lr_scheduled: float | None = None) -> None:
    path = _shard_path(out_dir, b)
    tmp = path + f".tmp{os.getpid()}"
    torch.save({"format": SHARD_FORMAT, "key": key, "batch": b, "inputs": x, "probs": p, "labels": y,
                "seconds": seconds, "lr": lr, "lr_scheduled": lr_scheduled}, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- main loop
def cake(teacher: nn.Module, *, num_classes: int, input_shape: Sequence[int], num_samples: int,
         batch_size: int = 100, steps: int = 200, w_cls: float = 1e3, w_contr: float = 1e1,
         w_tv: float = 1e5, lr: tuple[float, float] = (1e-1, 1e-5), schedule: str = "loglinear",
         langevin: bool = False, noise_std: float | None = None, prior: str | Callable = "normal",
         bn_prior_weight: float = 0.0, contrastive_on: str = "logits", group_size: int | None = None,
         clamp: tuple[float, float] | None = None, amp: bool | None = None, device=None, seed: int = 0,
         progress: bool = True, out_dir: str | None = None, backend: str = "auto",
         distributed: bool | None = None, max_abs: float | None = 100.0, backoff: int = 6) -> SyntheticDataset:
    """Synthesise ``num_samples`` inputs for ``teacher`` with CAKE (or LAKE).

    Args:
        teacher: any differentiable ``nn.Module`` mapping (N, *input_shape) to (N, num_classes)
            logits (TorchScript, torchvision and timm models included). Put in eval mode;
            its parameters are frozen during the call and restored afterwards.
        num_classes: the teacher's output width.
        input_shape: one input's shape without the batch dimension, e.g. (1, 16, 16).
        num_samples: samples to synthesise (the last batch may be smaller).
        batch_size: samples per batch (100). Each batch is optimised independently.
        steps: gradient steps per batch (200).
        w_cls, w_contr, w_tv: loss weights (1e3, 1e1, 1e5: the authors'), with the authors'
            normalisation (see :class:`fastkd.nn.CAKELoss`); TV is the mean absolute
            difference of neighbouring pixels.
        lr: (start, end) step sizes of the first and last batch (1e-1, 1e-5).
        schedule: "loglinear" or "cosine" interpolation of log(lr) across batches.
        langevin: False: CAKE (plain gradient steps); True: LAKE (adds sqrt(2 lr) N(0, I)
            noise after every step, or ``noise_std`` if given).
        noise_std: LAKE's noise scale (default sqrt(2 * lr)); ignored for CAKE.
        prior: initial inputs: "normal" (N(0, I)), "uniform" (U(-1, 1)), "silhouette" (one
            smooth random object per image on the background ``clamp[0]``,
            :func:`silhouette_prior`; needs ``clamp``) or a callable
            ``(shape, generator) -> tensor``.
        bn_prior_weight: weight of the DeepInversion BatchNorm-statistics term (0: off).
            Needs a teacher with BatchNorm layers; CAKE itself does not.
        contrastive_on: "logits" (the authors' choice) or "probs".
        group_size: samples per label group (default num_classes).
        clamp: optional (lo, hi) range of the inputs after each step.
        max_abs: runaway bound (100). A batch whose inputs leave [-max_abs, max_abs] or turn
            non-finite has run away (the step is too large for this teacher: e.g. a teacher
            with large logits, whose loss is steep): it is redone from its start with the
            step size divided by 10, up to ``backoff`` times, and the step size used is
            recorded per batch (``meta["backoffs"]``). None: no bound (non-finite inputs
            still trigger the back-off). With ``clamp`` the inputs cannot run away.
        backoff: how many times a runaway batch is redone with a 10x smaller step (6); a
            batch still running away after that stops the call with FloatingPointError.
        amp: bf16 autocast of the teacher's forward; default on for CUDA, off on the CPU.
        device: default: the teacher's device.
        seed: batch b is determined by (seed, b).
        progress: print progress (rank 0).
        out_dir: write each finished batch here and resume from what exists. A folder
            holding another run's shards raises :class:`ShardMismatchError` before any work.
        backend: backend of the fused ops ("auto", "cuda", "triton", "cpp", "torch").
        distributed: shard batches across torch.distributed ranks; default: when it is
            initialised with more than one process. Every rank returns the full data set.

    Returns:
        a :class:`SyntheticDataset` (inputs, teacher probabilities, intended labels; its
        ``meta`` holds the configuration, timings and throughput).
    """
    _validate(teacher, num_classes, input_shape, num_samples, batch_size, steps, w_cls, w_contr, w_tv,
              lr, schedule, prior, bn_prior_weight, group_size, clamp)
    if prior == "silhouette":
        prior = silhouette_prior(*clamp)
    if max_abs is not None and (isinstance(max_abs, bool) or not isinstance(max_abs, (int, float))
                                or not math.isfinite(max_abs) or max_abs <= 0):
        raise ValueError(f"cake: max_abs must be None or a finite number > 0, got {max_abs!r}")
    _pos_int("backoff", backoff, 0)
    if not isinstance(langevin, bool):
        raise TypeError(f"cake: langevin must be a bool, got {type(langevin).__name__}")
    if noise_std is not None:
        _nonneg("noise_std", noise_std)
    if contrastive_on not in ("logits", "probs"):
        raise ValueError(f"cake: contrastive_on must be 'logits' or 'probs', got {contrastive_on!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"cake: seed must be a non-negative int, got {seed!r}")
    input_shape = tuple(int(s) for s in input_shape)

    if device is None:
        p0 = next(iter(teacher.parameters()), None)
        device = p0.device if p0 is not None else torch.device("cpu")
    device = torch.device(device)
    use_amp = (device.type == "cuda") if amp is None else bool(amp)

    rank, world = _dist.info()
    if distributed is False:
        rank, world = 0, 1
    elif distributed and world == 1:
        raise RuntimeError("cake: distributed=True but torch.distributed is not initialised "
                           "(run under torchrun or call torch.distributed.init_process_group)")

    was_training = teacher.training
    req = [p.requires_grad for p in teacher.parameters()]
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    bn = None
    try:
        _probe(teacher, num_classes, input_shape, device)
        if bn_prior_weight > 0:
            bn = _BNPrior(teacher)
            if not bn.layers:
                raise ValueError("cake: bn_prior_weight > 0 needs a teacher with BatchNorm layers (with running "
                                 "statistics); this teacher has none. CAKE does not need it: set bn_prior_weight=0.")
        return _run(**locals())
    finally:
        if bn is not None:
            bn.remove()
        teacher.train(was_training)
        for p, r in zip(teacher.parameters(), req):
            p.requires_grad_(r)


def _run(teacher, num_classes, input_shape, num_samples, batch_size, steps, w_cls, w_contr, w_tv, lr,
         schedule, langevin, noise_std, prior, bn_prior_weight, contrastive_on, group_size, clamp, amp,
         device, seed, progress, out_dir, backend, distributed, use_amp, rank, world, bn, max_abs, backoff, **_):
    num_batches = math.ceil(num_samples / batch_size)
    sizes = [min(batch_size, num_samples - b * batch_size) for b in range(num_batches)]
    lrs = step_sizes(num_batches, lr[0], lr[1], schedule)
    method = "lake" if langevin else "cake"
    config = dict(method=method, num_classes=num_classes, input_shape=list(input_shape),
                  num_samples=num_samples, batch_size=batch_size, steps=steps, w_cls=w_cls, w_contr=w_contr,
                  w_tv=w_tv, lr=list(lr), schedule=schedule, langevin=langevin, noise_std=noise_std,
                  prior=prior if isinstance(prior, str) else getattr(prior, "__qualname__", "callable"),
                  bn_prior_weight=bn_prior_weight, contrastive_on=contrastive_on, group_size=group_size,
                  clamp=list(clamp) if clamp else None, amp=use_amp, seed=seed, max_abs=max_abs, backoff=backoff)
    key_src = json.dumps(config, sort_keys=True) + teacher_fingerprint(teacher)
    key = hashlib.sha1(key_src.encode()).hexdigest()
    manifest = {"format": "fastkd.synthetic-shards/1", "key": key, "config": config,
                "num_batches": num_batches, "teacher": teacher_fingerprint(teacher)}

    done: set[int] = set()
    if out_dir is not None:
        if world > 1 and rank != 0:
            _dist.barrier()  # rank 0 checks and writes the manifest first
        done = _prepare_out_dir(out_dir, manifest, rank)
        if world > 1 and rank == 0:
            _dist.barrier()
    mine = [b for b in range(num_batches) if b % world == rank]
    todo = [b for b in mine if b not in done]

    loss_fn = CAKELoss(w_cls, w_contr, 0.0, contrastive_on=contrastive_on, normalization="authors",
                       group_size=group_size, backend=backend)
    results: dict[int, tuple] = {}
    bar = Progress(len(todo), f"synthesis [{method}]", enabled=progress and rank == 0, unit="batch")
    if progress and rank == 0:
        print(f"synthesis [{method}]: {num_samples} samples in {num_batches} batches of {batch_size}, "
              f"{steps} steps, lr {lr[0]:g} -> {lr[1]:g} ({schedule}), seed {seed}, device {device}"
              + (f", {world} ranks" if world > 1 else "")
              + (f", resuming: {len(done)} batches already in {out_dir}" if done else ""),
              file=sys.stderr, flush=True)
    t_start = time.perf_counter()
    work = 0
    backoffs: dict[int, float] = {}
    for b in todo:
        t0 = time.perf_counter()
        eps = lrs[b]
        for attempt in range(backoff + 1):
            x, logits, y, ran = _synthesise_batch(teacher, b, sizes[b], input_shape, num_classes, group_size, prior,
                                              seed, steps, eps, langevin, noise_std, clamp, w_tv, loss_fn,
                                              backend, use_amp, bn, bn_prior_weight, device, max_abs)
            work += sizes[b] * (steps if ran is None else ran[0] + 1)
            if ran is None:
                break
            where = f"at step {ran[0] + 1} of {steps}: " + ran[1]
            if attempt == backoff:
                raise FloatingPointError(
                    f"cake: batch {b} ran away {where} even at step size {eps:g} ({backoff} times 10x below "
                    f"the schedule's {lrs[b]:g}); lower lr, lower the loss weights or give clamp=(lo, hi). "
                    "Batches already written are kept.")
            if progress and rank == 0:
                bar.note(f"batch {b} ran away {where} at step size {eps:g}; redoing it at {eps / 10:g}")
            eps = eps / 10
        if eps != lrs[b]:
            backoffs[b] = eps
        probs = torch.softmax(logits, 1).cpu()
        xc, yc = x.cpu(), y.cpu()
        dt = time.perf_counter() - t0
        if out_dir is not None:
            _write_shard(out_dir, b, key, xc, probs, yc, dt, lr=eps, lr_scheduled=lrs[b])
        else:
            results[b] = (xc, probs, yc, eps)
        agree = (probs.argmax(1) == yc).float().mean().item()
        bar.update(1, f"batch {b} lr {eps:.1e} agreement {100 * agree:.0f}%")
    bar.close()
    seconds = time.perf_counter() - t_start

    if world > 1:
        _dist.barrier()
        if out_dir is None:
            import torch.distributed as dist

            gathered = [None] * world
            dist.all_gather_object(gathered, results)
            results = {}
            for r in gathered:
                results.update(r)
    if out_dir is not None:
        ds = load_shards(out_dir)
    else:
        missing = [b for b in range(num_batches) if b not in results]
        if missing:  # pragma: no cover - would be a sharding bug
            raise RuntimeError(f"cake: batches {missing[:5]} were not synthesised")
        xs, ps, ys, used = zip(*(results[b] for b in range(num_batches)))
        ds = SyntheticDataset(torch.cat(xs), torch.cat(ps), torch.cat(ys))
        ds.meta["backoffs"] = [[b, used[b]] for b in range(num_batches) if used[b] != lrs[b]]
    ds.meta.update(config)
    ds.meta.update(seconds=seconds, batches_done_here=len(todo), resumed_batches=len(done), world_size=world,
                   throughput_sample_steps_per_s=(work / seconds if seconds > 0 else None),
                   teacher_agreement=ds.teacher_agreement(), teacher=manifest["teacher"])
    if progress and rank == 0:
        if ds.meta.get("backoffs"):
            bo = ds.meta["backoffs"]
            print(f"synthesis [{method}]: {len(bo)} of {num_batches} batches ran away at their scheduled step "
                  f"size and were redone with a smaller one (the largest used: {max(v for _, v in bo):g}); "
                  "a smaller lr start avoids the redo", file=sys.stderr, flush=True)
        print(f"synthesis [{method}]: done in {seconds:.1f}s "
              f"({ds.meta['throughput_sample_steps_per_s'] or 0:.0f} sample-steps/s here), teacher agrees "
              f"with the intended label on {100 * ds.teacher_agreement():.1f}% of samples",
              file=sys.stderr, flush=True)
    return ds


def _runaway(x: torch.Tensor, max_abs: float | None) -> str | None:
    """Why x has run away (non-finite, or beyond the bound), or None."""
    m = float(x.detach().abs().max()) if x.numel() else 0.0
    if not math.isfinite(m):
        return "its inputs hold NaN or Inf"
    if max_abs is not None and m > max_abs:
        return f"its inputs reached |x| = {m:.3g} (bound max_abs={max_abs:g})"
    return None


def _synthesise_batch(teacher, b, n, input_shape, num_classes, group_size, prior, seed, steps, eps, langevin,
                      noise_std, clamp, w_tv, loss_fn, backend, use_amp, bn, bn_prior_weight, device, max_abs):
    """Batch b from its prior draw at step size eps: (x, final logits, labels, None), or, when
    it runs away, (x, None, labels, (step, why)). The inputs are checked at steps 1, 2, 4, 8,
    ... and after the last, so a runaway is caught early at a few synchronisations per batch."""
    gen = torch.Generator().manual_seed(_batch_seed(seed, b))
    x = _draw_prior(prior, (n, *input_shape), gen).to(device)
    y, grp = class_prior_labels(n, num_classes, gen, group_size)
    y, grp = y.to(device), grp.to(device)
    std = 0.0 if not langevin else noise_std
    for t in range(steps):
        x = synthesis_step(teacher, x, y, grp, loss_fn, eps, noise_std=std, clamp=clamp, w_tv=w_tv,
                           seed=_batch_seed(seed, b, t + 1), backend=backend, amp=use_amp,
                           bn=bn, bn_prior_weight=bn_prior_weight, check_finite=(t == 0), batch=b)
        if (t + 1) & t == 0 or t + 1 == steps:
            why = _runaway(x, max_abs)
            if why is not None:
                if bn is not None:
                    bn.terms = []
                return x, None, y, (t, why)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        final = teacher(x).float()
    if bn is not None:
        bn.terms = []
    if not bool(torch.isfinite(final).all()):
        return x, None, y, (steps - 1, "the teacher's outputs on its inputs hold NaN or Inf")
    return x, final, y, None


def synthesis_step(teacher, x, y, groups, loss_fn, lr, *, noise_std=0.0, clamp=None, w_tv=0.0, seed=0,
                   backend="auto", amp=False, bn=None, bn_prior_weight=0.0, check_finite=False, batch=0):
    """One CAKE/LAKE step on x (returns the updated, detached x): teacher forward, the CAKE
    loss (fused contrastive), input gradient by autograd, then the fused noisy step with
    the TV prior's gradient added in the same kernel."""
    x = x.detach().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = teacher(x)
    logits = logits.float()
    if check_finite and not bool(torch.isfinite(logits).all()):
        raise FloatingPointError(f"cake: the teacher returned NaN or Inf logits on batch {batch} "
                                 "(first step); check the teacher, its input_shape and the prior")
    loss = loss_fn(x, logits, y, groups)
    if bn is not None:
        loss = loss + bn_prior_weight * bn.take()
    (g,) = torch.autograd.grad(loss, x)
    x = x.detach()
    ops.langevin_step_(x, g, lr, noise_std=noise_std, clamp=tuple(clamp) if clamp else None,
                       tv_weight=w_tv, tv_p=1, seed=seed, backend=backend)
    return x


def lake(teacher: nn.Module, **kwargs) -> SyntheticDataset:
    """LAKE: :func:`cake` with explicit Langevin noise (``langevin=True``)."""
    kwargs["langevin"] = True
    return cake(teacher, **kwargs)
