"""Demo section: reward guidance on a tiny Wan pipeline, guided vs unguided, with the demo's fitted manifold.

Called by ``latent-rewards demo`` (``trainer/demo.py`` registers it after the manifold section, which fits the
reward). Everything runs offline on CPU in a few seconds: the tiny random Wan model of :mod:`.tiny` produces
noise-like latents far from the fitted manifold, and guidance should pull each seed's final latent closer
(lower ``R_dist``) than the same seed unguided, and closer than picking the best of the unguided seeds.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["guided_vs_unguided"]

_PROMPT = "a paper boat drifting on a pond"


def guided_vs_unguided(
    ctx: Any,
    *,
    reward: Any = None,
    seeds: tuple[int, ...] = (0, 1, 2, 3),
    scale: float = 0.1,
    steps: int = 8,
    start: float | None = None,
    end: float | None = None,
    pipe: Any = None,
) -> dict[str, Any]:
    """Generate ``seeds`` with and without reward guidance and compare final ``R_dist``.

    Args:
        ctx: the demo context; reads ``ctx.reward_path`` (the fitted reward), ``ctx.seed`` and ``ctx.log``.
        reward: a reward (object or folder) to use instead of ``ctx.reward_path``.
        seeds: sampling seeds (offset by ``ctx.seed``); each is run once unguided and once guided.
        scale: guidance step (latent-std units per guided step).
        steps: denoising steps.
        start, end: the guidance window as fractions of the unshifted schedule (default: the library's 0 and 0.8).
        pipe: a tiny ``RewardGuidedWanPipeline`` to reuse (default: build one).

    Returns:
        ``{"results": ..., "lines": [...], "panels": [...]}`` (the fields of the demo's ``SectionOutput``).
    """
    from ..rewards.errors import ConfigError
    from ..rewards.guidance import DEFAULT_GUIDANCE_END, DEFAULT_GUIDANCE_START
    from ..rewards.hub import load_reward
    from .wan import load_wan_pipeline

    source = reward if reward is not None else getattr(ctx, "reward_path", None)
    if source is None:
        raise ConfigError("the guidance demo needs a fitted reward: run it after the 'manifold' section")
    reward = load_reward(source)
    start = DEFAULT_GUIDANCE_START if start is None else start
    end = DEFAULT_GUIDANCE_END if end is None else end
    log = getattr(ctx, "log", print)
    base_seed = int(getattr(ctx, "seed", 0)) * 1000
    log(f"tiny random Wan pipeline (CPU), {len(seeds)} seeds x {steps} steps, unguided vs reward guidance "
        f"(scale {scale}, cheap mode, window {start:g}..{end:g} of the schedule)")
    if pipe is None:
        pipe = load_wan_pipeline("tiny", device="cpu")
        pipe.set_progress_bar_config(disable=True)
    pipe.load_latent_reward(reward)
    # 32 text tokens: the tiny transformer's cost is dominated by its 4096-wide text projections otherwise.
    call = dict(prompt=_PROMPT, num_frames=9, height=64, width=64, num_inference_steps=steps,
                max_sequence_length=32, output_type="latent")
    runs: dict[str, list[Any]] = {"unguided": [], "guided": []}
    for s in seeds:
        for name, sc in (("unguided", 0.0), ("guided", scale)):
            out = pipe(**call, generator=torch.Generator().manual_seed(base_seed + s), reward_guidance_scale=sc,
                       reward_guidance_start=start, reward_guidance_end=end)
            runs[name].append(out)

    def r_dist(out: Any) -> float:
        return float(out.reward_metrics["r_dist"][0])

    rows = [(base_seed + s, r_dist(u), r_dist(g)) for s, u, g in zip(seeds, runs["unguided"], runs["guided"])]
    mean_u = sum(r[1] for r in rows) / len(rows)
    mean_g = sum(r[2] for r in rows) / len(rows)
    best_of = min(r[1] for r in rows)
    improved = sum(r[2] < r[1] for r in rows)
    trace0 = runs["guided"][0].reward_trace
    sigmas = trace0.sigmas
    n_guided = sum(trace0.guided)
    # The trace holds the reward of x0_hat before each step; the fitted reward is -R_dist (plain) or a band.
    curves = {
        name: [sum(-o.reward_trace.rewards[i][0] for o in outs) / len(outs) for i in range(len(sigmas))]
        for name, outs in runs.items()
    }
    plain = reward.config.reward_mode == "plain" if hasattr(reward.config, "reward_mode") else True
    results = {
        "scale": scale, "steps": steps, "window": [start, end], "guided_steps": n_guided, "prompt": _PROMPT,
        "seeds": [r[0] for r in rows],
        "r_dist_unguided": [r[1] for r in rows], "r_dist_guided": [r[2] for r in rows],
        "mean_r_dist_unguided": mean_u, "mean_r_dist_guided": mean_g,
        "best_of_unguided_r_dist": best_of, "guided_better_count": improved,
        "checks": {"guidance_lowers_r_dist_every_seed": improved == len(rows),
                   "guidance_beats_best_of_unguided": mean_g < best_of},
    }
    lines = [
        f"Tiny random Wan2.1 pipeline ({steps} UniPC steps, latent [16, 3, 8, 8]); prompt {_PROMPT!r}. Its samples "
        "are noise-like, far from the fitted manifold; reward guidance (cheap mode) steps each x0_hat towards it.",
        f"Guidance window {start:g}..{end:g}: fractions of the unshifted timestep schedule (ComfyUI's start/end "
        f"percent), so {n_guided} of the {steps} steps are guided whatever the scheduler's shift.",
        "",
        f"{'seed':>6} {'R_dist unguided':>16} {'R_dist guided':>14}",
        *(f"{seed:>6} {u:>16.3f} {g:>14.3f}" for seed, u, g in rows),
        f"{'mean':>6} {mean_u:>16.3f} {mean_g:>14.3f}",
        "",
        f"  [{'x' if improved == len(rows) else ' '}] guidance lowers the final R_dist for every seed "
        f"({improved}/{len(rows)})",
        f"  [{'x' if mean_g < best_of else ' '}] guided mean {mean_g:.3f} beats the best of {len(rows)} unguided "
        f"seeds ({best_of:.3f})",
    ]

    finals = {"unguided": mean_u, "guided": mean_g}

    def panel(ax: Any) -> None:
        # The window's axis: the fraction of the unshifted schedule (UniPC shift 3 here); the last point is the
        # final latent.
        progress = list(trace0.progress) + [1.0]
        ax.axvspan(start, end, color="tab:orange", alpha=0.08, label="guidance window")
        for name, style in (("unguided", "--"), ("guided", "-")):
            ax.plot(progress, curves[name] + [finals[name]], style, marker="o", label=name)
        ax.set_title("reward guidance on a tiny Wan: R_dist of x0_hat per step, then of the output")
        ax.set_xlabel("schedule progress (unshifted timestep fraction)")
        ax.set_ylabel("mean R_dist" if plain else "mean -reward")
        ax.legend()

    return {"results": results, "lines": lines, "panels": [panel]}
