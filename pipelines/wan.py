"""Reward-guided Wan pipelines and the one place that loads a Wan pipeline (CLI, demo, trainer).

``RewardGuidedWanPipeline`` is diffusers' ``WanPipeline`` plus :class:`RewardGuidanceMixin`; everything else
(``from_pretrained``, ``save_pretrained``, LoRA loading, CPU offload) is the parent's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import WanPipeline
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

from ..rewards.errors import CheckpointError, ConfigError
from ..rewards.devices import resolve_device
from . import DEFAULT_WAN_MODEL
from .guidance_mixin import RewardGuidanceMixin, reward_output_class

__all__ = [
    "DEFAULT_WAN_MODEL",
    "RewardGuidedWanPipeline",
    "RewardGuidedWanPipelineOutput",
    "load_wan_pipeline",
    "resolve_device",
    "resolve_dtype",
]


#: ``WanPipelineOutput`` plus ``rewards``, ``reward_metrics`` and ``reward_trace``.
RewardGuidedWanPipelineOutput = reward_output_class(WanPipelineOutput)


class RewardGuidedWanPipeline(RewardGuidanceMixin, WanPipeline):
    r"""Wan text-to-video with latent-reward scoring and guidance.

    Example::

        pipe = RewardGuidedWanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16)
        pipe.to("cuda")
        pipe.load_latent_reward("path/or/user/shell-lcc-reward")
        out = pipe("a red kite over the sea", num_frames=33, reward_guidance_scale=0.05, reward_guidance_end=0.8)
        print(out.rewards, out.reward_metrics["r_dist"])
    """


_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/``"auto"``: bf16 on CUDA, fp32 on CPU; or one of fp32, bf16, fp16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; expected auto, {', '.join(sorted(set(_DTYPES)))}") from None


def _swap_scheduler(pipe: Any, scheduler: str | None) -> None:
    if scheduler is None:
        return
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    cfg = pipe.scheduler.config
    shift = float(cfg.get("flow_shift", cfg.get("shift", 3.0)) or 3.0)
    if scheduler == "euler":
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    elif scheduler == "unipc":
        pipe.scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift
        )
    else:
        raise ConfigError(f"unknown scheduler {scheduler!r}; expected 'unipc' (Wan's default) or 'euler'")


def load_wan_pipeline(
    model: str | Path = DEFAULT_WAN_MODEL,
    *,
    pipeline_cls: type | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "auto",
    cpu_offload: bool = False,
    scheduler: str | None = None,
    seed: int = 0,
    **hub_kwargs: Any,
) -> Any:
    """Load a Wan pipeline (a Hub id, a local diffusers folder, or ``"tiny"``) ready to run.

    Args:
        model: ``"Wan-AI/Wan2.1-T2V-1.3B-Diffusers"`` (default), any Wan diffusers repo/folder, or ``"tiny"``
            for the tiny random model of :mod:`.tiny` (offline smoke runs).
        pipeline_cls: the class to load (default :class:`RewardGuidedWanPipeline`).
        device: ``"auto"``/``None`` (CUDA if present), ``"cuda"``, ``"cpu"``, ...
        dtype: weights dtype of the transformer and text encoder (``"auto"``: bf16 on CUDA, fp32 on CPU);
            the VAE stays fp32, as diffusers recommends for Wan.
        cpu_offload: ``enable_model_cpu_offload`` (models move to the GPU one at a time) for small GPUs.
        scheduler: ``None`` keeps the model's scheduler; ``"unipc"`` or ``"euler"`` replace it (same shift).
        seed: weights seed of the tiny model.
        **hub_kwargs: ``revision``, ``cache_dir``, ``local_files_only``, ``token`` for ``from_pretrained``.
    """
    from .tiny import TINY_MODEL_ID, build_tiny_wan_pipeline

    pipeline_cls = pipeline_cls or RewardGuidedWanPipeline
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if cpu_offload and dev.type == "cpu":
        raise ConfigError("--cpu-offload needs a GPU device (it moves models between CPU and GPU)")
    if str(model) == TINY_MODEL_ID:
        pipe = build_tiny_wan_pipeline(pipeline_cls, seed=seed)
        if torch_dtype != torch.float32:
            for name in ("transformer", "text_encoder"):
                getattr(pipe, name).to(torch_dtype)
    else:
        from diffusers import AutoencoderKLWan

        try:
            vae = AutoencoderKLWan.from_pretrained(str(model), subfolder="vae", torch_dtype=torch.float32, **hub_kwargs)
            pipe = pipeline_cls.from_pretrained(str(model), vae=vae, torch_dtype=torch_dtype, **hub_kwargs)
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"could not load the Wan pipeline {model!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                " (a diffusers Wan folder or Hub id is expected; offline, download it once first)"
            ) from None
    _swap_scheduler(pipe, scheduler)
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=dev)
    else:
        pipe.to(dev)
    return pipe
