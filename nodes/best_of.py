"""``LatentRewardsBestOf``: rank a batch of video latents by reward and keep the best k."""

from __future__ import annotations

from typing import Any

import torch
from comfy_api.latest import io

from ..rewards.base import LatentReward
from .score import score_latent_batch, scoring_inputs
from .types import CATEGORY, node_id_of

__all__ = ["LatentRewardsBestOf", "select_latents"]


def select_latents(latent: dict, indices: list[int]) -> dict:
    """The LATENT restricted to ``indices`` (in that order); per-sample entries (mask, batch_index) follow."""
    samples = latent["samples"]
    b = samples.shape[0]
    idx = torch.tensor(indices, dtype=torch.long, device=samples.device)
    out = dict(latent)
    out["samples"] = samples.index_select(0, idx)
    mask = latent.get("noise_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim > 0 and mask.shape[0] == b and b > 1:
        out["noise_mask"] = mask.index_select(0, idx.to(mask.device))
    batch_index = latent.get("batch_index")
    if isinstance(batch_index, (list, tuple)) and len(batch_index) == b:
        out["batch_index"] = [batch_index[i] for i in indices]
    return out


class LatentRewardsBestOf(io.ComfyNode):
    """Best-of-N: keep the k highest-reward videos of a batch, best first."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LatentRewardsBestOf",
            display_name="Latent Reward Best-of-N",
            category=CATEGORY,
            description=(
                "Ranks a batch of video latents by reward (higher is better) and returns the best k, best first, "
                "with their scores and their indices in the input batch. Generate N videos in one batch "
                "(batch_size N), then decode only the winners."
            ),
            inputs=[
                *scoring_inputs(),
                io.Int.Input("k", default=1, min=1, max=4096, tooltip="How many videos to keep (at most the batch size)."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="The best k latents, best first."),
                io.Float.Output(display_name="scores", is_output_list=True, tooltip="Their rewards, best first."),
                io.Int.Output(display_name="indices", is_output_list=True, tooltip="Their indices in the input batch."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls, latent: dict, reward: LatentReward, latent_format: str, k: int, model: Any = None, positive: Any = None
    ) -> io.NodeOutput:
        res = score_latent_batch(
            latent, reward, latent_format=latent_format, model=model, positive=positive,
            what="Latent Reward Best-of-N", maps=False, node_id=node_id_of(cls),
        )
        n = len(res.scores)
        keep = min(int(k), n)
        order = sorted(range(n), key=lambda i: (-res.scores[i], i))[:keep]
        best = [res.scores[i] for i in order]
        lines = [f"best {keep} of {n} by {res.kind} reward" + (f" (k={k} > batch size)" if k > n else "")]
        lines += [f"#{r + 1}: video {i}, reward {res.scores[i]:.4f}" for r, i in enumerate(order)]
        payload = {**res.payload(), "order": order}
        return io.NodeOutput(
            select_latents(latent, order), best, order, ui={"text": ["\n".join(lines)], "latent_rewards": [payload]}
        )
