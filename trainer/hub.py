"""Pushing a trained adapter to the Hugging Face Hub (``latent-rewards push``).

What is uploaded is one folder built by :func:`prepare_upload`: the adapter in both formats
(``pytorch_lora_weights.safetensors`` and ``<name>_comfyui.safetensors``, or ``transformer/`` for a full
fine-tune), the model card ``README.md`` (its usage snippets pointed at the repository), ``training_config.yaml``
and ``metrics.json`` (validation videos on request). ``--dry-run OUT`` writes exactly that folder and uploads
nothing. A run folder uploads its ``best/`` step; a run without one is refused (name a checkpoint explicitly).
The token comes from the ``HF_TOKEN`` environment variable or ``hf auth login`` and is never printed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..rewards.errors import CheckpointError
from ..rewards.hub import atomic_directory, looks_like_repo_id, upload_folder
from .export import LORA_WEIGHTS_NAME, TRAINING_STATE_DIR, list_checkpoints, set_card_repo_id

__all__ = ["resolve_export", "export_warning", "prepare_upload", "push", "UPLOAD_FILES"]

#: Besides the weights: what a pushed folder holds.
UPLOAD_FILES = ("README.md", "training_config.yaml", "metrics.json")


def _is_export(folder: Path) -> bool:
    return (folder / LORA_WEIGHTS_NAME).is_file() or (folder / "transformer").is_dir()


def _read_metrics(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _why_no_best(newest: Path) -> str:
    """Why a run has no ``best/``, from its newest checkpoint's validation history."""
    metrics = _read_metrics(newest)
    validations = [h for h in metrics.get("history") or [] if int(h.get("step", 0)) > 0]
    if validations and all(h.get("flags") for h in validations):
        flagged = "; ".join(f"step {h['step']}: {', '.join(h['flags'])}" for h in validations[-3:])
        why = f"every validation was flagged by the reward-hacking rule ({flagged})"
    elif validations:
        why = "its best step was not exported (the run was interrupted while writing it?)"
    else:
        why = "no validation step has run yet (still training, or stopped before the first validation)"
    if metrics.get("stop_reason"):
        why += f"; training {metrics['stop_reason']}"
    return why


def resolve_export(path: str | Path) -> Path:
    """A checkpoint or ``best/`` folder as is; a run folder -> its ``best/``.

    A run without ``best/`` is refused rather than silently replaced by its newest checkpoint, which is the step
    the reward-hacking rule did not pick (or had no chance to judge): the error says why and names the checkpoint
    to pass explicitly to publish it anyway.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such folder; expected a training run folder or one of its checkpoints")
    if _is_export(p):
        return p
    if _is_export(p / "best"):
        return p / "best"
    checkpoints = [c for _, c in list_checkpoints(p) if _is_export(c)]
    if checkpoints:
        newest = checkpoints[-1]
        raise CheckpointError(
            f"{p} has no best/ export: {_why_no_best(newest)}. Nothing was uploaded; to publish a checkpoint "
            f"anyway, pass it explicitly, e.g. {newest} (its README.md lists its validation verdicts)"
        )
    raise CheckpointError(
        f"{p}: not a training run or checkpoint (expected {LORA_WEIGHTS_NAME}, best/ or checkpoint-<step>/)"
    )


def export_warning(folder: str | Path) -> str | None:
    """A warning about publishing ``folder`` if its own validation was flagged by the reward-hacking rule."""
    folder = Path(folder)
    metrics = _read_metrics(folder)
    validation = metrics.get("validation") or {}
    if validation.get("flags"):
        best = metrics.get("best_step")
        return (
            f"{folder.name} (step {metrics.get('step')}) was flagged by the reward-hacking rule: "
            f"{'; '.join(validation['flags'])}; the run's best step is {best if best is not None else 'none'}"
        )
    return None


def prepare_upload(
    source: str | Path, dest: str | Path, *, repo_id: str | None = None, include_videos: bool = False
) -> Path:
    """Write the folder that would be uploaded for ``source`` to ``dest`` (atomically); returns ``dest``.

    ``repo_id``: the repository it goes to; the model card's usage snippets are pointed at it.
    """
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
        if repo_id is not None:
            set_card_repo_id(tmp, repo_id)
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
        folder = prepare_upload(src, Path(tmp) / "upload", repo_id=repo_id, include_videos=include_videos)
        return upload_folder(
            folder, repo_id, private=private, token=token,
            commit_message=commit_message or f"Upload {src.name} with latent-rewards",
        )
