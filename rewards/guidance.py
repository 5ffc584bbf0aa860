"""Reward guidance during flow-matching sampling: one implementation for diffusers and ComfyUI.

At a sampling step with noise level ``sigma`` (flow matching: ``x_t = (1 - sigma) x0 + sigma * noise``), the
model's post-CFG velocity ``v`` gives the predicted clean latent ``x0_hat = x_t - sigma * v``. Guidance moves
``x0_hat`` up the reward:

* **cheap** (default): the gradient of the reward w.r.t. ``x0_hat`` with the velocity held fixed (for rewards that
  read the noisy latent too, ``x_t = x0_hat + sigma * v`` moves with it). No pass through the denoiser.
* **exact** (opt-in): the gradient w.r.t. ``x_t`` through the denoiser, ``d R(x0_hat(x_t)) / d x_t``; the caller
  supplies ``denoise_fn(x_t) -> x0_hat`` (its framework's model call, CFG included).

The step ``x0_hat + scale * normalise(grad)`` is returned; frameworks convert it back to what their sampler wants
(diffusers: the velocity ``(x_t - x0_new) / sigma``; ComfyUI: the denoised latent itself). Frameworks that run
under ``torch.inference_mode()`` (ComfyUI) are handled here: gradients are taken outside it, on fresh tensors,
and nothing with ``requires_grad`` is returned.

The window ``[start, end]`` is a fraction of the *unshifted* timestep schedule, ComfyUI's ``start_percent`` /
``end_percent`` convention: a flow model with timestep shift ``s`` (Wan: 3 for 480p and 5 for 720p in diffusers,
8 in ComfyUI) samples at ``sigma = s t / (1 + (s - 1) t)`` for the unshifted time ``t`` in [0, 1], and a step's
progress is ``1 - t`` (:func:`schedule_progress`). On the usual uniform-in-``t`` schedules that is the fraction of
the steps done, whatever the shift; with ``shift=1`` it is ``1 - sigma``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .base import LatentReward, RewardInput
from .errors import ConfigError

__all__ = [
    "GuidanceConfig",
    "GuidanceStep",
    "RewardTrace",
    "schedule_progress",
    "sigma_at_progress",
    "DEFAULT_GUIDANCE_START",
    "DEFAULT_GUIDANCE_END",
    "guide_x0",
    "x0_from_velocity",
    "velocity_from_x0",
    "evaluate_reward",
    "GUIDANCE_MODES",
    "NORMALIZE_MODES",
]

GUIDANCE_MODES = ("cheap", "exact")
NORMALIZE_MODES = ("rms", "none")
#: Below this noise level a step is a no-op for the sampler, and 1/sigma conversions are unstable.
MIN_SIGMA = 1e-4
#: Default window (fractions of the unshifted schedule): guide the first 80% of the steps and leave the last ones,
#: where ``1 / sigma`` turns a small move of ``x0_hat`` into a large velocity change, to the model.
DEFAULT_GUIDANCE_START = 0.0
DEFAULT_GUIDANCE_END = 0.8
#: Slack on window bounds, so a step that sits exactly on a bound counts as inside.
_WINDOW_TOL = 1e-9


def _check_shift(shift: float) -> float:
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not (math.isfinite(shift) and shift > 0):
        raise ConfigError(f"reward guidance: the timestep shift must be a finite number > 0, got {shift!r}")
    return float(shift)


def schedule_progress(sigma: float, shift: float = 1.0) -> float:
    """The fraction of the unshifted timestep schedule done at noise level ``sigma``, in [0, 1].

    A flow model with timestep shift ``s`` samples at ``sigma = s t / (1 + (s - 1) t)``; inverting it gives the
    unshifted time ``t = sigma / (s - (s - 1) sigma)`` and the progress ``1 - t`` (0 at pure noise, 1 at the clean
    end). This is the quantity ComfyUI's ``model_sampling.percent_to_sigma`` maps from, so windows mean the same
    in both frameworks; ``shift=1`` gives ``1 - sigma``.
    """
    s = _check_shift(shift)
    sig = min(max(float(sigma), 0.0), 1.0)
    t = sig / (s - (s - 1.0) * sig)
    return min(max(1.0 - t, 0.0), 1.0)


def sigma_at_progress(progress: float, shift: float = 1.0) -> float:
    """Inverse of :func:`schedule_progress`: the noise level at a fraction ``progress`` of the schedule."""
    s = _check_shift(shift)
    t = 1.0 - min(max(float(progress), 0.0), 1.0)
    return s * t / (1.0 + (s - 1.0) * t)


@dataclass
class GuidanceConfig:
    """Knobs of reward guidance.

    Attributes:
        scale: step size on ``x0_hat``. With ``normalize="rms"`` it is in latent-std units per voxel (the
            gradient is rescaled to unit RMS per sample); 0 disables guidance.
        start, end: the window as fractions of the unshifted timestep schedule in [0, 1] (see
            :func:`schedule_progress`): 0 = the first step, 1 = the clean end.
        mode: ``"cheap"`` (gradient at ``x0_hat``) or ``"exact"`` (through the denoiser).
        normalize: ``"rms"`` (unit RMS gradient per sample) or ``"none"`` (raw gradient times scale).
        max_step: per-sample RMS cap on the step (a clamp against extreme scales); ``None`` for no cap.
    """

    scale: float = 0.0
    start: float = DEFAULT_GUIDANCE_START
    end: float = DEFAULT_GUIDANCE_END
    mode: str = "cheap"
    normalize: str = "rms"
    max_step: float | None = 1.0

    def validate(self) -> GuidanceConfig:
        """Check every field and return ``self``; :class:`ConfigError` names the bad one."""
        for name in ("scale", "start", "end"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"reward guidance: {name} must be a finite number, got {v!r}")
        if self.scale < 0:
            raise ConfigError(f"reward guidance: scale must be >= 0 (0 disables guidance), got {self.scale}")
        if not (0.0 <= self.start <= 1.0 and 0.0 <= self.end <= 1.0):
            raise ConfigError(
                f"reward guidance: start and end are fractions of the schedule in [0, 1], got "
                f"start={self.start}, end={self.end}"
            )
        if self.start > self.end:
            raise ConfigError(f"reward guidance: start ({self.start}) must not be after end ({self.end})")
        if self.mode not in GUIDANCE_MODES:
            raise ConfigError(f"reward guidance: mode must be one of {GUIDANCE_MODES}, got {self.mode!r}")
        if self.normalize not in NORMALIZE_MODES:
            raise ConfigError(
                f"reward guidance: normalize must be one of {NORMALIZE_MODES}, got {self.normalize!r}"
            )
        if self.max_step is not None and not (self.max_step > 0 and math.isfinite(self.max_step)):
            raise ConfigError(f"reward guidance: max_step must be > 0 or None, got {self.max_step!r}")
        return self

    def updated(self, **changes: Any) -> GuidanceConfig:
        """A validated copy with some fields changed (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None}).validate()

    @property
    def enabled(self) -> bool:
        """Whether guidance moves anything (``scale > 0``)."""
        return self.scale > 0

    def in_window(self, progress: float) -> bool:
        """Whether a fraction ``progress`` of the schedule lies in ``[start, end]`` (bounds included)."""
        return self.start - _WINDOW_TOL <= float(progress) <= self.end + _WINDOW_TOL

    def active_at(self, sigma: float, shift: float = 1.0) -> bool:
        """Whether guidance acts on a step at noise level ``sigma`` of a schedule with timestep shift ``shift``:
        enabled, ``sigma`` above :data:`MIN_SIGMA` and ``start <= schedule_progress(sigma, shift) <= end``."""
        if not self.enabled or sigma < MIN_SIGMA:
            return False
        return self.in_window(schedule_progress(sigma, shift))

    def active_between(self, sigma: float, sigma_start: float, sigma_end: float) -> bool:
        """Like :meth:`active_at` for frameworks that map the window to noise levels themselves (ComfyUI's
        ``percent_to_sigma(start)`` / ``percent_to_sigma(end)``): ``sigma_end <= sigma <= sigma_start``."""
        if not self.enabled or sigma < MIN_SIGMA:
            return False
        tol = _WINDOW_TOL * max(1.0, abs(float(sigma_start)))
        return float(sigma_end) - tol <= float(sigma) <= float(sigma_start) + tol


