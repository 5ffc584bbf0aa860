"""Config: YAML -> typed dataclasses, key=value overrides, errors that name the field, all before any model."""

from __future__ import annotations

import pytest
from latent_rewards.rewards.errors import ConfigError
from latent_rewards.trainer.config import (
    ACCELERATE_FSDP_CONFIG,
    BUILTIN_CONFIGS,
    CONFIG_DIR,
    WAN_LORA_MODULES,
    apply_overrides,
    builtin_config_path,
    dump_config,
    load_config,
    parse_overrides,
    read_prompts,
)
from latent_rewards.trainer.methods import ShellLCCSettings
from latent_rewards.trainer.rollouts import OneStepSettings, TruncatedSettings


def test_every_shipped_config_loads_and_validates(reward_dir):
    shipped = {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    assert shipped == {*BUILTIN_CONFIGS, ACCELERATE_FSDP_CONFIG.stem}  # nothing shipped that is not checked here
    for name in BUILTIN_CONFIGS:
        assert builtin_config_path(name).is_file()
        cfg = load_config(name, [f"reward.path={reward_dir}"])
        assert cfg.method.name == "shell_lcc"
        assert cfg.rollout.kind == "one_step"
    # The accelerate FSDP config: sharding by Wan block (a class diffusers really has), 4 processes.
    import yaml
    from diffusers.models.transformers import transformer_wan

    acc = yaml.safe_load(ACCELERATE_FSDP_CONFIG.read_text())
    assert acc["distributed_type"] == "FSDP" and acc["num_processes"] == 4
    fsdp = acc["fsdp_config"]
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert isinstance(getattr(transformer_wan, fsdp["fsdp_transformer_layer_cls_to_wrap"]), type)
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def _paper_recipe(cfg) -> None:
    """The authors' Shell-LCC fine-tuning settings (notes: shell_lcc.md, section 3.4)."""
    assert (cfg.rollout.settings.sigma_min, cfg.rollout.settings.sigma_max) == (0.7, 1.0)
    assert cfg.method.settings.kl_weight == 0 and cfg.method.settings.anti_drift_weight == 0
    assert cfg.optimizer.name == "adamw" and cfg.optimizer.lr == 1e-5 and cfg.optimizer.scheduler == "constant"
    assert cfg.optimizer.warmup_steps == 0 and cfg.max_grad_norm == 1.0
    assert cfg.mixed_precision == "bf16" and cfg.gradient_checkpointing


def test_the_authors_recipes(reward_dir):
    from latent_rewards.trainer.config import config_to_dict

    full = load_config("shell_lcc_wan1.3b", [f"reward.path={reward_dir}"])
    _paper_recipe(full)
    assert full.model == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" and full.finetune == "full"
    assert full.resolved_weight_dtype() == "fp32"  # fp32 weights, bf16 autocast
    assert full.batch_size * full.gradient_accumulation_steps == 8 and full.max_steps == 100
    assert full.reward.mode == "plain"
    assert (full.video.width, full.video.height, full.video.num_frames) == (1280, 720, 17)
    # The LoRA variant differs only in what is trained (and its name and folder).
    lora = load_config("shell_lcc_wan1.3b_lora", [f"reward.path={reward_dir}"])
    assert lora.finetune == "lora" and (lora.lora.rank, lora.lora.alpha) == (16, 16.0)
    assert lora.lora.targets == ["to_q", "to_k", "to_v", "to_out.0"]
    a, b = config_to_dict(full), config_to_dict(lora)
    assert {k for k in a if a[k] != b[k]} == {"name", "output_dir", "finetune"}
    assert "finetune: full" in builtin_config_path("shell_lcc_wan1.3b").read_text()
    # 14B: full fine-tune sharded with FSDP, band reward tau 0.444, ~20 steps, 4 GPUs x batch 2.
    band = load_config("shell_lcc_wan14b_band", [f"reward.path={reward_dir}"])
    _paper_recipe(band)
    assert band.model == "Wan-AI/Wan2.1-T2V-14B-Diffusers" and band.finetune == "full"
    assert band.reward.mode == "band" and band.reward.tau == pytest.approx(0.444) and band.max_steps == 20
    assert band.batch_size * band.gradient_accumulation_steps == 2 and band.checkpoint_every == 5
    assert band.resolved_weight_dtype(sharded=True) == "fp32"
    assert "accelerate_fsdp.yaml" in builtin_config_path("shell_lcc_wan14b_band").read_text()


def test_lora_target_list_matches_diffusers_wan_transformer():
    """WAN_LORA_MODULES (used to reject bad targets before any model is loaded) is exactly the set of Linear layers
    of diffusers' WanTransformer3DModel, built here on the meta device with the image-to-video extras; each one
    has an original-Wan name, so the ComfyUI export of any accepted target works."""
    import re

    import torch
    from diffusers import WanTransformer3DModel
    from latent_rewards.rewards.wan_keys import diffusers_to_wan

    with torch.device("meta"):
        model = WanTransformer3DModel(
            num_layers=2, num_attention_heads=1, attention_head_dim=32, ffn_dim=64, text_dim=32, freq_dim=32,
            image_dim=32, added_kv_proj_dim=32,
        )
    linear = {re.sub(r"^blocks\.\d+\.", "blocks.*.", n) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear)}
    assert linear == set(WAN_LORA_MODULES)
    for name in WAN_LORA_MODULES:
        assert diffusers_to_wan(name.replace("*", "3"))


