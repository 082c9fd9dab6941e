"""langevin_step_ benchmark: fused backends vs the eager op sequence, torch.compile of it and
torch.optim.SGD(foreach) + randn. Bytes bound: read x, read grad, write x (12 B/elem fp32)."""
from __future__ import annotations

import math

import torch

import fastkd
from fastkd.ops import langevin_step_

from ._mem import cpu_peak_extra_mb
from .core import Case

LR = 1e-3
STD = math.sqrt(2 * LR)
LO, HI = -3.0, 3.0


def eager_step(x, g):
    # mul, sub, randn, mul, add, clamp: what a synthesis loop writes by hand
    x.sub_(g * LR).add_(torch.randn_like(x) * STD).clamp_(LO, HI)


def _functional_step(x, g):
    return (x - LR * g + STD * torch.randn_like(x)).clamp(LO, HI)


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cuda":
        shapes = [(256, 3, 224, 224)] if quick else [(256, 3, 32, 32), (64, 3, 64, 64), (256, 3, 224, 224)]
    else:
        shapes = [(64, 3, 64, 64)] if quick else [(256, 3, 32, 32), (64, 3, 64, 64), (16, 3, 224, 224)]
    st = fastkd.backends()
    fused = [b for b in ("cuda", "triton", "cpp") if st[b].available
             and (b != "triton" or device == "cuda") and (b != "cpp" or device == "cpu")
             and (b != "cuda" or device == "cuda")]
    compiled = torch.compile(_functional_step)
    out = []
    for shape in shapes:
        x = torch.randn(shape, device=device)
        g = torch.randn(shape, device=device) * 0.1
        xs = torch.nn.Parameter(x.clone())
        xs.grad = g
        sgd = torch.optim.SGD([xs], lr=LR, foreach=True)

        def sgd_step():
            sgd.step()
            with torch.no_grad():
                xs.add_(torch.randn_like(xs), alpha=STD).clamp_(LO, HI)

        impls = {
            "eager": lambda x=x, g=g: eager_step(x, g),
            "torch.compile(eager)": lambda x=x, g=g: x.copy_(compiled(x, g)),
            "SGD(foreach)+randn": sgd_step,
        }
        for b in fused:
            impls[f"fastkd[{b}]"] = lambda x=x, g=g, b=b: langevin_step_(x, g, LR, clamp=(LO, HI), backend=b)
        for b in fused:
            impls[f"fastkd[{b}] +TV prior fused"] = (
                lambda x=x, g=g, b=b: langevin_step_(x, g, LR, clamp=(LO, HI), tv_weight=1.0, backend=b))
        note = "one step, clamp on, noise sqrt(2 lr); bytes bound 12 B/elem"
        if device == "cpu":
            mems = []
            for name, fn in impls.items():
                if not name.startswith("torch.compile"):
                    m = cpu_peak_extra_mb(fn)
                    if m is not None:
                        mems.append(f"{name} {m:.1f} MiB")
            if mems:
                note += "; peak extra host RSS: " + ", ".join(mems)
        out.append(Case("langevin_step_", "x".join(map(str, shape)), "float32", impls,
                        bytes=12.0 * x.numel(), note=note))
    return out


OPS = {"langevin_step_": cases}
