"""Empirical optimal transport between image sets: ``pairwise_sqdist`` and ``wasserstein``.

``pairwise_sqdist(a, b)`` is the (N, M) matrix ``||a_i - b_j||^2`` computed through one
matrix product: both sets are first centred on their common mean (distances do not change,
norms shrink), the row norms are accumulated in double, the product is taken in the input
precision and ``||a_i||^2 + ||b_j||^2 - 2 a_i.b_j`` is formed in double. Entries where that
form has cancelled (below 1/64 of ``||a_i||^2 + ||b_j||^2`` in fp32, 1e-7 in fp64) are
recomputed from the differences, so identical rows give exact zeros and near-duplicates
keep their relative accuracy; the result is clamped at zero, never negative.

``wasserstein(a, b, method=...)`` is the optimal transport cost between the uniform
empirical measures mu = (1/N) sum_i delta_{a_i} and nu = (1/M) sum_j delta_{b_j} for the
ground cost ``c(x, y) = ||x - y||_2^p`` (samples flattened), i.e. **W_p(mu, nu) to the power
p** (not its p-th root):

* ``"exact"``: N == M; min over permutations s of (1/N) sum_i ||a_i - b_s(i)||^p, solved
  exactly by an assignment solver on the (N, N) cost matrix.
* ``"sinkhorn"``: the transport cost <P, C> of the entropic plan P for eps = blur**p,
  computed by log-domain Sinkhorn iterations with an eps schedule (eps starts at the largest
  cost and halves each iteration down to blur**p; the remaining iterations run at
  blur**p; ``max_iter`` iterations in all). The potentials and the plan are float64 for
  every input dtype (fp32 potentials cannot resolve f + g - C to a fraction of eps when
  eps << max C); the compiled CPU iterations read fp32 costs as they are and compute the
  rest in double. N != M is allowed. Converges to the exact value
  as blur -> 0 (and enough iterations).
* ``"sliced"``: N == M; (1/L) sum_l W_p^p of the 1-D projections on L = n_projections
  random unit directions theta_l (Gaussian, normalised), i.e. the mean over directions of
  (1/N) sum_i |sort(a theta_l)_i - sort(b theta_l)_i|^p. ``ot.sliced_wasserstein_distance``
  of POT returns the p-th root of this value. The directions are a counter-based hash of
  (seed, l, d): the fused backends generate them inside the kernel (no D x L matrix is
  stored) and every backend draws the same directions for the same seed.

Gradients (with respect to a and b) are taken at the optimal plan (envelope theorem): the
plan (assignment, entropic plan, sorting permutation) is held fixed and the cost is
differentiated. For "exact" and "sliced" this is the gradient wherever the optimum is
unique; for "sinkhorn" it is the exact gradient of the entropic objective
<P, C> + eps KL(P | mu x nu) at convergence.
"""
from __future__ import annotations

import math
import numbers

import torch

from .. import _backend as B
from ._common import check_float_pair, compute_dtype, sqdist_recompute_tau, triton_autograd
from .image_distance import image_distance

__all__ = ["pairwise_sqdist", "pairwise_sqdist_reference", "wasserstein", "sliced_directions",
           "linear_assignment", "sinkhorn_eps_schedule", "METHODS"]

METHODS = ("exact", "sinkhorn", "sliced")
_M32 = 0xFFFFFFFF


_tau = sqdist_recompute_tau


# --------------------------------------------------------------------------- checks
def _check_pair(op, a, b, same_n=False, same_n_why=""):
    check_float_pair(op, a, b)
    if a.dim() < 2:
        raise ValueError(f"{op}: a must have shape (N, ...) with at least one feature dimension, got "
                         f"shape {tuple(a.shape)}")
    if b.dim() < 2:
        raise ValueError(f"{op}: b must have shape (M, ...) with at least one feature dimension, got "
                         f"shape {tuple(b.shape)}")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"{op}: a and b must have the same trailing shape, got a {tuple(a.shape)} and "
                         f"b {tuple(b.shape)}")
    if a.shape[0] == 0:
        raise ValueError(f"{op}: a is an empty set (shape {tuple(a.shape)}); at least one sample is needed")
    if b.shape[0] == 0:
        raise ValueError(f"{op}: b is an empty set (shape {tuple(b.shape)}); at least one sample is needed")
    if a[0].numel() == 0:
        raise ValueError(f"{op}: samples must have at least one value, got a of shape {tuple(a.shape)}")
    if same_n and a.shape[0] != b.shape[0]:
        raise ValueError(f"{op}: b must hold as many samples as a {same_n_why}, got N={a.shape[0]} "
                         f"and M={b.shape[0]}")


