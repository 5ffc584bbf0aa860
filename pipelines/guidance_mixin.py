"""``RewardGuidanceMixin``: latent-reward scoring and guidance for any flow-matching diffusers video pipeline.

A loader-style mixin in the spirit of diffusers' ``IPAdapterMixin`` / ``WanLoraLoaderMixin``: put it before the
pipeline class (``class MyPipe(RewardGuidanceMixin, WanPipeline)``) and the pipeline gains
:meth:`~RewardGuidanceMixin.load_latent_reward`, :meth:`~RewardGuidanceMixin.set_reward_guidance`,
:meth:`~RewardGuidanceMixin.score_latents` and the ``reward_guidance_*`` call arguments.

The parent ``__call__`` runs unchanged. For the duration of one call the mixin only *wraps* diffusers objects:

* ``scheduler.step``: it receives the post-CFG velocity and the current latent; inside the guidance window the
  velocity is replaced by the one that corresponds to the reward-moved ``x0_hat`` (the maths is
  :func:`latent_rewards.rewards.guidance.guide_x0`, shared with the ComfyUI nodes);
* forward hooks on the transformer(s) (exact mode only): they record each step's calls, which are replayed with
  gradients on ``x_t`` (CFG included) to differentiate through the denoiser;
* ``encode_prompt`` and ``vae.decode``: to read the prompt embedding (text-conditioned rewards) and the final
  latent (the reward per video) without copying the pipeline's code;
* ``scheduler.set_timesteps``: only to read the ``mu`` of dynamically shifted schedules (see :func:`scheduler_shift`).

The guidance window is a fraction of the unshifted timestep schedule (ComfyUI's ``start_percent`` convention, see
:func:`latent_rewards.rewards.guidance.schedule_progress`). diffusers' flow schedulers expose only shifted values
(their ``timesteps`` are ``sigma * num_train_timesteps``), so the mixin reads the scheduler's shift and inverts
``sigma = s t / (1 + (s - 1) t)`` at each step; the result is recorded in the trace as ``progress``.

Outside the window, with scale 0 or without a reward, the scheduler receives the untouched tensors, so the output is
bit-identical to the parent pipeline's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..rewards.base import LatentReward
from ..rewards.errors import ConfigError, LatentSpaceMismatchError
from ..rewards.guidance import (
    MIN_SIGMA,
    GuidanceConfig,
    RewardTrace,
    evaluate_reward,
    guide_x0,
    schedule_progress,
    x0_from_velocity,
)
from ..rewards.hub import load_reward
from ..rewards.latent_space import LatentSpace, available_latent_spaces, latent_space_for_constants

__all__ = [
    "RewardGuidanceMixin",
    "reward_output_class",
    "check_flow_matching_scheduler",
    "scheduler_shift",
    "pipeline_latent_space",
    "REWARD_CALL_KWARGS",
]

#: Call-time keyword arguments the mixin takes out before the parent ``__call__`` (name -> GuidanceConfig field,
#: which is also the :meth:`RewardGuidanceMixin.set_reward_guidance` argument).
REWARD_CALL_KWARGS = {
    "reward_guidance_scale": "scale",
    "reward_guidance_start": "start",
    "reward_guidance_end": "end",
    "reward_guidance_mode": "mode",
    "reward_guidance_normalize": "normalize",
    "reward_guidance_max_step": "max_step",
}

_UNSET: Any = object()
#: Relative error allowed when the exact mode re-derives the pipeline's CFG combination from the recorded calls
#: (bf16 rounding of the pipeline's own combination stays far below it; a different guidance formula does not).
_CFG_RECONSTRUCTION_TOL = 2e-2


# ---------------------------------------------------------------------------------------------- diffusers facts
def check_flow_matching_scheduler(scheduler: Any) -> None:
    """Raise :class:`ConfigError` unless ``scheduler`` is a flow-matching scheduler guidance can wrap.

    Supported: ``FlowMatchEulerDiscreteScheduler`` and multistep solvers in flow mode (``UniPCMultistepScheduler``
    / ``DPMSolverMultistepScheduler`` with ``prediction_type="flow_prediction"`` and ``use_flow_sigmas=True``,
    Wan's default). Each of them takes one ``step`` per timestep with ``x0_hat = x_t - sigma * v``.
    """
    name = type(scheduler).__name__
    config = getattr(scheduler, "config", None) or {}
    prediction = config.get("prediction_type")
    if name == "FlowMatchEulerDiscreteScheduler" and not config.get("stochastic_sampling", False):
        return
    if prediction == "flow_prediction" and config.get("use_flow_sigmas", False) and hasattr(scheduler, "sigmas"):
        return
    raise ConfigError(
        f"reward guidance needs a flow-matching scheduler: FlowMatchEulerDiscreteScheduler, or "
        f"UniPCMultistepScheduler / DPMSolverMultistepScheduler with prediction_type='flow_prediction' and "
        f"use_flow_sigmas=True (Wan's default); this pipeline has {name} (prediction_type={prediction!r}). "
        "Swap it with e.g. pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)"
    )


def scheduler_shift(scheduler: Any, mu: float | None = None) -> float:
    """The timestep shift ``s`` of a flow-matching scheduler's schedule, ``sigma = s t / (1 + (s - 1) t)``.

    The most robust source is the scheduler's own setting, not its ``timesteps``: diffusers' flow schedulers
    store shifted values there (``timesteps = sigma * num_train_timesteps``), so they cannot give the unshifted
    time. ``FlowMatchEulerDiscreteScheduler``: its ``shift`` (``set_shift`` included); UniPC / DPM-Solver in flow
    mode: ``flow_shift`` (DPM-Solver stores ``exp(mu)`` there itself). With ``use_dynamic_shifting`` (Euler,
    UniPC) the shift is the ``mu`` passed to ``set_timesteps``: diffusers' ``time_shift(mu, 1, t)`` is the same
    formula with ``s = exp(mu)`` (``time_shift_type="exponential"``) or ``s = mu`` (``"linear"``).

    Raises:
        ConfigError: dynamic shifting without a known ``mu``, or a shift that is not a positive number.
    """
    config = getattr(scheduler, "config", None) or {}
    dynamic = bool(config.get("use_dynamic_shifting", False))
    if type(scheduler).__name__ != "DPMSolverMultistepScheduler" and dynamic:
        if mu is None:
            raise ConfigError(
                f"reward guidance: {type(scheduler).__name__} uses dynamic shifting but no `mu` was passed to "
                "set_timesteps, so the window cannot be placed on its schedule"
            )
        shift = math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else float(mu)
    elif "flow_shift" in config:
        shift = config.get("flow_shift")
    else:
        shift = getattr(scheduler, "shift", config.get("shift", 1.0))
    shift = float(shift)
    if not (math.isfinite(shift) and shift > 0):
        raise ConfigError(f"reward guidance: {type(scheduler).__name__} has a timestep shift of {shift}; expected > 0")
    return shift


def _step_sigma(scheduler: Any, timestep: Any) -> float:
    """Noise level of the step the scheduler is about to take (its ``step_index`` is set on the first step)."""
    index = scheduler.step_index
    if index is None:
        begin = getattr(scheduler, "begin_index", None)
        index = begin if begin is not None else scheduler.index_for_timestep(timestep)
    return float(scheduler.sigmas[index])


def pipeline_latent_space(pipe: Any) -> LatentSpace | None:
    """The registered latent space the pipeline denoises in, recognised from its VAE's normalisation constants.

    ``None`` when the pipeline has no VAE config to read; :class:`LatentSpaceMismatchError` when the VAE
    normalises into a space latent-rewards does not know (e.g. Wan2.2's 48-channel VAE).
    """
    vae = getattr(pipe, "vae", None)
    config = getattr(vae, "config", None)
    if config is None:
        return None
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is None or std is None:
        return None
    space = latent_space_for_constants(mean, std)
    if space is not None:
        return space
    raise LatentSpaceMismatchError(
        f"the pipeline's VAE ({type(vae).__name__}, {len(mean)} channels) normalises into a latent space "
        f"latent-rewards does not know (known: {available_latent_spaces()}); rewards cannot read these latents"
    )


def _tensor_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise ConfigError(f"exact reward guidance: cannot read the transformer output of type {type(out).__name__}")


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set an instance attribute for the duration of a block and put back exactly what was there."""
    had_own = name in vars(obj)
    previous = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had_own:
            setattr(obj, name, previous)
        else:
            with contextlib.suppress(AttributeError):
                delattr(obj, name)


# ---------------------------------------------------------------------------------------------- outputs
@functools.cache
def reward_output_class(base: type) -> type:
    """A subclass of a diffusers output dataclass (e.g. ``WanPipelineOutput``) with three extra fields:
    ``rewards`` (``[B]`` reward per video, higher is better), ``reward_metrics`` (named per-video metrics of the
    reward, e.g. Shell-LCC's ``r_dist``) and ``reward_trace`` (a :class:`RewardTrace`: per step the noise level,
    the schedule progress, the reward per sample of ``x0_hat`` before the step and the guidance step's RMS)."""
    if not dataclasses.is_dataclass(base):
        raise TypeError(f"{base.__name__} is not a dataclass output")
    fields = [
        ("rewards", "torch.Tensor | None", dataclasses.field(default=None)),
        ("reward_metrics", "dict[str, torch.Tensor] | None", dataclasses.field(default=None)),
        ("reward_trace", "RewardTrace | None", dataclasses.field(default=None)),
    ]
    return dataclasses.make_dataclass(
        f"RewardGuided{base.__name__}",
        fields,
        bases=(base,),
        namespace={"__module__": __name__, "__doc__": f"{base.__name__} plus the latent reward of each video."},
    )


# ---------------------------------------------------------------------------------------------- exact mode
@dataclasses.dataclass
class _Call:
    module: torch.nn.Module
    args: tuple
    kwargs: dict[str, Any]
    output: torch.Tensor


class _CallRecorder:
    """Forward hooks that keep the denoiser calls of the current step (references only, nothing is copied)."""

    def __init__(self, modules: Sequence[torch.nn.Module]) -> None:
        self.modules = list(modules)
        self.calls: list[_Call] = []
        self.paused = False
        self._handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in self.modules]

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if not self.paused:
            self.calls.append(_Call(module, args, dict(kwargs), _tensor_output(output)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _hidden_states_of(call: _Call) -> torch.Tensor:
    h = call.kwargs.get("hidden_states", call.args[0] if call.args else None)
    if not isinstance(h, torch.Tensor):
        raise ConfigError("exact reward guidance: the transformer was not called with a hidden_states tensor")
    return h


def _input_mapper(h: torch.Tensor, latents: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """How the pipeline built the transformer input ``h`` from the latents, as a differentiable function.

    Covers Wan's three layouts: ``h = latents`` (T2V), ``h = cat([latents, condition])`` (Wan2.1 I2V) and
    ``h = mask * latents + (1 - mask) * condition`` (Wan2.2-style I2V: elements equal to the latent are the
    latent, the others are constants).
    """
    lat = latents.to(h.dtype)
    c = latents.shape[1]
    if h.shape == latents.shape:
        same = h == lat
        if bool(same.all()):
            return lambda x: x.to(h.dtype)
        if bool(same.any()):
            return lambda x: torch.where(same, x.to(h.dtype), h)
    elif (
        h.ndim == latents.ndim and h.shape[0] == latents.shape[0] and h.shape[2:] == latents.shape[2:]
        and h.shape[1] > c and torch.equal(h[:, :c], lat)
    ):
        rest = h[:, c:]
        return lambda x: torch.cat([x.to(h.dtype), rest], dim=1)
    raise ConfigError(
        f"exact reward guidance: cannot relate the transformer input {tuple(h.shape)} to the latents "
        f"{tuple(latents.shape)} (is cond/uncond batched in one call?); use reward_guidance_mode='cheap'"
    )


def _fresh(value: Any) -> Any:
    """Inference tensors (a pipeline called under ``torch.inference_mode()``) cannot enter an autograd graph."""
    if isinstance(value, torch.Tensor) and value.is_inference():
        return value.clone()
    if isinstance(value, dict):
        return {k: _fresh(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_fresh(v) for v in value)
    return value


@contextlib.contextmanager
def _replay_mode(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """During the exact replay: parameters need no gradient (only ``x_t`` does, so no ``.grad`` is ever written
    and no activations are kept for weight gradients) and activations are recomputed block by block
    (diffusers' gradient checkpointing) so memory stays near one forward pass."""
    frozen = [p for m in modules for p in m.parameters() if p.requires_grad]
    toggled = [
        m for m in modules
        if getattr(m, "_supports_gradient_checkpointing", False) and not m.is_gradient_checkpointing
    ]
    for p in frozen:
        p.requires_grad_(False)
    for m in toggled:
        m.enable_gradient_checkpointing()
    try:
        yield
    finally:
        for m in toggled:
            m.disable_gradient_checkpointing()
        for p in frozen:
            p.requires_grad_(True)


def _exact_denoiser(
    recorder: _CallRecorder, latents: torch.Tensor, velocity: torch.Tensor, sigma: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x_t -> x0_hat`` through the transformer, CFG included, rebuilt from this step's recorded calls.

    The CFG weight is recovered from the recorded outputs (least squares of ``v = u + w (c - u)``) and checked
    against the velocity the scheduler received, so pipelines with another guidance formula get a clear error
    instead of a wrong gradient.
    """
    calls = list(recorder.calls)
    if not calls or len(calls) > 2:
        raise ConfigError(
            f"exact reward guidance expects one (no CFG) or two (cond, uncond) transformer calls per step, "
            f"saw {len(calls)}; use reward_guidance_mode='cheap'"
        )
    n = velocity.float()
    outs = [c.output.float() for c in calls]
    weight: float | None = None
    if len(calls) == 1:
        rebuilt = outs[0]
    else:
        d = outs[0] - outs[1]
        denom = float(d.pow(2).sum())
        weight = float(((n - outs[1]) * d).sum()) / denom if denom > 0 else 1.0
        rebuilt = outs[1] + weight * d
    err = float((rebuilt - n).norm()) / max(float(n.norm()), 1e-12)
    if not err <= _CFG_RECONSTRUCTION_TOL:
        raise ConfigError(
            f"exact reward guidance could not reproduce the velocity from the recorded transformer calls "
            f"(relative error {err:.3g}); this pipeline combines its guidance differently - use "
            "reward_guidance_mode='cheap'"
        )
    mappers = [_input_mapper(_hidden_states_of(c), latents) for c in calls]

    def denoise(x: torch.Tensor) -> torch.Tensor:
        vs = []
        recorder.paused = True
        try:
            for call, mapper in zip(calls, mappers):
                kwargs = _fresh(call.kwargs)
                args = _fresh(call.args)
                if "hidden_states" in kwargs or not args:
                    kwargs["hidden_states"] = mapper(x)
                else:
                    args = (mapper(x), *args[1:])
                vs.append(_tensor_output(call.module(*args, **kwargs)).float())
        finally:
            recorder.paused = False
        v = vs[0] if weight is None else vs[1] + weight * (vs[0] - vs[1])
        return x0_from_velocity(x, v, sigma)

    return denoise


# ---------------------------------------------------------------------------------------------- one call
class _GuidanceSession:
    """What one guided ``__call__`` installs on the pipeline, and what it records."""

    def __init__(self, pipe: Any, reward: LatentReward, config: GuidanceConfig, record_trace: bool) -> None:
        self.pipe = pipe
        self.reward = reward
        self.config = config
        self.record_trace = record_trace
        self.trace = RewardTrace()
        self.text_embeds: torch.Tensor | None = None
        self.decoded_latents: torch.Tensor | None = None
        self.last_sample: torch.Tensor | None = None
        self.recorder: _CallRecorder | None = None
        self._warned_model_nonfinite = False
        self._mu: float | None = None

    def progress(self, sigma: float) -> float:
        """Fraction of the unshifted schedule at this step (the axis of the guidance window)."""
        return schedule_progress(sigma, scheduler_shift(self.pipe.scheduler, self._mu))

    # -- wrappers
    def _step(self, original: Callable[..., Any]) -> Callable[..., Any]:
        scheduler = self.pipe.scheduler

        def step(model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            sigma = _step_sigma(scheduler, timestep)
            progress = self.progress(sigma) if (self.config.enabled or self.record_trace) else 0.0
            active = self.config.enabled and sigma >= MIN_SIGMA and self.config.in_window(progress)
            if active or self.record_trace:
                self._check_model_output(model_output, sigma)
                model_output = self._guide(model_output, sample, sigma, progress, active)
            if self.recorder is not None:
                self.recorder.calls.clear()
            out = original(model_output, timestep, sample, *args, **kwargs)
            self.last_sample = out[0] if isinstance(out, tuple) else getattr(out, "prev_sample", None)
            return out

        return step

    def _check_model_output(self, model_output: torch.Tensor, sigma: float) -> None:
        if not self._warned_model_nonfinite and not bool(torch.isfinite(model_output).all()):
            self._warned_model_nonfinite = True
            warnings.warn(
                f"reward guidance: the denoiser returned NaN/Inf at sigma={sigma:.4f}; the video is invalid "
                "(with guidance on: lower reward_guidance_scale or keep reward_guidance_max_step set)",
                RuntimeWarning,
                stacklevel=4,
            )

    def _guide(
        self, model_output: torch.Tensor, sample: torch.Tensor, sigma: float, progress: float, active: bool
    ) -> torch.Tensor:
        x0 = x0_from_velocity(sample.float(), model_output.float(), sigma)
        if not active:
            r = evaluate_reward(self.reward, x0, sigma, x_t=sample, text_embeds=self.text_embeds)
            self.trace.add(sigma, r, None, False, progress=progress)
            return model_output
        denoise = None
        replay: contextlib.AbstractContextManager = contextlib.nullcontext()
        if self.config.mode == "exact":
            assert self.recorder is not None
            denoise = _exact_denoiser(self.recorder, sample, model_output, sigma)
            # Spans forward and backward: checkpointed blocks are recomputed during the backward pass.
            replay = _replay_mode(self.recorder.modules)
        with replay:
            res = guide_x0(
                self.reward, x0, sigma, self.config, x_t=sample, velocity=model_output,
                text_embeds=self.text_embeds, denoise_fn=denoise,
            )
        # v - (x0_new - x0) / sigma equals velocity_from_x0(x_t, x0_new) and is exact when the step is zero.
        v = model_output.float() - (res.x0.float() - x0) / max(sigma, MIN_SIGMA)
        bad = ~torch.isfinite(v.flatten(1)).all(1)
        if bool(bad.any()):
            warnings.warn(
                f"reward guidance: the guided velocity is not finite for {int(bad.sum())} samples at "
                f"sigma={sigma:.4f}; using the unguided velocity for them",
                RuntimeWarning,
                stacklevel=4,
            )
            v = torch.where(bad.view(-1, *([1] * (v.ndim - 1))), model_output.float(), v)
        self.trace.add(sigma, res.reward, res.step_rms, True, progress=progress)
        return v.to(model_output.dtype)

    def _encode_prompt(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            first = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(first, torch.Tensor):
                self.text_embeds = first.detach()
            return out

        return encode_prompt

    def _decode(self, original: Callable[..., Any]) -> Callable[..., Any]:
        vae_config = self.pipe.vae.config

        def decode(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            # Wan pipelines decode ``latents * std + mean``; undo it to score the normalised latent.
            shape = (1, -1) + (1,) * (z.ndim - 2)
            mean = torch.tensor(vae_config.latents_mean, dtype=torch.float32, device=z.device).view(shape)
            std = torch.tensor(vae_config.latents_std, dtype=torch.float32, device=z.device).view(shape)
            self.decoded_latents = ((z.detach().float() - mean) / std).detach()
            return original(z, *args, **kwargs)

        return decode

    def _set_timesteps(self, original: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(original)

        def set_timesteps(*args: Any, **kwargs: Any) -> Any:
            mu = signature.bind_partial(*args, **kwargs).arguments.get("mu")
            self._mu = float(mu) if mu is not None else None
            return original(*args, **kwargs)

        return set_timesteps

    @contextlib.contextmanager
    def installed(self) -> Iterator[_GuidanceSession]:
        pipe = self.pipe
        with contextlib.ExitStack() as stack:
            stack.enter_context(_patched(pipe.scheduler, "step", self._step(pipe.scheduler.step)))
            stack.enter_context(
                _patched(pipe.scheduler, "set_timesteps", self._set_timesteps(pipe.scheduler.set_timesteps))
            )
            if callable(getattr(pipe, "encode_prompt", None)):
                stack.enter_context(_patched(pipe, "encode_prompt", self._encode_prompt(pipe.encode_prompt)))
            vae = getattr(pipe, "vae", None)
            if vae is not None and getattr(vae.config, "latents_mean", None) is not None:
                stack.enter_context(_patched(vae, "decode", self._decode(vae.decode)))
            if self.config.enabled and self.config.mode == "exact":
                modules = [
                    m for m in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None))
                    if isinstance(m, torch.nn.Module)
                ]
                if not modules:
                    raise ConfigError("exact reward guidance needs a pipeline with a `transformer`")
                self.recorder = _CallRecorder(modules)
                stack.callback(self.recorder.remove)
            yield self

    def final_latents(self, frames: Any, output_type: str | None) -> torch.Tensor | None:
        if output_type == "latent" and isinstance(frames, torch.Tensor):
            return frames
        if self.decoded_latents is not None:
            return self.decoded_latents
        return self.last_sample


# ---------------------------------------------------------------------------------------------- the mixin
class RewardGuidanceMixin:
    """Adds latent-reward scoring and reward guidance to a flow-matching diffusers video pipeline.

    Example::

        from latent_rewards.pipelines import RewardGuidedWanPipeline

        pipe = RewardGuidedWanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16)
        pipe.load_latent_reward("user/shell-lcc-wan21")          # folder, Hub id or LatentReward
        out = pipe("a fox in the snow", reward_guidance_scale=0.05, reward_guidance_end=0.8)
        out.frames, out.rewards, out.reward_trace

    Guidance state is per pipeline instance: ``set_reward_guidance`` sets defaults, the ``reward_guidance_*``
    call arguments override them for one call.
    """

    # -- state (kept in the instance dict; loader mixins have no __init__)
    def _reward_state(self) -> dict[str, Any]:
        state = self.__dict__.get("_latent_reward_state")
        if state is None:
            state = {"rewards": {}, "active": None, "config": GuidanceConfig()}
            self.__dict__["_latent_reward_state"] = state
        return state

    @property
    def latent_reward(self) -> LatentReward | None:
        """The active latent reward (the last loaded, or the one chosen with ``set_reward_guidance``), or None."""
        state = self._reward_state()
        return state["rewards"].get(state["active"]) if state["active"] is not None else None

    @property
    def latent_reward_adapters(self) -> list[str]:
        """Names of the loaded rewards, in load order."""
        return list(self._reward_state()["rewards"])

    @property
    def reward_guidance_config(self) -> GuidanceConfig:
        """A copy of the default guidance settings (scale 0 until ``set_reward_guidance`` is called, and again
        after ``unload_latent_reward``)."""
        return dataclasses.replace(self._reward_state()["config"])

    # -- loading
    def load_latent_reward(
        self,
        path_or_repo_id_or_object: str | Path | LatentReward,
        adapter_name: str = "default",
        **hub_kwargs: Any,
    ) -> LatentReward:
        """Load a latent reward and make it the active one.

        Args:
            path_or_repo_id_or_object: a reward folder, a Hub repository id, or a :class:`LatentReward`.
            adapter_name: the name it is kept under (several can be loaded; one is active at a time).
            **hub_kwargs: ``revision``, ``cache_dir``, ``local_files_only``, ``token`` for Hub downloads.

        Raises:
            LatentSpaceMismatchError: the reward reads another latent space than this pipeline's VAE produces.
        """
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ConfigError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
        reward = load_reward(path_or_repo_id_or_object, **hub_kwargs)
        self._check_reward_space(reward)
        state = self._reward_state()
        state["rewards"][adapter_name] = reward
        state["active"] = adapter_name
        return reward

    def unload_latent_reward(self, adapter_name: str | None = None) -> None:
        """Forget one loaded reward (by name) or all of them (``None``).

        Guidance stops: the default guidance scale is reset to 0 (the window and other settings are kept), so a
        later plain call runs unguided, and the reward left active, if any, only guides again after
        ``set_reward_guidance(scale=...)``.
        """
        state = self._reward_state()
        if adapter_name is None:
            state["rewards"].clear()
        elif adapter_name in state["rewards"]:
            del state["rewards"][adapter_name]
        else:
            raise ConfigError(f"no latent reward named {adapter_name!r} is loaded (loaded: {self.latent_reward_adapters})")
        if state["active"] not in state["rewards"]:
            state["active"] = next(reversed(state["rewards"]), None)
        state["config"] = dataclasses.replace(state["config"], scale=0.0)

    def _check_reward_space(self, reward: LatentReward) -> None:
        space = pipeline_latent_space(self)
        if space is not None:
            reward.expect_latent_space(space)
            return
        transformer = getattr(self, "transformer", None)
        channels = getattr(getattr(transformer, "config", None), "out_channels", None)
        if channels is not None and channels != reward.latent_space.channels:
            raise LatentSpaceMismatchError(
                f"this {reward.kind} reward reads {reward.latent_space.name} latents "
                f"({reward.latent_space.channels} channels) but the pipeline's transformer outputs {channels}"
            )

    # -- settings
    def set_reward_guidance(
        self,
        scale: float | None = None,
        start: float | None = None,
        end: float | None = None,
        mode: str | None = None,
        normalize: str | None = None,
        max_step: float | None = _UNSET,
        adapter_name: str | None = None,
    ) -> GuidanceConfig:
        """Set the default guidance for later calls (arguments left out keep their value).

        Args:
            scale: step on ``x0_hat`` per guided step, in latent-std units per voxel with ``normalize="rms"``;
                0 turns guidance off (the reward is still evaluated for the trace and the final score). A scale
                > 0 needs a loaded reward when the pipeline is called (:class:`ConfigError` otherwise).
            start, end: the window, as fractions of the unshifted timestep schedule in [0, 1] (ComfyUI's
                ``start_percent`` / ``end_percent``): with Wan's shifted schedules ``end=0.8`` guides about the
                first 80% of the steps. Defaults 0 and 0.8.
            mode: ``"cheap"`` (gradient at ``x0_hat``; about one reward forward+backward per step) or ``"exact"``
                (through the transformer, CFG included; roughly triples the cost of a step).
            normalize: ``"rms"`` (unit-RMS gradient per sample) or ``"none"``.
            max_step: per-sample RMS cap on a step (``None``: no cap).
            adapter_name: make this loaded reward the active one.

        Returns:
            The new (validated) default :class:`GuidanceConfig`.
        """
        state = self._reward_state()
        config = self._guidance_with(
            scale=scale, start=start, end=end, mode=mode, normalize=normalize, max_step=max_step
        )
        if adapter_name is not None:
            if adapter_name not in state["rewards"]:
                raise ConfigError(
                    f"no latent reward named {adapter_name!r} is loaded (loaded: {self.latent_reward_adapters})"
                )
            state["active"] = adapter_name
        state["config"] = config
        return dataclasses.replace(config)

    def _guidance_with(self, **changes: Any) -> GuidanceConfig:
        """The default guidance with some :class:`GuidanceConfig` fields changed, validated: the one normalisation
        of :meth:`set_reward_guidance` and the ``reward_guidance_*`` call arguments. ``None`` keeps a field, except
        for ``max_step``, where ``None`` means "no cap" and only an argument left unset keeps it."""
        changes = {k: v for k, v in changes.items() if v is not _UNSET and (v is not None or k == "max_step")}
        return dataclasses.replace(self._reward_state()["config"], **changes).validate()

    # -- scoring
    def score_latents(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor | None = None,
        *,
        prompt: str | list[str] | None = None,
        return_metrics: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Score clean latents ``[B, C, T, H, W]`` of this pipeline's latent space (``output_type="latent"``).

        Args:
            latents: normalised latents, as the pipeline returns with ``output_type="latent"``.
            prompt_embeds: the prompt embedding, for text-conditioned rewards.
            prompt: alternatively the prompt(s), encoded with the pipeline's text encoder.
            return_metrics: return all the reward's named metrics (e.g. ``r_dist``) instead of the rewards.

        Returns:
            ``[B]`` rewards (higher is better), or a dict of ``[B]`` metrics.
        """
        reward = self.latent_reward
        if reward is None:
            raise ConfigError("no latent reward is loaded: call pipe.load_latent_reward(path_or_repo_id) first")
        if prompt_embeds is None and prompt is not None and reward.needs_text:
            prompt_embeds = self.encode_prompt(prompt=prompt, do_classifier_free_guidance=False)[0]
        return evaluate_reward(reward, latents, text_embeds=prompt_embeds, metrics=return_metrics)

    # -- the call
    def __call__(
        self,
        *args: Any,
        reward_guidance_scale: float | None = None,
        reward_guidance_start: float | None = None,
        reward_guidance_end: float | None = None,
        reward_guidance_mode: str | None = None,
        reward_guidance_normalize: str | None = None,
        reward_guidance_max_step: float | None = _UNSET,
        reward_trace: bool = True,
        **kwargs: Any,
    ) -> Any:
        """The parent pipeline's ``__call__`` with latent-reward guidance.

        Extra keyword arguments (each overrides :meth:`set_reward_guidance` for this call):
        ``reward_guidance_scale``, ``reward_guidance_start``, ``reward_guidance_end``, ``reward_guidance_mode``,
        ``reward_guidance_normalize``, ``reward_guidance_max_step``; ``reward_trace=False`` skips scoring
        ``x0_hat`` at unguided steps.

        With a reward loaded the output is the parent's output class extended by ``rewards`` ``[B]``,
        ``reward_metrics`` and ``reward_trace`` (see :func:`reward_output_class`); with ``return_dict=False``
        the tuple is ``(frames, rewards, reward_metrics, reward_trace)``. Without a reward the parent's output
        is returned unchanged.

        Raises:
            ConfigError: guidance is on (scale > 0, from the call or :meth:`set_reward_guidance`) but no reward
                is loaded; bad settings; a scheduler that is not flow matching.
        """
        given = locals()  # the explicit reward_guidance_* arguments, mapped to their fields by REWARD_CALL_KWARGS
        config = self._guidance_with(**{field: given[name] for name, field in REWARD_CALL_KWARGS.items()})
        reward = self.latent_reward
        parent_call = super().__call__  # type: ignore[misc]
        if reward is None:
            if config.enabled:
                where = "reward_guidance_scale" if reward_guidance_scale is not None else "set_reward_guidance(scale=...)"
                raise ConfigError(
                    f"reward guidance is on ({where} = {config.scale}) but no latent reward is loaded: call "
                    "pipe.load_latent_reward(path_or_repo_id) first, or pass reward_guidance_scale=0"
                )
            return parent_call(*args, **kwargs)

        check_flow_matching_scheduler(self.scheduler)  # type: ignore[attr-defined]
        self._check_reward_space(reward)
        signature = inspect.signature(parent_call)
        bound = signature.bind_partial(*args, **kwargs)
        call_kwargs = dict(bound.arguments)
        for name, param in signature.parameters.items():
            if param.kind in (param.VAR_POSITIONAL, param.POSITIONAL_ONLY):
                raise TypeError(f"{type(self).__name__}: unsupported __call__ signature ({name})")
            if param.kind == param.VAR_KEYWORD and name in call_kwargs:
                call_kwargs.update(call_kwargs.pop(name))
        return_dict = call_kwargs.pop("return_dict", True)
        output_type = call_kwargs.get("output_type", getattr(signature.parameters.get("output_type"), "default", None))
        reward.to(self._execution_device)  # type: ignore[attr-defined]

        session = _GuidanceSession(self, reward, config, record_trace=reward_trace)
        with session.installed():
            out = parent_call(**call_kwargs, return_dict=True)
        fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        frames = next(iter(fields.values()))
        final = session.final_latents(frames, output_type)
        metrics = None
        if final is not None:
            metrics = evaluate_reward(reward, final, text_embeds=session.text_embeds, metrics=True)
        result = reward_output_class(type(out))(
            **fields,
            rewards=None if metrics is None else metrics["reward"],
            reward_metrics=metrics,
            reward_trace=session.trace,
        )
        if not return_dict:
            return (frames, result.rewards, result.reward_metrics, result.reward_trace)
        return result
