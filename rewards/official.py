"""Import of the authors' Shell-LCC checkpoint (``manifold/shell_lcc.pth`` of needylove/Shell-LCC).

The file is a ``torch.save`` dict ``{"model": state_dict, "config": {...}, ...}``; the state dict has ``basis``,
``global_scale``, ``global_bias``, ``predictor.*`` (with BatchNorm buffers) and ``surface_head.*``, possibly
prefixed ``module.`` (saved from DDP). It is read with ``weights_only=True``: nothing is unpickled beyond tensors
and plain containers. Our :class:`~.shell_lcc.ShellLCC` uses the same parameter names, so the conversion is a
validation plus a prefix strip, and the converted reward computes exactly the authors' ``distance_reward``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .shell_lcc import ShellLCC, ShellLCCConfig

__all__ = ["load_official_shell_lcc", "convert_official_checkpoint"]

_PREFIXES = ("module.", "_orig_mod.", "model.")


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def _read(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (expected the official Shell-LCC .pth checkpoint)")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain containers, which "
            f"latent-rewards never unpickles ({str(e).splitlines()[0]})"
        ) from None
    except Exception as e:  # torch.load raises many types on garbage (IndexError, RuntimeError, EOFError...)
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first})") from None


def load_official_shell_lcc(
    path: str | Path, *, reward_mode: str = "plain", tau: float | None = None, latent_space: str = "wan2.1"
) -> ShellLCC:
    """Read an official Shell-LCC ``.pth`` and return the equivalent frozen :class:`ShellLCC`."""
    path = Path(path)
    ckpt = _read(path)
    if isinstance(ckpt, dict) and "model" in ckpt and isinstance(ckpt["model"], dict):
        state, config = ckpt["model"], ckpt.get("config") or {}
    elif isinstance(ckpt, dict) and any(_strip(k) == "basis" for k in ckpt if isinstance(k, str)):
        state, config = ckpt, {}  # a bare state dict
    else:
        keys = sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path}: not a Shell-LCC checkpoint: expected a dict with 'model' (state dict with 'basis', "
            f"'predictor.*', 'surface_head.*') and 'config'; found {keys}"
        )
    if not isinstance(config, dict):
        config = {}
    state = {_strip(k): v for k, v in state.items() if isinstance(k, str)}
    for need in ("basis", "predictor.0.weight", "surface_head.0.weight"):
        if need not in state or not isinstance(state[need], torch.Tensor):
            raise CheckpointError(f"{path}: not a Shell-LCC checkpoint: state dict lacks {need!r}")
    num_bases, emb = state["basis"].shape
    hidden = state["predictor.0.weight"].shape[0]
    for key, actual in (("embedding_dim", emb), ("num_bases", num_bases), ("hidden_dim", hidden)):
        if key in config and config[key] is not None and int(config[key]) != int(actual):
            raise CheckpointError(
                f"{path}: config says {key}={config[key]} but the weights have {actual}; the file is inconsistent"
            )
    cfg = ShellLCCConfig(
        embedding_dim=int(emb), num_bases=int(num_bases), hidden_dim=int(hidden),
        latent_space=latent_space, reward_mode=reward_mode, tau=tau,
    )
    model = ShellLCC(cfg)
    own = model.state_dict()
    # Older BatchNorm saves may lack `num_batches_tracked`; it does not affect eval-mode outputs.
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros_like(v)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_weights(state, source=str(path))
    return model.freeze()


def convert_official_checkpoint(
    path: str | Path,
    out_dir: str | Path,
    *,
    reward_mode: str = "plain",
    tau: float | None = None,
    latent_space: str = "wan2.1",
) -> Path:
    """Convert an official ``.pth`` into a reward folder (``config.json`` + ``model.safetensors`` + card)."""
    model = load_official_shell_lcc(path, reward_mode=reward_mode, tau=tau, latent_space=latent_space)
    return model.save_pretrained(out_dir)
