"""The authors' Shell-LCC formula, re-implemented from its published description, for equivalence checks.

Straightforward and unchunked on purpose: the whole ``N x M`` softmax at once, computed from a raw state dict in the
official checkpoint's parameter names. Used by the tests (converted reward == official value) and by
``bench/bench_shell_lcc.py`` (the baseline).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _p(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    for prefix in ("", "module."):
        if prefix + name in state:
            return state[prefix + name]
    raise KeyError(name)


def official_skeleton_flat(state: dict[str, torch.Tensor], z_flat: torch.Tensor, bn_eps: float = 1e-5) -> torch.Tensor:
    h = F.linear(z_flat, _p(state, "predictor.0.weight"), _p(state, "predictor.0.bias"))
    h = F.batch_norm(
        h,
        _p(state, "predictor.1.running_mean"),
        _p(state, "predictor.1.running_var"),
        _p(state, "predictor.1.weight"),
        _p(state, "predictor.1.bias"),
        training=False,
        eps=bn_eps,
    )
    h = F.relu(h)
    h = F.relu(F.linear(h, _p(state, "predictor.3.weight"), _p(state, "predictor.3.bias")))
    w = F.softmax(F.linear(h, _p(state, "predictor.5.weight"), _p(state, "predictor.5.bias")), dim=1)
    return torch.matmul(w, _p(state, "basis")) * _p(state, "global_scale") + _p(state, "global_bias")


def official_distance_flat(state: dict[str, torch.Tensor], z_flat: torch.Tensor) -> torch.Tensor:
    """Per-voxel normalised distance ``||(z - z_skel) / (exp(head(z_skel)) + 1e-6)||``."""
    z_skel = official_skeleton_flat(state, z_flat)
    h = F.relu(F.linear(z_skel, _p(state, "surface_head.0.weight"), _p(state, "surface_head.0.bias")))
    var = torch.exp(F.linear(h, _p(state, "surface_head.2.weight"), _p(state, "surface_head.2.bias")))
    return torch.norm((z_flat - z_skel) / (var + 1e-6), p=2, dim=1)


def official_distance_reward(state: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """The official ``distance_reward(z)``: one scalar, the mean over all voxels of all videos in the batch."""
    b, c, t, h, w = z.shape
    z_flat = z.permute(0, 2, 3, 4, 1).reshape(-1, c)
    return torch.mean(official_distance_flat(state, z_flat))
