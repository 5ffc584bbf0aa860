"""Pictures for the score node: per-frame distance curves, per-frame heatmaps, and score cards.

Images are ComfyUI ``IMAGE`` tensors ``[N, H, W, 3]`` in [0, 1]. Plots use matplotlib's object API with the Agg
canvas (no pyplot global state, safe in the server's worker thread).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["heatmap_frames", "heatmap_sheet", "curve_image", "score_cards", "heat_range"]

_CMAP = "magma"


def _figure(width_px: int, height_px: int, dpi: int = 100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _to_image(fig) -> torch.Tensor:
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].astype(np.float32) / 255.0).unsqueeze(0)


def heat_range(dmap: torch.Tensor) -> float:
    """Upper end of the colour scale: at least 2 (the shell is r = 1), else the 99th percentile."""
    flat = dmap.detach().float().flatten()
    q = float(torch.quantile(flat[: 1 << 24], 0.99)) if flat.numel() else 2.0
    return max(2.0, q if math.isfinite(q) else 2.0)


def heatmap_frames(dmap: torch.Tensor, *, upscale: int, vmax: float) -> torch.Tensor:
    """Per-voxel distances ``[B, T, h, w]`` -> colour frames ``[B*T, h*upscale, w*upscale, 3]`` (nearest)."""
    from matplotlib import colormaps

    lut = torch.from_numpy(colormaps[_CMAP](np.linspace(0.0, 1.0, 256))[:, :3].astype(np.float32))
    b, t, h, w = dmap.shape
    idx = (dmap.detach().float().cpu().clamp(0.0, vmax) / vmax * 255.0).round().long()
    frames = lut[idx.reshape(b * t, h, w)]
    if upscale > 1:
        frames = frames.repeat_interleave(upscale, dim=1).repeat_interleave(upscale, dim=2)
    return frames.contiguous()


def heatmap_sheet(dmap: torch.Tensor, *, vmax: float, title: str) -> torch.Tensor:
    """One video's distance maps ``[T, h, w]`` as a grid with a colour bar: ``[1, H, W, 3]``."""
    t, h, w = dmap.shape
    cols = min(t, 7)
    rows = math.ceil(t / cols)
    cell = 150
    fig = _figure(cols * cell + 90, int(rows * cell * h / max(w, 1)) + 70)
    axes = fig.subplots(rows, cols, squeeze=False)
    im = None
    data = dmap.detach().float().cpu().numpy()
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < t:
            im = ax.imshow(data[i], cmap=_CMAP, vmin=0.0, vmax=vmax, interpolation="nearest")
            ax.set_title(f"t={i}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.025, pad=0.02, label="distance r (1 = data shell)")
    return _to_image(fig)


def curve_image(per_frame: Sequence[Sequence[float]], scores: Sequence[float], *, ylabel: str, title: str) -> torch.Tensor:
    """Per-frame curves (one line per video), or a bar chart of the scores when there is no per-frame value."""
    fig = _figure(640, 360)
    ax = fig.add_subplot(1, 1, 1)
    if per_frame:
        for i, values in enumerate(per_frame):
            ax.plot(range(len(values)), values, marker="o", markersize=3, label=f"video {i} (score {scores[i]:.4g})")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="data shell (r = 1)")
        ax.set_xlabel("latent frame (4 video frames each, the first alone)")
        ax.set_ylabel(ylabel)
    else:
        ax.bar(range(len(scores)), scores, color="tab:blue")
        ax.set_xlabel("video")
        ax.set_ylabel("reward (higher is better)")
    if per_frame and len(per_frame) <= 8:
        ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _to_image(fig)


def score_cards(scores: Sequence[float], *, kind: str) -> torch.Tensor:
    """One small card per video with its score, for rewards without a per-voxel map: ``[B, 128, 256, 3]``."""
    cards = []
    for i, s in enumerate(scores):
        fig = _figure(256, 128)
        fig.text(0.5, 0.62, f"video {i}: {s:.4g}", ha="center", va="center", fontsize=14)
        fig.text(0.5, 0.3, f"{kind}: no per-voxel map", ha="center", va="center", fontsize=9, color="gray")
        cards.append(_to_image(fig))
    return torch.cat(cards) if cards else torch.zeros(1, 128, 256, 3)