# --------------------------------------------------------------------------- pairwise_sqdist
def pairwise_sqdist_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The definition: sum_d (a_i - b_j)^2, by direct differences in double (small sizes)."""
    a64, b64 = a.flatten(1).double(), b.flatten(1).double()
    return ((a64[:, None, :] - b64[None, :, :]) ** 2).sum(-1).to(a.dtype)


def _sqdist_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The same algorithm as the fused backends, in PyTorch ops (differentiable by autograd)."""
    ct = compute_dtype(a.dtype)
    a2, b2 = a.to(ct), b.to(ct)
    n, m = a2.shape[0], b2.shape[0]
    with torch.no_grad():  # any centre works (distances are translation invariant): fp32 is enough
        mu = (a2.sum(0) + b2.sum(0)) / (n + m)
    ac, bc = a2 - mu, b2 - mu
    na = torch.linalg.vector_norm(ac, dim=1, dtype=torch.float64) ** 2
    nb = torch.linalg.vector_norm(bc, dim=1, dtype=torch.float64) ** 2
    s = na[:, None] + nb[None, :]
    d = s - 2.0 * (ac @ bc.T).double()
    bad = d.detach() <= _tau(ct) * s.detach()
    if bool(bad.any()):
        i, j = bad.nonzero(as_tuple=True)
        direct = ((a2[i].double() - b2[j].double()) ** 2).sum(1)
        d = d.index_put((i, j), direct)
    return d.clamp_min(0.0).to(a.dtype)


def _fix_cancelled(a2, b2, d, s):
    """Recompute, from the differences, the entries of d whose GEMM form has cancelled."""
    bad = d <= _tau(a2.dtype) * s
    if bool(bad.any()):
        i, j = bad.nonzero(as_tuple=True)
        d = d.index_put((i, j), ((a2[i].double() - b2[j].double()) ** 2).sum(1).to(d.dtype))
    return d


def _sqdist_op(name: str):
    if name == "triton":
        from ._triton import ot as _to  # noqa: F401

        return torch.ops.fastkd_triton.pairwise_sqdist_fwd
    return torch.ops.fastkd.pairwise_sqdist_fwd


def pairwise_sqdist(a: torch.Tensor, b: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """(N, M) squared Euclidean distances between the rows of a (N, ...) and b (M, ...).

    Trailing dimensions are flattened. Never negative, exactly zero for identical rows,
    accurate in fp32 for large D (see the module docstring); differentiable in a and b.
    backend: "auto", "cuda", "triton", "cpp" or "torch".
    """
    _check_pair("pairwise_sqdist", a, b)
    be = B.resolve("pairwise_sqdist", backend, a.device)
    a2, b2 = a.flatten(1), b.flatten(1)
    if be == "torch":
        return _sqdist_torch(a2, b2)
    return _sqdist_op(be)(a2, b2)


def _sqdist_backward(ctx, grad):
    # d/da_i sum_j G_ij ||a_i - b_j||^2 = 2 (r_i a_i - (G b)_i), r = G 1: one GEMM per input,
    # the scaling fused into it (addmm). The centring of the forward cancels algebraically here.
    a, b = ctx.saved_tensors
    ct = compute_dtype(a.dtype)
    a2, b2, g = a.to(ct), b.to(ct), grad.to(ct)
    ga = gb = None
    if ctx.needs_input_grad[0]:
        ga = torch.addmm(a2 * (2.0 * g.sum(1, keepdim=True)), g, b2, beta=1.0, alpha=-2.0).to(a.dtype)
    if ctx.needs_input_grad[1]:
        gb = torch.addmm(b2 * (2.0 * g.sum(0).unsqueeze(1)), g.T, a2, beta=1.0, alpha=-2.0).to(b.dtype)
    return ga, gb


def _sqdist_bwd_fake(grad, a, b, need_a, need_b):
    return (a.new_empty(a.shape) if need_a else a.new_empty(0)), (b.new_empty(b.shape) if need_b else b.new_empty(0))


def _sqdist_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])


def _sqdist_fake(a, b):
    return a.new_empty((a.shape[0], b.shape[0]))


