"""Files and the Hugging Face Hub: atomic folder writes, loading from folders or Hub ids, pushing, model cards.

Used by every reward (``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``) and by the trainer for its
checkpoints and adapter uploads, so that there is one way to write a folder that never ends half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import CheckpointError

if TYPE_CHECKING:
    from .base import LatentReward

__all__ = [
    "atomic_directory",
    "atomic_write_text",
    "atomic_write_file",
    "resolve_pretrained",
    "load_reward",
    "load_reward_folder",
    "save_reward",
    "push_reward",
    "upload_folder",
    "looks_like_repo_id",
    "reward_model_card",
]

CONFIG_NAME = "config.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")


# ---------------------------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``target``; on success it replaces ``target`` in one rename.

    If the body raises (or the process dies), ``target`` is left exactly as it was: a previous version stays
    intact and no half-written folder appears under the target's name.
    """
    target = Path(target).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"cannot write a folder at {target}: a file with that name exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, _ordinary_mode(directory=True))
        yield tmp
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _ordinary_mode(*, directory: bool) -> int:
    """The mode a plain ``mkdir``/``open`` would give under the current umask. ``mkdtemp``/``mkstemp`` create
    owner-only entries; a saved reward or video must stay readable by e.g. a ComfyUI server under another user."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file through a temporary file and a rename, so readers never see half of it."""
    atomic_write_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_file(path: str | Path, write: Callable[[str], Any]) -> Path:
    """Write a file of any format atomically: ``write(tmp)`` fills a temporary file next to ``path`` (safetensors,
    ``torch.save``, a PNG), which then replaces ``path`` in one rename. Readers never see a partial file; if
    ``write`` raises, ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _ordinary_mode(directory=False))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


# ---------------------------------------------------------------------------------------------- resolving
def looks_like_repo_id(value: str) -> bool:
    """Whether ``value`` has the form of a Hub repository id (``user/name``)."""
    return bool(_REPO_ID.match(value)) and ".." not in value


def resolve_pretrained(
    path_or_repo_id: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    allow_patterns: list[str] | None = None,
    hub_only: bool = False,
) -> Path:
    """A local folder as is, or a Hub repository downloaded (or found) in the huggingface_hub cache.

    ``hub_only=True`` never looks for a local folder of that name (for inputs that only take repo ids, so a folder
    that happens to sit at ``user/name`` relative to the working directory cannot shadow the repository)."""
    p = Path(str(path_or_repo_id)).expanduser()
    if not hub_only and p.exists():
        if not p.is_dir():
            raise CheckpointError(
                f"{p} is a file; expected a folder with config.json and model.safetensors "
                "(to import an official Shell-LCC .pth use `latent-rewards convert`)"
            )
        return p
    name = str(path_or_repo_id)
    if not looks_like_repo_id(name):
        raise CheckpointError(f"{name}: no such folder, and not a Hub repository id of the form 'user/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .. import __version__

    try:
        folder = snapshot_download(
            name,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            allow_patterns=allow_patterns or ["*.json", "*.safetensors", "README.md", "*.yaml"],
            library_name="latent-rewards",
            library_version=__version__,
        )
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise CheckpointError(f"{name}: Hub repository not found or not accessible ({type(e).__name__})") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{name}: revision {revision!r} not found on the Hub") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{name}: not in the local Hugging Face cache and the Hub cannot be reached "
            "(offline?); download it once online or pass a local folder"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"{name}: could not download from the Hub: {e}") from None
    return Path(folder)


def read_config(folder: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a reward folder, validated to be a latent-rewards config (has ``kind``)."""
    folder = Path(folder)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{folder} is not a latent-rewards reward folder: expected {CONFIG_NAME} and model.safetensors"
        )
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable config ({e})") from None
    if not isinstance(data, dict) or "kind" not in data:
        raise CheckpointError(f"{cfg_path}: not a latent-rewards config (expected a JSON object with 'kind')")
    return data


