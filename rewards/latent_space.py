"""Named latent spaces that rewards read.

A reward reads *normalised* VAE latents ``[B, C, T, H, W]``: for Wan2.1 that is ``(mu - mean) / std`` with the
per-channel constants below, i.e. the space the Wan DiT denoises in (diffusers' Wan loop latents, ComfyUI's
tensors inside sampler hooks). Raw VAE latents (a VAE encode, a ComfyUI ``LATENT``) are normalised with
:meth:`LatentSpace.normalise` before scoring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import LatentShapeError, LatentSpaceMismatchError, NonFiniteError

__all__ = [
    "LatentSpace",
    "WAN21",
    "get_latent_space",
    "register_latent_space",
    "available_latent_spaces",
    "latent_space_for_constants",
]


@dataclass(frozen=True)
class LatentSpace:
    """Description of a VAE latent space.

    Attributes:
        name: canonical name recorded in every saved reward (``"wan2.1"``).
        channels: latent channels ``C``.
        mean, std: per-channel constants of the normalisation ``(raw - mean) / std``.
        temporal_compression, spatial_compression: VAE strides (frames and pixels per latent voxel).
        default_vae: Hub id of a diffusers repository whose ``vae`` subfolder encodes into this space.
        aliases: other spellings accepted by :func:`get_latent_space`.
    """

    name: str
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    temporal_compression: int = 4
    spatial_compression: int = 8
    default_vae: str | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"latent space {self.name!r}: mean/std need {self.channels} values each")

    def _stats(self, like: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = [1] * like.ndim
        shape[channel_dim] = self.channels
        mean = torch.tensor(self.mean, dtype=torch.float32, device=like.device).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32, device=like.device).view(shape)
        return mean, std

    def normalise(self, raw: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
        """Raw VAE latents (posterior mean) -> the normalised space rewards read. Keeps the input dtype."""
        self.check_channels(raw, channel_dim)
        mean, std = self._stats(raw, channel_dim)
        return ((raw.float() - mean) / std).to(raw.dtype)

    def denormalise(self, z: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
        """Inverse of :meth:`normalise`: what the VAE decoder expects."""
        self.check_channels(z, channel_dim)
        mean, std = self._stats(z, channel_dim)
        return (z.float() * std + mean).to(z.dtype)

    def check_channels(self, z: torch.Tensor, channel_dim: int = 1) -> None:
        if not isinstance(z, torch.Tensor):
            raise LatentShapeError(f"expected a torch.Tensor of {self.name} latents, got {type(z).__name__}")
        if z.ndim <= channel_dim or z.shape[channel_dim] != self.channels:
            raise LatentShapeError(
                f"expected {self.name} latents with {self.channels} channels in dim {channel_dim}, "
                f"got shape {tuple(z.shape)}"
            )

    def check(self, z: torch.Tensor, *, name: str = "latents", check_finite: bool = True) -> None:
        """Validate a batch ``[B, C, T, H, W]`` of latents of this space; raise a clear error otherwise."""
        if not isinstance(z, torch.Tensor):
            raise LatentShapeError(f"{name}: expected a torch.Tensor [B, C, T, H, W], got {type(z).__name__}")
        if z.ndim != 5:
            hint = " (add a batch dimension with z[None])" if z.ndim == 4 else ""
            raise LatentShapeError(
                f"{name}: expected a 5-D tensor [B, {self.channels}, T, H, W] of {self.name} latents, "
                f"got shape {tuple(z.shape)}{hint}"
            )
        if z.shape[1] != self.channels:
            hint = ""
            if z.shape[2] == self.channels:
                hint = " (it looks like [B, T, C, H, W]: permute with z.permute(0, 2, 1, 3, 4))"
            raise LatentShapeError(
                f"{name}: expected {self.channels} channels ({self.name}) in dim 1, got shape {tuple(z.shape)}{hint}"
            )
        if not z.is_floating_point():
            raise LatentShapeError(f"{name}: expected a floating-point tensor, got {z.dtype}")
        if z.numel() == 0:
            raise LatentShapeError(f"{name}: empty tensor of shape {tuple(z.shape)}")
        if check_finite and not bool(torch.isfinite(z).all()):
            raise NonFiniteError(f"{name}: contains NaN or Inf values; expected finite {self.name} latents")

    def matches_constants(self, mean: Any, std: Any, *, atol: float = 1e-3) -> bool:
        """Whether a VAE's normalisation constants (e.g. diffusers' ``latents_mean``/``latents_std``) are this
        space's, i.e. its normalised latents are what a reward of this space reads."""
        if mean is None or std is None or len(mean) != self.channels or len(std) != self.channels:
            return False
        return all(abs(float(a) - b) <= atol for a, b in zip((*mean, *std), (*self.mean, *self.std)))

    def expect(self, other: "LatentSpace | str", *, what: str = "reward") -> None:
        """Raise :class:`LatentSpaceMismatchError` unless ``other`` names this same space."""
        other_space = get_latent_space(other) if isinstance(other, str) else other
        if other_space.name != self.name:
            raise LatentSpaceMismatchError(
                f"{what} reads {self.name} latents but was given {other_space.name} latents; "
                f"use a reward trained on {other_space.name} latents"
            )


# Wan2.1 VAE constants (diffusers `AutoencoderKLWan.config.latents_mean/std`, Wan `vae2_1.py`).
WAN21 = LatentSpace(
    name="wan2.1",
    channels=16,
    mean=(
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    ),
    std=(
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    ),
    temporal_compression=4,
    spatial_compression=8,
    default_vae="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    aliases=("wan21", "wan2_1", "wan-2.1", "wan"),
)

_REGISTRY: dict[str, LatentSpace] = {}


def _key(name: str) -> str:
    return name.strip().lower()


def register_latent_space(space: LatentSpace) -> LatentSpace:
    """Make a latent space available by name (and its aliases) to :func:`get_latent_space`."""
    for n in (space.name, *space.aliases):
        _REGISTRY[_key(n)] = space
    return space


def get_latent_space(name: str | LatentSpace) -> LatentSpace:
    """Look up a latent space by name or alias (case-insensitive)."""
    if isinstance(name, LatentSpace):
        return name
    try:
        return _REGISTRY[_key(name)]
    except KeyError:
        raise LatentSpaceMismatchError(
            f"unknown latent space {name!r}; expected one of {available_latent_spaces()}"
        ) from None


def latent_space_for_constants(mean: Any, std: Any, *, atol: float = 1e-3) -> LatentSpace | None:
    """The registered space whose normalisation constants these are (a VAE config's ``latents_mean/std``)."""
    for space in {id(s): s for s in _REGISTRY.values()}.values():
        if space.matches_constants(mean, std, atol=atol):
            return space
    return None


def available_latent_spaces() -> list[str]:
    return sorted({s.name for s in _REGISTRY.values()})


register_latent_space(WAN21)
