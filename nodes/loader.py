"""``LatentRewardsLoader``: a reward folder from ``models/latent_rewards`` or a Hub repo id -> ``LATENT_REWARD``."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch
from comfy_api.latest import io, ui

from ..rewards.base import LatentReward
from ..rewards.errors import CheckpointError
from ..rewards.hub import load_reward
from .folders import NONE_FOUND, list_reward_folders, resolve_hub_repo, resolve_reward_folder
from .types import CATEGORY, LatentRewardType

__all__ = ["LatentRewardsLoader", "load_cached_reward", "clear_reward_cache"]

log = logging.getLogger(__name__)

# Loaded rewards, shared by every node that uses them: resolved folder -> (file fingerprint, reward).
_CACHE: dict[str, tuple[tuple, LatentReward]] = {}
_LOCK = threading.Lock()


def _fingerprint(folder: Path) -> tuple:
    stats = []
    for f in sorted(folder.glob("*")):
        if f.is_file() and f.suffix in (".json", ".safetensors"):
            st = f.stat()
            stats.append((f.name, st.st_size, st.st_mtime_ns))
    return tuple(stats)


def load_cached_reward(folder: Path) -> LatentReward:
    """Load (once per folder content) a reward from a local folder, outside inference mode: normal tensors."""
    folder = folder.resolve()
    fp = _fingerprint(folder)
    with _LOCK:
        hit = _CACHE.get(str(folder))
        if hit is not None and hit[0] == fp:
            return hit[1]
        # ComfyUI executes nodes under torch.inference_mode(); tensors made there could never take a gradient.
        with torch.inference_mode(False):
            reward = load_reward(folder)
        _CACHE[str(folder)] = (fp, reward)
        log.info("[latent-rewards] loaded %s reward from %s", reward.kind, folder)
        return reward


def clear_reward_cache() -> None:
    """Forget every reward the loader keeps in memory (the next load reads the folder again)."""
    with _LOCK:
        _CACHE.clear()


def _resolve(reward: str, repo_id: str) -> Path:
    repo_id = (repo_id or "").strip()
    return resolve_hub_repo(repo_id) if repo_id else resolve_reward_folder(reward)


class LatentRewardsLoader(io.ComfyNode):
    """Load a latent reward (Shell-LCC today; PAVRM / VELR ensembles use the same folder format)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        folders = list_reward_folders() or [NONE_FOUND]
        return io.Schema(
            node_id="LatentRewardsLoader",
            display_name="Latent Reward Loader",
            category=CATEGORY,
            description=(
                "Loads a latent-space video reward (config.json + model.safetensors) from models/latent_rewards/ "
                "or from a Hugging Face repo (downloaded once into models/latent_rewards/.hub). Loaded rewards are "
                "cached; nothing is unpickled."
            ),
            inputs=[
                io.Combo.Input(
                    "reward",
                    options=folders,
                    default=folders[0],
                    tooltip="A reward folder under models/latent_rewards/ (each holds config.json and "
                    "model.safetensors). Ignored when repo_id is set.",
                ),
                io.String.Input(
                    "repo_id",
                    default="",
                    tooltip="Optional Hugging Face repo id (user/name) of a reward; downloaded into "
                    "models/latent_rewards/.hub on first use (offline: read from there). Overrides 'reward'.",
                ),
            ],
            outputs=[LatentRewardType.Output(display_name="reward", tooltip="The loaded reward (LATENT_REWARD).")],
        )

    @classmethod
    def fingerprint_inputs(cls, reward: str = "", repo_id: str = "", **_: object) -> str:
        # Re-run when the files of a local reward change; Hub snapshots are immutable per revision.
        if (repo_id or "").strip():
            return f"hub:{repo_id.strip()}"
        try:
            folder = resolve_reward_folder(reward)
        except CheckpointError:
            return f"missing:{reward}"
        return repr(_fingerprint(folder))

    @classmethod
    def execute(cls, reward: str, repo_id: str = "") -> io.NodeOutput:
        folder = _resolve(reward, repo_id)
        model = load_cached_reward(folder)
        cfg = {k: v for k, v in model.config_dict().items() if k not in ("kind", "latent_rewards_version")}
        summary = f"{model.kind} reward ({model.latent_space.name} latents) from {folder}\n" + ", ".join(
            f"{k}={v}" for k, v in cfg.items()
        )
        return io.NodeOutput(model, ui=ui.PreviewText(summary))
