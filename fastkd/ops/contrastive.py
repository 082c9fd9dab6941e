"""Cross-class contrastive loss: ``fastkd.ops.cross_class_contrastive``.

Definition: for outputs p (N, K) and labels y (N,),

    L = sum over ordered pairs (i, j), i != j, y_i != y_j [and g_i == g_j] of ||p_i - p_j||^2

With ``groups`` only pairs inside the same group count. ``reduction="mean"`` divides by
the number of such pairs; when there is none (N <= 1, a single class per group) the
loss is 0 with a zero gradient, never NaN.

Every backend uses the O(N*K) closed form (no N x N matrix): segment the samples by
(group, class), subtract each group's mean (L is translation invariant inside a group),
and with q_i = p_i - m_g, T_s the sum of q over segment s, U_g the sum over the group:

    L       = 2 sum_i (N_g - n_s) ||q_i||^2 - 2 sum_g ||U_g||^2 + 2 sum_s ||T_s||^2
    dL/dp_i = 4 [(N_g - n_s) q_i - (U_g - T_s)]

N_g is the size of i's group and n_s of its (group, class) segment; the number of pairs
is sum_g N_g^2 - sum_s n_s^2. After centring every term except the tiny ||U_g||^2 is
non-negative, so nothing cancels; sums are accumulated in float64 on every backend.
The fused backends write the gradient during the forward pass.
"""
from __future__ import annotations

import torch

from .. import _backend as B
from ._common import check_float, check_reduction, check_tensor, triton_autograd

__all__ = ["cross_class_contrastive", "cross_class_contrastive_reference", "contrastive_num_pairs"]

_OP = "cross_class_contrastive"
_RED = {"mean": 1, "sum": 2}


