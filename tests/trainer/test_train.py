"""A short tiny-cpu run end to end: the reward improves, the folders are complete, both export formats load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from latent_rewards.rewards.wan_keys import comfyui_lora_to_peft, diffusers_state_dict_to_wan
from latent_rewards.trainer.export import LOCAL_LOCATION, LORA_WEIGHTS_NAME, comfyui_file_name, lora_state_dict
from latent_rewards.trainer.rollouts import TransformerDenoiser
from safetensors.torch import load_file
from trainer_test_helpers import metrics_records


def test_run_layout(trained_run):
    trainer, result = trained_run
    out = result.output_dir
    assert result.step == 8 and not result.interrupted and result.stop_reason is None
    # keep_last=1: only the newest checkpoint survives; best/ is separate.
    assert [p.name for p in result.checkpoints] == ["checkpoint-8"]
    ck = out / "checkpoint-8"
    name = trainer.config.name
    for f in (LORA_WEIGHTS_NAME, comfyui_file_name(name), "README.md", "training_config.yaml", "metrics.json"):
        assert (ck / f).is_file(), f
    assert sorted(p.name for p in (ck / "validation").glob("*.mp4")) == ["video_00.mp4", "video_01.mp4"]
    state = ck / "training_state"
    for f in ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "random_state_0.pt", "trainer_state.json"):
        assert (state / f).is_file(), f
    assert result.best_dir == out / "best" and not (out / "best" / "training_state").exists()
    assert (out / "best" / LORA_WEIGHTS_NAME).is_file()
    best_metrics = json.loads((out / "best" / "metrics.json").read_text())
    assert best_metrics["step"] == result.best_step == trainer.monitor.best_step
    # metrics.jsonl: one line per step, validations at 0 (base), 4, 8; TensorBoard events.
    train = metrics_records(out, "train")
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all({"loss", "reward", "r_dist", "grad_norm", "lr", "sigma"} <= set(r) for r in train)
    assert all(0.7 <= r["sigma"] <= 1.0 and r["skipped"] == 0.0 for r in train)
    assert [r["step"] for r in metrics_records(out, "validation")] == [0, 4, 8]
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert (out / "validation" / "base" / "frames.npz").is_file()


def test_video_files_decode(trained_run):
    import av

    _, result = trained_run
    with av.open(str(result.output_dir / "checkpoint-8" / "validation" / "video_00.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    h, w, n = (trained_run[0].config.video.height, trained_run[0].config.video.width, trained_run[0].config.video.num_frames)
    assert len(frames) == n and frames[0].shape == (h, w, 3)


def _fixed_noise_r_dist(transformer, trainer, lora: bool) -> float:
    """R_dist of the one-step prediction the recipe optimises, at fixed noise, prompts and sigma."""
    g = torch.Generator().manual_seed(123)
    eps = torch.randn(4, 16, 2, 4, 4, generator=g)
    sigma = torch.full((4,), 0.85)
    reward = trainer.reward
    text = trainer.cache.batch(trainer.train_prompts[:4])
    denoiser = TransformerDenoiser(transformer)
    was = transformer.training
    transformer.eval()
    if not lora:
        transformer.disable_adapters()
    try:
        v = denoiser.velocity(eps, sigma, text, grad=False)
    finally:
        if not lora:
            transformer.enable_adapters()
        transformer.train(was)
    return float(reward.distance(eps - 0.85 * v).mean())


def test_reward_improves_and_the_diffusers_export_reproduces_the_model(trained_run):
    from diffusers import WanPipeline
    from latent_rewards.pipelines.tiny import build_tiny_wan_pipeline

    trainer, result = trained_run
    base = _fixed_noise_r_dist(trainer.transformer, trainer, lora=False)
    tuned = _fixed_noise_r_dist(trainer.transformer, trainer, lora=True)
    assert tuned < base - 0.02, (base, tuned)  # plain reward: R_dist goes down

    pipe = build_tiny_wan_pipeline(WanPipeline)
    pipe.load_lora_weights(str(result.output_dir / "checkpoint-8"))
    loaded = _fixed_noise_r_dist(pipe.transformer, trainer, lora=True)
    assert loaded == pytest.approx(tuned, rel=1e-5)
    pipe.transformer.disable_adapters()
    assert _fixed_noise_r_dist(pipe.transformer, trainer, lora=True) == pytest.approx(base, rel=1e-5)


def test_comfyui_export_maps_every_key_and_applies_the_same_update(trained_run):
    from latent_rewards.pipelines.tiny import tiny_wan_transformer

    trainer, result = trained_run
    ck = result.output_dir / "checkpoint-8"
    comfy = load_file(str(ck / comfyui_file_name(trainer.config.name)))
    diffusers_lora = load_file(str(ck / LORA_WEIGHTS_NAME))
    assert all(k.startswith("diffusion_model.") for k in comfy)
    back, alphas = comfyui_lora_to_peft(comfy)
    assert set(back) == set(diffusers_lora)
    assert all(torch.equal(back[k], diffusers_lora[k]) for k in back)
    assert set(alphas.values()) == {float(trainer.config.lora.alpha)}
    # Apply the ComfyUI LoRA the way ComfyUI does (W + alpha / rank * B @ A on original-Wan names) and compare
    # with peft's merged weights: every LoRA key must land on a base weight.
    base = diffusers_state_dict_to_wan(tiny_wan_transformer().state_dict(), prefix="diffusion_model.")
    modules = {k[: -len(".alpha")] for k in comfy if k.endswith(".alpha")}
    merged = {}
    for m in modules:
        a, b, alpha = comfy[f"{m}.lora_A.weight"], comfy[f"{m}.lora_B.weight"], float(comfy[f"{m}.alpha"])
        assert f"{m}.weight" in base, m
        merged[m] = base[f"{m}.weight"] + (alpha / a.shape[0]) * (b @ a)
    from peft.tuners.lora import LoraLayer

    peft_merged = {}
    for name, module in trainer.transformer.named_modules():
        if isinstance(module, LoraLayer):
            w = module.get_base_layer().weight + module.get_delta_weight("default")
            peft_merged.update(diffusers_state_dict_to_wan({f"{name}.weight": w.detach()}, prefix="diffusion_model."))
    assert len(peft_merged) == len(merged)
    for m, w in merged.items():
        assert torch.allclose(w, peft_merged[f"{m}.weight"], atol=1e-6), m


def test_model_card_describes_the_run(trained_run):
    trainer, result = trained_run
    card = (result.output_dir / "best" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card
    reward_folder = Path(trainer.config.reward.path)
    for needle in ("shell_lcc", f"`{reward_folder.name}` (a local reward folder", "best step so far by the\nreward-hacking rule",
                   f'load_lora_weights("{LOCAL_LOCATION}")', "LoraLoaderModelOnly", "**Latent Reward LoRA Loader**",
                   comfyui_file_name(trainer.config.name), "| step | reward | R_dist |", "one_step"):
        assert needle in card, needle
    assert str(reward_folder) not in card  # a local absolute path means nothing to a reader of the Hub page
    for step in (0, 4, 8):
        assert f"\n| {step} | " in card


def test_lora_weights_from_a_gathered_state_dict_match_peft(trained_run):
    """Under FSDP the LoRA is read from the gathered state dict by name; it must be exactly what peft exports."""
    trainer, _ = trained_run
    t = trainer.transformer
    by_name, by_peft = lora_state_dict(t, t.state_dict()), lora_state_dict(t)
    assert by_name.keys() == by_peft.keys() and len(by_peft) == 2 * (2 * 10 + 1)  # A and B of (q,k,v,o x 2 + 2 ffn) x 2 blocks + proj_out
    assert all(torch.equal(by_name[k], by_peft[k]) for k in by_peft)
