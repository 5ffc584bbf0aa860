"""Tiny models for the ComfyUI tests, built at test time (nothing is committed or downloaded).

* the tiny Wan2.1 T2V transformer of ``pipelines/tiny.py`` converted to original Wan names (ComfyUI detects it as
  ``WAN21_T2V``), and a 48-channel twin that ComfyUI detects as Wan2.2 (another latent space);
* a small random Shell-LCC reward folder, and the same reward as a prepared offline Hugging Face cache entry;
* a random rank-4 LoRA on that transformer, written in diffusers/peft format (``save_lora_weights``, alpha in the
  safetensors header) and in ComfyUI format (``peft_lora_to_comfyui``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

# Names the API-format workflows in workflows/api/ refer to.
TINY_WAN21 = "latent_rewards_tiny_wan21_t2v.safetensors"
TINY_WAN22 = "latent_rewards_tiny_wan22_48ch.safetensors"
REWARD_NAME = "tiny-shell-lcc"
HUB_REPO = "latent-rewards-test/tiny-shell-lcc"
LORA_DIR = "latent_rewards_tiny"
LORA_DIFFUSERS = f"{LORA_DIR}/pytorch_lora_weights.safetensors"
LORA_COMFYUI = f"{LORA_DIR}/tiny_reward_lora_comfyui.safetensors"
LORA_NOT_A_LORA = f"{LORA_DIR}/not_a_lora.safetensors"
LORA_RANK, LORA_ALPHA = 4, 8.0
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


def tiny_wan_state(channels: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny Wan transformer's weights with original Wan names (what ComfyUI's UNETLoader reads)."""
    from latent_rewards.pipelines.tiny import tiny_wan_transformer
    from latent_rewards.rewards.wan_keys import diffusers_state_dict_to_wan

    model = tiny_wan_transformer(seed, in_channels=channels, out_channels=channels)
    return {k: v.detach().contiguous() for k, v in diffusers_state_dict_to_wan(model.state_dict()).items()}


def make_reward(seed: int = 0):
    from latent_rewards import ShellLCC

    torch.manual_seed(seed)
    return ShellLCC(num_bases=64, hidden_dim=32).freeze()


def make_lora(seed: int = 0) -> tuple[dict[str, torch.Tensor], "object"]:
    """A random (non-zero) peft LoRA on the tiny transformer: (state dict without prefix, LoraConfig)."""
    from latent_rewards.pipelines.tiny import tiny_wan_transformer
    from peft import LoraConfig, get_peft_model_state_dict

    model = tiny_wan_transformer(0)
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS)
    model.add_adapter(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}, config


@dataclass
class Assets:
    base: Path
    reward_dir: Path
    hub_cache: Path
    lora_state: dict[str, torch.Tensor]


def write_hub_snapshot(cache: Path, repo_id: str, folder: Path) -> Path:
    """Lay a folder out as a huggingface_hub cache entry (refs/main -> snapshots/<commit>), for offline loading."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 39 + "1"
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        shutil.copy2(f, snap / f.name)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snap


def populate_models(base: Path) -> Assets:
    """Write every tiny model the tests and the API workflows use into ``base/models``."""
    from diffusers import WanPipeline
    from latent_rewards.rewards.wan_keys import peft_lora_to_comfyui
    from safetensors.torch import save_file

    models = base / "models"
    dm = models / "diffusion_models"
    dm.mkdir(parents=True, exist_ok=True)
    save_file(tiny_wan_state(16), str(dm / TINY_WAN21))
    save_file(tiny_wan_state(48), str(dm / TINY_WAN22))

    rewards = models / "latent_rewards"
    reward_dir = make_reward(0).save_pretrained(rewards / REWARD_NAME)
    # Not a reward: a valid config whose weights file is the diffusion model.
    bad = rewards / "not-a-reward"
    bad.mkdir(parents=True, exist_ok=True)
    shutil.copy2(reward_dir / "config.json", bad / "config.json")
    shutil.copy2(dm / TINY_WAN21, bad / "model.safetensors")
    hub_cache = rewards / ".hub"
    write_hub_snapshot(hub_cache, HUB_REPO, reward_dir)

    loras = models / "loras" / LORA_DIR
    loras.mkdir(parents=True, exist_ok=True)
    state, config = make_lora(0)
    WanPipeline.save_lora_weights(str(loras), transformer_lora_layers=state, transformer_lora_adapter_metadata=config.to_dict())
    save_file(peft_lora_to_comfyui(state, LORA_ALPHA), str(models / "loras" / LORA_COMFYUI))
    shutil.copy2(dm / TINY_WAN21, models / "loras" / LORA_NOT_A_LORA)
    return Assets(base=base, reward_dir=reward_dir, hub_cache=hub_cache, lora_state=state)
