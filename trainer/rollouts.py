"""Rollout strategies: how a training step turns noise into the latent the reward scores.

The three reward fine-tuning recipes differ exactly here, so each is a small class behind one interface
(:class:`RolloutStrategy`), chosen by ``rollout.kind`` in the config:

* ``one_step`` (**Shell-LCC**): one transformer pass with gradient on pure noise ``eps`` at a noise level
  ``sigma ~ U[sigma_min, sigma_max]`` (default [0.7, 1]); ``x0_hat = eps - sigma * v``. The input is pure noise
  whatever sigma is: sigma enters only through the timestep and the x0 formula (the authors' choice).
* ``truncated`` (**VELR**): a no-gradient Euler prefix from pure noise to a random mid step, ``grad_steps`` Euler
  steps with gradient, then the one-step ``x0`` prediction at the end of the window (also with gradient).
* ``single_step`` (**PRFL**): a no-gradient prefix to a random step ``k``, then one Euler step with gradient; the
  reward reads the resulting *noisy* latent ``x_{k+1}`` at its own noise level (process reward), and the one-step
  ``x0`` prediction of the gradient call is returned too for rewards that read clean latents.

Strategies see the generator only through a :class:`Denoiser` (``velocity(x, sigma, text, grad=...)``), so they
are tested with any velocity field and the loop can route no-gradient calls around DDP. Randomness comes from the
generators in :class:`RolloutRandom`: ``local`` (noise; differs per process) and ``shared`` (step indices; the
same on every process so all ranks run the same number of passes). Both are saved in checkpoints, which is what
makes a resumed run reproduce the uninterrupted one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from ..rewards.errors import ConfigError
from ..rewards.guidance import x0_from_velocity

__all__ = [
    "Denoiser",
    "TransformerDenoiser",
    "RolloutRandom",
    "RolloutOutput",
    "RolloutStrategy",
    "OneStepFromNoise",
    "TruncatedWindow",
    "SingleRandomStep",
    "ROLLOUTS",
    "register_rollout",
    "build_rollout",
    "flow_sigmas",
    "latent_shape",
]


# ------------------------------------------------------------------------------------------------ plumbing
class Denoiser(Protocol):
    """What a strategy calls: the generator's flow-matching velocity ``v`` at noise level ``sigma`` ``[B]``."""

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, text_embeds: torch.Tensor, *, grad: bool) -> torch.Tensor:
        ...


class TransformerDenoiser:
    """A diffusers ``WanTransformer3DModel`` as a :class:`Denoiser` (timestep ``1000 * sigma``, Wan's convention).

    ``model`` is what gradient-enabled calls go through (possibly wrapped by DDP/FSDP), ``plain`` what
    no-gradient calls go through: the unwrapped module under DDP (so its reducer only sees the passes that
    backpropagate), the FSDP module itself under FSDP (its unwrapped parameters are shards). ``reference``
    gives the frozen base model's velocity (LoRA disabled, or a frozen copy for a full fine-tune), for KL and
    anti-drift terms. Velocities come back in fp32.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        plain: torch.nn.Module | None = None,
        *,
        dtype: torch.dtype | None = None,
        reference: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        self.plain = plain if plain is not None else model
        self.dtype = dtype if dtype is not None else next(self.plain.parameters()).dtype
        self._reference = reference

    def _call(self, module: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        t = (sigma.to(torch.float32) * 1000.0).to(x.device)
        out = module(
            hidden_states=x.to(self.dtype), timestep=t, encoder_hidden_states=text.to(self.dtype), return_dict=False
        )[0]
        return out.float()

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, text_embeds: torch.Tensor, *, grad: bool) -> torch.Tensor:
        if grad:
            return self._call(self.model, x, sigma, text_embeds)
        with torch.no_grad():
            return self._call(self.plain, x, sigma, text_embeds)

    def reference(self, x: torch.Tensor, sigma: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Velocity of the frozen base model (no gradient)."""
        if self._reference is None:
            raise ConfigError("this run has no reference model (KL / anti-drift need the frozen base model)")
        with torch.no_grad():
            return self._reference(x, sigma, text_embeds).float()


