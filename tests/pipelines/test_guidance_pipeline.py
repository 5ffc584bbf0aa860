"""RewardGuidanceMixin on real (tiny, random) diffusers Wan pipelines."""

from __future__ import annotations

import warnings

import pytest
import torch
from guided_wan_helpers import CALL, gen

from latent_rewards.rewards.errors import ConfigError, LatentSpaceMismatchError
from latent_rewards.rewards.guidance import DEFAULT_GUIDANCE_END, GuidanceConfig, schedule_progress


def latents_of(p, seed=0, **kw):
    return p(**{**CALL, **kw}, generator=gen(seed), output_type="latent")


# ---------------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
@pytest.mark.parametrize("cfg", [5.0, 1.0])
def test_scale_zero_is_bit_identical_to_wan_pipeline(pipe, plain_pipe, reward, scheduler, cfg):
    from latent_rewards.pipelines.tiny import tiny_scheduler

    pipe.scheduler = tiny_scheduler(scheduler)
    plain_pipe.scheduler = tiny_scheduler(scheduler)
    ref = latents_of(plain_pipe, guidance_scale=cfg).frames
    assert torch.equal(latents_of(pipe, guidance_scale=cfg).frames, ref)  # no reward loaded
    pipe.load_latent_reward(reward)
    out = latents_of(pipe, guidance_scale=cfg, reward_guidance_scale=0.0)
    assert torch.equal(out.frames, ref)
    # The reward is still evaluated: a full trace and the final score, equal to scoring the output directly.
    assert len(out.reward_trace.sigmas) == CALL["num_inference_steps"]
    assert not any(out.reward_trace.guided)
    torch.testing.assert_close(out.rewards, reward.reward(ref))


