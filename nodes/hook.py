"""Reward guidance inside ComfyUI sampling: one object serves the MODEL patch and the GUIDER.

The maths is :func:`latent_rewards.rewards.guidance.guide_x0` (shared with the diffusers mixin). This module only
translates ComfyUI's hook arguments: inside the sampler, ``x`` (noisy latent), ``sigma`` and the post-CFG
``denoised`` (``x0_hat``) are already in the normalised latent space rewards read, and ComfyUI wants the moved
``x0_hat`` back. Everything runs under ``torch.inference_mode()``; :func:`guide_x0` leaves it for the gradient.

The window (``start``/``end``, fractions of the schedule) is placed exactly like ComfyUI's own ``start_percent`` /
``end_percent`` inputs (ControlNet, conditioning timestep ranges): the sampling model's
``model_sampling.percent_to_sigma`` turns them into noise levels, so any model sampling (Wan's shift 8, a
``ModelSamplingSD3`` patch, ...) works and the diffusers mixin agrees for the same shift.

Exact mode differentiates through the denoiser (CFG included). The diffusion model's weights were created in
inference mode, and inference tensors cannot be saved for backward, so :func:`exact_weights` swaps in
normal-tensor copies of them for the exact pass. The copies are made once per model weights (keyed by the model
and its patch set, e.g. an applied LoRA) and kept in a one-entry module cache: exact mode costs one extra copy of
the diffusion model in memory, plus the activations of one forward pass for the backward.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import comfy.samplers
import torch

from ..rewards.base import LatentReward
from ..rewards.guidance import GuidanceConfig, RewardTrace, evaluate_reward, guide_x0, velocity_from_x0
from .progress import TRACE_EVENT, executing_node_id, send_event
from .types import reward_on

__all__ = [
    "RewardGuidance", "RewardCFGGuider", "exact_weights", "clear_exact_cache", "sigma_window", "percent_of_sigma",
    "WRAPPER_KEY",
]

log = logging.getLogger(__name__)

#: Key of our wrappers in ``model_options["transformer_options"]["wrappers"]``.
WRAPPER_KEY = "latent_rewards"

_EXACT_LOCK = threading.Lock()
_EXACT: dict[str, Any] = {"key": None, "model": None, "tensors": {}}


def _exact_key(base_model: torch.nn.Module) -> tuple:
    return id(base_model), getattr(base_model, "current_weight_patches_uuid", None)


@contextlib.contextmanager
def exact_weights(base_model: torch.nn.Module) -> Iterator[None]:
    """Temporarily give ``base_model.diffusion_model`` normal-tensor copies of its inference-tensor weights."""
    net = base_model.diffusion_model
    with _EXACT_LOCK:
        key = _exact_key(base_model)
        model_ref = _EXACT["model"]
        if _EXACT["key"] != key or model_ref is None or model_ref() is not base_model:
            _EXACT.update(key=key, model=weakref.ref(base_model), tensors={})
            log.info("[latent-rewards] exact guidance: copying the diffusion model weights to normal tensors")
        cache: dict[str, torch.Tensor] = _EXACT["tensors"]
        swapped: list[tuple[dict, str, torch.Tensor]] = []
        try:
            with torch.inference_mode(False):
                for mod_name, mod in net.named_modules():
                    for store in (mod._parameters, mod._buffers):
                        for name, t in list(store.items()):
                            if t is None or not t.is_inference():
                                continue
                            full = f"{mod_name}.{name}"
                            copy = cache.get(full)
                            if copy is None or copy.device != t.device or copy.dtype != t.dtype:
                                copy = t.detach().clone()
                                if isinstance(t, torch.nn.Parameter):
                                    copy = torch.nn.Parameter(copy, requires_grad=False)
                                cache[full] = copy
                            swapped.append((store, name, t))
                            store[name] = copy
            yield
        finally:
            for store, name, t in swapped:
                store[name] = t


def clear_exact_cache() -> None:
    """Drop the normal-tensor weight copies kept for exact mode."""
    with _EXACT_LOCK:
        _EXACT.update(key=None, model=None, tensors={})


def sigma_window(model_sampling: Any, config: GuidanceConfig) -> tuple[float, float]:
    """``(sigma_start, sigma_end)``: the window's noise levels, from ``model_sampling.percent_to_sigma`` as ComfyUI
    core nodes compute theirs (guidance acts when ``sigma_end <= sigma <= sigma_start``)."""
    return float(model_sampling.percent_to_sigma(config.start)), float(model_sampling.percent_to_sigma(config.end))


def percent_of_sigma(model_sampling: Any, sigma: float) -> float:
    """The schedule fraction of a noise level: the inverse of ``percent_to_sigma`` (monotone decreasing), found by
    bisection so it holds for any model sampling; recorded in the trace as ``progress``."""
    lo, hi = 0.0, 1.0
    for _ in range(40):  # 2**-40: far below any window resolution
        mid = 0.5 * (lo + hi)
        if float(model_sampling.percent_to_sigma(mid)) > sigma:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _text_embeds(conds: list | None, batch: int) -> torch.Tensor | None:
    """The prompt embedding of the positive conditioning, for rewards that read text."""
    for c in conds or []:
        cross = (c.get("model_conds") or {}).get("c_crossattn")
        t = getattr(cross, "cond", None)
        if isinstance(t, torch.Tensor):
            return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t
    return None


class RewardGuidance:
    """Reward guidance state for one patched MODEL or GUIDER: the reward, the knobs and the current run's trace."""

    def __init__(self, reward: LatentReward, config: GuidanceConfig, *, guidance_node: str | None = None) -> None:
        self.reward = reward
        self.config = config.validate()
        self.guidance_node = guidance_node
        self.trace = RewardTrace()
        self._run_node: str | None = None
        self._prompt_id: str | None = None

    # ------------------------------------------------------------------ one sampling run
    def sampler_wrapper(self, executor: Callable, *args: Any, **kwargs: Any) -> Any:
        """``SAMPLER_SAMPLE`` wrapper: a fresh trace per sampling run, sent to the frontend when it ends."""
        self.trace = RewardTrace()
        self._run_node, self._prompt_id = executing_node_id()
        try:
            return executor(*args, **kwargs)
        finally:
            self._send(done=True)
            if self.trace.rewards:
                first = sum(self.trace.rewards[0]) / len(self.trace.rewards[0])
                last = sum(self.trace.rewards[-1]) / len(self.trace.rewards[-1])
                log.info(
                    "[latent-rewards] %s guidance: %d steps (%d guided), mean reward of x0_hat %.4f -> %.4f",
                    self.reward.kind, len(self.trace.sigmas), sum(self.trace.guided), first, last,
                )

    def _send(self, done: bool) -> None:
        send_event(
            TRACE_EVENT,
            {
                "node": self._run_node,
                "guidance_node": self.guidance_node,
                "prompt_id": self._prompt_id,
                "kind": self.reward.kind,
                "trace": self.trace.as_dict(),
                "done": done,
            },
        )

    # ------------------------------------------------------------------ one step
    def step(
        self,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        sigma: torch.Tensor,
        *,
        model_sampling: Any,
        denoise_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        conds: list | None = None,
    ) -> torch.Tensor:
        """Move the post-CFG prediction ``x0`` up the reward when ``sigma`` is in the window; record the trace.

        ``model_sampling`` is the sampling model's (``BaseModel.model_sampling``, object patches included): it
        places the window on this model's schedule.
        """
        s = float(sigma.flatten()[0])
        reward = reward_on(self.reward, x0.device)
        text = _text_embeds(conds, x0.shape[0]) if reward.needs_text else None
        progress = percent_of_sigma(model_sampling, s)
        if self.config.active_between(s, *sigma_window(model_sampling, self.config)):
            out = guide_x0(
                reward, x0, sigma, self.config, x_t=x_t, velocity=velocity_from_x0(x_t, x0, sigma),
                text_embeds=text, denoise_fn=denoise_fn,
            )
            self.trace.add(s, out.reward, out.step_rms, True, progress=progress)
            result = out.x0
        else:
            reward_now = evaluate_reward(reward, x0, sigma, x_t=x_t, text_embeds=text)
            self.trace.add(s, reward_now, None, False, progress=progress)
            result = x0
        self._send(done=False)
        return result

    # ------------------------------------------------------------------ MODEL patch (post-CFG hook)
    def post_cfg(self, args: dict[str, Any]) -> torch.Tensor:
        """``sampler_post_cfg_function``: works with every sampler and guider that uses ComfyUI's CFG."""
        denoise_fn = self._post_cfg_denoiser(args) if self.config.mode == "exact" else None
        return self.step(
            args["denoised"], args["input"], args["sigma"], model_sampling=args["model"].model_sampling,
            denoise_fn=denoise_fn, conds=args.get("cond"),
        )

    def _post_cfg_denoiser(self, args: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
        model = args["model"]
        options = dict(args["model_options"])
        # Re-run everything up to this hook (model calls, CFG, earlier post-CFG patches), but not us again.
        fns = list(options.get("sampler_post_cfg_function", []))
        cut = next((i for i, f in enumerate(fns) if f == self.post_cfg), len(fns))
        options["sampler_post_cfg_function"] = fns[:cut]

        def denoise(x_t: torch.Tensor) -> torch.Tensor:
            with exact_weights(model):
                return comfy.samplers.sampling_function(
                    model, x_t, args["sigma"].clone(), args["uncond"], args["cond"], args["cond_scale"],
                    model_options=options,
                )

        return denoise


class RewardCFGGuider(comfy.samplers.CFGGuider):
    """A ``CFGGuider`` that applies reward guidance to its own CFG prediction (for ``SamplerCustomAdvanced``)."""

    def __init__(self, model_patcher: Any, guidance: RewardGuidance) -> None:
        super().__init__(model_patcher)
        self.guidance = guidance

    def predict_noise(
        self, x: torch.Tensor, timestep: torch.Tensor, model_options: dict = {}, seed: int | None = None  # noqa: B006
    ) -> torch.Tensor:
        """CFG's denoised prediction (ComfyUI's name notwithstanding), moved up the reward inside the window."""
        x0 = super().predict_noise(x, timestep, model_options, seed)
        denoise_fn = None
        if self.guidance.config.mode == "exact":

            def denoise_fn(x_t: torch.Tensor) -> torch.Tensor:
                with exact_weights(self.inner_model):
                    return comfy.samplers.CFGGuider.predict_noise(self, x_t, timestep.clone(), model_options, seed)

        return self.guidance.step(
            x0, x, timestep, model_sampling=self.inner_model.model_sampling, denoise_fn=denoise_fn,
            conds=self.conds.get("positive"),
        )
