"""The no-skill baseline every method is compared with: the student distilled, with the
method's own recipe and budget, on Gaussian noise labelled by the teacher instead of on the
method's data. Its inputs come from :func:`noise_inputs` in every method; CAKE/LAKE's recipe
(:func:`fastkd.distill.train_student`) is :func:`noise_baseline`, TA-DFKD's and MEKD's are in
their modules (their students train with their own losses)."""
from __future__ import annotations

import torch

__all__ = ["noise_inputs", "noise_baseline"]


def noise_inputs(n: int, shape, *, seed: int, clamp=None, generator: torch.Generator | None = None,
                 prior="normal") -> torch.Tensor:
    """``n`` N(0, I) inputs of ``shape`` (one sample's), drawn from ``generator`` or one seeded
    with ``seed``; ``clamp=(lo, hi)`` keeps them in the pixel range, as a clamped synthesis does.
    ``prior``: "normal", or the synthesis prior the inputs are drawn from instead ("uniform",
    "silhouette" (needs ``clamp``) or a callable, as in :func:`fastkd.synthesis.cake`), so that
    the baseline starts where the synthesis does."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    if prior == "normal":
        x = torch.randn((n, *tuple(shape)), generator=g)
    else:
        from ..synthesis.cake_synthesis import _draw_prior, silhouette_prior

        if prior == "silhouette":
            if clamp is None:
                raise ValueError("noise_inputs: prior='silhouette' needs clamp=(lo, hi), the pixel range")
            prior = silhouette_prior(*clamp)
        x = _draw_prior(prior, (n, *tuple(shape)), g)
    if clamp is not None:
        x.clamp_(float(clamp[0]), float(clamp[1]))
    return x


def noise_baseline(teacher, student, *, num_samples: int, input_shape, epochs: int, seed: int = 0,
                   eval_data=None, progress: bool = True, clamp=None, prior="normal", **train_kwargs):
    """Distil ``student`` on ``num_samples`` noise inputs labelled by the teacher, with the same
    :func:`fastkd.distill.train_student` recipe as the method it is compared with (CAKE/LAKE,
    DeepInversion); ``prior``: the inputs' distribution (:func:`noise_inputs`). Returns the
    :class:`fastkd.distill.History`."""
    from ..distill import teacher_probs, train_student

    x = noise_inputs(num_samples, input_shape, seed=10_000 + seed, clamp=clamp, prior=prior)
    dev = next(iter(teacher.parameters())).device
    p = teacher_probs(teacher, x, device=dev)
    train_kwargs.setdefault("name", "noise baseline")
    return train_student(student, (x, p), teacher=teacher, epochs=epochs, seed=seed, eval_data=eval_data,
                         progress=progress, **train_kwargs)
