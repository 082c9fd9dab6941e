"""Benchmarks of the image-matching and empirical Wasserstein ops.

Ops: image_distance, pairwise_sqdist, assignment (the exact solver alone),
wasserstein_exact, wasserstein_sinkhorn, wasserstein_sliced. Compared with eager PyTorch,
torch.compile of it, POT (ot.emd2, ot.sinkhorn2, ot.sliced_wasserstein_distance) and
geomloss SamplesLoss (tensorized backend). Every Wasserstein row reports its relative
error against the exact value (the optimal assignment), so speed and accuracy are read
together. fastkd and geomloss rows are timed forward+backward; POT rows forward only
(POT works on numpy arrays; data transfer from the device and the cost matrix included).
"""
from __future__ import annotations

import math

import torch

import fastkd
from fastkd.ops import image_distance, linear_assignment, pairwise_sqdist, sliced_directions, wasserstein

from .core import Case


def _sizes(device: str, quick: bool):
    if device == "cuda":
        if quick:
            return [(256, 3072)]
        return [(n, d) for n in (64, 256, 1024) for d in (784, 3072, 12288, 150528)]
    return [(64, 3072)] if quick else [(64, 784), (64, 3072), (256, 3072)]


def _fused(device: str):
    st = fastkd.backends()
    if device == "cuda":
        return [b for b in ("cuda", "triton") if st[b].available]
    return ["cpp"] if st["cpp"].available else []


def _data(n, d, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, d, generator=g).to(device)
    b = (0.7 * torch.rand(n, d, generator=g) + 0.2).to(device)
    return a, b


def _fwd_bwd(fn, a, b):
    def go():
        fn(a, b).backward()
    return go


def _zero(*ts):
    def z():
        for t in ts:
            t.grad = None
    return z


def _rel(x, ref):
    x = x.detach() if isinstance(x, torch.Tensor) else x
    return abs(float(x) - float(ref)) / abs(float(ref))


# --------------------------------------------------------------------------- image_distance
def image_distance_cases(device: str, quick: bool) -> list[Case]:
    shapes = [(256, 3, 32, 32)] if quick else ([(256, 3, 32, 32), (64, 3, 224, 224)] if device == "cuda"
                                               else [(256, 3, 32, 32), (16, 3, 224, 224)])
    out = []

    def eager(x, y):
        return (x - y).abs().flatten(1).mean(1).mean()

    compiled = torch.compile(eager)
    for shape in shapes:
        a = torch.randn(shape, device=device, requires_grad=True)
        b = torch.randn(shape, device=device)
        impls = {"eager": _fwd_bwd(eager, a, b), "torch.compile(eager)": _fwd_bwd(compiled, a, b),
                 "F.l1_loss": _fwd_bwd(lambda x, y: torch.nn.functional.l1_loss(x, y), a, b)}
        for be in _fused(device):
            impls[f"fastkd[{be}]"] = _fwd_bwd(lambda x, y, be=be: image_distance(x, y, p=1, backend=be), a, b)
        out.append(Case("image_distance", "x".join(map(str, shape)), "float32", impls, bytes=12.0 * a.numel(),
                        setup=_zero(a), note="p=1 mean, fwd+bwd; bytes bound = read a, b + write grad"))
    return out


