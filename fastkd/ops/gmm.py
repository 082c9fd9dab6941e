"""On-device two-component 1-D Gaussian mixture: ``fastkd.ops.gmm_fit`` / ``gmm_select``.

TA-DFKD keeps a generated sample when the teacher answers it cleanly: the per-sample
scores (min-max normalised teacher cross-entropy against its own argmax) are fitted with
a two-component Gaussian mixture and a sample is kept when its posterior for the
low-mean component exceeds ``threshold``. The authors fit it with scikit-learn on the
CPU at every step; here the whole fit runs on the tensor's device with no host sync.

Algorithm (the same as ``sklearn.mixture.GaussianMixture(n_components=2)`` on 1-D data,
the specification is :func:`gmm_fit_reference`):

* initialisation: 2-means (Lloyd) started from the minimum and the maximum score,
  ``kmeans_iter`` iterations, then one M-step on the hard assignment (sklearn's default
  ``init_params="kmeans"``, made deterministic: no random restarts);
* EM: ``max_iter`` iterations, each an E-step (the mean log-likelihood, the "lower
  bound") and an M-step (weights, means, variances + ``reg_covar``); the fit stops when
  the lower bound changes by less than ``tol`` -- on the device this is a *convergence
  mask*: every iteration is run, but parameters are frozen once converged, so no value
  is read back to the host;
* a final E-step gives the posteriors.

Everything is computed in float64. Defaults follow the authors' selection
(``max_iter=10, tol=1e-2, reg_covar=5e-4``).

Bad input and fallbacks:

* fewer than 2 scores: ``ValueError`` (a mixture of two components needs two points);
* non-finite scores (NaN / inf): ``nan_policy="raise"`` (default) raises ``ValueError``
  -- this check reads one flag back to the host; ``nan_policy="omit"`` fits the finite
  scores only, never selects the others, and needs no host sync;
* fewer than 2 finite scores, or all finite scores equal (no second component to find):
  every finite score is selected (posterior 1 for the low component), ``degenerate`` is
  True in :func:`gmm_fit`'s result.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import _backend as B
from ._common import check_float

__all__ = ["GMMFit", "gmm_fit", "gmm_fit_reference", "gmm_select"]

_EPS64 = float(torch.finfo(torch.float64).eps)
_LOG2PI = math.log(2.0 * math.pi)


class GMMFit(NamedTuple):
    """Result of :func:`gmm_fit`. Component 0 is the low-mean one."""
    prob_low: torch.Tensor   # (N,) posterior of the low-mean component (0 for omitted scores)
    means: torch.Tensor      # (2,) float64, ascending
    variances: torch.Tensor  # (2,) float64 (reg_covar included)
    weights: torch.Tensor    # (2,) float64
    n_iter: torch.Tensor     # () int64: EM iterations that updated the parameters
    converged: torch.Tensor  # () bool
    degenerate: torch.Tensor  # () bool: fewer than 2 distinct finite scores, everything selected


def _m_step(xv, resp, n, reg_covar):
    nk = resp.sum(1) + 10 * _EPS64
    means = (resp * xv).sum(1) / nk
    var = (resp * (xv - means[:, None]).square()).sum(1) / nk + reg_covar
    weights = nk / nk.sum()
    return weights, means, var


def _e_step(xv, w, n, weights, means, var):
    lp = (-0.5 * (_LOG2PI + torch.log(var)[:, None] + (xv - means[:, None]).square() / var[:, None])
          + torch.log(weights)[:, None])
    lnorm = torch.logsumexp(lp, dim=0)
    lower_bound = (lnorm * w).sum() / n.clamp_min(1)
    resp = torch.exp(lp - lnorm) * w
    return lower_bound, resp


def gmm_fit_reference(scores: torch.Tensor, valid: torch.Tensor | None = None, *, max_iter: int = 10,
                      tol: float = 1e-2, reg_covar: float = 5e-4, kmeans_iter: int = 16) -> GMMFit:
    """Plain-PyTorch EM on ``scores`` (N,) restricted to ``valid`` (N,) bool: the specification."""
    x = scores.detach().to(torch.float64)
    if valid is None:
        valid = torch.ones_like(x, dtype=torch.bool)
    w = valid.to(torch.float64)
    xv = torch.where(valid, x, torch.zeros_like(x))
    n = w.sum()
    lo = torch.where(valid, x, torch.full_like(x, math.inf)).min()
    hi = torch.where(valid, x, torch.full_like(x, -math.inf)).max()
    degenerate = (n < 2) | ~(hi > lo)
    lo = torch.where(degenerate, torch.zeros_like(lo), lo)
    hi = torch.where(degenerate, torch.ones_like(hi), hi)
    # --- 2-means from (min, max); ties go to the low cluster like sklearn's argmin
    c = torch.stack([lo, hi])
    for _ in range(kmeans_iter):
        r1 = (xv > 0.5 * (c[0] + c[1])).to(torch.float64) * w
        r = torch.stack([w - r1, r1])
        cnt = r.sum(1)
        c = torch.where(cnt > 0, (r * xv).sum(1) / cnt.clamp_min(1), c)
    r1 = (xv > 0.5 * (c[0] + c[1])).to(torch.float64) * w
    weights, means, var = _m_step(xv, torch.stack([w - r1, r1]), n, reg_covar)
    # --- EM with a convergence mask (no host sync)
    prev = torch.full((), -math.inf, dtype=torch.float64, device=x.device)
    done = torch.zeros((), dtype=torch.bool, device=x.device)
    n_iter = torch.zeros((), dtype=torch.int64, device=x.device)
    for _ in range(max_iter):
        lb, resp = _e_step(xv, w, n, weights, means, var)
        nw, nm, nv = _m_step(xv, resp, n, reg_covar)
        active = ~done
        weights = torch.where(active, nw, weights)
        means = torch.where(active, nm, means)
        var = torch.where(active, nv, var)
        n_iter = n_iter + active.to(torch.int64)
        done = done | (active & ((lb - prev).abs() < tol))
        prev = torch.where(active, lb, prev)
    _, resp = _e_step(xv, w, n, weights, means, var)
    low_first = means[0] <= means[1]
    order = torch.where(low_first, torch.tensor([0, 1], device=x.device), torch.tensor([1, 0], device=x.device))
    prob_low = resp.gather(0, order[:1, None].expand(1, x.shape[0]))[0]
    prob_low = torch.where(degenerate, w, prob_low)
    return GMMFit(prob_low, means[order], var[order], weights[order], n_iter, done, degenerate)


def _check(scores, threshold, max_iter, tol, reg_covar, nan_policy):
    op = "gmm_select"
    check_float("scores", scores, op)
    if scores.dim() != 1:
        raise ValueError(f"{op}: scores must be 1-D (N,), got shape {tuple(scores.shape)}")
    if scores.shape[0] < 2:
        raise ValueError(f"{op}: a two-component mixture needs at least 2 scores, got {scores.shape[0]}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"{op}: threshold must be a number in [0, 1], got {threshold!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{op}: max_iter must be an int >= 1, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"{op}: tol must be a number >= 0, got {tol!r}")
    if isinstance(reg_covar, bool) or not isinstance(reg_covar, (int, float)) or not reg_covar > 0:
        raise ValueError(f"{op}: reg_covar must be a number > 0, got {reg_covar!r}")
    if nan_policy not in ("raise", "omit"):
        raise ValueError(f"{op}: nan_policy must be 'raise' or 'omit', got {nan_policy!r}")


def gmm_fit(scores: torch.Tensor, *, max_iter: int = 10, tol: float = 1e-2, reg_covar: float = 5e-4,
            nan_policy: str = "raise", backend: str = "auto") -> GMMFit:
    """Fit a 2-component Gaussian mixture to 1-D ``scores`` on their device (see module doc)."""
    _check(scores, 0.5, max_iter, tol, reg_covar, nan_policy)
    valid = torch.isfinite(scores)
    if nan_policy == "raise" and not bool(valid.all()):
        bad = int((~valid).sum())
        raise ValueError(f"gmm_select: scores hold {bad} non-finite value(s) (NaN or inf); clean them "
                         "or pass nan_policy='omit' to fit the finite scores only")
    be = B.resolve("gmm_select", backend, scores.device, supported=("triton", "torch"))
    if be == "triton" and scores.shape[0] <= _TRITON_MAX_N:
        from ._triton import gmm as _tg

        return GMMFit(*_tg.gmm_fit_triton(scores, valid, max_iter, float(tol), float(reg_covar)))
    return gmm_fit_reference(scores, valid, max_iter=max_iter, tol=tol, reg_covar=reg_covar)


_TRITON_MAX_N = 1 << 16


def gmm_select(scores: torch.Tensor, *, threshold: float = 0.5, max_iter: int = 10, tol: float = 1e-2,
               reg_covar: float = 5e-4, nan_policy: str = "raise", backend: str = "auto") -> torch.Tensor:
    """Boolean mask (N,) of the scores whose posterior for the low-mean component > threshold.

    Args:
        scores: 1-D float tensor (N >= 2), e.g. per-sample losses; any device.
        threshold: posterior threshold in [0, 1].
        max_iter, tol, reg_covar: EM iterations, convergence tolerance on the mean
            log-likelihood, variance regulariser (scikit-learn's meaning).
        nan_policy: "raise" (one host check) or "omit" (non-finite scores are left out
            of the fit and never selected; no host sync).
        backend: "auto", "triton" (one kernel launch on a GPU) or "torch".
    """
    _check(scores, threshold, max_iter, tol, reg_covar, nan_policy)
    fit = gmm_fit(scores, max_iter=max_iter, tol=tol, reg_covar=reg_covar, nan_policy=nan_policy,
                  backend=backend)
    return fit.prob_low > threshold