@dataclass
class GuidanceStep:
    """What one guidance call did: the moved ``x0``, the reward per sample before the step, and flags."""

    x0: torch.Tensor
    reward: torch.Tensor
    step_rms: torch.Tensor
    clamped: bool = False
    nonfinite: bool = False


@dataclass
class RewardTrace:
    """Per-step record of a guided run: sigma, schedule progress (the window's axis), reward per sample (before
    the step), step size and whether the step was guided."""

    sigmas: list[float] = field(default_factory=list)
    rewards: list[list[float]] = field(default_factory=list)
    step_rms: list[list[float]] = field(default_factory=list)
    guided: list[bool] = field(default_factory=list)
    progress: list[float] = field(default_factory=list)

    def add(
        self, sigma: float, reward: torch.Tensor, step_rms: torch.Tensor | None, guided: bool,
        progress: float | None = None,
    ) -> None:
        """Append one step; ``progress`` defaults to ``schedule_progress(sigma)`` (shift 1)."""
        self.sigmas.append(float(sigma))
        self.rewards.append([float(v) for v in reward.detach().float().cpu()])
        self.step_rms.append([float(v) for v in step_rms.detach().float().cpu()] if step_rms is not None else [])
        self.guided.append(bool(guided))
        self.progress.append(float(progress) if progress is not None else schedule_progress(sigma))

    def select(self, indices: list[int] | slice) -> RewardTrace:
        """The trace of some samples of the batch (per-step lists sliced), e.g. one candidate of best-of-N."""
        def pick(row: list[float]) -> list[float]:
            return row[indices] if isinstance(indices, slice) else [row[i] for i in indices]

        return RewardTrace(
            sigmas=list(self.sigmas), rewards=[pick(r) for r in self.rewards],
            step_rms=[pick(r) if r else [] for r in self.step_rms], guided=list(self.guided),
            progress=list(self.progress),
        )

    def as_dict(self) -> dict[str, list]:
        """JSON-ready lists (the ComfyUI frontend and the generate CLI write this)."""
        return {
            "sigmas": self.sigmas, "progress": self.progress, "rewards": self.rewards, "step_rms": self.step_rms,
            "guided": self.guided,
        }


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Flow matching: ``x0_hat = x_t - sigma * v``."""
    return x_t - _bcast(sigma, x_t) * v


def velocity_from_x0(x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Inverse of :func:`x0_from_velocity`: ``v = (x_t - x0) / sigma``."""
    return (x_t - x0) / _bcast(sigma, x_t).clamp_min(MIN_SIGMA)


