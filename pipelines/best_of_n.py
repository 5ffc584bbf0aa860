"""Best-of-N: generate N candidates (one seed each), score their final latents, keep the best.

Cheap test-time scaling with a latent reward: candidates are generated with ``output_type="latent"`` and only the
winner goes through the VAE decoder. Works with any Wan-style diffusers pipeline (scored with ``reward=``) and
with reward guidance on (a :class:`~.guidance_mixin.RewardGuidanceMixin` pipeline with a loaded reward scores with
that reward unless ``reward=`` names another one, e.g. a held-out reward against over-optimisation).
With ``cache_dir`` every finished candidate is saved, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..rewards.base import LatentReward
from ..rewards.errors import ConfigError
from ..rewards.guidance import RewardTrace, evaluate_reward
from ..rewards.hub import atomic_directory, load_reward

__all__ = ["BestOfNResult", "best_of_n", "decode_latents"]


@dataclasses.dataclass
class BestOfNResult:
    """The winner of a best-of-N run and every candidate's score.

    Attributes:
        frames: the best video, decoded with the requested ``output_type`` (the latent for ``"latent"``).
        latents: its final normalised latent ``[1, C, T, H, W]``.
        best_index: index of the best candidate in ``seeds``.
        seeds: the seed of each candidate, in generation order.
        rewards: the reward of each candidate (higher is better).
        metrics: each candidate's named reward metrics (e.g. ``r_dist`` for Shell-LCC).
        traces: each candidate's per-step reward trace (``None`` when the pipeline records none).
        candidate_latents: every candidate's final latent ``[1, C, T, H, W]`` (CPU, fp32).
    """

    frames: Any
    latents: torch.Tensor
    best_index: int
    seeds: list[int]
    rewards: list[float]
    metrics: list[dict[str, float]]
    traces: list[RewardTrace | None]
    candidate_latents: list[torch.Tensor] = dataclasses.field(default_factory=list, repr=False)

    @property
    def best_seed(self) -> int:
        return self.seeds[self.best_index]

    @property
    def ranking(self) -> list[int]:
        """Candidate indices from best to worst."""
        return sorted(range(len(self.rewards)), key=lambda i: -self.rewards[i])

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no tensors)."""
        return {
            "best_index": self.best_index,
            "best_seed": self.best_seed,
            "candidates": [
                {"seed": s, "reward": r, "metrics": m, "trace": t.as_dict() if t is not None else None}
                for s, r, m, t in zip(self.seeds, self.rewards, self.metrics, self.traces)
            ],
        }


def decode_latents(pipe: Any, latents: torch.Tensor, output_type: str = "np") -> Any:
    """Decode normalised Wan latents ``[B, C, T, H, W]`` exactly as the Wan pipelines do at the end of a call.

    Returns ``latents`` itself for ``output_type="latent"``, else the ``video_processor`` output (``"np"``:
    float array ``[B, F, H, W, 3]`` in [0, 1]; ``"pil"``; ``"pt"``).
    """
    if output_type == "latent":
        return latents
    vae = pipe.vae
    try:
        from diffusers.utils.torch_utils import get_module_execution_device

        device = get_module_execution_device(vae)
    except ImportError:  # pragma: no cover - older diffusers
        device = vae.device
    z = latents.to(device, dtype=vae.dtype)
    shape = (1, vae.config.z_dim) + (1,) * (z.ndim - 2)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
    with torch.no_grad():
        video = vae.decode(z / inv_std + mean, return_dict=False)[0]
        frames = pipe.video_processor.postprocess_video(video, output_type=output_type)
    pipe.maybe_free_model_hooks()
    return frames


def _candidate_folder(cache_dir: Path, seed: int) -> Path:
    return cache_dir / f"seed-{seed}"


def _load_candidate(folder: Path, key: str) -> tuple[torch.Tensor, float, dict[str, float], RewardTrace | None] | None:
    from safetensors.torch import load_file

    try:
        info = json.loads((folder / "result.json").read_text(encoding="utf-8"))
        if info.get("key") != key:
            return None
        latents = load_file(str(folder / "latents.safetensors"))["latents"]
    except (OSError, ValueError, KeyError):
        return None
    trace = RewardTrace(**info["trace"]) if info.get("trace") else None
    return latents, float(info["reward"]), info["metrics"], trace


def _save_candidate(
    folder: Path, key: str, seed: int, latents: torch.Tensor, reward: float, metrics: dict[str, float],
    trace: RewardTrace | None,
) -> None:
    from safetensors.torch import save_file

    with atomic_directory(folder) as tmp:
        save_file({"latents": latents.contiguous()}, str(tmp / "latents.safetensors"))
        info = {"key": key, "seed": seed, "reward": reward, "metrics": metrics,
                "trace": trace.as_dict() if trace is not None else None}
        (tmp / "result.json").write_text(json.dumps(info), encoding="utf-8")


