"""Eager re-implementation of the CAKE/LAKE authors' synthesis loop (the reference).

It optimises the same objective as :func:`fastkd.synthesis.cake`, written the way the
authors' released code writes it: the pairwise term by broadcasting a
(groups, m, m, K) difference tensor and taking torch's mean-reduced MSE times
0.5 * groups^2, the batch-mean cross-entropy times groups, TV by slicing as a separate
term, ``torch.optim.SGD`` on the inputs, and (LAKE) ``x += sqrt(2 lr) * randn_like(x)``
after each step. Each batch starts from the same prior draw and labels as fastkd's
batch of the same index and seed, so the two loops can be compared sample for sample.
It is used by the throughput benchmark (``fastkd bench cake_synthesis``) and the
accuracy study (benchmarks/cake_accuracy.py); it is not meant for production use.
"""
from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from .._progress import Progress
from .cake_synthesis import _batch_seed, _draw_prior, class_prior_labels, step_sizes
from .dataset import SyntheticDataset

__all__ = ["authors_loss", "authors_step", "authors_loop"]


def authors_loss(x: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor,
                 w_cls: float, w_contr: float, w_tv: float) -> torch.Tensor:
    """w_cls * G * CE_mean + w_contr * 0.5 * G^2 * MSE_mean(pairwise) + w_tv * TV_mean."""
    n, k = logits.shape
    num_groups = int(groups.max().item()) + 1
    cls = F.cross_entropy(logits, labels) * num_groups
    if n % num_groups == 0:  # the authors' layout: equal groups, (G, m, m, K) differences
        m = n // num_groups
        lg = logits.view(num_groups, m, k)
        lab = labels.view(num_groups, m)
        diff = lg[:, :, None, :] - lg[:, None, :, :]
        mask = (lab[:, :, None] != lab[:, None, :]).unsqueeze(-1).to(diff.dtype)
        contr = F.mse_loss(diff * mask, torch.zeros_like(diff)) * (0.5 * num_groups ** 2)
    else:  # ragged last group: mask the full (N, N, K) differences
        diff = logits[:, None, :] - logits[None, :, :]
        mask = ((labels[:, None] != labels[None, :]) & (groups[:, None] == groups[None, :]))
        m = n / num_groups
        contr = (diff.square() * mask.unsqueeze(-1)).sum() * (0.5 * num_groups / (m * m * k))
    dh = x[:, :, 1:, :] - x[:, :, :-1, :]
    dw = x[:, :, :, 1:] - x[:, :, :, :-1]
    tv = (dh.abs().sum() + dw.abs().sum()) / (dh.numel() + dw.numel())
    return w_cls * cls + w_contr * contr + w_tv * tv


def authors_step(teacher: nn.Module, x: torch.nn.Parameter, opt: torch.optim.Optimizer, labels, groups,
                 lr: float, w_cls: float, w_contr: float, w_tv: float, langevin: bool, amp: bool) -> None:
    """One eager step: forward, loss, backward, SGD step, then (LAKE) Gaussian noise."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = teacher(x)
    loss = authors_loss(x, logits.float(), labels, groups, w_cls, w_contr, w_tv)
    loss.backward()
    opt.step()
    if langevin:
        with torch.no_grad():
            x.add_(torch.randn_like(x) * math.sqrt(2.0 * lr))


def authors_loop(teacher: nn.Module, *, num_classes: int, input_shape, num_samples: int,
                 batch_size: int = 100, steps: int = 200, w_cls: float = 1e3, w_contr: float = 1e1,
                 w_tv: float = 1e5, lr=(1e-1, 1e-5), schedule: str = "loglinear", langevin: bool = False,
                 prior="normal", amp: bool | None = None, device=None, seed: int = 0,
                 progress: bool = False) -> SyntheticDataset:
    """The authors' loop (eager) with :func:`fastkd.synthesis.cake`'s arguments and defaults."""
    if device is None:
        p0 = next(iter(teacher.parameters()), None)
        device = p0.device if p0 is not None else torch.device("cpu")
    device = torch.device(device)
    use_amp = (device.type == "cuda") if amp is None else bool(amp)
    was = teacher.training
    req = [p.requires_grad for p in teacher.parameters()]
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    num_batches = math.ceil(num_samples / batch_size)
    lrs = step_sizes(num_batches, lr[0], lr[1], schedule)
    xs, ps, ys = [], [], []
    bar = Progress(num_batches, f"authors' loop [{'lake' if langevin else 'cake'}]", enabled=progress,
                   unit="batch")
    t_start = time.perf_counter()
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the eager loop's noise comes from torch's global generator
    try:
        for b in range(num_batches):
            n = min(batch_size, num_samples - b * batch_size)
            gen = torch.Generator().manual_seed(_batch_seed(seed, b))
            x0 = _draw_prior(prior, (n, *input_shape), gen)
            y, grp = class_prior_labels(n, num_classes, gen)
            x = torch.nn.Parameter(x0.to(device))
            y, grp = y.to(device), grp.to(device)
            opt = torch.optim.SGD([x], lr=lrs[b])
            for _ in range(steps):
                authors_step(teacher, x, opt, y, grp, lrs[b], w_cls, w_contr, w_tv, langevin, use_amp)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                probs = torch.softmax(teacher(x).float(), 1)
            xs.append(x.detach().cpu())
            ps.append(probs.cpu())
            ys.append(y.cpu())
            bar.update(1)
    finally:
        torch.random.set_rng_state(rng_state)
        teacher.train(was)
        for p, r in zip(teacher.parameters(), req):
            p.requires_grad_(r)
    bar.close()
    seconds = time.perf_counter() - t_start
    ds = SyntheticDataset(torch.cat(xs), torch.cat(ps), torch.cat(ys),
                          dict(method=("lake" if langevin else "cake") + "-authors-loop", seconds=seconds,
                               num_samples=num_samples, steps=steps, seed=seed,
                               throughput_sample_steps_per_s=num_samples * steps / seconds))
    if progress:
        print(f"authors' loop: done in {seconds:.1f}s", file=sys.stderr, flush=True)
    return ds
