"""CAKE/LAKE synthesis step: fastkd (fused ops) vs an eager re-implementation of the
authors' loop (pairwise term by broadcasting, separate TV, SGD step plus randn), on
LeNet-5 and ResNet-18 teachers. One timed call = one synthesis step on a batch
(teacher forward + input gradient + update); throughput in samples x steps per second
is batch / time. The student accuracy each loop leads to is measured by
benchmarks/cake_accuracy.py (see docs/cake.md)."""
from __future__ import annotations

import torch

from fastkd import models
from fastkd.nn import CAKELoss
from fastkd.synthesis.cake_synthesis import class_prior_labels, synthesis_step
from fastkd.synthesis.reference import authors_step

from .core import Case


def _cases(device: str, quick: bool) -> list[Case]:
    if device == "cuda":
        specs = [("lenet5", (1, 32, 32), 500), ("resnet18", (3, 32, 32), 500), ("cnn", (1, 8, 8), 500)]
    else:  # a ResNet-18 step on 500 images takes seconds on a CPU
        specs = [("lenet5", (1, 32, 32), 500), ("resnet18", (3, 32, 32), 16), ("cnn", (1, 8, 8), 100)]
    if quick:
        specs = specs[:1]
    out = []
    amp = device == "cuda"
    for name, shape, batch in specs:
        for langevin in (False, True):
            torch.manual_seed(0)
            extra = {"input_size": shape[-1]} if name == "cnn" else {}  # cnn: the bundled digits teacher's model
            teacher = models.create(name, num_classes=10, in_channels=shape[0], **extra).to(device).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            gen = torch.Generator().manual_seed(0)
            x0 = torch.randn((batch, *shape), generator=gen).to(device)
            y, grp = class_prior_labels(batch, 10, gen)
            y, grp = y.to(device), grp.to(device)
            lr = 1e-3
            loss_fn = CAKELoss(1e3, 1e1, 0.0)
            state = {"x": x0.clone(), "step": 0}

            def fused(state=state, teacher=teacher, y=y, grp=grp, loss_fn=loss_fn, langevin=langevin):
                state["step"] += 1
                state["x"] = synthesis_step(teacher, state["x"], y, grp, loss_fn, lr,
                                            noise_std=None if langevin else 0.0, w_tv=1e5, seed=state["step"],
                                            amp=amp)

            xp = torch.nn.Parameter(x0.clone())
            opt = torch.optim.SGD([xp], lr=lr)

            def eager(teacher=teacher, xp=xp, opt=opt, y=y, grp=grp, langevin=langevin):
                authors_step(teacher, xp, opt, y, grp, lr, 1e3, 1e1, 1e5, langevin, amp)

            method = "lake" if langevin else "cake"
            out.append(Case(op="cake_synthesis", shape=f"{name} {method} {batch}x{'x'.join(map(str, shape))}",
                            dtype="bf16-autocast" if amp else "fp32",
                            impls={"fastkd": fused, "eager": eager}, baseline="eager",
                            note=f"one synthesis step; throughput = {batch} / time samples x steps per second"))
    return out


OPS = {"cake_synthesis": _cases}
