"""gmm_select benchmark: on-device EM (torch, Triton) vs scikit-learn's GaussianMixture on the CPU.

scikit-learn is timed as TA-DFKD's released code uses it: the scores are copied to the
host, fitted (k-means initialisation + EM, max_iter 10, tol 1e-2, reg_covar 5e-4) and the
posteriors of the low-mean component copied back as a mask on the scores' device.
"""
from __future__ import annotations

import numpy as np
import torch

import fastkd
from fastkd.ops import gmm_fit, gmm_select

from .core import Case


def _scores(n: int, device: str) -> torch.Tensor:
    rng = np.random.default_rng(0)
    k = int(0.6 * n)
    a = np.concatenate([rng.normal(0.15, 0.05, k), rng.normal(0.7, 0.15, n - k)])
    a = (a - a.min()) / (a.max() - a.min())
    return torch.tensor(a, dtype=torch.float32, device=device)


def _sklearn_select(x: torch.Tensor) -> torch.Tensor:
    from sklearn.mixture import GaussianMixture

    a = x.detach().cpu().double().numpy()[:, None]
    gm = GaussianMixture(2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=0).fit(a)
    p = gm.predict_proba(a)[:, gm.means_.argmin()]
    return torch.from_numpy(p > 0.5).to(x.device)


def cases(device: str, quick: bool) -> list[Case]:
    sizes = [1024] if quick else [256, 1024, 4096]
    try:
        import sklearn.mixture  # noqa: F401
        have_sk = True
    except ImportError:
        have_sk = False
    st = fastkd.backends()
    out = []
    for n in sizes:
        x = _scores(n, device)
        impls = {}
        if have_sk:
            impls["sklearn GaussianMixture (CPU)"] = lambda x=x: _sklearn_select(x)
        impls["fastkd[torch]"] = lambda x=x: gmm_select(x, backend="torch", nan_policy="omit")
        if device == "cuda" and st["triton"].available:
            impls["fastkd[triton]"] = lambda x=x: gmm_select(x, backend="triton", nan_policy="omit")
        acc = {}
        if have_sk:
            ref = _sklearn_select(x)
            for name in list(impls)[1:]:
                acc[name] = float((impls[name]() != ref).sum().item())
        out.append(Case("gmm_select", str(n), "float32", impls,
                        baseline="sklearn GaussianMixture (CPU)" if have_sk else "fastkd[torch]",
                        accuracy=acc, note="one fit + selection; err = selections differing from sklearn"))
    return out


OPS = {"gmm_select": cases}
