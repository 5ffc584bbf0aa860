"""ComfyUI nodes of latent-rewards (V3 schema, ComfyUI >= 0.3.48). Imported only inside ComfyUI.

Every node is a small ``comfy_api.latest.io.ComfyNode`` class registered through ``NODE_CLASS_MAPPINGS`` (V3
classes in the V1 mapping load on every V3-capable ComfyUI). On an older ComfyUI without ``comfy_api`` the pack
logs one clear line and registers nothing instead of failing the import.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

MIN_COMFYUI = "0.3.48"

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

try:
    from comfy_api.latest import io as _io

    _V3 = hasattr(_io, "ComfyNode")
except ImportError:
    _V3 = False

if _V3:
    from .best_of import LatentRewardsBestOf
    from .folders import register_folders
    from .guidance import LatentRewardsGuidance, LatentRewardsGuider
    from .loader import LatentRewardsLoader
    from .lora import LatentRewardsLoraLoader
    from .score import LatentRewardsScore

    register_folders()
    NODES = [
        LatentRewardsLoader,
        LatentRewardsGuidance,
        LatentRewardsGuider,
        LatentRewardsScore,
        LatentRewardsBestOf,
        LatentRewardsLoraLoader,
    ]
    for _node in NODES:
        _schema = _node.GET_SCHEMA()
        NODE_CLASS_MAPPINGS[_schema.node_id] = _node
        NODE_DISPLAY_NAME_MAPPINGS[_schema.node_id] = _schema.display_name
else:
    NODES = []
    log.warning(
        "[latent-rewards] this ComfyUI has no V3 node API (comfy_api.latest, ComfyUI >= %s): the Latent Rewards "
        "nodes were NOT registered. Update ComfyUI to %s or newer to use them.",
        MIN_COMFYUI, MIN_COMFYUI,
    )

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "NODES", "MIN_COMFYUI"]
