"""DeepInversion (Yin et al., "Dreaming to Distill", CVPR 2020): synthesise inputs from a teacher
with BatchNorm layers by optimising them (Adam) so that the teacher assigns them drawn labels
while every BatchNorm layer sees batch statistics equal to its running ones, with total-variation
and L2 image priors; then distil the student on the teacher's soft labels of them.

This method is the worked example of the method contract (docs/methods.md): a ``Config``
dataclass and ``run()``; the command line (`fastkd distill --method deepinversion`), the
teacher, student, evaluation data, output folder and student check come from
:mod:`fastkd.methods._cli`. The fused ops it runs on are :class:`fastkd.nn.BNStatsLoss`
(:func:`fastkd.ops.bn_stats_loss`) and :func:`fastkd.ops.tv_loss`.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._progress import Progress

METHOD = "deepinversion"
DEFAULT_STUDENT = "cnn_half"

__all__ = ["Config", "synthesize", "run"]


@dataclass
class Config:
    """Hyper-parameters of :func:`run`."""
    num_samples: int = field(default=2000, metadata={"help": "inputs to synthesise"})
    batch_size: int = field(default=100, metadata={"help": "inputs optimised together (their BN statistics)"})
    steps: int = field(default=200, metadata={"help": "Adam steps per batch"})
    lr: float = field(default=0.05, metadata={"help": "Adam learning rate on the inputs"})
    w_bn: float = field(default=10.0, metadata={"help": "weight of the BatchNorm-statistics term"})
    w_tv: float = field(default=1e-3, metadata={"help": "weight of the total-variation prior (mean |difference|)"})
    w_l2: float = field(default=1e-5, metadata={"help": "weight of the L2 prior (mean square)"})
    epochs: int = field(default=30, metadata={"help": "student epochs"})
    student_batch_size: int = field(default=128, metadata={"help": "student batch size"})
    student_lr: float = field(default=0.1, metadata={"help": "peak SGD lr of the student (one-cycle)"})
    seed: int = field(default=0, metadata={"help": "seeds the synthesis and the student"})
    backend: str = field(default="auto", metadata={"help": "backend of the fused ops",
                                                   "choices": ["auto", "cuda", "triton", "cpp", "torch"]})

    def validate(self) -> "Config":
        for k in ("num_samples", "batch_size", "steps", "epochs", "student_batch_size"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"deepinversion: {k} must be an int >= 1, got {v!r}")
        if self.batch_size < 2:
            raise ValueError(f"deepinversion: batch_size must be >= 2 (batch statistics), got {self.batch_size}")
        for k in ("lr", "student_lr"):
            if not getattr(self, k) > 0:
                raise ValueError(f"deepinversion: {k} must be > 0, got {getattr(self, k)!r}")
        for k in ("w_bn", "w_tv", "w_l2"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"deepinversion: {k} must be a finite number >= 0, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"deepinversion: seed must be an int >= 0, got {self.seed!r}")
        return self


def synthesize(teacher: nn.Module, *, config: Config, num_classes: int, input_shape, device=None,
               progress: bool = True, log=None):
    """The synthetic set: ``num_samples`` inputs, batch by batch from N(0, I), each batch
    optimised for ``steps`` Adam steps on ``CE(teacher(x), y) + w_bn * L_bn + w_tv * TV(x) +
    w_l2 * mean(x^2)``. Returns a :class:`fastkd.synthesis.SyntheticDataset`."""
    from ..nn import BNStatsLoss
    from ..synthesis import SyntheticDataset

    cfg = config.validate()
    dev = torch.device(device) if device is not None else next(teacher.parameters()).device
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    bn = BNStatsLoss(teacher, backend=cfg.backend) if cfg.w_bn > 0 else None
    nb = math.ceil(cfg.num_samples / cfg.batch_size)
    xs, ps, ys = [], [], []
    bar = Progress(nb, "deepinversion", enabled=progress, unit="batch", write=log)
    try:
        for b in range(nb):
            n = min(cfg.batch_size, cfg.num_samples - b * cfg.batch_size)
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + b)
            x = torch.randn((n, *input_shape), generator=g).to(dev).requires_grad_(True)
            y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)].to(dev)
            opt = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9))
            for _ in range(cfg.steps):
                logits = teacher(x)
                loss = F.cross_entropy(logits, y)
                if bn is not None:
                    loss = loss + cfg.w_bn * bn()
                if cfg.w_tv > 0 and len(input_shape) == 3:
                    loss = loss + cfg.w_tv * ops.tv_loss(x, p=1, reduction="mean", backend=cfg.backend)
                loss = loss + cfg.w_l2 * x.pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                if bn is not None:
                    with bn.paused():
                        probs = torch.softmax(teacher(x), 1)
                else:
                    probs = torch.softmax(teacher(x), 1)
            if not bool(torch.isfinite(x).all()):
                raise FloatingPointError(f"deepinversion: batch {b} diverged (NaN/Inf inputs); lower lr")
            xs.append(x.detach().cpu())
            ps.append(probs.cpu())
            ys.append(y.cpu())
            bar.update(1, f"agreement {100 * float((probs.argmax(1) == y).float().mean()):.0f}%")
    finally:
        bar.close()
        if bn is not None:
            bn.remove()
    return SyntheticDataset(torch.cat(xs), torch.cat(ps), torch.cat(ys))


def run(teacher: nn.Module, student: nn.Module, *, config: Config, input_shape, num_classes: int, eval_data=None,
        device=None, progress: bool = True, log=None, out_dir: str | None = None, **_) -> dict:
    """Synthesise, then distil ``student`` (trained in place) on the teacher's soft labels."""
    from ..distill import train_student
    from ..viz import save_image_grid

    t0 = time.perf_counter()
    ds = synthesize(teacher, config=config, num_classes=num_classes, input_shape=input_shape, device=device,
                    progress=progress, log=log)
    t_syn = time.perf_counter() - t0
    h = train_student(student, ds, epochs=config.epochs, batch_size=config.student_batch_size, lr=config.student_lr,
                      eval_data=eval_data, seed=config.seed, progress=progress, device=device, log=log,
                      checkpoint=os.path.join(out_dir, "student_checkpoint.pt") if out_dir else None)
    grid = None
    if out_dir is not None and len(input_shape) == 3 and input_shape[0] in (1, 3):
        grid = save_image_grid(ds.inputs[:64], os.path.join(out_dir, "samples.png"),
                               titles=[str(int(v)) for v in ds.labels[:64]],
                               title="DeepInversion samples (intended class)")
    return {"summary": {"synthesis_seconds": t_syn, "student_seconds": h.seconds,
                        "teacher_agreement": ds.teacher_agreement(), "student_history": h.to_dict(),
                        "samples_png": grid},
            "check": (ds.inputs, "the synthetic inputs")}