def _bcast(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if s.ndim == 1 and like.ndim > 1:
        s = s.view(-1, *([1] * (like.ndim - 1)))
    return s


def _reward_inputs(
    reward: LatentReward, x0: torch.Tensor, x_t: torch.Tensor | None, sigma: torch.Tensor, text_embeds: torch.Tensor | None
) -> dict[str, Any]:
    # x0 always goes first: it is the latent being guided (and metrics() takes it positionally).
    return {**reward.select_inputs(x_t=x_t, timestep=sigma, text_embeds=text_embeds), "x0": x0}


def _per_sample_rms(t: torch.Tensor) -> torch.Tensor:
    """RMS per sample without overflow or underflow (scaled by the per-sample max first)."""
    flat = t.flatten(1)
    amax = flat.abs().amax(1).clamp_min(torch.finfo(flat.dtype).tiny)
    return amax * (flat / amax.unsqueeze(1)).pow(2).mean(1).sqrt()


def _guidance_step(
    grad: torch.Tensor, config: GuidanceConfig, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, bool, bool]:
    """The step ``scale * normalise(grad)`` with a per-sample RMS cap, robust to overflow.

    The direction (unit RMS) and the magnitude are computed separately, so a huge ``scale`` or gradient is capped
    by ``max_step`` instead of overflowing to Inf and turning into NaN (``Inf * 0``). A sample whose gradient has
    NaN/Inf values, or whose step would still be non-finite (``max_step=None``), gets no step and a warning.
    """
    b = grad.shape[0]
    shape = (-1,) + (1,) * (grad.ndim - 1)
    bad = ~torch.isfinite(grad.flatten(1)).all(1)
    nonfinite = bool(bad.any())
    if nonfinite:
        warnings.warn(
            "reward guidance: the reward gradient has NaN/Inf values at sigma="
            f"{float(sigma[0]):.4f}; skipping the step for {int(bad.sum())} of {b} samples (lower the scale?)",
            RuntimeWarning,
            stacklevel=3,
        )
        grad = torch.where(bad.view(shape), torch.zeros_like(grad), grad)
    g_rms = _per_sample_rms(grad)
    zero = g_rms <= torch.finfo(grad.dtype).tiny
    direction = grad / torch.where(zero, torch.ones_like(g_rms), g_rms).view(shape)
    # Magnitude in float64 so that scale * |grad| cannot overflow before the cap is applied.
    if config.normalize == "rms":
        target = torch.full((b,), float(config.scale), dtype=torch.float64, device=grad.device)
    else:
        target = g_rms.double() * float(config.scale)
    target = torch.where(zero, torch.zeros_like(target), target)
    clamped = False
    if config.max_step is not None and bool((target > config.max_step).any()):
        clamped = True
        target = target.clamp(max=float(config.max_step))
        warnings.warn(
            f"reward guidance: step RMS above max_step={config.max_step} was clamped (scale {config.scale} "
            "is large for this reward)",
            RuntimeWarning,
            stacklevel=3,
        )
    step = direction * target.to(grad.dtype).view(shape)
    overflow = ~torch.isfinite(step.flatten(1)).all(1)
    if bool(overflow.any()):
        nonfinite = True
        warnings.warn(
            f"reward guidance: the step overflowed for {int(overflow.sum())} of {b} samples (scale "
            f"{config.scale} with max_step=None); skipping it for those samples",
            RuntimeWarning,
            stacklevel=3,
        )
        step = torch.where(overflow.view(shape), torch.zeros_like(step), step)
        target = torch.where(overflow, torch.zeros_like(target), target)
    step_rms = target.to(torch.float32)
    return step, step_rms, clamped, nonfinite


def evaluate_reward(
    reward: LatentReward,
    x0: torch.Tensor,
    sigma: torch.Tensor | float = 0.0,
    *,
    x_t: torch.Tensor | None = None,
    text_embeds: torch.Tensor | None = None,
    metrics: bool = False,
    maps: bool = False,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The reward per sample of a (predicted) clean latent, without gradient, in fp32.

    Safe inside ``torch.inference_mode()``. For rewards that read the noisy latent, ``x_t`` defaults to ``x0`` at
    ``sigma = 0`` (a finished sample). With ``metrics=True`` returns :meth:`LatentReward.metrics` (always with a
    ``reward`` entry; Shell-LCC adds ``r_dist`` and ``lcc_distance``), and with ``maps=True`` also the reward's
    per-voxel maps from the same pass (Shell-LCC: ``distance_map``).
    """
    b = x0.shape[0]
    with torch.inference_mode(False), torch.no_grad():
        x0f = x0.detach().to(device=reward.device, dtype=torch.float32).clone()
        sig = torch.as_tensor(sigma, dtype=torch.float32, device=x0f.device).clone()
        if sig.ndim == 0:
            sig = sig.expand(b)
        if x_t is not None:
            xtf = x_t.detach().to(device=x0f.device, dtype=torch.float32).clone()
        elif float(sig.abs().max()) == 0.0:
            xtf = x0f
        else:
            xtf = None
        te = text_embeds.detach().to(x0f.device).clone() if text_embeds is not None else None
        inputs = _reward_inputs(reward, x0f, xtf, sig, te)
        if metrics:
            x0_in = inputs.pop("x0")
            return {k: v.detach().float() for k, v in reward.metrics(x0_in, maps=maps, **inputs).items()}
        return reward.reward(**inputs).detach().float()


def guide_x0(
    reward: LatentReward,
    x0: torch.Tensor,
    sigma: torch.Tensor | float,
    config: GuidanceConfig,
    *,
    x_t: torch.Tensor | None = None,
    velocity: torch.Tensor | None = None,
    text_embeds: torch.Tensor | None = None,
    denoise_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> GuidanceStep:
    """One guidance step on the predicted clean latent ``x0`` ``[B, C, T, H, W]`` (normalised latent space).

    Args:
        reward: a frozen latent reward.
        x0: the post-CFG prediction ``x0_hat`` at this step.
        sigma: the step's noise level (scalar or ``[B]``).
        config: scale, mode, normalisation (the window is checked by the caller with ``config.active_at`` or
            ``config.active_between``).
        x_t: the current noisy latent (needed by rewards that read it, and by exact mode).
        velocity: the post-CFG velocity; if given with ``x_t``, cheap mode keeps ``x_t = x0 + sigma v`` consistent
            for rewards that read noisy latents.
        text_embeds: the prompt embedding for text-conditioned rewards.
        denoise_fn: exact mode only: ``x_t -> x0_hat`` through the denoiser (CFG included).

    Returns:
        A :class:`GuidanceStep` with the moved ``x0`` (same dtype/device as ``x0``, no grad) and the reward
        per sample before the step.
    """
    config.validate()
    out_dtype = x0.dtype
    b = x0.shape[0]
    sig = torch.as_tensor(sigma, dtype=torch.float32, device=x0.device)
    if sig.ndim == 0:
        sig = sig.expand(b)
    with torch.inference_mode(False), torch.enable_grad():
        # Fresh, normal tensors: inputs may be inference tensors (ComfyUI) or half precision.
        sig = sig.clone()
        if text_embeds is not None:
            text_embeds = text_embeds.detach().clone()
        if config.mode == "exact":
            if denoise_fn is None or x_t is None:
                raise ConfigError("exact reward guidance needs x_t and denoise_fn (the denoiser call)")
            leaf = x_t.detach().clone().float().requires_grad_(True)
            x0_g = denoise_fn(leaf).float()
            xt_g = leaf
        else:
            leaf = x0.detach().clone().float().requires_grad_(True)
            x0_g = leaf
            xt_g = None
            if RewardInput.NOISY in reward.required_inputs:
                if x_t is None:
                    raise ConfigError("this reward reads the noisy latent: pass x_t to guide_x0")
                if velocity is not None:
                    xt_g = leaf + _bcast(sig, leaf) * velocity.detach().float().clone()
                else:
                    xt_g = x_t.detach().clone().float()
        r = reward.reward(**_reward_inputs(reward, x0_g, xt_g, sig, text_embeds))
        (grad,) = torch.autograd.grad(r.sum(), leaf)
    r = r.detach()
    step, step_rms, clamped, nonfinite = _guidance_step(grad.detach(), config, sig)
    new_x0 = (x0.detach().float() + step).to(out_dtype)
    bad = ~torch.isfinite(new_x0.flatten(1)).all(1) & torch.isfinite(x0.detach().flatten(1)).all(1)
    if bool(bad.any()):
        # Only possible with max_step=None: never hand the sampler a non-finite latent the step created.
        nonfinite = True
        warnings.warn(
            f"reward guidance: the step made x0 non-finite for {int(bad.sum())} of {x0.shape[0]} samples; "
            "skipping it for those samples (set max_step)",
            RuntimeWarning,
            stacklevel=2,
        )
        keep = bad.view(-1, *([1] * (x0.ndim - 1)))
        new_x0 = torch.where(keep, x0.detach().to(out_dtype), new_x0)
        step_rms = torch.where(bad.to(step_rms.device), torch.zeros_like(step_rms), step_rms)
    return GuidanceStep(x0=new_x0, reward=r.float(), step_rms=step_rms, clamped=clamped, nonfinite=nonfinite)