# --------------------------------------------------------------------------- directions
def _hash32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit integer hash of csrc/ot.h on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def sliced_directions(D: int, n_projections: int, seed: int, *, dtype=torch.float32,
                      device=None) -> torch.Tensor:
    """The (D, n_projections) matrix of unit directions the sliced method uses for ``seed``.

    Materialised here for reference and tests only; the fused backends generate the same
    numbers inside their kernels.
    """
    s = _hash32(torch.tensor(int(seed) & _M32, dtype=torch.int64, device=device))
    l = torch.arange(n_projections, dtype=torch.int64, device=device)
    key = _hash32(s ^ ((l * 0x9E3779B9) & _M32))[None, :]
    d = torch.arange(D, dtype=torch.int64, device=device)[:, None]
    h1 = _hash32(key ^ ((2 * d) & _M32))
    h2 = _hash32(key ^ ((2 * d + 1) & _M32))
    u1 = ((h1 >> 8) + 1).to(torch.float32) * 5.9604644775390625e-08
    u2 = (h2 >> 8).to(torch.float32) * 5.9604644775390625e-08
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.2831853071795864 * u2)
    z64 = z.double()
    return (z64 / torch.linalg.vector_norm(z64, dim=0, keepdim=True)).to(dtype)


def _project_op(name: str):
    if name == "triton":
        from ._triton import ot as _to  # noqa: F401

        return torch.ops.fastkd_triton.sliced_project, torch.ops.fastkd_triton.sliced_backproject
    return torch.ops.fastkd.sliced_project, torch.ops.fastkd.sliced_backproject


def _project_setup(ctx, inputs, output):
    x, _L, seed = inputs
    ctx.D = x.shape[1]
    ctx.seed = seed
    ctx.dtype = x.dtype
    ctx.save_for_backward(output[1])


def _make_project_backward(backproject):
    def _backward(ctx, grad_proj, _grad_inv):
        if grad_proj is None:
            return None, None, None
        (inv,) = ctx.saved_tensors
        return backproject(grad_proj.contiguous(), inv, ctx.D, ctx.seed).to(ctx.dtype), None, None
    return _backward


def _project_fake(x, n_projections, seed):
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((x.shape[0], n_projections)), x.new_empty((n_projections,), dtype=ct)


def _backproject_fake(g, inv_norm, D, seed):
    return g.new_empty((g.shape[0], D))


# --------------------------------------------------------------------------- assignment
def linear_assignment(cost: torch.Tensor, *, solver: str = "auto") -> torch.Tensor:
    """Column index assigned to each row of a square cost matrix (minimum total cost).

    solver: "cpp" (the compiled shortest-augmenting-path solver), "scipy"
    (scipy.optimize.linear_sum_assignment) or "auto" (cpp when built, else scipy).
    Runs on the CPU in double precision; the result is on cost's device.
    """
    if solver not in ("auto", "cpp", "scipy"):
        raise ValueError(f"linear_assignment: solver must be 'auto', 'cpp' or 'scipy', got {solver!r}")
    c = cost.detach().to("cpu", torch.float64)
    if c.dim() != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"linear_assignment: cost must be a square matrix, got shape {tuple(cost.shape)}")
    if not bool(torch.isfinite(c).all()):
        raise ValueError("linear_assignment: cost must be finite (it holds NaN or Inf)")
    if solver == "auto":
        solver = "cpp" if B.has_extension() else "scipy"
    if solver == "cpp":
        if not B.has_extension():
            raise B.BackendUnavailableError(f"linear_assignment: solver 'cpp' is unavailable: "
                                            f"{B.backend_status('cpp').reason}")
        col = torch.ops.fastkd.linear_assignment(c)
    else:
        from scipy.optimize import linear_sum_assignment

        _, col_np = linear_sum_assignment(c.numpy())
        col = torch.from_numpy(col_np).to(torch.int64)
    return col.to(cost.device)


# --------------------------------------------------------------------------- sinkhorn
def sinkhorn_eps_schedule(cmax: float, blur: float, p: float, max_iter: int) -> torch.Tensor:
    """eps per iteration: from the largest cost, halving, down to blur**p; max_iter in all."""
    eps_f = float(blur) ** p
    e0 = max(float(cmax), eps_f)
    sched = [max(eps_f, e0 * 0.5 ** k) for k in range(max_iter)]
    sched[-1] = eps_f  # the last iteration always runs at the target eps
    return torch.tensor(sched, dtype=torch.float64)