def test_decoded_output_identical_and_scored_from_the_final_latent(pipe, plain_pipe, reward):
    import numpy as np

    ref = plain_pipe(**CALL, generator=gen(3), output_type="np").frames
    pipe.load_latent_reward(reward)
    out = pipe(**CALL, generator=gen(3), output_type="np")
    assert np.array_equal(out.frames, ref)
    lat = latents_of(pipe, 3)
    torch.testing.assert_close(out.rewards, lat.rewards, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- effect
@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
def test_guidance_lowers_final_r_dist_for_several_seeds(pipe, reward, scheduler):
    from latent_rewards.pipelines.tiny import tiny_scheduler

    pipe.scheduler = tiny_scheduler(scheduler)
    pipe.load_latent_reward(reward)
    for seed in (0, 1, 2):
        base = latents_of(pipe, seed)
        guided = latents_of(pipe, seed, reward_guidance_scale=0.05)
        assert guided.reward_metrics["r_dist"].item() < base.reward_metrics["r_dist"].item() - 0.05
        torch.testing.assert_close(guided.rewards, -guided.reward_metrics["r_dist"])
        trace = guided.reward_trace
        # The default window (0 .. 0.8 of the schedule): UniPC's 5 steps sit at 0, 0.2, .., 0.8 (all guided),
        # Euler's at 0, 0.25, .., 1.0 (the last one is not).
        assert trace.guided == [p <= DEFAULT_GUIDANCE_END + 1e-9 for p in trace.progress]
        assert sum(trace.guided) == (5 if scheduler == "unipc" else 4)
        assert all(abs(s[0] - 0.05) < 1e-6 for s, g in zip(trace.step_rms, trace.guided) if g)


def test_window_limits_the_guided_steps(pipe, reward):
    pipe.load_latent_reward(reward)
    pipe.set_reward_guidance(scale=0.05, start=0.0, end=0.5)
    out = latents_of(pipe)
    trace = out.reward_trace
    # The tiny pipeline's UniPC has flow_shift 3: progress is measured on the unshifted schedule.
    assert trace.progress == pytest.approx([schedule_progress(s, 3.0) for s in trace.sigmas], abs=1e-12)
    assert trace.guided == [p <= 0.5 for p in trace.progress] == [True, True, True, False, False]
    assert all(r == [] for r, g in zip(trace.step_rms, trace.guided) if not g)


@pytest.mark.parametrize("cfg", [5.0, 1.0])
def test_batch_and_num_videos_per_prompt(pipe, reward, cfg):
    pipe.load_latent_reward(reward)
    kw = dict(prompt=["a cat", "a dog"], num_videos_per_prompt=2, guidance_scale=cfg)
    gens = [gen(s) for s in range(4)]
    base = pipe(**{**CALL, **kw}, generator=gens, output_type="latent")
    gens = [gen(s) for s in range(4)]
    guided = pipe(**{**CALL, **kw}, generator=gens, output_type="latent", reward_guidance_scale=0.05)
    assert guided.frames.shape[0] == 4 and guided.rewards.shape == (4,)
    assert all(len(r) == 4 for r in guided.reward_trace.rewards)
    assert bool((guided.reward_metrics["r_dist"] < base.reward_metrics["r_dist"]).all())


def test_exact_mode_runs_and_improves(pipe, reward):
    pipe.load_latent_reward(reward)
    base = latents_of(pipe, 1)
    exact = latents_of(pipe, 1, reward_guidance_scale=0.05, reward_guidance_mode="exact")
    assert exact.reward_metrics["r_dist"].item() < base.reward_metrics["r_dist"].item() - 0.05


def test_chunked_reward_gives_the_same_guided_sample(pipe, reward):
    pipe.load_latent_reward(reward)
    reward.chunk_size = None
    whole = latents_of(pipe, 2, reward_guidance_scale=0.05).frames
    reward.chunk_size = 7  # 192 voxels per sample in 28 chunks
    chunked = latents_of(pipe, 2, reward_guidance_scale=0.05).frames
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- no state left
def _transformer_state(t):
    return (
        [p.requires_grad for p in t.parameters()],
        t.is_gradient_checkpointing,
        len(t._forward_hooks) + len(t._forward_pre_hooks),
    )


@pytest.mark.parametrize("mode", ["cheap", "exact"])
def test_no_gradients_or_state_left_behind(pipe, reward, mode):
    t = pipe.transformer
    before = _transformer_state(t)
    pipe.load_latent_reward(reward)
    out = latents_of(pipe, reward_guidance_scale=0.05, reward_guidance_mode=mode)
    assert torch.is_grad_enabled()
    assert not out.frames.requires_grad and not out.rewards.requires_grad
    assert all(p.grad is None for p in t.parameters())
    assert all(p.grad is None for p in reward.parameters())
    assert _transformer_state(t) == before
    assert "step" not in vars(pipe.scheduler)
    assert "encode_prompt" not in vars(pipe) and "decode" not in vars(pipe.vae)
    with torch.no_grad():
        latents_of(pipe, reward_guidance_scale=0.05, reward_guidance_mode=mode)
        assert not torch.is_grad_enabled()


@pytest.mark.parametrize("mode", ["cheap", "exact"])
def test_works_under_inference_mode(pipe, reward, mode):
    pipe.load_latent_reward(reward)
    base = latents_of(pipe, 4)
    with torch.inference_mode():
        out = latents_of(pipe, 4, reward_guidance_scale=0.05, reward_guidance_mode=mode)
    assert out.reward_metrics["r_dist"].item() < base.reward_metrics["r_dist"].item()


def test_state_restored_when_the_call_fails(pipe, reward):
    pipe.load_latent_reward(reward)
    with pytest.raises(ValueError):
        pipe(**{**CALL, "prompt": None}, generator=gen(0), reward_guidance_scale=0.05)  # no prompt
    assert "step" not in vars(pipe.scheduler) and "encode_prompt" not in vars(pipe)


# ---------------------------------------------------------------------------------------------- exact internals
def test_exact_denoiser_reproduces_the_cfg_prediction_and_differentiates_through_it(pipe):
    from latent_rewards.pipelines.guidance_mixin import _CallRecorder, _exact_denoiser, _replay_mode

    t = pipe.transformer
    torch.manual_seed(0)
    x = torch.randn(2, 16, 3, 8, 8)
    cond, uncond = torch.randn(2, 12, 4096), torch.randn(2, 12, 4096)
    step = torch.full((2,), 700.0)
    rec = _CallRecorder([t])
    try:
        with torch.no_grad():
            c = t(hidden_states=x, timestep=step, encoder_hidden_states=cond, return_dict=False)[0]
            u = t(hidden_states=x, timestep=step, encoder_hidden_states=uncond, return_dict=False)[0]
        v = u + 5.0 * (c - u)
        denoise = _exact_denoiser(rec, x, v, 0.7)
        leaf = x.clone().requires_grad_(True)
        with torch.enable_grad(), _replay_mode([t]):
            x0 = denoise(leaf)
            (g,) = torch.autograd.grad(x0.pow(2).sum(), leaf)
        torch.testing.assert_close(x0.detach(), x - 0.7 * v, rtol=1e-4, atol=1e-5)
        # d/dx sum(x0^2) = 2 x0 (I - 0.7 dv/dx): differs from the cheap-mode gradient 2 x0 through the model.
        assert torch.isfinite(g).all() and not torch.allclose(g, 2 * x0.detach(), atol=1e-6)
        # A pipeline that combines its calls differently is refused instead of guided with a wrong gradient.
        with pytest.raises(ConfigError, match="cheap"):
            _exact_denoiser(rec, x, 0.5 * v + 0.3 * torch.randn_like(v), 0.7)
    finally:
        rec.remove()
    assert all(p.grad is None for p in t.parameters())


# ---------------------------------------------------------------------------------------------- bad input
def test_reward_for_another_latent_space_is_refused(pipe):
    from latent_rewards import ShellLCC
    from latent_rewards.rewards.latent_space import WAN21, LatentSpace, register_latent_space

    register_latent_space(LatentSpace(
        name="test-other16", channels=16, mean=tuple(0.0 for _ in range(16)), std=tuple(1.0 for _ in range(16)),
    ))
    other = ShellLCC(num_bases=8, hidden_dim=8, latent_space="test-other16").freeze()
    with pytest.raises(LatentSpaceMismatchError, match="wan2.1"):
        pipe.load_latent_reward(other)
    assert pipe.latent_reward is None
    assert WAN21.name == "wan2.1"


def test_non_flow_matching_scheduler_is_refused(pipe, reward):
    from diffusers import DDIMScheduler

    pipe.load_latent_reward(reward)
    pipe.scheduler = DDIMScheduler()
    with pytest.raises(ConfigError, match="flow-matching scheduler.*DDIMScheduler"):
        latents_of(pipe, reward_guidance_scale=0.05)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"reward_guidance_start": -0.1},
        {"reward_guidance_end": 1.5},
        {"reward_guidance_start": 0.8, "reward_guidance_end": 0.2},
        {"reward_guidance_scale": -1.0},
        {"reward_guidance_mode": "fast"},
        {"reward_guidance_scale": float("nan")},
    ],
)
def test_bad_guidance_settings_are_errors(pipe, reward, kwargs):
    pipe.load_latent_reward(reward)
    with pytest.raises(ConfigError, match="reward guidance"):
        latents_of(pipe, **kwargs)
    setting = {k.removeprefix("reward_guidance_"): v for k, v in kwargs.items()}
    with pytest.raises(ConfigError, match="reward guidance"):
        pipe.set_reward_guidance(**setting)
    assert pipe.reward_guidance_config == GuidanceConfig()