def _dense_ids(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    uniq, inv = torch.unique(t, return_inverse=True)
    return inv, int(uniq.numel())


def _segments(labels: torch.Tensor, groups: torch.Tensor | None):
    """Dense group ids, segment ids, segment -> group, and the sizes of both."""
    n = labels.shape[0]
    if groups is None:
        gid, G = torch.zeros(n, dtype=torch.int64, device=labels.device), 1
    else:
        gid, G = _dense_ids(groups)
    lid, L = _dense_ids(labels)
    sid, S = _dense_ids(gid * max(L, 1) + lid)
    sg = torch.zeros(S, dtype=torch.int64, device=labels.device).scatter_(0, sid, gid)
    ng = torch.bincount(gid, minlength=G)
    ns = torch.bincount(sid, minlength=S)
    return gid, sid, sg, ng, ns, G, S


def contrastive_num_pairs(labels: torch.Tensor, groups: torch.Tensor | None = None) -> int:
    """Number of ordered pairs (i != j) with different labels (and the same group)."""
    if labels.numel() == 0:
        return 0
    *_, ng, ns, _G, _S = _segments(labels, groups)
    return int((ng * ng).sum().item() - (ns * ns).sum().item())


def cross_class_contrastive_reference(outputs: torch.Tensor, labels: torch.Tensor,
                                      groups: torch.Tensor | None = None,
                                      reduction: str = "sum") -> torch.Tensor:
    """Plain-PyTorch closed form (float64 accumulation), differentiable by autograd."""
    n, k = outputs.shape
    if n == 0 or k == 0:
        return (outputs.sum() * 0.0).to(outputs.dtype)
    p = outputs.to(torch.float64)
    gid, sid, sg, ng, ns, G, S = _segments(labels, groups)
    mean = torch.zeros(G, k, dtype=p.dtype, device=p.device).index_add(0, gid, p) / ng[:, None].to(p.dtype)
    q = p - mean[gid]
    T = torch.zeros(S, k, dtype=p.dtype, device=p.device).index_add(0, sid, q)
    U = torch.zeros(G, k, dtype=p.dtype, device=p.device).index_add(0, sg, T)
    w = (ng[gid] - ns[sid]).to(p.dtype)
    loss = 2.0 * (w * q.square().sum(1)).sum() - 2.0 * U.square().sum() + 2.0 * T.square().sum()
    if reduction == "mean":
        pairs = (ng * ng).sum() - (ns * ns).sum()
        loss = loss / pairs.clamp_min(1).to(p.dtype)
    return loss.to(outputs.dtype)


def _check_index(name: str, t, n: int, device, op: str) -> None:
    check_tensor(name, t, op)
    if t.dtype != torch.int64:
        raise TypeError(f"{op}: {name} must be an int64 tensor, got dtype {t.dtype}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{op}: {name} must have shape (N,) = ({n},) like outputs' first dimension, "
                         f"got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{op}: {name} must be on outputs' device {device}, got {t.device}")
    if t.numel() and not torch.compiler.is_compiling() and bool((t < 0).any()):
        raise ValueError(f"{op}: {name} must be non-negative, got minimum {int(t.min())}")


def _check(outputs, labels, groups, reduction) -> int:
    check_float("outputs", outputs, _OP)
    if outputs.dim() != 2:
        raise ValueError(f"{_OP}: outputs must have shape (N, K), got {outputs.dim()}-D shape "
                         f"{tuple(outputs.shape)}")
    _check_index("labels", labels, outputs.shape[0], outputs.device, _OP)
    if groups is not None:
        _check_index("groups", groups, outputs.shape[0], outputs.device, _OP)
    check_reduction(reduction, _OP, allowed=("sum", "mean"))
    return _RED[reduction]


def _fused_op(name: str):
    if name == "triton":
        from ._triton import contrastive as _tc  # noqa: F401  (registers the Triton op)

        return torch.ops.fastkd_triton.cross_class_contrastive_fwd
    return torch.ops.fastkd.cross_class_contrastive_fwd


def cross_class_contrastive(outputs: torch.Tensor, labels: torch.Tensor, *,
                            groups: torch.Tensor | None = None, reduction: str = "sum",
                            backend: str = "auto") -> torch.Tensor:
    """Sum (or mean) of ||p_i - p_j||^2 over ordered pairs with different labels.

    Args:
        outputs: float tensor (N, K), e.g. a teacher's logits or probabilities.
        labels: int64 tensor (N,), non-negative class ids.
        groups: optional int64 tensor (N,), non-negative; only pairs inside a group count.
        reduction: "sum" or "mean" (divided by the number of pairs; 0 when there is none).
        backend: "auto", "cuda", "triton", "cpp" or "torch".
    """
    code = _check(outputs, labels, groups, reduction)
    be = B.resolve(_OP, backend, outputs.device)
    if be == "torch":
        return cross_class_contrastive_reference(outputs, labels, groups, reduction)
    need_grad = outputs.requires_grad and torch.is_grad_enabled()
    loss, _ = _fused_op(be)(outputs, labels, groups, code, need_grad)
    return loss


# --------------------------------------------------------------------------- registration
def _setup_context(ctx, inputs, output):
    ctx.need_grad = inputs[4]
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, _grad_grad):
    if not ctx.need_grad:
        raise RuntimeError("cross_class_contrastive: backward through a call made with need_grad=False")
    (saved,) = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None
    return saved * grad_loss.to(saved.dtype), None, None, None, None


def _fake(outputs, labels, groups, reduction, need_grad):
    grad = outputs.new_empty(outputs.shape) if need_grad else outputs.new_empty((0,))
    return outputs.new_empty(()), grad


def register_cpp() -> None:
    torch.library.register_fake("fastkd::cross_class_contrastive_fwd")(_fake)
    torch.library.register_autograd("fastkd::cross_class_contrastive_fwd", _backward,
                                    setup_context=_setup_context)


if B.has_extension() and hasattr(torch.ops.fastkd, "cross_class_contrastive_fwd"):
    register_cpp()


triton_autograd("fastkd_triton::cross_class_contrastive_fwd", lambda m: (_backward, _setup_context))
