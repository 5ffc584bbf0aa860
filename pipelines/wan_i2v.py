"""Reward-guided Wan image-to-video (a separate module: importing diffusers' I2V pipeline pulls in CLIP)."""

from __future__ import annotations

from diffusers import WanImageToVideoPipeline

from .guidance_mixin import RewardGuidanceMixin

__all__ = ["RewardGuidedWanImageToVideoPipeline"]


class RewardGuidedWanImageToVideoPipeline(RewardGuidanceMixin, WanImageToVideoPipeline):
    r"""Wan image-to-video (Wan2.1 with a CLIP image tower, or Wan2.2-style without) with latent-reward guidance.

    Example::

        pipe = RewardGuidedWanImageToVideoPipeline.from_pretrained("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", ...)
        pipe.load_latent_reward("path/or/user/shell-lcc-reward")
        out = pipe(image=image, prompt="...", reward_guidance_scale=0.05)
    """