def _sinkhorn_torch(C: torch.Tensor, sched: torch.Tensor):
    n, m = C.shape
    f = C.new_zeros(n)
    g = C.new_zeros(m)
    loga, logb = -math.log(n), -math.log(m)
    for eps in sched.tolist():
        f = -eps * (torch.logsumexp((g[None, :] - C) / eps, dim=1) + logb)
        g = -eps * (torch.logsumexp((f[:, None] - C) / eps, dim=0) + loga)
    return f, g


def _sinkhorn_plan(C, f, g, eps):
    n, m = C.shape
    return torch.exp((f[:, None] + g[None, :] - C) / eps - math.log(n) - math.log(m))


class _SlicedPair(torch.autograd.Function):
    """Projections of a and b on the same seeded directions, with one backward for both: the
    two gradients (N x L each, small) are stacked and back-projected in a single call, so
    the directions are generated once in the backward instead of once per input."""

    @staticmethod
    def forward(ctx, a2, b2, L, seed, be):
        proj, _ = _project_op(be)
        pa, inv = proj(a2, L, seed)
        pb, _ = proj(b2, L, seed)
        ctx.save_for_backward(inv)
        ctx.n, ctx.D, ctx.seed, ctx.be = a2.shape[0], a2.shape[1], seed, be
        ctx.dtypes = (a2.dtype, b2.dtype)
        return pa, pb

    @staticmethod
    def backward(ctx, ga, gb):
        (inv,) = ctx.saved_tensors
        _, back = _project_op(ctx.be)
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if need_a and need_b and ga is not None and gb is not None:
            g = back(torch.cat([ga, gb]).contiguous(), inv, ctx.D, ctx.seed)
            return g[:ctx.n].to(ctx.dtypes[0]), g[ctx.n:].to(ctx.dtypes[1]), None, None, None
        da = back(ga.contiguous(), inv, ctx.D, ctx.seed).to(ctx.dtypes[0]) if need_a and ga is not None else None
        db = back(gb.contiguous(), inv, ctx.D, ctx.seed).to(ctx.dtypes[1]) if need_b and gb is not None else None
        return da, db, None, None, None


