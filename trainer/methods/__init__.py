"""Reward fine-tuning recipes. A recipe supplies the rollout and the loss; the loop knows nothing recipe-specific.

Recipes register themselves by name (``method.name`` in the config)::

    @register_method
    class MyRecipe(Recipe):
        name = "my_recipe"
        settings_class = MySettings      # the fields of the config's `method:` section
        default_rollout = "one_step"     # a name from trainer.rollouts.ROLLOUTS

Shipped: ``shell_lcc``. PRFL and VELR plug in the same way (their rollouts, ``single_step`` and ``truncated``,
are already in :mod:`latent_rewards.trainer.rollouts`).
"""

from .base import METHODS, Recipe, RecipeContext, StepResult, TrainBatch, build_method, register_method
from .shell_lcc import ShellLCCRecipe, ShellLCCSettings

__all__ = [
    "METHODS",
    "Recipe",
    "RecipeContext",
    "StepResult",
    "TrainBatch",
    "build_method",
    "register_method",
    "ShellLCCRecipe",
    "ShellLCCSettings",
]
