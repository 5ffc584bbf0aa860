"""latent-rewards: latent-space video rewards (Shell-LCC, PRFL/PAVRM, VELR) for scoring, guidance and LoRA
fine-tuning, in diffusers pipelines and ComfyUI graphs.

This folder is both the pip package ``latent_rewards`` and a ComfyUI custom-node folder: when ComfyUI imports it,
``NODE_CLASS_MAPPINGS`` and ``WEB_DIRECTORY`` register the node pack; elsewhere importing it never touches
ComfyUI.
"""

from __future__ import annotations

import sys

__version__ = "0.1.0"

from .rewards import (  # noqa: E402
    LatentReward,
    LatentRewardsError,
    ShellLCC,
    ShellLCCConfig,
    WAN21,
    get_latent_space,
    load_reward,
)

WEB_DIRECTORY = "./web/js"
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}


def _inside_comfyui() -> bool:
    # ComfyUI has imported its own `folder_paths` and `comfy` before it loads custom nodes.
    return "folder_paths" in sys.modules and "comfy" in sys.modules


if _inside_comfyui():
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

__all__ = [
    "__version__",
    "LatentReward",
    "LatentRewardsError",
    "ShellLCC",
    "ShellLCCConfig",
    "WAN21",
    "get_latent_space",
    "load_reward",
    "NODE_CLASS_MAPPINGS",
    "NODE_DISPLAY_NAME_MAPPINGS",
    "WEB_DIRECTORY",
]