def test_guidance_without_a_reward_is_an_error(pipe, plain_pipe, reward):
    with pytest.raises(ConfigError, match="load_latent_reward"):
        latents_of(pipe, reward_guidance_scale=0.1)
    with pytest.raises(ConfigError, match="load_latent_reward"):
        pipe.score_latents(torch.randn(1, 16, 3, 8, 8))
    # The default set with set_reward_guidance is checked at the call too, not silently ignored.
    pipe.set_reward_guidance(scale=0.1)
    with pytest.raises(ConfigError, match=r"set_reward_guidance\(scale=...\) = 0.1.*load_latent_reward"):
        latents_of(pipe)
    ref = latents_of(plain_pipe).frames
    assert torch.equal(latents_of(pipe, reward_guidance_scale=0.0).frames, ref)  # explicitly off for one call


def test_unloading_the_reward_turns_guidance_off(pipe, plain_pipe, reward, small_shell_lcc):
    ref = latents_of(plain_pipe).frames
    pipe.load_latent_reward(reward)
    pipe.set_reward_guidance(scale=0.05, end=0.6)
    assert not torch.equal(latents_of(pipe).frames, ref)
    pipe.unload_latent_reward()
    assert pipe.reward_guidance_config == GuidanceConfig(scale=0.0, end=0.6)  # only the scale is reset
    assert torch.equal(latents_of(pipe).frames, ref)
    # Unloading one of two rewards does not hand the scale over to the one left active.
    pipe.load_latent_reward(reward)
    pipe.load_latent_reward(small_shell_lcc(1), adapter_name="second")
    pipe.set_reward_guidance(scale=0.05)
    pipe.unload_latent_reward("second")
    out = latents_of(pipe)
    assert pipe.latent_reward is reward and torch.equal(out.frames, ref) and not any(out.reward_trace.guided)