# --------------------------------------------------------------------------- pairwise_sqdist
def pairwise_sqdist_cases(device: str, quick: bool) -> list[Case]:
    if device == "cuda":
        sizes = [(1024, 3072)] if quick else [(n, d) for n in (256, 1024) for d in (3072, 150528)]
    else:
        sizes = [(64, 3072)] if quick else [(64, 3072), (256, 3072), (64, 150528)]
    out = []
    for n, d in sizes:
        a, b = _data(n, d, device)
        b = a + 0.05 * (b - a)  # close sets: where the GEMM form cancels
        a.requires_grad_(True)
        b.requires_grad_(True)
        with torch.no_grad():
            ref = torch.cdist(a.double(), b.double()) ** 2

        def err(t):
            return ((t.detach().double() - ref).abs() / ref.clamp_min(1e-300)).max().item()

        w = torch.rand(n, n, device=device)

        def mk(fn, a=a, b=b, w=w):
            def go():
                (fn(a, b) * w).sum().backward()
            return go

        def cdist2(x, y):
            return torch.cdist(x, y) ** 2

        def mm_form(x, y):
            return ((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T).clamp_min(0)

        impls = {"eager cdist**2": mk(cdist2), "eager mm form": mk(mm_form)}
        acc = {"eager cdist**2": err(cdist2(a, b)), "eager mm form": err(mm_form(a, b))}
        for be in _fused(device) + ["torch"]:
            f = (lambda x, y, be=be: pairwise_sqdist(x, y, backend=be))
            impls[f"fastkd[{be}]"] = mk(f)
            acc[f"fastkd[{be}]"] = err(f(a, b))
        out.append(Case("pairwise_sqdist", f"{n}x{n}x{d}", "float32", impls, baseline="eager cdist**2",
                        setup=_zero(a, b), accuracy=acc,
                        note="fwd+bwd; error = max relative error vs fp64 on close sets (b = a + 5% noise)"))
    return out


# --------------------------------------------------------------------------- assignment solver
def assignment_cases(device: str, quick: bool) -> list[Case]:
    sizes = [256] if quick else ([64, 256, 1024] if device == "cpu" else [64, 256, 1024])
    out = []
    for n in sizes:
        a, b = _data(n, 3072, "cpu")
        C = (torch.cdist(a.double(), b.double()) ** 2)
        impls = {"scipy.linear_sum_assignment": lambda C=C: linear_assignment(C, solver="scipy")}
        if fastkd.backends()["cpp"].available:
            impls["fastkd cpp (shortest augmenting path)"] = lambda C=C: linear_assignment(C, solver="cpp")
        try:
            import ot

            Cn = C.numpy()
            u = ot.unif(n)
            impls["POT ot.emd (network simplex)"] = lambda u=u, Cn=Cn: ot.emd(u, u, Cn)
        except ImportError:
            pass
        out.append(Case("assignment", f"{n}x{n}", "float64", impls, baseline="scipy.linear_sum_assignment",
                        note="solver only, on an (N, N) squared-distance matrix of images (D=3072)"))
    return out


# --------------------------------------------------------------------------- wasserstein
def _exact_value(a, b):
    with torch.no_grad():
        return wasserstein(a.detach().double(), b.detach().double(), method="exact").item()


def wasserstein_exact_cases(device: str, quick: bool) -> list[Case]:
    out = []
    for n, d in _sizes(device, quick):
        a, b = _data(n, d, device)
        exact = _exact_value(a, b)
        a.requires_grad_(True)
        impls, acc = {}, {}
        for be in _fused(device) + ["torch"]:
            f = (lambda x, y, be=be: wasserstein(x, y, method="exact", backend=be))
            impls[f"fastkd[{be}]"] = _fwd_bwd(f, a, b)
            acc[f"fastkd[{be}]"] = _rel(f(a, b), exact)

        def eager(x, y):  # what one writes by hand: cdist, scipy, gather
            from scipy.optimize import linear_sum_assignment

            C = torch.cdist(x, y) ** 2
            r, c = linear_sum_assignment(C.detach().cpu().numpy())
            return C[torch.as_tensor(r, device=x.device), torch.as_tensor(c, device=x.device)].mean()

        impls["eager cdist + scipy"] = _fwd_bwd(eager, a, b)
        acc["eager cdist + scipy"] = _rel(eager(a, b), exact)
        try:
            import ot

            def pot(a=a, b=b, n=n):
                xa, xb = a.detach().cpu().numpy(), b.detach().cpu().numpy()
                return ot.emd2(ot.unif(n), ot.unif(n), ot.dist(xa, xb))

            impls["POT ot.emd2 (incl. transfer)"] = pot
            acc["POT ot.emd2 (incl. transfer)"] = _rel(pot(), exact)
        except ImportError:
            pass
        out.append(Case("wasserstein_exact", f"N={n},D={d}", "float32", impls, baseline="eager cdist + scipy",
                        setup=_zero(a), accuracy=acc, note="W_2^2; error = relative vs the exact value"))
    return out


def wasserstein_sinkhorn_cases(device: str, quick: bool) -> list[Case]:
    out = []
    try:
        from geomloss import SamplesLoss
        try:
            from geomloss._legacy.sinkhorn_divergence import epsilon_schedule, max_diameter
        except ImportError:  # older layout
            from geomloss.sinkhorn_divergence import epsilon_schedule, max_diameter
    except ImportError:
        SamplesLoss = None
    blur = 0.05
    for n, d in _sizes(device, quick):
        a, b = _data(n, d, device)
        exact = _exact_value(a, b)
        a.requires_grad_(True)
        # geomloss's cost is |x-y|^2 / 2: blur / sqrt(2) there is eps = blur^2 on |x-y|^2 here,
        # and its value times 2 is on our scale. scaling sqrt(1/2) halves eps per iteration, as here.
        scaling = math.sqrt(0.5)
        if SamplesLoss is not None:
            diam = max_diameter(a.detach(), b.detach())
            iters = len(epsilon_schedule(2, diam, blur / math.sqrt(2), scaling))
        else:
            iters = 40
        impls, acc = {}, {}
        for be in _fused(device)[:1] + ["torch"]:
            f = (lambda x, y, be=be: wasserstein(x, y, method="sinkhorn", blur=blur, max_iter=iters, backend=be))
            impls[f"fastkd[{be}]"] = _fwd_bwd(f, a, b)
            acc[f"fastkd[{be}]"] = _rel(f(a, b), exact)
        if SamplesLoss is not None:
            gl = SamplesLoss("sinkhorn", p=2, blur=blur / math.sqrt(2), scaling=scaling, debias=False,
                             backend="tensorized")

            def geo(x, y, gl=gl):
                return 2.0 * gl(x, y)

            impls["geomloss tensorized"] = _fwd_bwd(geo, a, b)
            acc["geomloss tensorized"] = _rel(geo(a, b), exact)
        try:
            import ot

            def pot(a=a, b=b, n=n, iters=iters):
                xa, xb = a.detach().cpu().numpy().astype("float64"), b.detach().cpu().numpy().astype("float64")
                return ot.sinkhorn2(ot.unif(n), ot.unif(n), ot.dist(xa, xb), reg=blur ** 2, method="sinkhorn_log",
                                    numItermax=iters)

            impls["POT ot.sinkhorn2 log (incl. transfer)"] = pot
            acc["POT ot.sinkhorn2 log (incl. transfer)"] = _rel(pot(), exact)
        except ImportError:
            pass
        out.append(Case("wasserstein_sinkhorn", f"N={n},D={d},it={iters}", "float32", impls,
                        baseline="geomloss tensorized" if SamplesLoss is not None else "fastkd[torch]",
                        setup=_zero(a), accuracy=acc,
                        note=f"blur={blur}, same iteration count; error = relative vs the exact W_2^2"))
    return out


def wasserstein_sliced_cases(device: str, quick: bool) -> list[Case]:
    out = []
    L, seed = 128, 0
    for n, d in _sizes(device, quick):
        a, b = _data(n, d, device)
        with torch.no_grad():  # fp64 value for the same directions
            exact = wasserstein(a.double(), b.double(), method="sliced", n_projections=L, seed=seed,
                                backend="torch").item()
        a.requires_grad_(True)
        impls, acc = {}, {}
        for be in _fused(device) + ["torch"]:
            f = (lambda x, y, be=be: wasserstein(x, y, method="sliced", n_projections=L, seed=seed, backend=be))
            impls[f"fastkd[{be}]"] = _fwd_bwd(f, a, b)
            acc[f"fastkd[{be}]"] = _rel(f(a, b), exact)

        def eager(x, y, d=d):  # materialised random directions, matmul, sort
            th = torch.randn(d, L, device=x.device)
            th = th / th.norm(dim=0, keepdim=True)
            return ((torch.sort(x @ th, 0).values - torch.sort(y @ th, 0).values) ** 2).mean()

        impls["eager torch"] = _fwd_bwd(eager, a, b)
        acc["eager torch"] = _rel(eager(a, b), exact)
        try:
            import ot

            theta = sliced_directions(d, L, seed).double().numpy()

            def pot(a=a, b=b, theta=theta):
                xa, xb = a.detach().cpu().numpy(), b.detach().cpu().numpy()
                return ot.sliced_wasserstein_distance(xa, xb, n_projections=L, p=2, projections=theta) ** 2

            impls["POT sliced (incl. transfer)"] = pot
            acc["POT sliced (incl. transfer)"] = _rel(pot(), exact)
        except ImportError:
            pass
        out.append(Case("wasserstein_sliced", f"N={n},D={d},L={L}", "float32", impls, baseline="eager torch",
                        setup=_zero(a), accuracy=acc,
                        note="sliced W_2^2; error = relative vs the fp64 sliced value for the same "
                             "directions (eager torch draws other directions: its error is sampling noise)"))
    return out


OPS = {"image_distance": image_distance_cases, "pairwise_sqdist": pairwise_sqdist_cases,
       "assignment": assignment_cases, "wasserstein_exact": wasserstein_exact_cases,
       "wasserstein_sinkhorn": wasserstein_sinkhorn_cases, "wasserstein_sliced": wasserstein_sliced_cases}
