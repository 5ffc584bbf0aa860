"""Pushing a trained adapter to the Hugging Face Hub (``latent-rewards push``).

What is uploaded is one folder built by :func:`prepare_upload`: the adapter in both formats
(``pytorch_lora_weights.safetensors`` and ``<name>_comfyui.safetensors``, or ``transformer/`` for a full
fine-tune), the model card ``README.md``, ``training_config.yaml`` and ``metrics.json`` (validation videos on
request). ``--dry-run OUT`` writes exactly that folder and uploads nothing. The token comes from the
``HF_TOKEN`` environment variable or ``huggingface-cli login`` and is never printed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..rewards.errors import CheckpointError
from ..rewards.hub import atomic_directory, looks_like_repo_id, upload_folder
from .export import LORA_WEIGHTS_NAME, TRAINING_STATE_DIR, latest_checkpoint, list_checkpoints

__all__ = ["resolve_export", "prepare_upload", "push", "UPLOAD_FILES"]

#: Besides the weights: what a pushed folder holds.
UPLOAD_FILES = ("README.md", "training_config.yaml", "metrics.json")


def _is_export(folder: Path) -> bool:
    return (folder / LORA_WEIGHTS_NAME).is_file() or (folder / "transformer").is_dir()


def resolve_export(path: str | Path) -> Path:
    """A checkpoint or ``best/`` folder as is; a run folder -> its ``best/`` (else its newest checkpoint)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such folder; expected a training run folder or one of its checkpoints")
    if _is_export(p):
        return p
    if _is_export(p / "best"):
        return p / "best"
    ckpt = latest_checkpoint(p) or (list_checkpoints(p)[-1][1] if list_checkpoints(p) else None)
    if ckpt is not None and _is_export(ckpt):
        return ckpt
    raise CheckpointError(
        f"{p}: not a training run or checkpoint (expected {LORA_WEIGHTS_NAME}, best/ or checkpoint-<step>/)"
    )


def prepare_upload(source: str | Path, dest: str | Path, *, include_videos: bool = False) -> Path:
    """Write the folder that would be uploaded for ``source`` to ``dest`` (atomically); returns ``dest``."""
    src = resolve_export(source)
    dest = Path(dest).expanduser()
    with atomic_directory(dest) as tmp:
        for item in sorted(src.iterdir()):
            if item.name == TRAINING_STATE_DIR:
                continue
            if item.name == "validation":
                if include_videos:
                    shutil.copytree(item, tmp / item.name)
                continue
            if item.name == "transformer" and item.is_dir():
                shutil.copytree(item, tmp / item.name)
            elif item.is_file() and (item.suffix == ".safetensors" or item.name in UPLOAD_FILES):
                shutil.copy2(item, tmp / item.name)
        if not (tmp / "README.md").is_file():
            raise CheckpointError(f"{src}: no model card README.md; is this a latent-rewards export?")
    return dest


def push(
    source: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    include_videos: bool = False,
    commit_message: str | None = None,
) -> str:
    """Upload the adapter, card and config of a run/checkpoint to ``repo_id``; returns the commit URL."""
    if not looks_like_repo_id(repo_id):
        raise CheckpointError(f"--repo: {repo_id!r} is not a Hub repository id of the form 'user/name'")
    src = resolve_export(source)
    with tempfile.TemporaryDirectory(prefix="latent-rewards-push-") as tmp:
        folder = prepare_upload(src, Path(tmp) / "upload", include_videos=include_videos)
        return upload_folder(
            folder, repo_id, private=private, token=token,
            commit_message=commit_message or f"Upload {src.name} with latent-rewards",
        )