def test_extreme_scale_is_clamped_with_a_warning(pipe, reward):
    pipe.load_latent_reward(reward)
    with pytest.warns(RuntimeWarning, match="clamped"):
        out = latents_of(pipe, reward_guidance_scale=1e30, reward_guidance_normalize="none")
    assert torch.isfinite(out.frames).all()
    assert all(abs(s[0] - 1.0) < 1e-6 for s in out.reward_trace.step_rms)  # max_step=1 per step


def test_nan_reward_gradient_skips_the_step_with_a_warning(pipe, plain_pipe):
    from latent_rewards.rewards.base import LatentReward
    from latent_rewards.rewards.shell_lcc import ShellLCCConfig

    class NaNGradReward(LatentReward):
        """Finite value, NaN gradient (sqrt at 0): what a broken reward or an overflow produces."""

        kind = "test-nan-grad"
        config_class = ShellLCCConfig

        def reward(self, x0=None, **_):
            return torch.sqrt(x0.float() * 0.0).flatten(1).sum(1)

    ref = latents_of(plain_pipe, 5).frames
    pipe.load_latent_reward(NaNGradReward(ShellLCCConfig(num_bases=4, hidden_dim=4)))
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        out = latents_of(pipe, 5, reward_guidance_scale=0.5)
    assert torch.equal(out.frames, ref)
    assert all(s == [0.0] for s in out.reward_trace.step_rms)


# ---------------------------------------------------------------------------------------------- API
def test_adapters_scoring_and_tuple_output(pipe, reward, small_shell_lcc):
    other = small_shell_lcc(1)
    pipe.load_latent_reward(reward)
    pipe.load_latent_reward(other, adapter_name="second")
    assert pipe.latent_reward_adapters == ["default", "second"] and pipe.latent_reward is other
    pipe.set_reward_guidance(adapter_name="default", scale=0.02)
    assert pipe.latent_reward is reward and pipe.reward_guidance_config.scale == 0.02
    frames, rewards, metrics, trace = pipe(**CALL, generator=gen(0), output_type="latent", return_dict=False)
    torch.testing.assert_close(pipe.score_latents(frames), rewards)
    torch.testing.assert_close(pipe.score_latents(frames, return_metrics=True)["r_dist"], metrics["r_dist"])
    assert len(trace.sigmas) == CALL["num_inference_steps"] and all(trace.guided)
    with pytest.raises(ConfigError, match="no latent reward named"):
        pipe.set_reward_guidance(adapter_name="missing")
    pipe.unload_latent_reward("default")
    assert pipe.latent_reward is other
    pipe.unload_latent_reward()
    assert pipe.latent_reward is None and pipe.latent_reward_adapters == []


