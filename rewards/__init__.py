"""The reward core: pure PyTorch, no ComfyUI, diffusers, gradio or accelerate imports."""

from .base import LatentReward, RewardInput, available_rewards, register_reward, reward_class_for_kind
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    LatentRewardsError,
    LatentShapeError,
    LatentSpaceMismatchError,
    MissingInputError,
    NonFiniteError,
)
from .hub import load_reward
from .latent_space import WAN21, LatentSpace, available_latent_spaces, get_latent_space, register_latent_space
from .official import convert_official_checkpoint, load_official_shell_lcc
from .shell_lcc import ShellLCC, ShellLCCConfig

__all__ = [
    "LatentReward",
    "RewardInput",
    "register_reward",
    "reward_class_for_kind",
    "available_rewards",
    "load_reward",
    "ShellLCC",
    "ShellLCCConfig",
    "LatentSpace",
    "WAN21",
    "get_latent_space",
    "register_latent_space",
    "available_latent_spaces",
    "convert_official_checkpoint",
    "load_official_shell_lcc",
    "LatentRewardsError",
    "LatentShapeError",
    "LatentSpaceMismatchError",
    "NonFiniteError",
    "CheckpointError",
    "DataError",
    "ConfigError",
    "MissingInputError",
]
