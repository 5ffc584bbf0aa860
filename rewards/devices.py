"""One ``--device`` resolver for every command (encode, score, evaluate, generate) and the Wan pipeline loader.
It lives in the core so that both ``pipelines/`` and ``trainer/`` can use it (dependencies point down only).

Pure PyTorch (no diffusers import), so the CLI can check a device before loading any model, and a bad value is
one :class:`ConfigError` line that names the devices this machine has, never a traceback from deep inside torch.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

__all__ = ["available_devices", "resolve_device"]

#: Accelerator types checked for availability (``torch.<type>.is_available()``), in preference order after CUDA.
_ACCELERATORS = ("mps", "xpu")


def _available(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        backend = getattr(torch.backends, "mps", None)
        return bool(backend is not None and backend.is_available())
    module = getattr(torch, kind, None)
    return bool(module is not None and getattr(module, "is_available", lambda: False)())


def _count(kind: str) -> int:
    if kind == "cuda":
        return torch.cuda.device_count()
    if kind == "mps":
        return 1
    module = getattr(torch, kind, None)
    return int(getattr(module, "device_count", lambda: 1)())


def available_devices() -> list[str]:
    """The ``--device`` values that work on this machine: ``auto``, ``cpu``, then each accelerator and index."""
    names = ["auto", "cpu"]
    for kind in ("cuda", *_ACCELERATORS):
        if _available(kind):
            n = _count(kind)
            names += [kind] + ([f"{kind}:{i}" for i in range(n)] if n > 1 or kind == "cuda" else [])
    return names


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA if available, else CPU. Any other value must name a device this machine has.

    Raises:
        ConfigError: a malformed name (``"foo"``, ``"cuda:x"``), a device type this machine lacks (``"cuda"`` on
            a CPU-only torch), or an index past the last device; the message lists the valid choices.
    """
    if device is None or str(device).strip().lower() in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choices = ", ".join(available_devices())
    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device).strip().lower())
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {str(device)!r}; expected one of: {choices}") from None
    if dev.type == "cpu":
        if dev.index not in (None, 0):
            raise ConfigError(f"device {str(device)!r}: the CPU has no index; expected one of: {choices}")
        return dev
    if dev.type not in ("cuda", *_ACCELERATORS):
        raise ConfigError(f"device {str(device)!r} is not a compute device for this tool; expected one of: {choices}")
    if not _available(dev.type):
        raise ConfigError(f"device {str(device)!r} asked for, but this PyTorch has no {dev.type.upper()} device "
                          f"available; expected one of: {choices}")
    if dev.index is not None and dev.index >= _count(dev.type):
        raise ConfigError(f"device {str(device)!r} does not exist ({_count(dev.type)} {dev.type} device(s)); "
                          f"expected one of: {choices}")
    return dev
