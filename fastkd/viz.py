"""Pictures people would rather look at than numbers: image grids (matplotlib, Agg backend)."""
from __future__ import annotations

import math
import os

import torch


def save_image_grid(images: torch.Tensor, path: str, *, ncols: int | None = None, titles=None, colors=None,
                    title: str | None = None, normalize: bool = True, cell: float = 0.9, dpi: int = 110) -> str | None:
    """Write a PNG grid of ``images`` (N, C, H, W; 1 channel in gray, 3 in colour) to ``path``.

    ``titles`` / ``colors``: optional per-image captions and their colours; ``title``: the
    figure's. ``normalize`` stretches each image to its own min..max (synthetic inputs are
    unbounded). Returns ``path``, or None (nothing written) when there are no images."""
    imgs = images.detach().float().cpu()
    n = imgs.shape[0]
    if n == 0:
        return None
    if imgs.dim() != 4 or imgs.shape[1] not in (1, 3):
        raise ValueError(f"save_image_grid: images must be (N, 1 or 3, H, W), got {tuple(imgs.shape)}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * cell, nrows * (cell + (0.25 if titles else 0)) + 0.5),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = imgs[i]
        if normalize:
            img = (img - img.min()) / (img.max() - img.min() + 1e-8)
        img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0).clamp(0, 1)
        ax.imshow(img.numpy(), cmap="gray" if img.dim() == 2 else None)
        if titles is not None and titles[i]:
            ax.set_title(str(titles[i]), fontsize=7, color=(colors[i] if colors is not None else "black"))
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
