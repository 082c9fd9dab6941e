"""fastkd.ops.cross_class_contrastive: every backend against a naive pairwise fp64 definition."""
import pytest
import torch

import fastkd
from fastkd.ops import contrastive_num_pairs, cross_class_contrastive, cross_class_contrastive_reference

from conftest import HAS_CUDA, cpu_backend_params, gpu_backend_params

ALL_CPU = ["torch"] + cpu_backend_params()


def naive(p: torch.Tensor, y: torch.Tensor, g=None, reduction="sum"):
    """Pairwise definition in float64 with an explicit mask (rows in chunks to bound memory)."""
    p = p.double()
    total, count = 0.0, 0
    for i in range(0, max(p.shape[0], 1), 256):
        d = (p[i:i + 256, None, :] - p[None, :, :]).square().sum(-1)
        mask = y[i:i + 256, None] != y[None, :]
        if g is not None:
            mask &= g[i:i + 256, None] == g[None, :]
        total = total + (d * mask).sum()
        count += int(mask.sum())
    s = total if isinstance(total, torch.Tensor) else p.sum() * 0.0
    if reduction == "mean":
        s = s / max(count, 1)
    return s


def _case(n, k, ncls, ngrp=None, dtype=torch.float64, offset=0.0, device="cpu"):
    p = torch.randn(n, k, dtype=dtype, device=device) + offset
    y = torch.randint(0, ncls, (n,), device=device)
    g = torch.randint(0, ngrp, (n,), device=device) if ngrp else None
    return p, y, g


def _check(backend, n, k, ncls, ngrp, reduction, device="cpu"):
    p, y, g = _case(n, k, ncls, ngrp, device=device)
    p1 = p.clone().requires_grad_(True)
    p2 = p.clone().requires_grad_(True)
    got = cross_class_contrastive(p1, y, groups=g, reduction=reduction, backend=backend)
    want = naive(p2, y, g, reduction)
    got.backward(torch.tensor(1.7, dtype=p.dtype, device=device))
    (want * 1.7).backward()
    assert got.dtype == p.dtype and got.shape == ()
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", ALL_CPU)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("n,k,ncls,ngrp", [(2, 3, 2, None), (17, 5, 3, None), (40, 10, 10, 4),
                                           (33, 1, 4, 3), (64, 7, 100, None), (25, 3, 2, 25)])
def test_matches_naive(backend, n, k, ncls, ngrp, reduction):
    _check(backend, n, k, ncls, ngrp, reduction)


@pytest.mark.parametrize("backend", ALL_CPU)
def test_large_label_and_group_ids(backend):
    p = torch.randn(30, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (30,)) * (2**40) + 7
    g = torch.randint(0, 2, (30,)) * (2**50)
    got = cross_class_contrastive(p, y, groups=g, reduction="mean", backend=backend)
    torch.testing.assert_close(got, naive(p, y, g, "mean"))


@pytest.fixture(scope="module")
def offset_case_4096():
    # Logits with a large common offset: the closed form must centre to stay accurate.
    g = torch.Generator().manual_seed(4096)
    p = torch.randn(4096, 10, generator=g) + 30.0
    y = torch.randint(0, 10, (4096,), generator=g)
    return p, y, naive(p, y)  # fp64 pairwise on the same fp32 values


@pytest.mark.parametrize("backend", ALL_CPU)
def test_fp32_accuracy_n4096(backend, offset_case_4096):
    p, y, want = offset_case_4096
    got = cross_class_contrastive(p, y, backend=backend)
    assert abs(got.double().item() - want.item()) / want.item() < 1e-5


@pytest.mark.parametrize("backend", ALL_CPU)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("case", ["n1", "one_class", "one_class_per_group", "empty"])
def test_no_pairs_is_zero_with_zero_grad(backend, reduction, case):
    n = {"n1": 1, "one_class": 6, "one_class_per_group": 6, "empty": 0}[case]
    p = torch.randn(n, 4, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(n, dtype=torch.int64)
    g = torch.arange(n) % 3 if case == "one_class_per_group" else None
    if case == "one_class_per_group":
        y = g.clone()
    out = cross_class_contrastive(p, y, groups=g, reduction=reduction, backend=backend)
    out.backward()
    assert out.item() == 0.0 and not torch.isnan(out)
    assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("backend", ALL_CPU)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gradcheck(backend, reduction):
    p, y, g = _case(12, 4, 3, 2)
    p.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: cross_class_contrastive(t, y, groups=g, reduction=reduction, backend=backend), (p,))


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision(backend, dtype):
    p, y, g = _case(50, 6, 5, 2, dtype=dtype)
    p.requires_grad_(True)
    out = cross_class_contrastive(p, y, groups=g, reduction="mean", backend=backend)
    out.backward()
    pd = p.detach().double().requires_grad_(True)
    want = naive(pd, y, g, "mean")
    want.backward()
    assert out.dtype == dtype and p.grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(p.grad.double(), pd.grad, rtol=tol * 4, atol=tol * 4)


@pytest.mark.parametrize("backend", ALL_CPU)
def test_noncontiguous(backend):
    base = torch.randn(10, 20, dtype=torch.float64)
    p = base.t()[:, ::2]  # (20, 5) strided view
    y = torch.randint(0, 3, (40,))[::2]
    torch.testing.assert_close(cross_class_contrastive(p, y, backend=backend), naive(p, y))


def test_num_pairs():
    y = torch.tensor([0, 0, 1, 2, 2, 2])
    assert contrastive_num_pairs(y) == 36 - (4 + 1 + 9)
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    assert contrastive_num_pairs(y, g) == (9 - (4 + 1)) + (9 - 9)