def test_overrides_use_the_configs_own_keys(reward_dir, tmp_path):
    cfg = load_config("tiny-cpu", [
        f"reward.path={reward_dir}", f"output_dir={tmp_path / 'x'}", "max_steps=12", "checkpoint_every=4",
        "lora.rank=4", "optimizer.lr=1e-4", "prompts=[a cat, a dog]", "method.kl_weight=0.5",
        "rollout.sigma_min=0.8", "validation.every=0", "monitor.real_radius=0.9",
    ])
    assert cfg.output_dir == str(tmp_path / "x")
    assert (cfg.max_steps, cfg.checkpoint_every, cfg.lora.rank) == (12, 4, 4)
    assert cfg.optimizer.lr == pytest.approx(1e-4) and isinstance(cfg.optimizer.lr, float)  # YAML reads 1e-4 as str
    assert cfg.prompts == ["a cat", "a dog"]
    assert isinstance(cfg.method.settings, ShellLCCSettings) and cfg.method.settings.kl_weight == 0.5
    assert isinstance(cfg.rollout.settings, OneStepSettings) and cfg.rollout.settings.sigma_min == 0.8
    assert cfg.monitor.real_radius == 0.9


def test_rollout_kind_switch_uses_that_strategys_fields(reward_dir):
    data = {"reward": {"path": str(reward_dir)}, "rollout": "truncated"}
    cfg = load_config(apply_overrides(data, ["rollout.grad_steps=2", "rollout.start_max=20"]))
    assert isinstance(cfg.rollout.settings, TruncatedSettings)
    assert (cfg.rollout.settings.grad_steps, cfg.rollout.settings.start_max) == (2, 20)
    with pytest.raises(ConfigError, match=r"rollout\.sigma_min: unknown field"):
        load_config(apply_overrides(data, ["rollout.sigma_min=0.5"]))