# ---------------------------------------------------------------------------------------------- rewards
def load_reward_folder(
    folder: str | Path,
    *,
    expected_class: type["LatentReward"] | None = None,
    map_location: str | torch.device = "cpu",
) -> "LatentReward":
    """Build the reward class named by the folder's ``config.json`` and load its weights strictly, frozen."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .base import LatentReward, reward_class_for_kind

    folder = Path(folder)
    data = read_config(folder)
    cls = reward_class_for_kind(data["kind"])
    if expected_class is not None and expected_class is not LatentReward and not issubclass(cls, expected_class):
        raise CheckpointError(
            f"{folder} holds a {data['kind']!r} reward, not a {expected_class.kind or expected_class.__name__!r} "
            f"one; load it with latent_rewards.load_reward"
        )
    model = cls(cls.config_from_dict(data))
    weights = folder / cls.weights_name
    if not weights.is_file():
        raise CheckpointError(f"{folder}: missing {cls.weights_name}")
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
    model.load_weights(state, source=str(weights))
    return model.to(map_location).freeze()


def save_reward(reward: "LatentReward", save_directory: str | Path, *, model_card: str | None = None) -> Path:
    """Write ``model.safetensors``, ``config.json`` and ``README.md`` into ``save_directory`` atomically."""
    from safetensors.torch import save_file

    save_directory = Path(save_directory)
    state = {k: v.detach().contiguous().cpu() for k, v in reward.state_dict().items()}
    with atomic_directory(save_directory) as tmp:
        save_file(state, str(tmp / reward.weights_name), metadata={"format": "pt", "kind": reward.kind})
        (tmp / CONFIG_NAME).write_text(json.dumps(reward.config_dict(), indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(model_card or reward_model_card(reward), encoding="utf-8")
    return save_directory


def load_reward(
    path_or_repo_id: "str | Path | LatentReward",
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    map_location: str | torch.device = "cpu",
) -> "LatentReward":
    """Load any saved reward (folder or Hub id); the class is chosen by ``kind`` in its ``config.json``.

    A :class:`LatentReward` instance is returned as is, so APIs can accept "path, repo id or object".
    """
    from .base import LatentReward

    if isinstance(path_or_repo_id, LatentReward):
        return path_or_repo_id
    if not isinstance(path_or_repo_id, (str, Path)):
        raise CheckpointError(
            f"expected a reward folder, a Hub repo id or a LatentReward, got {type(path_or_repo_id).__name__}"
        )
    return LatentReward.from_pretrained(
        path_or_repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
        token=token, map_location=map_location,
    )


def upload_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload with latent-rewards",
    revision: str | None = None,
    create_pr: bool = False,
) -> str:
    """Create the repository if needed and upload ``folder``. The token comes from the argument, ``HF_TOKEN``
    or ``huggingface-cli login``; it is never printed."""
    from huggingface_hub import HfApi

    if not looks_like_repo_id(repo_id):
        raise CheckpointError(f"{repo_id!r} is not a Hub repository id of the form 'user/name'")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
            revision=revision, create_pr=create_pr,
        )
    except Exception as e:  # network, offline mode, auth, permissions: one clear line, never the token
        raise CheckpointError(f"could not upload to the Hub repository {repo_id}: {_hub_error_line(e, token)}") from None
    return str(getattr(info, "commit_url", info))


def _hub_error_line(error: Exception, token: str | bool | None) -> str:
    """First line of a Hub error with any token scrubbed, plus a hint for the usual causes."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    for secret in {token if isinstance(token, str) else None, os.environ.get("HF_TOKEN")} - {None, ""}:
        line = line.replace(secret, "***")
    name = type(error).__name__
    if "Offline" in name or "offline" in line.lower():
        hint = "HF_HUB_OFFLINE is set; unset it to upload"
    elif "401" in line or "403" in line or "token" in line.lower():
        hint = "log in with `huggingface-cli login` or set HF_TOKEN to a token with write access"
    elif "Connect" in name or "Timeout" in name:
        hint = "the Hub cannot be reached from this machine"
    else:
        hint = ""
    return f"{name}: {line}" + (f" ({hint})" if hint else "")


def push_reward(reward: "LatentReward", repo_id: str, **kwargs: Any) -> str:
    """Save ``reward`` to a temporary folder and upload it (see :func:`upload_folder` for the arguments)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_reward(reward, Path(tmp) / "reward")
        return upload_folder(folder, repo_id, **kwargs)


def reward_model_card(reward: "LatentReward") -> str:
    """A model card with Hub metadata and usage for Python, diffusers and ComfyUI."""
    cfg = reward.config_dict()
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in cfg.items())
    return f"""---
library_name: latent-rewards
tags:
- latent-rewards
- {reward.kind}
- video
- reward-model
- {reward.latent_space.name}
license: apache-2.0
---

# {reward.kind} latent reward ({reward.latent_space.name} latents)

A latent-space video reward for [latent-rewards](https://github.com/latent-rewards/latent-rewards). It reads
normalised `{reward.latent_space.name}` latents `[B, {reward.latent_space.channels}, T, H, W]` and returns one value
per video, higher is better.

## Use

```python
from latent_rewards import load_reward
reward = load_reward("path/or/user-repo")
scores = reward.reward(latents)          # [B]
```

diffusers: `pipe.load_latent_reward("path/or/user-repo")` on a `RewardGuidedWanPipeline`.
ComfyUI: put this folder in `ComfyUI/models/latent_rewards/` and pick it in **Latent Reward Loader**.

## Config

| field | value |
|---|---|
{rows}
"""
