"""The guidance window: fractions of the unshifted timestep schedule (ComfyUI's start/end percent), in the core and
in the diffusers mixin, for shifted flow schedules."""

from __future__ import annotations

import math

import pytest
import torch
from guided_wan_helpers import CALL, gen

from latent_rewards.rewards.errors import ConfigError
from latent_rewards.rewards.guidance import GuidanceConfig, schedule_progress, sigma_at_progress


# ---------------------------------------------------------------------------------------------- core
def test_schedule_progress_inverts_the_shift():
    for shift in (1.0, 3.0, 5.0, 8.0):
        for t in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
            sigma = shift * t / (1 + (shift - 1) * t)  # the shifted noise level of unshifted time t
            assert schedule_progress(sigma, shift) == pytest.approx(1 - t, abs=1e-12)
            assert sigma_at_progress(1 - t, shift) == pytest.approx(sigma, abs=1e-12)
    # The example that motivated the definition: ComfyUI's shift 8 keeps sigma high for most of the steps;
    # sigma 0.4 is 92% of the way through the schedule, not 60%.
    assert schedule_progress(0.4, 8.0) == pytest.approx(12 / 13)
    with pytest.raises(ConfigError, match="shift"):
        schedule_progress(0.5, 0.0)


def test_shift_one_is_the_old_one_minus_sigma_window():
    config = GuidanceConfig(scale=0.1, start=0.2, end=0.6)
    for sigma in torch.linspace(0, 1, 101).tolist():
        expected = sigma >= 1e-4 and 0.2 - 1e-9 <= 1 - sigma <= 0.6 + 1e-9
        assert config.active_at(sigma) == config.active_at(sigma, 1.0) == expected
    assert not GuidanceConfig(scale=0.0).active_at(0.5)


def test_window_counts_steps_whatever_the_shift():
    """On a schedule uniform in unshifted time, start/end select the same steps for every shift."""
    config = GuidanceConfig(scale=0.1, start=0.25, end=0.65)
    steps = 20
    for shift in (1.0, 3.0, 5.0, 8.0):
        sigmas = [sigma_at_progress(i / steps, shift) for i in range(steps)]
        guided = [i for i, s in enumerate(sigmas) if config.active_at(s, shift)]
        assert guided == list(range(5, 14)), shift  # i / 20 in [0.25, 0.65]
        lo, hi = sigma_at_progress(0.65, shift), sigma_at_progress(0.25, shift)
        assert guided == [i for i, s in enumerate(sigmas) if config.active_between(s, hi, lo)]
    # The old 1 - sigma reading of end=0.6 with shift 8 guided 28 of 30 steps.
    old = GuidanceConfig(scale=0.1, end=0.6)
    sig30 = [sigma_at_progress(i / 30, 8.0) for i in range(30)]
    assert sum(old.active_at(s) for s in sig30) == 28 and sum(old.active_at(s, 8.0) for s in sig30) == 19


# ---------------------------------------------------------------------------------------------- diffusers
def _schedulers():
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    flow = dict(prediction_type="flow_prediction", use_flow_sigmas=True)
    return {
        "unipc-3": (UniPCMultistepScheduler(**flow, flow_shift=3.0), 3.0),
        "unipc-8": (UniPCMultistepScheduler(**flow, flow_shift=8.0), 8.0),
        "dpm-5": (DPMSolverMultistepScheduler(**flow, flow_shift=5.0), 5.0),
        "euler-5": (FlowMatchEulerDiscreteScheduler(shift=5.0), 5.0),
    }


@pytest.mark.parametrize("name", ["unipc-3", "unipc-8", "dpm-5", "euler-5"])
def test_mixin_guides_the_steps_whose_unshifted_progress_is_in_the_window(pipe, reward, name):
    from latent_rewards.pipelines.guidance_mixin import scheduler_shift

    scheduler, shift = _schedulers()[name]
    pipe.scheduler = scheduler
    assert scheduler_shift(scheduler) == shift
    pipe.load_latent_reward(reward)
    out = pipe(**{**CALL, "num_inference_steps": 10}, generator=gen(0), output_type="latent",
               reward_guidance_scale=0.05, reward_guidance_start=0.25, reward_guidance_end=0.65)
    trace = out.reward_trace
    assert len(trace.sigmas) == 10
    assert trace.progress == pytest.approx([schedule_progress(s, shift) for s in trace.sigmas], abs=1e-12)
    assert trace.guided == [0.25 <= p <= 0.65 for p in trace.progress]
    # The multistep solvers place step i at unshifted time 1 - 0.999 i / 10 and Euler at 1 - 0.997 i / 9: the
    # window keeps about the same fraction of the steps for every shift.
    expected = [3, 4, 5, 6] if not name.startswith("euler") else [3, 4, 5]
    assert [i for i, g in enumerate(trace.guided) if g] == expected
    assert all(r == [] for r, g in zip(trace.step_rms, trace.guided) if not g)


def test_dynamic_shifting_uses_the_mu_given_to_set_timesteps(pipe, reward):
    """FlowMatchEuler / UniPC with use_dynamic_shifting: the shift is exp(mu) (or mu), read from set_timesteps."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    from latent_rewards.pipelines.guidance_mixin import _GuidanceSession, scheduler_shift

    pipe.load_latent_reward(reward)
    for dynamic in (
        FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear"),
        UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, use_dynamic_shifting=True),
    ):
        linear = dynamic.config.time_shift_type == "linear"
        mu = 3.0 if linear else math.log(3.0)
        pipe.scheduler = dynamic
        with pytest.raises(ConfigError, match="dynamic shifting"):
            scheduler_shift(dynamic)
        session = _GuidanceSession(pipe, reward, GuidanceConfig(scale=0.1), record_trace=True)
        with session.installed():
            pipe.scheduler.set_timesteps(10, mu=mu)  # what a pipeline with dynamic shifting does
            progress = [session.progress(float(s)) for s in pipe.scheduler.sigmas[:-1]]
        assert scheduler_shift(dynamic, mu) == pytest.approx(3.0)
        assert "set_timesteps" not in vars(pipe.scheduler)
        # The unshifted grids the schedulers shift: Euler's linspace(1, 0.001, 10), UniPC's 1 - 0.999 i / 10.
        step = 0.999 / 9 if isinstance(dynamic, FlowMatchEulerDiscreteScheduler) else 0.0999
        assert progress == pytest.approx([step * i for i in range(10)], abs=1e-5)


def test_trace_of_one_sample_keeps_the_progress(pipe, reward):
    """``RewardTrace.select``: one video of a batch (what best-of-N keeps per candidate), progress included."""
    from latent_rewards.rewards.guidance import RewardTrace

    pipe.load_latent_reward(reward)
    out = pipe(**{**CALL, "prompt": ["a", "b"]}, generator=[gen(0), gen(1)], output_type="latent",
               reward_guidance_scale=0.05, reward_guidance_end=0.5)
    whole, second = out.reward_trace, out.reward_trace.select([1])
    assert second.rewards == [r[1:] for r in whole.rewards]
    assert second.step_rms == [s[1:] for s in whole.step_rms] and second.guided == whole.guided
    assert second.progress == whole.progress and second.sigmas == whole.sigmas
    assert RewardTrace(**second.as_dict()) == second  # JSON round trip (best-of-N caches and the CLI report)
