"""diffusers integration: reward guidance mixin, guided Wan pipelines, scoring and best-of-N.

Pipeline names are imported lazily, so importing :mod:`latent_rewards.pipelines` (or its ``tiny`` module) does not
import diffusers until a pipeline class is used.
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported eagerly (torch and the core only): the function `best_of_n` must win over its module of the same name,
# whichever of `from latent_rewards.pipelines import best_of_n` and `import ...pipelines.best_of_n` runs first.
from .best_of_n import BestOfNResult, best_of_n, decode_latents  # noqa: E402

_EXPORTS = {
    "RewardGuidanceMixin": ".guidance_mixin",
    "reward_output_class": ".guidance_mixin",
    "check_flow_matching_scheduler": ".guidance_mixin",
    "RewardGuidedWanPipeline": ".wan",
    "RewardGuidedWanImageToVideoPipeline": ".wan_i2v",
    "RewardGuidedWanPipelineOutput": ".wan",
    "load_wan_pipeline": ".wan",
    "write_video": ".video",
}

#: The real default model of ``load_wan_pipeline`` and ``latent-rewards generate`` (defined here: importing it
#: must not import diffusers, e.g. for ``--help``).
DEFAULT_WAN_MODEL = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"

__all__ = [*_EXPORTS, "DEFAULT_WAN_MODEL", "BestOfNResult", "best_of_n", "decode_latents"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
