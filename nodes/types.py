"""The ``LATENT_REWARD`` socket type and the glue between ComfyUI objects and the reward core.

* ``LatentReward`` objects travel between nodes as ``LATENT_REWARD``; they are ordinary (non-inference) tensors
  created by the loader outside ``torch.inference_mode()``, so guidance can take gradients through them.
* A ComfyUI ``LATENT`` holds *raw* VAE latents; rewards read the *normalised* space. :func:`normalised_latents`
  converts with the MODEL's own ``latent_format.process_in`` (what the sampler used) or, without a model, with the
  reward core's description of the named latent space. Latent-space mismatches and wrong shapes are errors.
"""

from __future__ import annotations

from typing import Any

import torch
from comfy_api.latest import io

from ..rewards.base import LatentReward
from ..rewards.errors import LatentShapeError, LatentSpaceMismatchError
from ..rewards.latent_space import available_latent_spaces, get_latent_space

__all__ = [
    "CATEGORY",
    "LatentRewardType",
    "COMFY_LATENT_FORMATS",
    "model_latent_space",
    "check_model_matches_reward",
    "normalised_latents",
    "reward_on",
    "latent_format_options",
    "node_id_of",
]

CATEGORY = "latent_rewards"

#: The socket type carrying a loaded :class:`~latent_rewards.rewards.LatentReward`.
LatentRewardType = io.Custom("LATENT_REWARD")

#: ComfyUI ``comfy.latent_formats`` class name -> latent-space name of the reward core.
COMFY_LATENT_FORMATS: dict[str, str] = {"Wan21": "wan2.1", "Wan22": "wan2.2"}


def model_latent_space(model: Any) -> tuple[str, int, Any]:
    """``(space name, channels, latent_format object)`` of a ComfyUI MODEL (a ``ModelPatcher``)."""
    fmt = model.get_model_object("latent_format")
    cls_name = type(fmt).__name__
    return COMFY_LATENT_FORMATS.get(cls_name, cls_name), int(getattr(fmt, "latent_channels", -1)), fmt


def _same_space(reward: LatentReward, name: str) -> bool:
    try:
        return get_latent_space(name).name == reward.latent_space.name
    except LatentSpaceMismatchError:  # a space the core does not know (e.g. wan2.2 today)
        return False


def check_model_matches_reward(model: Any, reward: LatentReward, *, what: str) -> Any:
    """Raise :class:`LatentSpaceMismatchError` unless the MODEL denoises the latent space the reward reads.

    Returns the model's ``latent_format`` object.
    """
    name, channels, fmt = model_latent_space(model)
    if not _same_space(reward, name):
        space = reward.latent_space
        raise LatentSpaceMismatchError(
            f"{what}: the {reward.kind} reward reads {space.name} latents ({space.channels} channels) but the model "
            f"works in {type(fmt).__name__} latents ({channels} channels); use a reward trained on this model's "
            f"latents, or a {space.name} model"
        )
    return fmt


def latent_format_options() -> list[str]:
    """Names offered by the latent-format dropdown (the latent spaces the reward core knows)."""
    return available_latent_spaces()


def normalised_latents(
    latent: dict, reward: LatentReward, *, model: Any | None = None, latent_format: str | None = None, what: str
) -> torch.Tensor:
    """A ComfyUI ``LATENT`` dict -> normalised fp32 latents ``[B, C, T, H, W]`` for ``reward``, checked."""
    if not isinstance(latent, dict) or "samples" not in latent:
        raise LatentShapeError(f"{what}: expected a LATENT (a dict with 'samples'), got {type(latent).__name__}")
    samples = latent["samples"]
    if getattr(samples, "is_nested", False):
        raise LatentShapeError(f"{what}: nested LATENT batches (mixed shapes) are not supported; score them one by one")
    space = reward.latent_space
    try:
        space.check(samples, name=f"{what}: LATENT samples")
    except LatentShapeError as e:
        raise LatentShapeError(f"{e} (this {reward.kind} reward reads {space.name} video latents)") from None
    if model is not None:
        fmt = check_model_matches_reward(model, reward, what=what)
        with torch.inference_mode(False):
            return fmt.process_in(samples.detach().float().clone()).float()
    name = latent_format or space.name
    if not _same_space(reward, name):
        raise LatentSpaceMismatchError(
            f"{what}: latent_format is {name!r} but the {reward.kind} reward reads {space.name} latents; "
            f"pick {space.name!r} or a reward trained on {name} latents"
        )
    with torch.inference_mode(False):
        return space.normalise(samples.detach().float().clone())


def reward_on(reward: LatentReward, device: torch.device | str) -> LatentReward:
    """Move the (cached, shared) reward to ``device`` outside inference mode, so its weights stay normal tensors."""
    device = torch.device(device)
    if reward.device != device:
        with torch.inference_mode(False):
            reward.to(device)
    return reward


def node_id_of(cls: type[io.ComfyNode]) -> str | None:
    """The graph id of the node being executed (set by the executor on the per-run class clone; ``None`` when a
    node is called directly from a script or test)."""
    return getattr(cls.hidden, "unique_id", None) if cls.hidden is not None else None
