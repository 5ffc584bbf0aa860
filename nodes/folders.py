"""Model folders: ``models/latent_rewards/`` (reward folders and the Hub download cache) and LoRA files.

A reward is a *folder* (``config.json`` + ``model.safetensors``), so the dropdown lists folders found under every
``latent_rewards`` path ComfyUI knows (the default ``models/latent_rewards`` plus any ``extra_model_paths.yaml``
entry). Hub downloads go to ``models/latent_rewards/.hub`` (huggingface_hub cache layout, hidden from the list).
"""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from ..rewards.errors import CheckpointError
from ..rewards.hub import looks_like_repo_id, resolve_pretrained

__all__ = [
    "FOLDER",
    "HUB_CACHE_NAME",
    "register_folders",
    "reward_dirs",
    "hub_cache_dir",
    "resolve_hub_repo",
    "list_reward_folders",
    "resolve_reward_folder",
    "list_lora_files",
    "resolve_lora_file",
    "NONE_FOUND",
]

FOLDER = "latent_rewards"
HUB_CACHE_NAME = ".hub"
#: Dropdown placeholder when nothing is installed (a combo must offer at least one value).
NONE_FOUND = "(none found)"
_MAX_DEPTH = 3


def register_folders() -> None:
    """Make ``models/latent_rewards`` a ComfyUI model folder (kept first; user-configured paths stay)."""
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)


def reward_dirs() -> list[Path]:
    """Every ``latent_rewards`` model folder ComfyUI knows (``models/latent_rewards`` first, then extra paths)."""
    register_folders()
    return [Path(p) for p in folder_paths.get_folder_paths(FOLDER)]


def hub_cache_dir() -> Path:
    """Where Hub repositories (rewards and LoRAs) are downloaded: ``models/latent_rewards/.hub``."""
    return reward_dirs()[0] / HUB_CACHE_NAME


def resolve_hub_repo(repo_id: str, *, allow_patterns: list[str] | None = None, form: str = "'user/name'") -> Path:
    """The snapshot folder of a Hub repository (rewards and LoRAs alike), downloaded once into
    :func:`hub_cache_dir` or found there offline; :class:`CheckpointError` unless ``repo_id`` is ``user/name``
    (``form`` describes what the node's input accepts, for that message)."""
    if not looks_like_repo_id(repo_id):
        raise CheckpointError(f"repo_id {repo_id!r} is not a Hugging Face repo id of the form {form}")
    return resolve_pretrained(repo_id, cache_dir=hub_cache_dir(), allow_patterns=allow_patterns, hub_only=True)


def list_reward_folders() -> list[str]:
    """Reward folders (relative names, ``/``-separated) under every ``latent_rewards`` path, sorted."""
    found: set[str] = set()
    for base in reward_dirs():
        if not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
            rel = Path(dirpath).relative_to(base)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if len(rel.parts) < _MAX_DEPTH else []
            if "config.json" in filenames and rel.parts:
                found.add(rel.as_posix())
    return sorted(found)


def resolve_reward_folder(name: str) -> Path:
    """The folder of a reward listed by :func:`list_reward_folders`."""
    if name and name != NONE_FOUND and ".." not in Path(name).parts:
        for base in reward_dirs():
            candidate = base / name
            if candidate.is_dir():
                return candidate
    bases = ", ".join(str(b) for b in reward_dirs())
    raise CheckpointError(
        f"reward {name!r} not found in {bases}; put a reward folder (config.json + model.safetensors) there, "
        "or give a Hugging Face repo id"
    )


def list_lora_files() -> list[str]:
    """LoRA files ComfyUI lists under ``models/loras`` that are safetensors (nothing else is ever unpickled)."""
    return sorted(f for f in folder_paths.get_filename_list("loras") if f.lower().endswith((".safetensors", ".sft")))


def resolve_lora_file(name: str) -> Path:
    """The full path of a LoRA listed under ``models/loras``; :class:`CheckpointError` if missing or not safetensors."""
    path = folder_paths.get_full_path("loras", name) if name and name != NONE_FOUND else None
    if path is None or not os.path.isfile(path):
        raise CheckpointError(f"LoRA {name!r} not found in models/loras; pick a listed file or give a Hub repo id")
    if not path.lower().endswith((".safetensors", ".sft")):
        raise CheckpointError(f"{path}: only .safetensors LoRA files are loaded (pickled formats are refused)")
    return Path(path)
