"""Figures for the chapters. Each function takes computed results and returns a matplotlib Figure;
none of them computes anything the library does not already provide."""

from __future__ import annotations

import matplotlib


import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def new_figure(ncols: int = 1, width: float = 4.2, height: float = 3.2, **kwargs):
    """A figure with `ncols` axes in the book's style."""
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), constrained_layout=True, **kwargs)
    return fig, axes


def image_grid(images: torch.Tensor, nrow: int, title: str | None = None, labels: list[str] | None = None):
    """A grid of display-ready images in [0, 1], shape (N, C, H, W)."""
    images = images.detach().cpu().clamp(0, 1)
    n = images.shape[0]
    ncol = (n + nrow - 1) // nrow
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.1 * ncol, 1.1 * nrow + (0.3 if title else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = images[i].permute(1, 2, 0).squeeze(-1).numpy()
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
            if labels is not None:
                ax.set_title(labels[i], fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


# --- chapter 1: the objective transformation ---------------------------------------------------

# --- chapter 2: NTK linearisation --------------------------------------------------------------

# --- chapter 3: convexified trajectories -------------------------------------------------------

# --- chapter 4: experiments --------------------------------------------------------------------

# --- performance -------------------------------------------------------------------------------
