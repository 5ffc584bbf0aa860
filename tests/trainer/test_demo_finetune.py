"""Demo section "fine-tune": trains the tiny model, reloads the exported adapter, reports the reward change."""

from __future__ import annotations

from latent_rewards.trainer.demo import SECTIONS, DemoContext


def test_finetune_section(tmp_path, reward_dir):
    from latent_rewards.trainer.demo_finetune import finetune_section

    assert "fine-tune" in [s.name for s in SECTIONS]
    ctx = DemoContext(out=tmp_path, reward_path=reward_dir, verbose=False)
    out = finetune_section(ctx)
    r = out.results
    assert r["steps"] == 8 and (tmp_path / "finetune" / "best" / "pytorch_lora_weights.safetensors").is_file()
    # The adapter, reloaded with load_lora_weights, lowers R_dist of what the recipe optimises.
    assert r["one_step_r_dist"]["finetuned"] < r["one_step_r_dist"]["base"]
    assert r["reward_changed"]
    assert any("one-step prediction" in line for line in out.lines) and len(out.panels) == 1
