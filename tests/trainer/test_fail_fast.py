"""Bad settings fail before any model is loaded, naming the field: the LoRA targets (checked statically against
the Wan layout) and the reward (loaded and checked against the recipe first: kind, latent space, reward mode).

Every case runs the real CLI with a model id that does not exist (and the Hub is offline): had the trainer loaded
any part of the generator first, the error would be about the model. The text-embedding cache stays empty (the
text encoder never ran) and the output folder is never created.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from latent_rewards import ShellLCC
from latent_rewards.rewards.base import LatentReward, RewardInput, register_reward
from latent_rewards.rewards.errors import ConfigError
from latent_rewards.rewards.latent_space import LatentSpace, register_latent_space
from latent_rewards.trainer.cli import main
from torch import nn

MISSING_MODEL = "nobody/not-a-model"


@dataclass
class _NoisyReaderConfig:
    latent_space: str = "wan2.1"


@register_reward
class NoisyReader(LatentReward):
    """Stands for a process reward (PAVRM): it reads the noisy latent and its timestep, and has no reward modes."""

    kind = "test-noisy-reader"
    config_class = _NoisyReaderConfig
    required_inputs = frozenset({RewardInput.NOISY, RewardInput.TIMESTEP})

    def __init__(self, config: _NoisyReaderConfig | None = None) -> None:
        super().__init__(config if config is not None else _NoisyReaderConfig())
        self.scale = nn.Parameter(torch.ones(()))

    def reward(self, x0=None, *, x_t=None, timestep=None, text_embeds=None):
        self.check_inputs(x0, x_t=x_t, timestep=timestep, text_embeds=text_embeds)
        return -self.scale * x_t.float().pow(2).mean(dim=(1, 2, 3, 4))


@pytest.fixture(scope="module")
def rewards(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-rewards")
    register_latent_space(LatentSpace(name="test-other-vae", channels=16, mean=(0.0,) * 16, std=(1.0,) * 16))
    ShellLCC(num_bases=8, hidden_dim=8, latent_space="test-other-vae").freeze().save_pretrained(root / "other-space")
    NoisyReader().freeze().save_pretrained(root / "noisy")
    ShellLCC(num_bases=8, hidden_dim=8).freeze().save_pretrained(root / "unknown-kind")
    cfg = json.loads((root / "unknown-kind" / "config.json").read_text())
    (root / "unknown-kind" / "config.json").write_text(json.dumps({**cfg, "kind": "from-the-future"}))
    ShellLCC(num_bases=8, hidden_dim=8).freeze().save_pretrained(root / "good")
    return {p.name: p for p in root.iterdir()}


def _train(tmp_path: Path, reward: Path, *extra: str) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([
            "train", "tiny-cpu", f"reward.path={reward}", f"model={MISSING_MODEL}", f"output_dir={tmp_path / 'out'}",
            f"text_cache_dir={tmp_path / 'cache'}", "logging.report_to=none", *extra, "--no-progress",
        ])
    return rc, err.getvalue().strip()


@pytest.mark.parametrize(
    ("reward", "extra", "message"),
    [
        ("good", ["lora.targets=[to_q, nope]"], "lora.targets: 'nope' is not a Linear layer"),
        ("other-space", [], "reward.path: "),  # ... reads test-other-vae latents but was given wan2.1 latents
        ("unknown-kind", [], "reward.path: "),
        ("noisy", ["reward.mode=null"], "rollout.kind: the test-noisy-reader reward reads noisy latents"),
        ("noisy", ["rollout={kind: single_step}"], "reward.mode: the test-noisy-reader reward has no reward modes"),
    ],
)
def test_fails_naming_the_field_before_any_model_is_loaded(tmp_path, rewards, reward, extra, message):
    rc, err = _train(tmp_path, rewards[reward], *extra)
    assert rc == 2 and err.count("\n") == 0, err
    assert f"error: {message}" in err, err
    assert MISSING_MODEL not in err  # nothing of the (missing) model was touched
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))
    assert not (tmp_path / "out").exists()
    if reward == "other-space":
        assert "test-other-vae" in err and "wan2.1" in err
    if reward == "unknown-kind":
        assert "unknown reward kind 'from-the-future'" in err


def test_control_a_good_config_gets_as_far_as_the_model(tmp_path, rewards):
    """The same call with a good reward fails on the missing model: what the cases above never reach."""
    rc, err = _train(tmp_path, rewards["good"])
    assert rc == 2 and f"model {MISSING_MODEL!r}" in err, err


def test_a_target_absent_from_this_checkpoint_is_named(tmp_path, tiny_overrides):
    """add_k_proj is a Wan layer (image-to-video only): the config accepts it; the text-to-video model has none."""
    from latent_rewards.trainer.config import load_config
    from latent_rewards.trainer.loop import Trainer

    cfg = load_config("tiny-cpu", tiny_overrides(tmp_path / "out", "lora.targets=[to_q, add_k_proj]"))
    with pytest.raises(ConfigError, match=r"^lora\.targets: 'add_k_proj' matches no layer of 'tiny'"):
        Trainer(cfg, progress=False).train()


def test_fsdp_refuses_what_it_cannot_shard(tmp_path, reward_dir):
    """Checked right after the Accelerator is made (before any model): a LoRA-disabled reference is fine under
    FSDP, a frozen full copy (finetune=full with KL / anti-drift) or low-precision master weights are not."""
    from latent_rewards.trainer.config import load_config
    from latent_rewards.trainer.loop import Trainer
    from latent_rewards.trainer.methods import build_method
    from latent_rewards.trainer.rollouts import build_rollout

    def check(*overrides: str) -> None:
        cfg = load_config("tiny-cpu", [f"reward.path={reward_dir}", *overrides])
        trainer = Trainer(cfg, progress=False)
        trainer.fsdp = 2
        trainer.recipe = build_method(cfg.method.name, cfg.method.settings, build_rollout(cfg.rollout.kind, None))
        trainer._check_distributed_mode()

    check("method.kl_weight=0.1")  # LoRA: the reference is the sharded model with adapters off
    check("finetune=full")
    with pytest.raises(ConfigError, match=r"^method: KL / anti-drift .* finetune=lora"):
        check("finetune=full", "method.anti_drift_weight=1.0")
    with pytest.raises(ConfigError, match=r"^weight_dtype: bf16 is not supported under FSDP"):
        check("weight_dtype=bf16")
