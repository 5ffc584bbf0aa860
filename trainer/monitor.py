"""The reward-hacking watch: image statistics of validation videos, a rule that keeps the best step, early stop.

Every reward here can be over-optimised: Shell-LCC first removes blur, then stamps high-frequency texture on flat
regions and finally collapses towards the manifold's mean (the authors stop by eye, with sharpness / frequency /
change numbers as proxies). At each validation the trainer decodes a few videos at fixed seeds and this module
measures, per video, against the same prompt and seed from the base model (step 0):

* ``lap_ratio``: sharpness, the variance of the 3x3 Laplacian ``[[0,1,0],[1,-4,1],[0,1,0]]`` of the greyscale
  frames in [0, 1], averaged over frames, divided by the base video's;
* ``hf_ratio``: the fraction of spectral energy ``|FFT|^2`` above a quarter of Nyquist (normalised radius
  > 0.25; the frame mean is removed first so brightness does not count), divided by the base video's;
* ``change``: the mean absolute pixel difference to the base video (0..1, i.e. /255);
* ``r_dist``: the reward's ``R_dist`` of the validation latents (Shell-LCC), compared with the real-data radius
  when ``monitor.real_radius`` is known.

Ratios and the change are the medians over the validation videos.

**The rule** (documented in the model card and logged with its reasons). A validation step is *flagged* when any of

1. ``hf_ratio > max_hf_over_lap * max(lap_ratio, 1)``: high frequencies grow much faster than edges, the
   reward-hacking noise signature (default factor 1.5);
2. ``change > max_change``: the content drifted from what the base model makes (default 0.2);
3. ``r_dist < min_radius_fraction * real_radius``: the samples are pulled inside the shell of real data, towards
   the manifold's mean (collapse; default 0.8, only when ``real_radius`` is set);
4. a metric is not finite.

The **best step** is the unflagged validation step (after step 0) with the highest mean validation reward
(earliest on ties); it is exported to ``OUTPUT_DIR/best/``. When ``patience`` validations in a row are flagged,
training **stops early** and the log says which checks fired. Numbers select the candidate; look at the videos
before trusting it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "laplacian_variance",
    "high_frequency_ratio",
    "content_change",
    "to_grey",
    "video_statistics",
    "ValidationReport",
    "RewardHackingMonitor",
]

_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


def to_grey(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """RGB frames ``[F, H, W, 3]`` (uint8, or float in [0, 1]) -> greyscale ``[F, H, W]`` float in [0, 1] (BT.601)."""
    x = torch.as_tensor(np.asarray(frames)) if not isinstance(frames, torch.Tensor) else frames
    x = x.float() / 255.0 if not x.is_floating_point() else x.float()
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected frames [F, H, W, 3], got shape {tuple(x.shape)}")
    return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


def laplacian_variance(grey: torch.Tensor) -> float:
    """Mean over frames of the variance of the 3x3 Laplacian response (valid region) of ``[F, H, W]`` frames."""
    resp = F.conv2d(grey.unsqueeze(1).float(), _LAPLACIAN.to(grey.device))
    return float(resp.flatten(1).var(dim=1, unbiased=False).mean())


def high_frequency_ratio(grey: torch.Tensor, cutoff: float = 0.25) -> float:
    """Mean over frames of the share of ``|FFT|^2`` energy at normalised radius > ``cutoff`` (1 = Nyquist)."""
    g = grey.float()
    g = g - g.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(g).abs().pow(2)
    fy = torch.fft.fftfreq(g.shape[-2]).view(-1, 1) / 0.5
    fx = torch.fft.fftfreq(g.shape[-1]).view(1, -1) / 0.5
    high = (fy.pow(2) + fx.pow(2)).sqrt() > cutoff
    total = power.flatten(1).sum(1)
    share = (power * high).flatten(1).sum(1) / total.clamp_min(1e-12)
    return float(torch.where(total > 0, share, torch.zeros_like(share)).mean())


def content_change(base: np.ndarray | torch.Tensor, frames: np.ndarray | torch.Tensor) -> float:
    """Mean absolute difference of two videos ``[F, H, W, 3]`` on the 0..1 scale (= mean |a - b| / 255 for uint8)."""
    a, b = (torch.as_tensor(np.asarray(v)) for v in (base, frames))
    a = a.float() / 255.0 if not a.is_floating_point() else a.float()
    b = b.float() / 255.0 if not b.is_floating_point() else b.float()
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a - b).abs().mean())


def _pick_frames(frames: np.ndarray, max_frames: int) -> np.ndarray:
    if max_frames <= 0 or len(frames) <= max_frames:
        return frames
    idx = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
    return frames[idx]


def video_statistics(frames: np.ndarray, max_frames: int = 0) -> dict[str, float]:
    """``{"lap": ..., "hf": ...}`` of one video ``[F, H, W, 3]``."""
    grey = to_grey(_pick_frames(frames, max_frames))
    return {"lap": laplacian_variance(grey), "hf": high_frequency_ratio(grey)}


@dataclass
class ValidationReport:
    """One validation: medians over videos, the rule's verdict and what it means for training."""

    step: int
    reward: float
    r_dist: float | None = None
    lap_ratio: float = 1.0
    hf_ratio: float = 1.0
    change: float = 0.0
    lap: float = 0.0
    hf: float = 0.0
    flags: list[str] = field(default_factory=list)
    is_best: bool = False
    stop: bool = False
    reason: str = ""

    @property
    def healthy(self) -> bool:
        return not self.flags

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "healthy": self.healthy}

    def summary(self) -> str:
        parts = [f"reward {self.reward:.4f}"]
        if self.r_dist is not None:
            parts.append(f"R_dist {self.r_dist:.4f}")
        parts.append(f"lap x{self.lap_ratio:.2f}, hf x{self.hf_ratio:.2f}, change {self.change:.3f}")
        verdict = "flagged: " + "; ".join(self.flags) if self.flags else "ok"
        return f"step {self.step}: " + ", ".join(parts) + f" [{verdict}]"