@dataclass
class RolloutRandom:
    """Generators of a rollout: ``local`` for noise (per process), ``shared`` for step indices (all processes)."""

    local: torch.Generator
    shared: torch.Generator

    @classmethod
    def from_seed(cls, seed: int, rank: int = 0) -> "RolloutRandom":
        return cls(torch.Generator().manual_seed(seed * 1_000_003 + 17 + rank), torch.Generator().manual_seed(seed))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"local": self.local.get_state(), "shared": self.shared.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.local.set_state(state["local"])
        self.shared.set_state(state["shared"])

    def noise(self, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
        # Drawn on the CPU so the same seed gives the same noise on any device.
        return torch.randn(shape, generator=self.local, dtype=torch.float32).to(device)

    def uniform(self, n: int, low: float, high: float, device: torch.device | str) -> torch.Tensor:
        return (low + (high - low) * torch.rand(n, generator=self.local, dtype=torch.float32)).to(device)

    def index(self, low: int, high: int) -> int:
        """An integer in ``[low, high]`` (both inclusive), the same on every process."""
        return int(torch.randint(low, high + 1, (1,), generator=self.shared))


@dataclass
class RolloutOutput:
    """What a rollout hands to the recipe's loss.

    Attributes:
        x0: predicted clean latent ``[B, C, T, H, W]`` fp32, differentiable w.r.t. the trainable weights.
        x_t: the noisy latent a process reward reads (``single_step``), else None.
        sigma_t: ``[B]`` noise level of ``x_t`` (the reward's ``timestep`` in [0, 1]), else None.
        model_input: input latent of the last gradient-enabled call (detached): where KL / anti-drift compare the
            trained model with the frozen base.
        model_sigma: ``[B]`` noise level of that call.
        velocity: output of that call (with graph).
        info: scalars worth logging (mean sigma, start index, ...).
        v_ref: the frozen base model's velocity at ``model_input`` once a regulariser has asked for it.
    """

    x0: torch.Tensor
    model_input: torch.Tensor
    model_sigma: torch.Tensor
    velocity: torch.Tensor
    x_t: torch.Tensor | None = None
    sigma_t: torch.Tensor | None = None
    info: dict[str, float] = field(default_factory=dict)
    v_ref: torch.Tensor | None = None


def flow_sigmas(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """The ``num_steps + 1`` noise levels of a flow-matching sampler, from 1 down to 0, with Wan's time shift
    ``sigma' = shift * s / (1 + (shift - 1) * s)`` (shift 5 at 720p, 3 at 480p)."""
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * s / (1.0 + (shift - 1.0) * s)).float()


def latent_shape(batch: int, num_frames: int, height: int, width: int, *, channels: int = 16,
                 temporal: int = 4, spatial: int = 8) -> tuple[int, int, int, int, int]:
    """Latent ``[B, C, T, H, W]`` of a video ``num_frames x height x width`` (Wan2.1 VAE strides 4, 8, 8)."""
    return (batch, channels, (num_frames - 1) // temporal + 1, height // spatial, width // spatial)


def _euler(x: torch.Tensor, sigma: float, sigma_next: float, v: torch.Tensor) -> torch.Tensor:
    return x + (sigma_next - sigma) * v


def _euler_steps(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, start: int, stop: int,
                 text: torch.Tensor, *, grad: bool) -> torch.Tensor:
    """Euler steps ``start .. stop-1`` from ``x`` at ``sigmas[start]``: the latent at step ``stop``."""
    b = x.shape[0]
    for i in range(start, stop):
        s = float(sigmas[i])
        v = denoiser.velocity(x, torch.full((b,), s, device=x.device), text, grad=grad)
        x = _euler(x, s, float(sigmas[i + 1]), v)
    return x


# ------------------------------------------------------------------------------------------------ strategies
class RolloutStrategy(ABC):
    """Base class: ``strategy(denoiser, text_embeds, latent_shape, random) -> RolloutOutput``."""

    name: ClassVar[str] = ""
    settings_class: ClassVar[type] = object

    def __init__(self, settings: Any = None) -> None:
        self.settings = settings if settings is not None else self.settings_class()
        validate = getattr(self.settings, "validate", None)
        if callable(validate):
            validate("rollout")

    #: What the output can feed a reward: always ``x0``; ``x_t`` + ``timestep`` only for process rollouts.
    provides_noisy: ClassVar[bool] = False

    @abstractmethod
    def __call__(
        self,
        denoiser: Denoiser,
        text_embeds: torch.Tensor,
        shape: tuple[int, ...],
        random: RolloutRandom,
    ) -> RolloutOutput:
        """Run the rollout for ``shape[0]`` samples conditioned on ``text_embeds`` ``[B, L, D]``."""


@dataclass
class OneStepSettings:
    """``one_step``: noise level range of the single pass (the authors use [0.7, 1.0])."""

    sigma_min: float = 0.7
    sigma_max: float = 1.0

    def validate(self, path: str) -> None:
        if not (0.0 < self.sigma_min <= self.sigma_max <= 1.0):
            raise ConfigError(
                f"{path}.sigma_min/sigma_max: expected 0 < sigma_min <= sigma_max <= 1, "
                f"got {self.sigma_min}, {self.sigma_max}"
            )


def _check_sampler(path: str, num_steps: int, shift: float) -> None:
    if num_steps < 2:
        raise ConfigError(f"{path}.num_steps: expected >= 2, got {num_steps}")
    if shift <= 0:
        raise ConfigError(f"{path}.shift: expected > 0, got {shift}")


@dataclass
class TruncatedSettings:
    """``truncated``: a sampler of ``num_steps`` (shifted) steps; the gradient window starts at a random step in
    ``[start_min, start_max]`` and spans ``grad_steps`` steps (VELR: 50 steps, start 15-25, 10 with gradient)."""

    num_steps: int = 50
    shift: float = 5.0
    start_min: int = 15
    start_max: int = 25
    grad_steps: int = 10

    def validate(self, path: str) -> None:
        _check_sampler(path, self.num_steps, self.shift)
        if self.grad_steps < 0:
            raise ConfigError(f"{path}.grad_steps: expected >= 0, got {self.grad_steps}")
        if not 0 <= self.start_min <= self.start_max:
            raise ConfigError(f"{path}.start_min/start_max: expected 0 <= start_min <= start_max")
        if self.start_max + self.grad_steps >= self.num_steps:
            raise ConfigError(
                f"{path}.start_max: start_max + grad_steps must be < num_steps (the window must end above "
                f"sigma 0), got {self.start_max} + {self.grad_steps} >= {self.num_steps}"
            )


@dataclass
class SingleStepSettings:
    """``single_step``: a sampler of ``num_steps`` (shifted) steps; the gradient step ``k`` is drawn from
    ``[index_min, index_max]`` (PRFL: 40 steps, shift 5, k in 0..38)."""

    num_steps: int = 40
    shift: float = 5.0
    index_min: int = 0
    index_max: int = 38

    def validate(self, path: str) -> None:
        _check_sampler(path, self.num_steps, self.shift)
        if not 0 <= self.index_min <= self.index_max <= self.num_steps - 2:
            raise ConfigError(
                f"{path}.index_min/index_max: expected 0 <= index_min <= index_max <= num_steps - 2 "
                f"(= {self.num_steps - 2}, so the reward reads a latent above sigma 0)"
            )


ROLLOUTS: dict[str, type[RolloutStrategy]] = {}


def register_rollout(cls: type[RolloutStrategy]) -> type[RolloutStrategy]:
    """Class decorator: make a strategy selectable as ``rollout.kind: <cls.name>``."""
    ROLLOUTS[cls.name] = cls
    return cls


@register_rollout
class OneStepFromNoise(RolloutStrategy):
    """Shell-LCC: ``v = G(eps, sigma)`` with gradient, ``x0_hat = eps - sigma * v``, ``sigma ~ U[lo, hi]``."""

    name = "one_step"
    settings_class = OneStepSettings

    def __call__(self, denoiser, text_embeds, shape, random):
        device = text_embeds.device
        eps = random.noise(shape, device)
        sigma = random.uniform(shape[0], self.settings.sigma_min, self.settings.sigma_max, device)
        v = denoiser.velocity(eps, sigma, text_embeds, grad=True)
        return RolloutOutput(
            x0=x0_from_velocity(eps, v, sigma), model_input=eps, model_sigma=sigma, velocity=v,
            info={"sigma": float(sigma.mean())},
        )


def _prefix(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, stop: int, text: torch.Tensor) -> torch.Tensor:
    """No-gradient Euler steps ``0 .. stop-1`` from ``x`` at ``sigmas[0]``: the latent at step ``stop``."""
    return _euler_steps(denoiser, x, sigmas, 0, stop, text, grad=False).detach()


@register_rollout
class TruncatedWindow(RolloutStrategy):
    """VELR: no-grad prefix to a random mid step, ``grad_steps`` Euler steps with gradient, then ``x0`` at the end."""

    name = "truncated"
    settings_class = TruncatedSettings

    def __call__(self, denoiser, text_embeds, shape, random):
        st = self.settings
        device = text_embeds.device
        sigmas = flow_sigmas(st.num_steps, st.shift)
        start = random.index(st.start_min, st.start_max)
        end = start + st.grad_steps
        x = _prefix(denoiser, random.noise(shape, device), sigmas, start, text_embeds)
        x = _euler_steps(denoiser, x, sigmas, start, end, text_embeds, grad=True)
        sigma_end = torch.full((shape[0],), float(sigmas[end]), device=device)
        v = denoiser.velocity(x, sigma_end, text_embeds, grad=True)
        return RolloutOutput(
            x0=x0_from_velocity(x, v, sigma_end), model_input=x.detach(), model_sigma=sigma_end, velocity=v,
            info={"start_step": float(start), "sigma": float(sigmas[end])},
        )


@register_rollout
class SingleRandomStep(RolloutStrategy):
    """PRFL: no-grad prefix to a random step ``k``, one Euler step with gradient, reward on ``x_{k+1}``."""

    name = "single_step"
    settings_class = SingleStepSettings
    provides_noisy = True

    def __call__(self, denoiser, text_embeds, shape, random):
        st = self.settings
        device = text_embeds.device
        sigmas = flow_sigmas(st.num_steps, st.shift)
        k = random.index(st.index_min, st.index_max)
        x = _prefix(denoiser, random.noise(shape, device), sigmas, k, text_embeds)
        b = shape[0]
        s, s_next = float(sigmas[k]), float(sigmas[k + 1])
        sigma_k = torch.full((b,), s, device=device)
        v = denoiser.velocity(x, sigma_k, text_embeds, grad=True)
        return RolloutOutput(
            x0=x0_from_velocity(x, v, sigma_k), model_input=x, model_sigma=sigma_k, velocity=v,
            x_t=_euler(x, s, s_next, v), sigma_t=torch.full((b,), s_next, device=device),
            info={"step_index": float(k), "sigma": s_next},
        )


def build_rollout(kind: str, settings: Any = None) -> RolloutStrategy:
    """The strategy registered as ``kind`` with its settings (defaults when None)."""
    try:
        cls = ROLLOUTS[kind]
    except KeyError:
        raise ConfigError(f"rollout.kind: unknown rollout {kind!r} (known: {', '.join(sorted(ROLLOUTS))})") from None
    return cls(settings)
