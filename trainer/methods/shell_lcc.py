"""The Shell-LCC recipe (Zhang et al., ECCV 2026): the manifold distance of a one-step prediction is the loss.

Per micro-batch (the authors' ``train_T2V_model.py``, restated):

1. rollout ``one_step``: ``eps ~ N(0, I)``, ``sigma ~ U[0.7, 1]``, ``v = G(eps, 1000 sigma, text)`` with gradient,
   ``x0_hat = eps - sigma * v``;
2. ``R_dist`` of the batch: the mean normalised shell distance over all voxels of all samples (fp32, the manifold
   frozen, gradients flowing into ``x0_hat`` only);
3. loss ``R_dist`` (plain, the paper setting) or ``|R_dist - tau|`` (band, tau = 0.444 for Wan 14B), i.e. minus
   the reward mode of the loaded reward; optional ``kl_weight * KL(base || trained)`` and the authors' anti-drift
   hinge ``anti_drift_weight * max(0, MSE(x0_hat, x0_hat_ref) - margin)`` (off in the paper setting).

There is no flow-matching term: the reward is the only loss, which is why the run is stopped early (see
:mod:`latent_rewards.trainer.monitor`). With a reward other than Shell-LCC (anything reading ``x0``) the loss is
minus its mean reward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...rewards.errors import ConfigError
from ..rollouts import RolloutOutput
from .base import Recipe, RecipeContext, StepResult, TrainBatch, register_method

__all__ = ["ShellLCCSettings", "ShellLCCRecipe"]


@dataclass
class ShellLCCSettings:
    """``method:`` fields of the Shell-LCC recipe."""

    #: Multiplies the reward term.
    reward_weight: float = 1.0
    #: Weight of the KL to the frozen base model (0: off, the paper setting).
    kl_weight: float = 0.0
    #: Weight of the anti-drift hinge (0: off, the paper setting; the authors' optional term uses 1).
    anti_drift_weight: float = 0.0
    anti_drift_margin: float = 0.05

    def validate(self, path: str) -> None:
        for name in ("reward_weight", "kl_weight", "anti_drift_weight", "anti_drift_margin"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
                raise ConfigError(f"{path}.{name}: expected a finite number >= 0, got {v!r}")
        if self.reward_weight == 0:
            raise ConfigError(f"{path}.reward_weight: must be > 0 (the reward is what this recipe optimises)")


@register_method
class ShellLCCRecipe(Recipe):
    """Shell-LCC reward fine-tuning: one pass from noise, manifold distance of ``x0_hat`` as the loss."""

    name = "shell_lcc"
    settings_class = ShellLCCSettings
    default_rollout = "one_step"
    rollouts = None  # the paper uses one_step; truncated/single_step give x0 too and are allowed for ablations

    def needs_reference(self) -> bool:
        return self.settings.kl_weight > 0 or self.settings.anti_drift_weight > 0

    def loss(self, ctx: RecipeContext, batch: TrainBatch, out: RolloutOutput) -> StepResult:
        st = self.settings
        reward_model = ctx.reward
        logs: dict[str, torch.Tensor | float] = dict(out.info)
        if hasattr(reward_model, "distance") and hasattr(reward_model, "reward_from_distance"):
            with self._fp32(ctx.device):
                r_dist = reward_model.distance(out.x0.float())
                # One R_dist per micro-batch over all its voxels, as the authors compute it; the band is applied
                # to that batch value (|mean - tau|, not mean |. - tau|).
                objective = reward_model.reward_from_distance(r_dist.mean())
            logs["r_dist"] = r_dist.detach().mean()
        else:
            objective = self.compute_reward(ctx, batch, out).mean()
        loss = -st.reward_weight * objective
        logs["reward"] = objective.detach()
        if st.kl_weight > 0:
            kl = self.kl_to_reference(ctx, batch, out)
            loss = loss + st.kl_weight * kl
            logs["kl"] = kl.detach()
        if st.anti_drift_weight > 0:
            drift = self.anti_drift(ctx, batch, out, st.anti_drift_margin)
            loss = loss + st.anti_drift_weight * drift
            logs["drift"] = drift.detach()
        return StepResult(loss=loss, logs=logs)
