"""``LatentRewardsScore``: score a batch of video latents, with per-frame distance curves and heatmaps.

Rewards that expose a per-voxel map (Shell-LCC's ``distance_map``) get curves and heatmaps; any other reward gets
its scalar per video (a bar chart and score cards), so new reward kinds work without changes here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import comfy.model_management
import torch
from comfy_api.latest import io, ui

from ..rewards.base import LatentReward
from ..rewards.errors import MissingInputError
from ..rewards.guidance import evaluate_reward
from .progress import progress_bar
from .render import curve_image, heat_range, heatmap_frames, heatmap_sheet, score_cards
from .types import CATEGORY, LatentRewardType, latent_format_options, node_id_of, normalised_latents, reward_on

__all__ = ["LatentRewardsScore", "BatchScores", "score_latent_batch", "scoring_inputs"]


@dataclass
class BatchScores:
    """Scores of a batch: reward per video, named metrics per video, and per-voxel maps when the reward has them."""

    kind: str
    scores: list[float]
    metrics: dict[str, list[float]] = field(default_factory=dict)
    maps: torch.Tensor | None = None  # [B, T, h, w] on the CPU

    def per_frame(self) -> list[list[float]]:
        return [] if self.maps is None else self.maps.flatten(2).mean(2).tolist()

    def payload(self) -> dict[str, Any]:
        """What the frontend extension and API clients read (``ui.latent_rewards`` in /history)."""
        return {"kind": self.kind, "scores": self.scores, "metrics": self.metrics, "per_frame": self.per_frame()}

    def text(self) -> str:
        lines = [f"{self.kind} reward, {len(self.scores)} video(s), higher is better"]
        for i, s in enumerate(self.scores):
            extra = " | ".join(f"{k} {v[i]:.4f}" for k, v in self.metrics.items() if k != "reward")
            lines.append(f"video {i}: reward {s:.4f}" + (f" | {extra}" if extra else ""))
        return "\n".join(lines)


def scoring_inputs() -> list[io.Input]:
    """Inputs shared by the score and best-of nodes."""
    return [
        io.Latent.Input("latent", tooltip="Video latents [B, C, T, H, W] as ComfyUI passes them (raw VAE space)."),
        LatentRewardType.Input("reward", tooltip="The reward to score with (from Latent Reward Loader)."),
        io.Combo.Input(
            "latent_format", options=latent_format_options(), default=latent_format_options()[0],
            tooltip="Latent space of the LATENT, used to normalise it when no model is connected. Must match the "
            "space the reward reads.",
        ),
        io.Model.Input(
            "model", optional=True,
            tooltip="Optional: the model that made the latents; its latent format normalises them (and is checked "
            "against the reward). Overrides latent_format.",
        ),
        io.Conditioning.Input(
            "positive", optional=True,
            tooltip="Optional prompt conditioning for rewards that read the text (PAVRM, VELR); Shell-LCC "
            "ignores it.",
        ),
    ]


def _text_from_conditioning(conditioning: Any, batch: int) -> torch.Tensor | None:
    if not conditioning:
        return None
    t = conditioning[0][0]
    return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t


def score_latent_batch(
    latent: dict, reward: LatentReward, *, latent_format: str | None, model: Any = None, positive: Any = None,
    what: str, maps: bool = True, node_id: str | None = None,
) -> BatchScores:
    """Normalise and score every video of a LATENT batch, one video at a time with a progress bar."""
    z = normalised_latents(latent, reward, model=model, latent_format=latent_format, what=what)
    if reward.needs_text and positive is None:
        raise MissingInputError(f"{what}: the {reward.kind} reward reads the prompt; connect 'positive'")
    reward_on(reward, comfy.model_management.get_torch_device())
    b = z.shape[0]
    text = _text_from_conditioning(positive, b) if reward.needs_text else None
    scores: list[float] = []
    metrics: dict[str, list[float]] = {}
    map_parts: list[torch.Tensor] = []
    pbar = progress_bar(b, node_id)
    for i in range(b):
        zi = z[i : i + 1]
        ti = text[i : i + 1] if text is not None else None
        # One pass gives the scores and, for rewards that have one (Shell-LCC), the per-voxel distance map.
        m = evaluate_reward(reward, zi, x_t=None, text_embeds=ti, metrics=True, maps=maps)
        voxel_map = m.pop("distance_map", None)
        scores.append(float(m["reward"][0]))
        for k, v in m.items():
            if k != "reward":
                metrics.setdefault(k, []).append(float(v[0]))
        if voxel_map is not None:
            map_parts.append(voxel_map.cpu())
        pbar.update(1)
    return BatchScores(
        kind=reward.kind, scores=scores, metrics=metrics, maps=torch.cat(map_parts) if map_parts else None
    )


class LatentRewardsScore(io.ComfyNode):
    """Score video latents with a latent reward and show where they leave the data manifold."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LatentRewardsScore",
            display_name="Latent Reward Score",
            category=CATEGORY,
            description=(
                "Scores each video of a LATENT batch (higher is better) and draws the per-frame distance curve and "
                "a distance heatmap per latent frame, so you can see where a video is off the data manifold. "
                "Output node: it runs and shows its result even when nothing is connected."
            ),
            inputs=scoring_inputs(),
            outputs=[
                io.Float.Output(display_name="scores", is_output_list=True, tooltip="Reward per video (a list)."),
                io.String.Output(display_name="report", tooltip="JSON: scores, metrics and per-frame distances."),
                io.Image.Output(display_name="curve", tooltip="Per-frame distance curve (or score bars)."),
                io.Image.Output(
                    display_name="heatmaps",
                    tooltip="One distance heatmap per latent frame of every video, at pixel size (B*T images); "
                    "score cards for rewards without a per-voxel map.",
                ),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(
        cls, latent: dict, reward: LatentReward, latent_format: str, model: Any = None, positive: Any = None
    ) -> io.NodeOutput:
        res = score_latent_batch(
            latent, reward, latent_format=latent_format, model=model, positive=positive,
            what="Latent Reward Score", node_id=node_id_of(cls),
        )
        per_frame = res.per_frame()
        title = f"{res.kind}: " + ", ".join(f"{s:.4g}" for s in res.scores[:8])
        curve = curve_image(per_frame, res.scores, ylabel="mean distance r per frame", title=title)
        if res.maps is not None:
            vmax = heat_range(res.maps)
            heatmaps = heatmap_frames(res.maps, upscale=reward.latent_space.spatial_compression, vmax=vmax)
            sheets = torch.cat(
                [heatmap_sheet(res.maps[i], vmax=vmax, title=f"video {i}: reward {s:.4g}") for i, s in enumerate(res.scores)]
            )
        else:
            heatmaps = sheets = score_cards(res.scores, kind=res.kind)
        previews = ui.PreviewImage(curve, cls=cls).as_dict()["images"] + ui.PreviewImage(sheets, cls=cls).as_dict()["images"]
        payload = res.payload()
        ui_out = {"text": [res.text()], "images": previews, "animated": (False,), "latent_rewards": [payload]}
        return io.NodeOutput(res.scores, json.dumps(payload), curve, heatmaps, ui=ui_out)
