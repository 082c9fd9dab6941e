"""Fused hot-path ops. Each takes ``backend="auto" | "cuda" | "triton" | "cpp" | "torch"``."""
from .tv import tv_loss, tv_loss_and_grad, tv_loss_reference, tv_num_terms

__all__ = ["tv_loss", "tv_loss_and_grad", "tv_loss_reference", "tv_num_terms"]
