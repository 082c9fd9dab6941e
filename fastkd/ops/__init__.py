"""Fused hot-path ops. Each takes ``backend="auto" | "cuda" | "triton" | "cpp" | "torch"``."""
from .tv import tv_loss, tv_loss_and_grad, tv_loss_reference, tv_num_terms

__all__ = ["tv_loss", "tv_loss_and_grad", "tv_loss_reference", "tv_num_terms"]
from .contrastive import cross_class_contrastive, cross_class_contrastive_reference, contrastive_num_pairs  # noqa: E402
from .langevin import langevin_step_, langevin_step_reference, philox_normal  # noqa: E402

__all__ += ["cross_class_contrastive", "cross_class_contrastive_reference", "contrastive_num_pairs",
            "langevin_step_", "langevin_step_reference", "philox_normal"]
from .image_distance import image_distance, image_distance_reference  # noqa: E402
from .ot import (linear_assignment, pairwise_sqdist, pairwise_sqdist_reference,  # noqa: E402
                 sliced_directions, wasserstein)

__all__ += ["image_distance", "image_distance_reference", "pairwise_sqdist", "pairwise_sqdist_reference",
            "wasserstein", "sliced_directions", "linear_assignment"]
