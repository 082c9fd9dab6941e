"""The CPU target of cross_class_contrastive at N=16384, K=10, measured directly: naive eager
(cdist**2 and a mask, ~7 GiB) against the cpp backend, forward+backward, 2 threads.

    python benchmarks/contrastive_n16384_cpu.py
"""
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastkd.ops import cross_class_contrastive  # noqa: E402
torch.set_num_threads(2)
N, K = 16384, 10
g = torch.Generator().manual_seed(0)
p = torch.randn(N, K, generator=g); y = torch.randint(0, 10, (N,), generator=g)
def naive(p, y):
    d = torch.cdist(p, p) ** 2
    m = (y[:, None] != y[None, :])
    return (d * m).sum()
def run(f, reps):
    ts = []
    for _ in range(reps):
        x = p.clone().requires_grad_(True)
        t = time.perf_counter(); l = f(x); l.backward(); ts.append(time.perf_counter() - t)
    ts.sort(); return ts[len(ts) // 2], l.item(), x.grad
tc, lc, gc = run(lambda x: cross_class_contrastive(x, y, backend='cpp'), 21)
tn, ln, gn = run(lambda x: naive(x, y), 3)
ref = naive(p.double(), y).item()
print(f'N={N} K={K}: naive eager fwd+bwd {tn*1e3:.0f} ms, cpp {tc*1e3:.3f} ms, speed-up {tn/tc:.0f}x; '
      f'rel err cpp {abs(lc-ref)/ref:.2e}, naive fp32 {abs(ln-ref)/ref:.2e}; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/2**20:.1f} GiB')