def test_loads_reward_from_a_folder(pipe, reward, tmp_path):
    reward.save_pretrained(tmp_path / "r")
    loaded = pipe.load_latent_reward(str(tmp_path / "r"))
    x = torch.randn(2, 16, 3, 8, 8)
    torch.testing.assert_close(pipe.score_latents(x), reward.reward(x))
    assert loaded is pipe.latent_reward


def test_text_conditioned_reward_receives_the_prompt_embeddings(pipe):
    from latent_rewards.rewards.base import LatentReward, RewardInput
    from latent_rewards.rewards.shell_lcc import ShellLCCConfig

    seen = []

    class TextReward(LatentReward):
        kind = "test-text"
        config_class = ShellLCCConfig
        required_inputs = frozenset({RewardInput.X0, RewardInput.TEXT})

        def reward(self, x0=None, *, text_embeds=None, **_):
            self.check_inputs(x0, text_embeds=text_embeds)
            seen.append(tuple(text_embeds.shape))
            return -(x0.float() - text_embeds.float().mean()).pow(2).flatten(1).mean(1)

    pipe.load_latent_reward(TextReward(ShellLCCConfig(num_bases=4, hidden_dim=4)))
    out = pipe(**{**CALL, "prompt": ["a", "b"]}, generator=[gen(0), gen(1)], output_type="latent",
               reward_guidance_scale=0.05)
    assert out.rewards.shape == (2,)
    assert seen and all(s[0] == 2 and s[2] == 4096 for s in seen)


def test_set_reward_guidance_max_step_none_and_kwargs_override(pipe, reward):
    pipe.load_latent_reward(reward)
    cfg = pipe.set_reward_guidance(scale=0.1, max_step=None)
    assert cfg.max_step is None and cfg.scale == 0.1
    out = latents_of(pipe, reward_guidance_scale=0.02)
    assert all(abs(s[0] - 0.02) < 1e-6 for s in out.reward_trace.step_rms)
    assert pipe.reward_guidance_config.scale == 0.1  # call-time kwargs do not change the defaults


def test_pipeline_output_class_is_kept(pipe, reward):
    from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

    from latent_rewards.pipelines import RewardGuidedWanPipelineOutput

    pipe.load_latent_reward(reward)
    out = latents_of(pipe)
    assert isinstance(out, WanPipelineOutput) and isinstance(out, RewardGuidedWanPipelineOutput)
    assert out[0] is out.frames and out["rewards"] is out.rewards


def test_core_guidance_step_never_overflows():
    """The core step itself (shared with ComfyUI): huge scales are capped, not turned into Inf/NaN."""
    from latent_rewards import ShellLCC
    from latent_rewards.rewards.guidance import evaluate_reward, guide_x0

    torch.manual_seed(0)
    r = ShellLCC(num_bases=16, hidden_dim=8).freeze()
    x = torch.randn(2, 16, 2, 4, 4)
    for normalize in ("rms", "none"):
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            s = guide_x0(r, x, 0.5, GuidanceConfig(scale=1e38, normalize=normalize))
        assert torch.isfinite(s.x0).all() and torch.allclose(s.step_rms, torch.ones(2))
        torch.testing.assert_close((s.x0 - x).pow(2).flatten(1).mean(1).sqrt(), torch.ones(2))
    with pytest.warns(RuntimeWarning, match="overflowed|non-finite"):
        s = guide_x0(r, x, 0.5, GuidanceConfig(scale=1e300, normalize="none", max_step=None))
    assert torch.isfinite(s.x0).all()
    with torch.inference_mode():
        xi = torch.randn(2, 16, 2, 4, 4)
        torch.testing.assert_close(evaluate_reward(r, xi), r.reward(xi))
