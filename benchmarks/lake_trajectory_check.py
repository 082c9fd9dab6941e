"""fastkd's LAKE step (torch backend) against the authors' eager step, fed the *same* noise
(fastkd's Philox normals for both), on batches 0, 40 and 100 of the 128-batch schedule of
the digits demo (lr 1e-2 -> 1e-5): prints the largest difference of the inputs after steps
1, 5 and 25. For scale it also runs the authors' step from a start moved by 1e-6
(``authors_pert``): how far rounding-level differences alone carry a trajectory.

    python benchmarks/lake_trajectory_check.py
"""
import sys, math, torch
sys.path.insert(0, __import__('os').path.dirname(__import__('os').path.dirname(__import__('os').path.abspath(__file__))))
torch.set_num_threads(1)
import fastkd.synthesis.reference as ref
from fastkd.synthesis.cake_synthesis import _batch_seed, _draw_prior, class_prior_labels, synthesis_step, step_sizes
from fastkd.nn import CAKELoss
from fastkd.ops import philox_normal
from fastkd.teachers import digits_teacher
t, _ = digits_teacher(); t.eval(); [p.requires_grad_(False) for p in t.parameters()]
lrs = step_sizes(128, 1e-2, 1e-5)
for b in (0, 40, 100):
    gen = torch.Generator().manual_seed(_batch_seed(0, b))
    x0 = _draw_prior('normal', (100, 1, 8, 8), gen); y, g = class_prior_labels(100, 10, gen, None)
    lf = CAKELoss(1e3, 1e1, 0.0, contrastive_on='logits', normalization='authors', backend='torch')
    xf = x0.clone()
    xa = torch.nn.Parameter(x0.clone()); opt = torch.optim.SGD([xa], lr=lrs[b])
    x0p = x0 + 1e-6 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    xp = torch.nn.Parameter(x0p); optp = torch.optim.SGD([xp], lr=lrs[b])
    for s in range(25):
        sd = _batch_seed(0, b, s + 1)
        xf = synthesis_step(t, xf, y, g, lf, lrs[b], noise_std=None, w_tv=1e5, seed=sd, backend='torch')
        for x_, o_ in ((xa, opt), (xp, optp)):
            o_.zero_grad(); loss = ref.authors_loss(x_, t(x_), y, g, 1e3, 1e1, 1e5); loss.backward(); o_.step()
            with torch.no_grad(): x_.add_(philox_normal(x_.numel(), sd).view_as(x_) * math.sqrt(2 * lrs[b]))
        if s in (0, 4, 24):
            print(b, s, 'max|xf-xa|', (xf - xa.detach()).abs().max().item(),
                  'max|authors_pert-xa|', (xp - xa).detach().abs().max().item(), 'scale', xa.detach().abs().max().item())