def test_dump_and_reload_round_trips(reward_dir):
    cfg = load_config("shell_lcc_wan14b_band", [f"reward.path={reward_dir}", "lora.targets=[to_q, attn2.to_v]"])
    import yaml

    again = load_config(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    ("override", "field", "words"),
    [
        ("lora.rnak=4", "lora.rnak", "did you mean 'lora.rank'"),
        ("max_steps=abc", "max_steps", "integer"),
        ("lora.rank=0", "lora.rank", "positive integer"),
        ("optimizer.lr=-1", "optimizer.lr", "positive"),
        ("rollout.sigma_min=1.5", "rollout.sigma_min", "sigma_min <= sigma_max <= 1"),
        ("video.height=30", "video.height", "multiple of 16"),
        ("video.num_frames=6", "video.num_frames", "4k+1"),
        ("reward.mode=band", "reward.tau", "band"),
        ("reward.mode=sharp", "reward.mode", "'plain' or 'band'"),
        ("method.name=dpo", "method.name", "known: shell_lcc"),
        ("rollout.kind=two_step", "rollout.kind", "known:"),
        ("mixed_precision=fp8", "mixed_precision", "one of"),
        ("gradient_checkpointing=maybe", "gradient_checkpointing", "true or false"),
        ("prompts=/no/such/prompts.txt", "prompts", "not a file"),
        ("hub.push_at_end=true", "hub.push_at_end", "repo_id"),
        ("validation.every=-1", "validation.every", ">= 0"),
        ("monitor.min_radius_fraction=2", "monitor.min_radius_fraction", "[0, 1]"),
        ("method.kl_weight=-0.1", "method.kl_weight", ">= 0"),
        ("lora.targets=[nope]", "lora.targets", "'nope' is not a Linear layer of the Wan2.1 transformer"),
        ("lora.targets=[to_q, attn1]", "lora.targets", "'attn1' is not a Linear layer"),
        ("lora.targets=[to_qq]", "lora.targets", "did you mean 'to_q'"),
        ("lora.targets=[patch_embedding]", "lora.targets", "not a Linear layer"),
    ],
)
def test_bad_values_name_the_field(reward_dir, override, field, words):
    with pytest.raises(ConfigError) as e:
        load_config("tiny-cpu", [f"reward.path={reward_dir}", override])
    msg = str(e.value)
    assert msg.startswith(field), msg
    assert words in msg, msg


def test_reward_path_is_required_and_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"^reward\.path: required"):
        load_config("tiny-cpu")
    (tmp_path / "not-a-reward").mkdir()
    with pytest.raises(ConfigError, match=r"^reward\.path: .* not a reward folder"):
        load_config("tiny-cpu", [f"reward.path={tmp_path / 'not-a-reward'}"])
    with pytest.raises(ConfigError, match=r"^reward\.path: .*no such folder"):
        load_config("tiny-cpu", ["reward.path=./missing-folder"])
    assert load_config("tiny-cpu", ["reward.path=someone/shell-lcc"]).reward.path == "someone/shell-lcc"


def test_malformed_overrides_and_files(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["max_steps"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"max_steps": 3}, ["max_steps.x=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_prompts_default_file_and_list(tmp_path):
    default = read_prompts("default")
    assert 100 <= len(default) <= 300 and len(set(default)) == len(default)
    f = tmp_path / "p.txt"
    f.write_text("# comment\n\n a cat \nsecond prompt\n")
    assert read_prompts(str(f)) == ["a cat", "second prompt"]
    assert read_prompts(["x", " ", "y"]) == ["x", "y"]


def test_cli_rejects_a_bad_config_before_loading_any_model(capsys, reward_dir):
    from latent_rewards.trainer.cli import main

    # The model id does not exist (and the Hub is offline): if anything were loaded first, the error would be
    # about the model, not the field.
    rc = main(["train", "tiny-cpu", f"reward.path={reward_dir}", "model=nobody/not-a-model", "lora.rank=-1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "lora.rank: expected a positive integer" in err


def test_cli_print_config(capsys, reward_dir):
    from latent_rewards.trainer.cli import main

    assert main(["train", "tiny-cpu", f"reward.path={reward_dir}", "lora.rank=4", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "rank: 4" in out and "kind: one_step" in out


def test_cli_options_after_overrides_keep_their_values(capsys, reward_dir, tmp_path):
    from latent_rewards.trainer.cli import main

    missing = tmp_path / "no-such-checkpoint"
    rc = main(["train", "tiny-cpu", f"reward.path={reward_dir}", f"output_dir={tmp_path / 'run'}",
               "--resume-from", str(missing), "lora.rank=4", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"resume: {missing} is not a resumable checkpoint folder" in err
