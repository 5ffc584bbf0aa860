"""The recipe interface: a rollout plus a loss, with hooks for what later recipes need.

The training loop calls, per micro-batch, ``recipe.training_step(ctx, batch) -> StepResult`` and, after each
optimizer step, ``recipe.on_step_end(ctx, step, logs)``. Everything else is the recipe's business:

* **rollout**: a :class:`~latent_rewards.trainer.rollouts.RolloutStrategy` (``one_step``, ``truncated``,
  ``single_step``), chosen by the config; a recipe may restrict which it accepts (:attr:`Recipe.rollouts`).
* **reward inputs**: :meth:`Recipe.reward_inputs` passes what the reward declares it reads (``x0``; ``x_t`` +
  ``timestep``; ``text_embeds``), so a process reward (PAVRM) and a clean-latent reward (Shell-LCC, VELR) use the
  same code path. The reward is frozen and evaluated in fp32 with autocast off.
* **regularisers** shared by the recipes: KL to the frozen base (:meth:`kl_to_reference`) and the anti-drift hinge
  (:meth:`anti_drift`), both against ``ctx.denoiser.reference`` (LoRA disabled).
* **extra losses / state**: override :meth:`training_step` to add terms (e.g. PRFL's interleaved SFT step; its
  captions come through :meth:`extra_prompts` and ``ctx.text_embeds``), :meth:`on_step_end` for online reward
  updates or a replay buffer (VELR; ``ctx.decode`` turns latents into pixels for a pixel-space judge), and
  :meth:`state_dict` / :meth:`load_state_dict` for anything that must survive a resume.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ...rewards.base import LatentReward, RewardInput
from ...rewards.errors import ConfigError
from ...rewards.guidance import x0_from_velocity
from ..rollouts import ROLLOUTS, RolloutOutput, RolloutRandom, RolloutStrategy, TransformerDenoiser

__all__ = ["Recipe", "RecipeContext", "StepResult", "TrainBatch", "METHODS", "register_method", "build_method"]


@dataclass
class TrainBatch:
    """One micro-batch of prompts and their cached text embeddings ``[B, L, D]`` (zero-padded like Wan's)."""

    prompts: list[str]
    text_embeds: torch.Tensor
    indices: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class RecipeContext:
    """What a recipe can use during a step (built once by the loop)."""

    denoiser: TransformerDenoiser
    reward: LatentReward
    random: RolloutRandom
    #: Latent shape of one sample ``(C, T, H, W)``.
    sample_shape: tuple[int, int, int, int]
    device: torch.device
    accelerator: Any = None
    config: Any = None
    step: int = 0
    #: ``text_embeds(prompts) -> [B, L, D]`` from the cache: the training prompts plus :meth:`Recipe.extra_prompts`.
    text_embeds: Callable[[list[str]], torch.Tensor] | None = None
    #: ``decode(latents [B, C, T, H, W]) -> list of uint8 [F, H, W, 3] videos`` with the generator's VAE (no
    #: gradient; the VAE visits the device only for the call), e.g. to score replay-buffer samples in pixels.
    decode: Callable[[torch.Tensor], list[Any]] | None = None


@dataclass
class StepResult:
    """A micro-batch's loss (scalar, with graph) and what to log (floats or 0-d tensors)."""

    loss: torch.Tensor
    logs: dict[str, Any] = field(default_factory=dict)


METHODS: dict[str, type["Recipe"]] = {}


def register_method(cls: type["Recipe"]) -> type["Recipe"]:
    """Class decorator: make a recipe selectable as ``method: <cls.name>``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a non-empty `name`")
    METHODS[cls.name] = cls
    return cls


class Recipe(ABC):
    """Base class of reward fine-tuning recipes (see the module docstring for the hooks)."""

    name: ClassVar[str] = ""
    settings_class: ClassVar[type] = object
    default_rollout: ClassVar[str] = "one_step"
    #: Rollout kinds this recipe accepts; None accepts all.
    rollouts: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, settings: Any = None, rollout: RolloutStrategy | None = None) -> None:
        self.settings = settings if settings is not None else self.settings_class()
        self.rollout = rollout if rollout is not None else ROLLOUTS[self.default_rollout]()
        self.check_rollout(self.rollout.name)

    @classmethod
    def check_rollout(cls, kind: str | None) -> None:
        if kind is not None and cls.rollouts is not None and kind not in cls.rollouts:
            raise ConfigError(f"rollout.kind: the {cls.name} recipe supports {list(cls.rollouts)}, got {kind!r}")

    # ------------------------------------------------------------------ lifecycle hooks
    def extra_prompts(self) -> list[str]:
        """Texts besides the training prompts whose embeddings the recipe needs (e.g. captions of SFT data);
        encoded with the training prompts before the text encoder is freed, then read with ``ctx.text_embeds``."""
        return []

    def needs_reference(self) -> bool:
        """Whether the loop must provide the frozen base model's velocity (a copy of it for a full fine-tune)."""
        return False

    def check_reward(self, reward: LatentReward) -> None:
        """Raise :class:`ConfigError` if this recipe and its rollout cannot feed ``reward`` what it reads. The loop
        calls it right after loading the reward, before any generator part is loaded; override to add checks."""
        needs = reward.required_inputs
        if (RewardInput.NOISY in needs or RewardInput.TIMESTEP in needs) and not self.rollout.provides_noisy:
            raise ConfigError(
                f"rollout.kind: the {reward.kind} reward reads noisy latents (x_t + timestep), which the "
                f"{self.rollout.name!r} rollout does not produce; use rollout.kind=single_step"
            )

    def setup(self, ctx: RecipeContext) -> None:
        """Called once before training (after :meth:`check_reward`); the default checks the reward again."""
        self.check_reward(ctx.reward)

    def on_step_end(self, ctx: RecipeContext, step: int, logs: dict[str, float]) -> None:
        """After each optimizer step (online reward updates, replay buffers)."""

    def state_dict(self) -> dict[str, Any]:
        """Recipe state to checkpoint (tensors and plain data only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` when resuming."""

    # ------------------------------------------------------------------ the step
    def rollout_step(self, ctx: RecipeContext, batch: TrainBatch) -> RolloutOutput:
        shape = (len(batch), *ctx.sample_shape)
        return self.rollout(ctx.denoiser, batch.text_embeds, shape, ctx.random)

    def training_step(self, ctx: RecipeContext, batch: TrainBatch) -> StepResult:
        """One micro-batch: rollout, then :meth:`loss`. Override to add terms computed on other data."""
        out = self.rollout_step(ctx, batch)
        return self.loss(ctx, batch, out)

    @abstractmethod
    def loss(self, ctx: RecipeContext, batch: TrainBatch, out: RolloutOutput) -> StepResult:
        """The loss of one rolled-out micro-batch."""

    # ------------------------------------------------------------------ helpers for subclasses
    @staticmethod
    def _fp32(device: torch.device) -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=torch.device(device).type, enabled=False)

    def reward_inputs(self, ctx: RecipeContext, batch: TrainBatch, out: RolloutOutput) -> dict[str, Any]:
        """Keyword arguments for ``reward.reward`` from what the reward declares it reads (fp32)."""
        kwargs = ctx.reward.select_inputs(x0=out.x0, x_t=out.x_t, timestep=out.sigma_t, text_embeds=batch.text_embeds)
        return {k: None if v is None else v.float() for k, v in kwargs.items()}

    def compute_reward(self, ctx: RecipeContext, batch: TrainBatch, out: RolloutOutput) -> torch.Tensor:
        """``[B]`` rewards (higher is better), differentiable w.r.t. the generator, never w.r.t. the reward."""
        with self._fp32(ctx.device):
            return ctx.reward.reward(**self.reward_inputs(ctx, batch, out))

    def reference_velocity(self, ctx: RecipeContext, batch: TrainBatch, out: RolloutOutput) -> torch.Tensor:
        """The frozen base model's velocity at the rollout's last gradient-enabled call (cached per output)."""
        if out.v_ref is None:
            out.v_ref = ctx.denoiser.reference(out.model_input, out.model_sigma, batch.text_embeds)
        return out.v_ref

    def kl_to_reference(self, ctx: RecipeContext, batch: TrainBatch, out: RolloutOutput) -> torch.Tensor:
        """KL between the trained and the frozen base policy at the same input, for Gaussian steps: the mean
        squared velocity difference (up to a constant factor)."""
        v_ref = self.reference_velocity(ctx, batch, out)
        return F.mse_loss(out.velocity.float(), v_ref)

    def anti_drift(self, ctx: RecipeContext, batch: TrainBatch, out: RolloutOutput, margin: float) -> torch.Tensor:
        """``max(0, MSE(x0, x0_ref) - margin)``: free within ``margin`` of the base model's prediction."""
        v_ref = self.reference_velocity(ctx, batch, out)
        x0_ref = x0_from_velocity(out.model_input, v_ref, out.model_sigma)
        return torch.relu(F.mse_loss(out.x0.float(), x0_ref.float()) - margin)


def build_method(name: str, settings: Any, rollout: RolloutStrategy) -> Recipe:
    """The recipe registered as ``name``."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ConfigError(f"method.name: unknown method {name!r} (known: {', '.join(sorted(METHODS))})") from None
    return cls(settings, rollout)
