"""One exception family for everything a user can get wrong.

Every error says what was expected and, where it helps, how to fix it. The CLI prints the message on one line
and exits non-zero; library users can catch :class:`LatentRewardsError` (or the specific subclass).
"""

from __future__ import annotations

__all__ = [
    "LatentRewardsError",
    "LatentShapeError",
    "LatentSpaceMismatchError",
    "NonFiniteError",
    "CheckpointError",
    "DataError",
    "ConfigError",
    "MissingInputError",
]


class LatentRewardsError(Exception):
    """Base class of all errors raised by latent-rewards for bad input."""


class LatentShapeError(LatentRewardsError, ValueError):
    """A latent tensor has the wrong rank, channel count or layout."""


class LatentSpaceMismatchError(LatentRewardsError, ValueError):
    """A reward was trained on one latent space and is asked to score another."""


class NonFiniteError(LatentRewardsError, ValueError):
    """A tensor contains NaN or Inf."""


class CheckpointError(LatentRewardsError, OSError):
    """A file or folder is missing, unreadable, or not the kind of checkpoint expected."""


class DataError(LatentRewardsError, OSError):
    """A data set is empty, a video cannot be decoded, or a latent file holds the wrong content."""


class ConfigError(LatentRewardsError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class MissingInputError(LatentRewardsError, ValueError):
    """A reward needs an input (noisy latent, timestep, text embedding) the caller did not pass."""
