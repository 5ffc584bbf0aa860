"""Rollout strategies (one_step / truncated / single_step) and the Shell-LCC recipe's loss.

The strategies see the generator only as ``velocity(x, sigma, text, grad)``, so most checks use an analytic
velocity field with one trainable parameter (every number can be recomputed by hand); the last ones run the real
tiny Wan transformer with LoRA.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from latent_rewards.rewards.base import LatentReward, RewardInput
from latent_rewards.rewards.errors import ConfigError
from latent_rewards.trainer.methods import RecipeContext, ShellLCCRecipe, ShellLCCSettings, TrainBatch
from latent_rewards.trainer.rollouts import (
    ROLLOUTS,
    OneStepFromNoise,
    OneStepSettings,
    RolloutRandom,
    SingleRandomStep,
    SingleStepSettings,
    TransformerDenoiser,
    TruncatedSettings,
    TruncatedWindow,
    flow_sigmas,
    latent_shape,
)

SHAPE = (2, 16, 2, 4, 4)


class LinearField:
    """``v = w * x + 0.1 * sigma``: a velocity field with one trainable weight; records every call."""

    def __init__(self, w: float = 0.5) -> None:
        self.w = torch.tensor(w, requires_grad=True)
        self.calls: list[tuple[float, bool]] = []

    def f(self, x, sigma):
        return self.w * x + 0.1 * sigma.view(-1, 1, 1, 1, 1)

    def velocity(self, x, sigma, text, *, grad):
        self.calls.append((float(sigma[0]), grad))
        if grad:
            return self.f(x, sigma)
        with torch.no_grad():
            return self.f(x, sigma)

    def reference(self, x, sigma, text):
        with torch.no_grad():
            return 0.5 * x + 0.1 * sigma.view(-1, 1, 1, 1, 1)


def _text(b=2):
    return torch.zeros(b, 3, 8)


def test_registry_and_sigma_schedule():
    assert set(ROLLOUTS) == {"one_step", "truncated", "single_step"}
    s = flow_sigmas(10, shift=1.0)
    assert s.shape == (11,) and s[0] == 1 and s[-1] == 0 and torch.all(s[1:] < s[:-1])
    assert torch.allclose(s, torch.linspace(1, 0, 11))
    s5 = flow_sigmas(2, shift=5.0)
    assert s5[1].item() == pytest.approx(5 * 0.5 / (1 + 4 * 0.5))
    assert latent_shape(1, 17, 720, 1280) == (1, 16, 5, 90, 160)


def test_one_step_is_x0_from_pure_noise():
    field = LinearField()
    rnd = RolloutRandom.from_seed(3)
    out = OneStepFromNoise(OneStepSettings(0.7, 1.0))(field, _text(), SHAPE, rnd)
    eps = out.model_input
    assert field.calls and all(g for _, g in field.calls) and len(field.calls) == 1
    assert torch.all((out.model_sigma >= 0.7) & (out.model_sigma <= 1.0))
    expected = eps - out.model_sigma.view(-1, 1, 1, 1, 1) * (0.5 * eps + 0.1 * out.model_sigma.view(-1, 1, 1, 1, 1))
    assert torch.allclose(out.x0, expected)
    assert abs(float(eps.std()) - 1.0) < 0.2  # the input is pure noise, whatever sigma is
    out.x0.sum().backward()
    assert field.w.grad is not None and field.w.grad.abs() > 0
    # Same seed, same rollout.
    again = OneStepFromNoise()(LinearField(), _text(), SHAPE, RolloutRandom.from_seed(3))
    assert torch.equal(again.x0.detach(), out.x0.detach())


def _euler_reference(x, sigmas, start, stop, w):
    for i in range(start, stop):
        v = w * x + 0.1 * sigmas[i]
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def test_truncated_window_prefix_without_grad_then_window_with_grad():
    st = TruncatedSettings(num_steps=12, shift=3.0, start_min=3, start_max=6, grad_steps=2)
    field = LinearField(0.3)
    rnd = RolloutRandom.from_seed(0)
    noise_rnd = RolloutRandom.from_seed(0)
    out = TruncatedWindow(st)(field, _text(), SHAPE, rnd)
    start = int(out.info["start_step"])
    assert st.start_min <= start <= st.start_max
    grads = [g for _, g in field.calls]
    assert grads == [False] * start + [True] * (st.grad_steps + 1)
    sigmas = flow_sigmas(12, 3.0)
    assert [s for s, _ in field.calls] == pytest.approx([float(s) for s in sigmas[: start + st.grad_steps + 1]])
    # Recompute by hand from the same noise.
    noise_rnd.index(st.start_min, st.start_max)
    x = noise_rnd.noise(SHAPE, "cpu")
    with torch.no_grad():
        x_end = _euler_reference(x, sigmas, 0, start + st.grad_steps, 0.3)
        s_end = sigmas[start + st.grad_steps]
        x0 = x_end - s_end * (0.3 * x_end + 0.1 * s_end)
    assert torch.allclose(out.x0.detach(), x0, atol=1e-6)
    assert out.model_sigma[0].item() == pytest.approx(float(s_end))
    out.x0.mean().backward()
    assert field.w.grad.abs() > 0


def test_truncated_start_index_is_shared_across_processes():
    st = TruncatedSettings(num_steps=50, start_min=15, start_max=25, grad_steps=1)
    starts = []
    for rank in (0, 1):
        field = LinearField()
        out = TruncatedWindow(st)(field, _text(), SHAPE, RolloutRandom.from_seed(7, rank))
        starts.append((int(out.info["start_step"]), out.model_input.sum().item()))
    assert starts[0][0] == starts[1][0]  # same number of passes on every rank (shared generator)
    assert starts[0][1] != starts[1][1]  # different noise per rank (local generator)


def test_single_random_step_gives_the_noisy_latent_and_its_sigma():
    st = SingleStepSettings(num_steps=8, shift=5.0, index_min=0, index_max=6)
    field = LinearField(0.2)
    out = SingleRandomStep(st)(field, _text(), SHAPE, RolloutRandom.from_seed(1))
    k = int(out.info["step_index"])
    sigmas = flow_sigmas(8, 5.0)
    assert [g for _, g in field.calls] == [False] * k + [True]
    assert out.sigma_t[0].item() == pytest.approx(float(sigmas[k + 1]))
    v = out.velocity
    assert torch.allclose(out.x_t, out.model_input + (sigmas[k + 1] - sigmas[k]) * v)
    assert torch.allclose(out.x0, out.model_input - sigmas[k] * v)
    assert SingleRandomStep.provides_noisy and not OneStepFromNoise.provides_noisy
    out.x_t.sum().backward()
    assert field.w.grad.abs() > 0


def test_random_state_round_trip():
    rnd = RolloutRandom.from_seed(5)
    state = rnd.state_dict()
    a = (rnd.noise((3,), "cpu"), rnd.index(0, 100))
    rnd.load_state_dict(state)
    b = (rnd.noise((3,), "cpu"), rnd.index(0, 100))
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (OneStepSettings, {"sigma_min": 0.0}, "sigma_min"),
        (TruncatedSettings, {"num_steps": 20, "start_max": 15, "grad_steps": 5}, "start_max"),
        (SingleStepSettings, {"num_steps": 10, "index_max": 9}, "index_min/index_max"),
    ],
)
def test_settings_validation(cls, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        cls(**kwargs).validate("rollout")


# ------------------------------------------------------------------------------------------------ recipe
def _ctx(reward, denoiser, shape=(16, 2, 4, 4)):
    return RecipeContext(denoiser=denoiser, reward=reward, random=RolloutRandom.from_seed(0), sample_shape=shape,
                         device=torch.device("cpu"))


def test_shell_lcc_loss_is_batch_r_dist_plain_and_band(small_shell_lcc):
    reward = small_shell_lcc()
    field = LinearField()
    batch = TrainBatch(prompts=["a", "b"], text_embeds=_text())
    recipe = ShellLCCRecipe(ShellLCCSettings(), OneStepFromNoise())
    ctx = _ctx(reward, field)
    recipe.setup(ctx)
    out = recipe.rollout_step(ctx, batch)
    res = recipe.loss(ctx, batch, out)
    r = reward.distance(out.x0.detach())
    assert res.loss.item() == pytest.approx(float(r.mean()), rel=1e-5)
    assert float(res.logs["r_dist"]) == pytest.approx(float(r.mean()), rel=1e-5)
    res.loss.backward()
    assert field.w.grad.abs() > 0
    assert all(p.grad is None for p in reward.parameters())  # the reward is frozen
    reward.set_reward_mode("band", tau=float(r.mean()) + 0.5)
    band = recipe.loss(ctx, batch, out)
    assert band.loss.item() == pytest.approx(0.5, rel=1e-4)  # |mean R_dist - tau|


def test_kl_and_anti_drift_against_the_reference(small_shell_lcc):
    reward = small_shell_lcc()
    batch = TrainBatch(prompts=["a", "b"], text_embeds=_text())
    recipe = ShellLCCRecipe(ShellLCCSettings(kl_weight=1.0, anti_drift_weight=1.0, anti_drift_margin=0.0))
    assert recipe.needs_reference()
    same = LinearField(0.5)  # equal to its reference
    ctx = _ctx(reward, same)
    out = recipe.rollout_step(ctx, batch)
    res = recipe.loss(ctx, batch, out)
    assert float(res.logs["kl"]) == pytest.approx(0.0, abs=1e-12) and float(res.logs["drift"]) == pytest.approx(0.0, abs=1e-12)
    moved = LinearField(0.9)
    ctx = _ctx(reward, moved)
    out = recipe.rollout_step(ctx, batch)
    res = recipe.loss(ctx, batch, out)
    dv = (0.9 - 0.5) * out.model_input
    assert float(res.logs["kl"]) == pytest.approx(float(dv.pow(2).mean()), rel=1e-5)
    dx0 = out.model_sigma.view(-1, 1, 1, 1, 1) * dv
    assert float(res.logs["drift"]) == pytest.approx(float(dx0.pow(2).mean()), rel=1e-5)
    margin = ShellLCCRecipe(ShellLCCSettings(anti_drift_weight=1.0, anti_drift_margin=10.0))
    assert float(margin.loss(ctx, batch, out).logs["drift"]) == 0.0  # inside the margin: free


@dataclasses.dataclass
class _NoisyConfig:
    latent_space: str = "wan2.1"


class NoisyEnergy(LatentReward):
    """A process reward in the PAVRM mould: reads the noisy latent, its timestep and the text."""

    kind = "test-noisy-energy"
    config_class = _NoisyConfig
    required_inputs = frozenset({RewardInput.NOISY, RewardInput.TIMESTEP, RewardInput.TEXT})

    def reward(self, x0=None, *, x_t=None, timestep=None, text_embeds=None):
        self.check_inputs(x0, x_t=x_t, timestep=timestep, text_embeds=text_embeds)
        self.seen = (x_t, timestep, text_embeds)
        return -(x_t.pow(2).flatten(1).mean(1)) * (1 - timestep)


def test_reward_inputs_follow_what_the_reward_reads():
    reward = NoisyEnergy(_NoisyConfig()).freeze()
    batch = TrainBatch(prompts=["a", "b"], text_embeds=_text())
    field = LinearField()
    recipe = ShellLCCRecipe(ShellLCCSettings(), OneStepFromNoise())
    with pytest.raises(ConfigError, match="single_step"):
        recipe.setup(_ctx(reward, field))
    recipe = ShellLCCRecipe(ShellLCCSettings(), SingleRandomStep(SingleStepSettings(num_steps=6, index_max=4)))
    ctx = _ctx(reward, field)
    recipe.setup(ctx)
    out = recipe.rollout_step(ctx, batch)
    res = recipe.loss(ctx, batch, out)
    x_t, t, text = reward.seen
    assert torch.equal(x_t, out.x_t) and torch.equal(t, out.sigma_t) and text.shape == (2, 3, 8)
    res.loss.backward()
    assert field.w.grad.abs() > 0


# ------------------------------------------------------------------------------------------------ real model
@pytest.fixture(scope="module")
def lora_transformer():
    from latent_rewards.pipelines.tiny import tiny_wan_transformer
    from peft import LoraConfig

    t = tiny_wan_transformer()
    t.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return t.train()


@pytest.mark.parametrize(
    "strategy",
    [OneStepFromNoise(), TruncatedWindow(TruncatedSettings(num_steps=6, start_min=1, start_max=2, grad_steps=2)),
     SingleRandomStep(SingleStepSettings(num_steps=6, index_max=4))],
    ids=["one_step", "truncated", "single_step"],
)
def test_strategies_backpropagate_into_lora_of_the_tiny_wan(lora_transformer, strategy, small_shell_lcc):
    t = lora_transformer
    t.zero_grad(set_to_none=True)
    denoiser = TransformerDenoiser(t)
    text = torch.randn(1, 8, 4096)
    out = strategy(denoiser, text, (1, 16, 2, 4, 4), RolloutRandom.from_seed(0))
    reward = small_shell_lcc()
    target = out.x_t if out.x_t is not None else out.x0
    (-reward.reward(target)).sum().backward()
    b_grads = [p.grad for n, p in t.named_parameters() if "lora_B" in n]
    assert b_grads and all(g is not None for g in b_grads)
    assert sum(float(g.abs().sum()) for g in b_grads) > 0
    assert all(p.grad is None for n, p in t.named_parameters() if "lora" not in n)  # base weights stay frozen
