"""``LatentRewardsGuidance`` (MODEL -> MODEL patch) and ``LatentRewardsGuider`` (a reward-guided CFG GUIDER).

The MODEL patch adds a post-CFG hook, so it works with the stock ``KSampler``, ``KSamplerAdvanced`` and
``SamplerCustomAdvanced`` (with any guider built on ComfyUI's CFG); the GUIDER is for ``SamplerCustomAdvanced``
graphs that want guidance without patching the model. Both use :class:`~.hook.RewardGuidance`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import comfy.patcher_extension
from comfy_api.latest import io

from ..rewards.base import LatentReward
from ..rewards.guidance import (
    DEFAULT_GUIDANCE_END,
    DEFAULT_GUIDANCE_START,
    GUIDANCE_MODES,
    NORMALIZE_MODES,
    GuidanceConfig,
)
from .hook import WRAPPER_KEY, RewardCFGGuider, RewardGuidance
from .types import CATEGORY, LatentRewardType, check_model_matches_reward, node_id_of

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher

__all__ = ["LatentRewardsGuidance", "LatentRewardsGuider", "guidance_inputs", "guidance_config"]

_EXACT_NOTE = (
    "exact: gradient through the denoiser (CFG included); about 3x the cost of a step, keeps a normal-tensor copy "
    "of the diffusion model weights (one more model in memory) and one forward pass of activations. "
    "cheap: gradient at the prediction only, no extra model pass."
)


def guidance_inputs() -> list[io.Input]:
    """The knobs shared by the MODEL patch and the GUIDER (same names as the diffusers helper)."""
    return [
        LatentRewardType.Input("reward", tooltip="The reward to climb (from Latent Reward Loader)."),
        io.Float.Input(
            "scale", default=0.05, min=0.0, max=10.0, step=0.005,
            tooltip="Step on the predicted clean latent per guided step. With normalize=rms it is in latent-std "
            "units per voxel; 0 disables guidance (the reward is still traced).",
        ),
        io.Float.Input(
            "start", default=DEFAULT_GUIDANCE_START, min=0.0, max=1.0, step=0.01,
            tooltip="Start of the guidance window as a fraction of the schedule, like ComfyUI's start_percent "
            "(the model's sampling shift is taken into account): 0 = the first step.",
        ),
        io.Float.Input(
            "end", default=DEFAULT_GUIDANCE_END, min=0.0, max=1.0, step=0.01,
            tooltip="End of the guidance window as a fraction of the schedule, like ComfyUI's end_percent: 0.8 "
            "guides about the first 80% of the steps and leaves the last, low-noise ones alone; 1 = every step.",
        ),
        io.Combo.Input(
            "normalize", options=list(NORMALIZE_MODES), default="rms",
            tooltip="rms: rescale the reward gradient to unit RMS per video, so scale is a step size. "
            "none: raw gradient times scale.",
        ),
        io.Combo.Input("mode", options=list(GUIDANCE_MODES), default="cheap", tooltip=_EXACT_NOTE),
        io.Float.Input(
            "max_step", default=1.0, min=0.0, max=100.0, step=0.01,
            tooltip="Cap on the RMS of one step per video (a guard against extreme scales); 0 = no cap.",
        ),
    ]


def guidance_config(scale: float, start: float, end: float, normalize: str, mode: str, max_step: float) -> GuidanceConfig:
    """The validated core :class:`GuidanceConfig` of the node inputs (``max_step`` 0 means no cap)."""
    return GuidanceConfig(
        scale=float(scale), start=float(start), end=float(end), normalize=normalize, mode=mode,
        max_step=float(max_step) if max_step and max_step > 0 else None,
    ).validate()


def _traced_clone(
    model: ModelPatcher, reward: LatentReward, config: GuidanceConfig, node_id: str | None, *, what: str
) -> tuple[ModelPatcher, RewardGuidance]:
    """What both nodes start from: the latent spaces checked, a :class:`RewardGuidance`, and a clone of ``model``
    whose sampling runs each start a fresh trace (sent to the frontend when they end)."""
    check_model_matches_reward(model, reward, what=what)
    guidance = RewardGuidance(reward, config, guidance_node=node_id)
    patched = model.clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY, guidance.sampler_wrapper)
    return patched, guidance


class LatentRewardsGuidance(io.ComfyNode):
    """Patch a MODEL so that every sampler climbs the reward during its guidance window."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LatentRewardsGuidance",
            display_name="Latent Reward Guidance",
            category=CATEGORY,
            description=(
                "Reward guidance as a model patch: after CFG, the predicted clean latent is moved up the reward's "
                "gradient during the chosen part of the schedule (start/end percent, as in ComfyUI's other nodes). "
                "Works with KSampler, KSamplerAdvanced and "
                "SamplerCustomAdvanced. The reward must read this model's latents (e.g. a wan2.1 reward with "
                "Wan2.1 models)."
            ),
            inputs=[io.Model.Input("model", tooltip="The diffusion model to guide (e.g. Wan2.1 T2V)."), *guidance_inputs()],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with reward guidance applied.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls, model: ModelPatcher, reward: LatentReward, scale: float, start: float, end: float, normalize: str,
        mode: str, max_step: float,
    ) -> io.NodeOutput:
        """Clone ``model`` and add the post-CFG guidance hook and the per-run trace wrapper."""
        config = guidance_config(scale, start, end, normalize, mode, max_step)
        patched, guidance = _traced_clone(model, reward, config, node_id_of(cls), what="Latent Reward Guidance")
        patched.set_model_sampler_post_cfg_function(guidance.post_cfg)
        return io.NodeOutput(patched)


class LatentRewardsGuider(io.ComfyNode):
    """A CFG guider with reward guidance, for SamplerCustomAdvanced."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LatentRewardsGuider",
            display_name="Latent Reward Guider (CFG)",
            category=CATEGORY,
            description=(
                "A GUIDER for SamplerCustomAdvanced: classifier-free guidance, then reward guidance on the "
                "predicted clean latent during the chosen part of the schedule. The input model is not modified."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (e.g. Wan2.1 T2V)."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning (the prompt)."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning."),
                io.Float.Input(
                    "cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                    tooltip="Classifier-free guidance scale (Wan2.1 uses about 5-6).",
                ),
                *guidance_inputs(),
            ],
            outputs=[io.Guider.Output(display_name="guider", tooltip="Plug into SamplerCustomAdvanced.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls, model: ModelPatcher, positive: list, negative: list, cfg: float, reward: LatentReward, scale: float,
        start: float, end: float, normalize: str, mode: str, max_step: float,
    ) -> io.NodeOutput:
        """A :class:`RewardCFGGuider` over a clone of ``model`` with the given conditioning and CFG scale."""
        config = guidance_config(scale, start, end, normalize, mode, max_step)
        m, guidance = _traced_clone(model, reward, config, node_id_of(cls), what="Latent Reward Guider")
        guider = RewardCFGGuider(m, guidance)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)