@pytest.mark.parametrize("backend", ALL_CPU)
def test_memory_is_o_n_k(backend):
    # At N = 16384 an N x N fp32 matrix alone is 1 GiB; the closed form needs a few MiB.
    from fastkd.bench._mem import cpu_peak_extra_mb

    p = torch.randn(16384, 10, requires_grad=True)
    y = torch.randint(0, 10, (16384,))
    extra = cpu_peak_extra_mb(lambda: cross_class_contrastive(p, y, backend=backend).backward())
    if extra is None:
        pytest.skip("peak RSS is not measurable here (/proc/self/clear_refs)")
    assert extra < 128, extra


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_opcheck(backend):
    p, y, g = _case(9, 3, 3, 2)
    for args in [(p, y, None, 2, False), (p.clone().requires_grad_(True), y, g, 1, True)]:
        torch.library.opcheck(torch.ops.fastkd.cross_class_contrastive_fwd.default, args)


@pytest.mark.slow
@pytest.mark.parametrize("backend", cpu_backend_params())
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    y = torch.randint(0, 4, (16,))

    def f(t):
        return cross_class_contrastive(t.softmax(-1), y, reduction="mean", backend=backend) + t.square().mean()

    p = torch.randn(16, 5, requires_grad=True)
    pr = p.detach().clone().requires_grad_(True)
    out = torch.compile(f, fullgraph=True)(p)
    out.backward()
    ref = f(pr)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(p.grad, pr.grad)


# --------------------------------------------------------------------------- modules
def test_module_and_probs():
    p, y, g = _case(20, 5, 5, 2)
    m = fastkd.nn.CrossClassContrastiveLoss(reduction="mean", contrastive_on="probs")
    torch.testing.assert_close(m(p, y, g), naive(p.softmax(-1), y, g, "mean"))
    assert "probs" in repr(m)


def test_cake_loss_terms_and_weights():
    torch.manual_seed(1)
    n, k = 20, 10
    x = torch.randn(n, 3, 8, 8)
    logits = torch.randn(n, k)
    y = torch.cat([torch.randperm(k), torch.randperm(k)])
    loss = fastkd.nn.CAKELoss(w_cls=2.0, w_contr=3.0, w_tv=5.0)
    t = loss.terms(x, logits, y)
    groups = torch.arange(n) // k
    ce = torch.nn.functional.cross_entropy(logits, y)
    torch.testing.assert_close(t["cls"], 2 * ce)  # G = 2 groups
    # authors' form: MSE mean over (group, i, j, class) entries * 0.5 * G^2
    lg = logits.view(2, k, k)
    mse = (lg[:, :, None, :] - lg[:, None, :, :]).square().mean()
    torch.testing.assert_close(t["contr"], mse * 0.5 * 4, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t["tv"], fastkd.ops.tv_loss(x))
    total = loss(x, logits, y)
    torch.testing.assert_close(total, 2 * t["cls"] + 3 * t["contr"] + 5 * t["tv"])
    mean_form = fastkd.nn.CAKELoss(normalization="mean").terms(x, logits, y, groups)
    torch.testing.assert_close(mean_form["contr"], naive(logits, y, groups, "mean").float() / k)
    torch.testing.assert_close(mean_form["cls"], ce)


@pytest.mark.parametrize("kwargs,match", [({"contrastive_on": "softmax"}, "contrastive_on"),
                                          ({"normalization": "x"}, "normalization"),
                                          ({"w_cls": "1"}, "w_cls"), ({"group_size": 0}, "group_size")])
def test_cake_loss_bad_args(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastkd.nn.CAKELoss(**kwargs)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("make,exc,match", [
    (lambda: (torch.randn(4), torch.zeros(4, dtype=torch.long)), ValueError, "outputs must have shape"),
    (lambda: (torch.ones(4, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long)), TypeError, "outputs must be a floating"),
    (lambda: (torch.randn(4, 2), torch.zeros(3, dtype=torch.long)), ValueError, r"labels must have shape \(N,\)"),
    (lambda: (torch.randn(4, 2), torch.zeros(4)), TypeError, "labels must be an int64"),
    (lambda: (torch.randn(4, 2), torch.zeros(4, dtype=torch.int32)), TypeError, "labels must be an int64"),
    (lambda: (torch.randn(4, 2), torch.tensor([0, 1, -1, 2])), ValueError, "labels must be non-negative"),
    (lambda: (torch.randn(4, 2), [0, 1, 2, 3]), TypeError, "labels must be a torch.Tensor"),
])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_bad_input(make, exc, match, backend):
    p, y = make()
    with pytest.raises(exc, match=match):
        cross_class_contrastive(p, y, backend=backend)


def test_bad_groups_and_reduction():
    p, y = torch.randn(4, 2), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="groups must have shape"):
        cross_class_contrastive(p, y, groups=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="groups must be non-negative"):
        cross_class_contrastive(p, y, groups=torch.tensor([0, -2, 0, 0]))
    with pytest.raises(ValueError, match="reduction must be one of"):
        cross_class_contrastive(p, y, reduction="none")


# --------------------------------------------------------------------------- GPU
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("n,k,ncls,ngrp", [(2, 3, 2, None), (40, 10, 10, 4), (300, 100, 7, 5)])
def test_gpu_matches_naive(backend, n, k, ncls, ngrp, reduction):
    _check(backend, n, k, ncls, ngrp, reduction, device="cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
@pytest.mark.parametrize("backend", gpu_backend_params())
def test_gpu_fp32_accuracy(backend):
    p, y, _ = _case(4096, 10, 10, dtype=torch.float32, offset=30.0, device="cuda")
    want = naive(p, y)
    got = cross_class_contrastive(p, y, backend=backend)
    assert abs(got.double().item() - want.item()) / want.item() < 1e-5