def _finite(*values: float | None) -> bool:
    return all(v is None or math.isfinite(v) for v in values)


class RewardHackingMonitor:
    """Applies the rule of the module docstring to successive validations; keeps its history for resume."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.base_stats: list[dict[str, float]] | None = None
        self.history: list[dict[str, Any]] = []
        self.best_step: int | None = None
        self.best_reward: float | None = None
        self.flagged_streak = 0
        self.stop_reason: str | None = None

    def set_baseline(self, base_videos: list[np.ndarray]) -> list[dict[str, float]]:
        """Statistics of the base model's validation videos (step 0), the reference of every ratio."""
        self.base_stats = [video_statistics(v, self.settings.max_frames) for v in base_videos]
        return self.base_stats

    def measure(self, videos: list[np.ndarray], base_videos: list[np.ndarray] | None) -> dict[str, float]:
        """Median lap/hf ratios and content change of ``videos`` against the base videos (same prompts/seeds)."""
        stats = [video_statistics(v, self.settings.max_frames) for v in videos]
        out = {"lap": float(np.median([s["lap"] for s in stats])), "hf": float(np.median([s["hf"] for s in stats]))}
        if self.base_stats is None or base_videos is None:
            return {**out, "lap_ratio": 1.0, "hf_ratio": 1.0, "change": 0.0}
        eps = 1e-12
        out["lap_ratio"] = float(np.median([s["lap"] / max(b["lap"], eps) for s, b in zip(stats, self.base_stats)]))
        out["hf_ratio"] = float(np.median([s["hf"] / max(b["hf"], eps) for s, b in zip(stats, self.base_stats)]))
        mf = self.settings.max_frames
        out["change"] = float(np.median([
            content_change(_pick_frames(b, mf), _pick_frames(v, mf)) for v, b in zip(videos, base_videos)
        ]))
        return out

    def flags(self, *, lap_ratio: float, hf_ratio: float, change: float, r_dist: float | None, reward: float) -> list[str]:
        """The checks of the rule that fire for these numbers (empty: healthy)."""
        s = self.settings
        out = []
        if not _finite(lap_ratio, hf_ratio, change, r_dist, reward):
            out.append("non-finite metric")
            return out
        if hf_ratio > s.max_hf_over_lap * max(lap_ratio, 1.0):
            out.append(
                f"high-frequency noise (hf x{hf_ratio:.2f} > {s.max_hf_over_lap:g} x max(lap x{lap_ratio:.2f}, 1))"
            )
        if change > s.max_change:
            out.append(f"content drift (change {change:.3f} > {s.max_change:g})")
        if s.real_radius is not None and r_dist is not None and r_dist < s.min_radius_fraction * s.real_radius:
            out.append(
                f"collapse towards the mean (R_dist {r_dist:.3f} < {s.min_radius_fraction:g} x real radius "
                f"{s.real_radius:g})"
            )
        return out

    def update(self, step: int, *, reward: float, r_dist: float | None, metrics: dict[str, float]) -> ValidationReport:
        """Judge one validation; sets ``is_best`` / ``stop`` / ``reason`` on the returned report."""
        rep = ValidationReport(
            step=step, reward=float(reward), r_dist=None if r_dist is None else float(r_dist),
            lap_ratio=metrics.get("lap_ratio", 1.0), hf_ratio=metrics.get("hf_ratio", 1.0),
            change=metrics.get("change", 0.0), lap=metrics.get("lap", 0.0), hf=metrics.get("hf", 0.0),
        )
        if step == 0:  # the base model: the reference, never a candidate
            self.history.append(rep.as_dict())
            return rep
        if self.settings.enabled:
            rep.flags = self.flags(
                lap_ratio=rep.lap_ratio, hf_ratio=rep.hf_ratio, change=rep.change, r_dist=rep.r_dist, reward=rep.reward
            )
        if rep.healthy:
            self.flagged_streak = 0
            if math.isfinite(rep.reward) and (self.best_reward is None or rep.reward > self.best_reward):
                self.best_step, self.best_reward = step, rep.reward
                rep.is_best = True
        else:
            self.flagged_streak += 1
            p = self.settings.patience
            if self.settings.enabled and p > 0 and self.flagged_streak >= p:
                rep.stop = True
                best = f"best step {self.best_step}" if self.best_step is not None else "no unflagged step"
                rep.reason = (
                    f"stopped early at step {step}: {p} validation(s) in a row flagged by the reward-hacking rule "
                    f"({'; '.join(rep.flags)}); {best}"
                )
                self.stop_reason = rep.reason
        self.history.append(rep.as_dict())
        return rep

    def state_dict(self) -> dict[str, Any]:
        return {
            "base_stats": self.base_stats, "history": self.history, "best_step": self.best_step,
            "best_reward": self.best_reward, "flagged_streak": self.flagged_streak, "stop_reason": self.stop_reason,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base_stats = state.get("base_stats")
        self.history = list(state.get("history", []))
        self.best_step = state.get("best_step")
        self.best_reward = state.get("best_reward")
        self.flagged_streak = int(state.get("flagged_streak", 0))
        self.stop_reason = state.get("stop_reason")