# --------------------------------------------------------------------------- wasserstein
def _check_w(a, b, method, p, blur, max_iter, n_projections, seed):
    op = "wasserstein"
    if method not in METHODS:
        raise ValueError(f"{op}: method must be one of {METHODS}, got {method!r}")
    why = {"exact": "for method='exact' (an assignment)", "sliced": "for method='sliced'"}.get(method, "")
    _check_pair(op, a, b, same_n=method in ("exact", "sliced"), same_n_why=why)
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(p) or p < 1:
        raise ValueError(f"{op}: p must be a real number >= 1, got {p!r}")
    if isinstance(blur, bool) or not isinstance(blur, numbers.Real) or not math.isfinite(blur) or blur <= 0:
        raise ValueError(f"{op}: blur must be a positive number, got {blur!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"{op}: max_iter must be a positive integer, got {max_iter!r}")
    if isinstance(n_projections, bool) or not isinstance(n_projections, numbers.Integral) or n_projections < 1:
        raise ValueError(f"{op}: n_projections must be a positive integer, got {n_projections!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
        raise ValueError(f"{op}: seed must be None or a non-negative integer, got {seed!r}")


def _cost(a2, b2, p, backend):
    d2 = pairwise_sqdist(a2, b2, backend=backend)
    if p == 2:
        return d2
    return d2.clamp_min(1e-30) ** (p / 2.0) if p < 2 else d2 ** (p / 2.0)


def wasserstein(a: torch.Tensor, b: torch.Tensor, *, method: str = "exact", p: float = 2,
                blur: float = 0.05, max_iter: int = 100, n_projections: int = 128,
                seed: int | None = None, backend: str = "auto") -> torch.Tensor:
    """W_p^p between the uniform empirical measures on the rows of a (N, ...) and b (M, ...).

    Args:
        a, b: float tensors with the same trailing shape (samples are flattened).
        method: "exact" (N == M, assignment), "sinkhorn" (entropic, N != M allowed) or
            "sliced" (N == M, mean over random directions of the 1-D W_p^p).
        p: exponent of the ground cost ||x - y||^p (>= 1).
        blur: Sinkhorn only: the target eps is blur**p.
        max_iter: Sinkhorn only: number of iterations (the eps schedule included).
        n_projections: sliced only: number of random directions.
        seed: sliced only: seed of the directions (None draws one from torch's generator).
        backend: "auto", "cuda", "triton", "cpp" or "torch": the backend of the building
            blocks (distance matrix, Sinkhorn iterations, projections). The exact method
            always solves the assignment on the CPU.
    Returns a 0-dim tensor of a's dtype, differentiable in a and b (envelope theorem).
    See the module docstring for the precise definitions.
    """
    _check_w(a, b, method, p, blur, max_iter, n_projections, seed)
    be = B.resolve("wasserstein", backend, a.device)
    a2, b2 = a.flatten(1), b.flatten(1)
    if method == "exact":
        with torch.no_grad():
            C = pairwise_sqdist(a2.detach(), b2.detach(), backend=be)
            if not bool(torch.isfinite(C).all()):
                raise ValueError("wasserstein: a and b must be finite (their distance matrix holds NaN or Inf)")
            col = linear_assignment(C, solver="cpp" if be != "torch" and B.has_extension() else "auto")
        bm = b2[col]
        if p == 2:
            return image_distance(a2, bm, p=2, reduction="mean", backend=be)
        ct = compute_dtype(a.dtype)
        diff = (a2.to(ct) - bm.to(ct))
        return (diff * diff).sum(1).clamp_min(0).pow(p / 2.0).mean().to(a.dtype)
    if method == "sinkhorn":
        ct = compute_dtype(a.dtype)
        C = _cost(a2, b2, p, be).to(ct)
        with torch.no_grad():
            # Potentials and plan in float64 whatever the input dtype: f and g are about
            # max(C) and the plan needs f + g - C to much better than eps; in fp32 that fails
            # once eps << max(C) (wrong values at blur 0.05 on large images, NaN at small blur).
            Cd = C.detach()
            sched = sinkhorn_eps_schedule(float(Cd.max()), blur, p, int(max_iter))
            if be == "cpp":
                f, g = torch.ops.fastkd.sinkhorn_log(Cd, sched)  # reads fp32 C, float64 potentials
            else:
                f, g = _sinkhorn_torch(Cd.double(), sched)
            P = _sinkhorn_plan(Cd.double(), f, g, float(sched[-1]))
        return (P.to(ct) * C).sum().to(a.dtype)
    # sliced
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    L = int(n_projections)
    ct = compute_dtype(a.dtype)
    if be == "torch":
        theta = sliced_directions(a2.shape[1], L, seed, dtype=ct, device=a.device)
        pa, pb = a2.to(ct) @ theta, b2.to(ct) @ theta
    else:
        pa, pb = _SlicedPair.apply(a2, b2, L, int(seed), be)
        pa, pb = pa.to(ct), pb.to(ct)
    sa = torch.sort(pa, dim=0).values
    sb = torch.sort(pb, dim=0).values
    d = (sa - sb).abs()
    return (d.pow(p) if p != 2 else d * d).mean().to(a.dtype)


# --------------------------------------------------------------------------- registration
def register_cpp() -> None:
    torch.library.register_fake("fastkd::pairwise_sqdist_fwd")(_sqdist_fake)
    torch.library.register_fake("fastkd::pairwise_sqdist_bwd")(_sqdist_bwd_fake)
    # autograd of pairwise_sqdist_fwd is registered by the extension itself, in C++
    # (csrc/autograd.cpp: no Python autograd.Function per call)
    torch.library.register_fake("fastkd::sliced_project")(_project_fake)
    torch.library.register_fake("fastkd::sliced_backproject")(_backproject_fake)
    torch.library.register_autograd("fastkd::sliced_project",
                                    _make_project_backward(torch.ops.fastkd.sliced_backproject),
                                    setup_context=_project_setup)

    @torch.library.register_fake("fastkd::linear_assignment")
    def _la_fake(cost):
        return cost.new_empty((cost.shape[0],), dtype=torch.int64)

    @torch.library.register_fake("fastkd::sinkhorn_log")
    def _sk_fake(C, eps_schedule):  # float64 potentials for every cost dtype
        return (C.new_empty((C.shape[0],), dtype=torch.float64),
                C.new_empty((C.shape[1],), dtype=torch.float64))


if B.has_extension():
    register_cpp()


triton_autograd("fastkd_triton::pairwise_sqdist_fwd", lambda m: (_sqdist_backward, _sqdist_setup))
triton_autograd("fastkd_triton::sliced_project", lambda m: (_make_project_backward(m.sliced_backproject), _project_setup))
