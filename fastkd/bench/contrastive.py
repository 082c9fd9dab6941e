"""cross_class_contrastive benchmark: fused backends vs the naive cdist + mask (eager and
torch.compile) and the eager closed form, forward + backward, with peak memory."""
from __future__ import annotations

import os

import torch

import fastkd
from fastkd.ops import cross_class_contrastive, cross_class_contrastive_reference

from ._mem import cpu_peak_extra_mb
from .core import Case


def naive_contrastive(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What people write: all pairwise squared distances, masked by 'different label'."""
    d = torch.cdist(p, p).square()
    return (d * (y[:, None] != y[None, :])).sum()


def _naive_bytes(n: int, k: int) -> float:
    # distance matrix, its square, the mask, the product, and as many buffers in backward
    return n * n * (4 + 4 + 1 + 4) * 2.0 + 8.0 * n * k


def _mem_cap() -> float:
    default = 8.0 if torch.cuda.is_available() else 1.5
    return float(os.environ.get("FASTKD_BENCH_MEM_CAP_GB", default)) * 2**30


def cases(device: str, quick: bool) -> list[Case]:
    if quick:
        shapes = [(16384, 10)]
    elif device == "cuda":
        shapes = [(n, k) for n in (256, 1024, 4096, 16384) for k in (10, 100, 1000)]
    else:  # keep a full CPU run within a few minutes
        shapes = [(256, 10), (1024, 10), (4096, 10), (16384, 10), (1024, 100), (1024, 1000), (4096, 100)]
    st = fastkd.backends()
    fused = [b for b in ("cuda", "triton", "cpp") if st[b].available
             and (b != "triton" or device == "cuda") and (b != "cpp" or device == "cpu")
             and (b != "cuda" or device == "cuda")]
    compiled = torch.compile(naive_contrastive, dynamic=False)
    out = []
    for n, k in shapes:
        p = torch.randn(n, k, device=device, requires_grad=True)
        y = torch.randint(0, 10, (n,), device=device)

        def zero(p=p):
            p.grad = None

        def bwd(f, p=p, y=y):
            def go():
                f(p, y).backward()
            return go

        impls = {}
        note = "fwd+bwd; bytes bound = read outputs + write grad (8 B/elem)"
        if _naive_bytes(n, k) <= _mem_cap():
            impls["eager naive cdist+mask"] = bwd(naive_contrastive)
            impls["torch.compile(naive)"] = bwd(compiled)
        else:
            note += (f"; naive skipped: needs ~{_naive_bytes(n, k) / 2**30:.1f} GiB > cap "
                     f"{_mem_cap() / 2**30:.1f} GiB (FASTKD_BENCH_MEM_CAP_GB); it scales as N^2")
        impls["eager closed form"] = bwd(lambda t, yy: cross_class_contrastive_reference(t, yy))
        for b in fused:
            impls[f"fastkd[{b}]"] = bwd(lambda t, yy, b=b: cross_class_contrastive(t, yy, backend=b))
        baseline = "eager naive cdist+mask" if "eager naive cdist+mask" in impls else "eager closed form"
        if device == "cpu":
            mems = []
            for name, fn in impls.items():
                if name.startswith("torch.compile"):
                    continue
                zero()
                m = cpu_peak_extra_mb(fn)
                if m is not None:
                    mems.append(f"{name} {m:.1f} MiB")
            if mems:
                note += "; peak extra host RSS: " + ", ".join(mems)
        out.append(Case("cross_class_contrastive", f"N={n},K={k}", "float32", impls, bytes=8.0 * n * k,
                        baseline=baseline, setup=zero, note=note))
    return out


OPS = {"cross_class_contrastive": cases}