def best_of_n(
    pipe: Any,
    prompt: str,
    n: int | None = None,
    *,
    seeds: Sequence[int] | None = None,
    reward: str | Path | LatentReward | None = None,
    output_type: str = "np",
    batch_size: int = 1,
    generator_device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    cache_key: str = "",
    progress: bool = True,
    **call_kwargs: Any,
) -> BestOfNResult:
    """Generate ``n`` candidates of ``prompt`` with the given seeds, score them, return the best with all scores.

    Args:
        pipe: a Wan diffusers pipeline (``RewardGuidedWanPipeline`` with a loaded reward, or any Wan pipeline
            with ``reward=``). Reward guidance settings in ``call_kwargs`` apply to every candidate.
        prompt: one prompt.
        n: number of candidates (may be left out when ``seeds`` is given); seeds default to ``0 .. n-1``.
        reward: score with this reward (folder, Hub id or object) instead of the pipeline's loaded one.
        output_type: how the winner is decoded (``"np"``, ``"pil"``, ``"pt"`` or ``"latent"``).
        batch_size: candidates per pipeline call (each keeps its own seed's noise).
        generator_device: device of the per-seed ``torch.Generator`` (``"cpu"`` makes seeds portable).
        cache_dir: save each finished candidate here and reuse those saved with the same ``cache_key``.
        cache_key: fingerprint of the settings (prompt, model, guidance...) that make a saved candidate valid.
        progress: show a progress bar over candidates.
        **call_kwargs: passed to the pipeline call (``num_frames``, ``guidance_scale``,
            ``reward_guidance_scale``, ...).
    """
    from tqdm.auto import tqdm

    if seeds is None:
        if n is None or int(n) < 1:
            raise ConfigError(f"best_of_n needs n >= 1 candidates, got {n!r}")
        seeds = list(range(int(n)))
    seeds = [int(s) for s in seeds]
    if n is not None and len(seeds) != int(n):
        raise ConfigError(f"best_of_n: {len(seeds)} seeds given for n={n}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"best_of_n needs at least one seed and distinct seeds, got {seeds}")
    if not isinstance(prompt, str):
        raise ConfigError("best_of_n takes one prompt (a string); loop over prompts for several")
    for key in ("generator", "latents", "num_videos_per_prompt", "output_type", "return_dict"):
        if key in call_kwargs:
            raise ConfigError(f"best_of_n sets {key!r} itself; do not pass it")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    scorer = load_reward(reward) if reward is not None else None
    if scorer is None and getattr(pipe, "latent_reward", None) is None:
        raise ConfigError("best_of_n needs a reward: pass reward=... or load one with pipe.load_latent_reward(...)")
    if scorer is not None:
        checker = getattr(pipe, "_check_reward_space", None)
        if checker is not None:
            checker(scorer)
    text_embeds = None
    if scorer is not None and scorer.needs_text:
        text_embeds = pipe.encode_prompt(prompt=prompt, do_classifier_free_guidance=False)[0]
    cache = Path(cache_dir) if cache_dir is not None else None

    latents_all: list[torch.Tensor | None] = [None] * len(seeds)
    rewards: list[float] = [math.nan] * len(seeds)
    metrics: list[dict[str, float]] = [{} for _ in seeds]
    traces: list[RewardTrace | None] = [None] * len(seeds)
    todo = []
    for i, seed in enumerate(seeds):
        found = _load_candidate(_candidate_folder(cache, seed), cache_key) if cache is not None else None
        if found is None:
            todo.append(i)
        else:
            latents_all[i], rewards[i], metrics[i], traces[i] = found

    bar = tqdm(total=len(seeds), initial=len(seeds) - len(todo), desc="best-of-n", disable=not progress)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        generators = [torch.Generator(device=generator_device).manual_seed(seeds[i]) for i in chunk]
        out = pipe(
            prompt, num_videos_per_prompt=len(chunk), generator=generators if len(chunk) > 1 else generators[0],
            output_type="latent", **call_kwargs,
        )
        lat = out.frames.detach()
        if scorer is not None:
            embeds = text_embeds.repeat(len(chunk), 1, 1) if text_embeds is not None else None
            m = evaluate_reward(scorer.to(lat.device), lat, text_embeds=embeds, metrics=True)
        else:
            m = out.reward_metrics
        trace = getattr(out, "reward_trace", None)
        for j, i in enumerate(chunk):
            latents_all[i] = lat[j : j + 1].float().cpu()
            metrics[i] = {k: float(v[j]) for k, v in m.items()}
            rewards[i] = metrics[i]["reward"]
            if trace is not None:
                traces[i] = trace.select([j])
            if cache is not None:
                _save_candidate(
                    _candidate_folder(cache, seeds[i]), cache_key, seeds[i], latents_all[i], rewards[i], metrics[i],
                    traces[i],
                )
        bar.update(len(chunk))
    bar.close()

    finite = [r if math.isfinite(r) else -math.inf for r in rewards]
    best = max(range(len(seeds)), key=lambda i: finite[i])
    best_latents = latents_all[best]
    assert best_latents is not None
    device = getattr(pipe, "_execution_device", best_latents.device)
    frames = decode_latents(pipe, best_latents.to(device), output_type)
    return BestOfNResult(
        frames=frames, latents=best_latents, best_index=best, seeds=seeds, rewards=rewards, metrics=metrics,
        traces=traces, candidate_latents=[lat for lat in latents_all if lat is not None],
    )
