"""The trainer's exported LoRA in a real ComfyUI: every key applies, with ComfyUI's own loader and the pack's.

A few tiny-cpu training steps produce ``checkpoint-N/`` (``*_comfyui.safetensors`` + ``pytorch_lora_weights``).
The reference is the same model with the LoRA merged into its weights the way peft merges it, saved as a plain
diffusion model: sampling with ComfyUI's ``LoraLoaderModelOnly`` (our ComfyUI file) and with
``LatentRewardsLoraLoader`` (both files) must give the merged model's sample, and the log must not say
"lora key not loaded". The pushed folder, placed in the pack's Hub cache, loads by repo id too.
"""

from __future__ import annotations

import copy

import pytest
import torch
from comfy_harness import load_workflow
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.comfyui

EXPORT_DIR = "trainer_export"
MERGED = "trainer_export_merged_tiny_wan21.safetensors"


@pytest.fixture(scope="module")
def trained_export(comfy_models, tmp_path_factory):
    """3 Shell-LCC LoRA steps on the tiny model with the test reward; returns (checkpoint folder, run name)."""
    from latent_rewards.trainer.config import load_config
    from latent_rewards.trainer.loop import Trainer

    out = tmp_path_factory.mktemp("trainer_export") / "run"
    cfg = load_config("tiny-cpu", [
        f"reward.path={comfy_models.reward_dir}", f"output_dir={out}", f"text_cache_dir={out.parent / 'cache'}",
        "prompts=[a cat on a sofa, waves on a beach]", "max_sequence_length=16", "max_steps=3",
        "checkpoint_every=3", "validation.every=0", "logging.report_to=none",
    ])
    Trainer(cfg, progress=False).train()
    return out / "checkpoint-3", cfg.name


def _merged_state(checkpoint) -> dict[str, torch.Tensor]:
    """The tiny transformer with the exported LoRA merged as peft merges it, in original Wan names."""
    from diffusers import WanPipeline
    from latent_rewards.pipelines.tiny import build_tiny_wan_pipeline, tiny_wan_transformer
    from latent_rewards.rewards.wan_keys import diffusers_state_dict_to_wan
    from peft.tuners.lora import LoraLayer

    pipe = build_tiny_wan_pipeline(WanPipeline)
    pipe.load_lora_weights(str(checkpoint))
    t = pipe.transformer
    adapter = pipe.get_active_adapters()[0]
    state = {}
    for name, module in t.named_modules():
        if isinstance(module, LoraLayer):
            w = module.get_base_layer().weight + module.get_delta_weight(adapter)
            state[f"{name}.weight"] = w.detach()
            if module.get_base_layer().bias is not None:
                state[f"{name}.bias"] = module.get_base_layer().bias.detach()
    plain = dict(tiny_wan_transformer().state_dict())
    assert set(state) <= set(plain)
    plain.update(state)
    return {k: v.contiguous() for k, v in diffusers_state_dict_to_wan(plain).items()}


def test_exported_lora_loads_in_comfyui_with_every_key_applied(comfy_server, trained_export, tmp_path):
    from comfy_assets import write_hub_snapshot

    from latent_rewards.trainer.hub import prepare_upload

    checkpoint, name = trained_export
    comfy_file = f"{name}_comfyui.safetensors"
    loras = comfy_server.base / "models" / "loras" / EXPORT_DIR
    loras.mkdir(parents=True, exist_ok=True)
    for f in (comfy_file, "pytorch_lora_weights.safetensors"):
        (loras / f).write_bytes((checkpoint / f).read_bytes())
    save_file(_merged_state(checkpoint), str(comfy_server.base / "models" / "diffusion_models" / MERGED))
    # What `latent-rewards push` uploads, as a Hub download leaves it in the pack's cache (offline).
    pushed = prepare_upload(checkpoint, tmp_path / "upload")
    write_hub_snapshot(comfy_server.base / "models" / "latent_rewards" / ".hub", "someone/tiny-trained", pushed)
    n_modules = len({k.rsplit(".", 1)[0] for k in load_file(str(checkpoint / comfy_file)) if k.endswith(".alpha")})

    p = load_workflow("wan21_t2v_reward_lora.json")
    sampler = p["8"]["inputs"]
    for node in ("6", "7", "8", "9", "10"):
        del p[node]
    p["20"] = {"class_type": "UNETLoader", "inputs": {"unet_name": MERGED, "weight_dtype": "default"}}
    p["21"] = {"class_type": "LoraLoaderModelOnly",
               "inputs": {"model": ["1", 0], "lora_name": f"{EXPORT_DIR}/{comfy_file}", "strength_model": 1.0}}
    p["22"] = {"class_type": "LatentRewardsLoraLoader", "inputs": {
        "model": ["1", 0], "lora_name": f"{EXPORT_DIR}/{comfy_file}", "strength_model": 1.0, "repo_id": ""}}
    p["23"] = {"class_type": "LatentRewardsLoraLoader", "inputs": {
        "model": ["1", 0], "lora_name": f"{EXPORT_DIR}/pytorch_lora_weights.safetensors", "strength_model": 1.0,
        "repo_id": ""}}
    p["24"] = {"class_type": "LatentRewardsLoraLoader", "inputs": {
        "model": ["1", 0], "lora_name": f"{EXPORT_DIR}/{comfy_file}", "strength_model": 1.0,
        "repo_id": f"someone/tiny-trained/{comfy_file}"}}
    branches = {"base": "1", "merged": "20", "core_comfyui": "21", "pack_comfyui": "22", "pack_diffusers": "23",
                "pack_hub": "24"}
    for i, (branch, model) in enumerate(branches.items()):
        p[f"6{i}"] = {"class_type": "KSampler", "inputs": {**copy.deepcopy(sampler), "model": [model, 0]}}
        p[f"7{i}"] = {"class_type": "SaveLatent",
                      "inputs": {"samples": [f"6{i}", 0], "filename_prefix": f"trainer_export/{branch}"}}
    start = len(comfy_server.log_text())
    result = comfy_server.run(p)
    assert result.ok, (result.rejected, result.error, comfy_server.log_tail())
    log = comfy_server.log_text()[start:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log[-3000:]

    def latent(i: int) -> torch.Tensor:
        (item,) = result.ui(f"7{i}")["latents"]
        return load_file(str(comfy_server.base / item["type"] / item["subfolder"] / item["filename"]))["latent_tensor"]

    out = {branch: latent(i) for i, branch in enumerate(branches)}
    for branch in ("core_comfyui", "pack_comfyui", "pack_diffusers", "pack_hub"):
        torch.testing.assert_close(out[branch], out["merged"], rtol=1e-4, atol=1e-4, msg=branch)
    assert (out["merged"] - out["base"]).abs().max() > 1e-3  # the LoRA does something
    for node in ("22", "23", "24"):
        assert f"{n_modules} weights patched" in result.ui(node)["text"][0], result.ui(node)
