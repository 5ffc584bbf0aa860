"""``latent-rewards evaluate``: how well a reward tells real latents/videos from generated ones."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .score import add_video_arguments

#: Metrics where lower means "more like the real data"; all others (the reward) are higher-is-real.
_LOWER_IS_REAL = ("r_dist", "lcc_distance")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "evaluate",
        help="compare a reward's scores of real vs generated latents or videos",
        description=(
            "Score a set of real and a set of generated items (latent files or videos) and report, for each "
            "metric, mean ± std per set and the pairwise distinguishability: the share of (real, generated) pairs "
            "in which the real item is closer to the manifold (lower R_dist; higher reward), ties counting half "
            "(the paper: 91.4%% for Shell-LCC; R_dist 0.880 ± 0.076 real vs 0.918 ± 0.083 generated). Writes "
            "evaluation.json, scores.csv and r_dist_hist.png to --out."
        ),
    )
    p.add_argument("reward", metavar="REWARD", help="reward folder or Hugging Face Hub id")
    p.add_argument("--real", required=True, nargs="+", metavar="PATH", help="real latents/videos (folders or files)")
    p.add_argument("--generated", required=True, nargs="+", metavar="PATH",
                   help="generated latents/videos (folders or files)")
    p.add_argument("--out", default="latent-rewards-eval", help="output folder (default ./latent-rewards-eval)")
    add_video_arguments(p)
    return p


def evaluate_sets(real_rows: list[dict[str, Any]], gen_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-metric statistics of both sets and their pairwise distinguishability."""
    from ..report import distinguishability, summary_stats
    from .score import metric_keys

    out: dict[str, Any] = {"n_real": len(real_rows), "n_generated": len(gen_rows), "metrics": {}}
    for key in metric_keys(real_rows):
        r = [row[key] for row in real_rows]
        g = [row[key] for row in gen_rows]
        lower = key in _LOWER_IS_REAL
        out["metrics"][key] = {
            "real": summary_stats(r),
            "generated": summary_stats(g),
            "distinguishability": distinguishability(r, g, lower_is_real=lower),
            "real_is": "lower" if lower else "higher",
        }
    return out


def run(args: argparse.Namespace) -> int:
    from ...rewards.hub import atomic_write_text, load_reward
    from ...rewards.devices import resolve_device
    from ..data import expand_inputs
    from ..report import plot_histograms, save_panels
    from .score import format_rows, score_files

    device = resolve_device(args.device)  # a bad --device fails before anything is loaded
    reward = load_reward(args.reward)
    # One pass over both sets, so videos in both are encoded with one VAE load.
    n_real = len(expand_inputs(args.real))
    rows = score_files(reward, [*args.real, *args.generated], vae=args.vae, fps=args.fps, frames=args.frames,
                       size=args.size, layout=None if args.layout == "auto" else args.layout, device=device)
    real, generated = rows[:n_real], rows[n_real:]
    result = evaluate_sets(real, generated)
    result.update({"reward": str(args.reward), "real": [str(p) for p in args.real],
                   "generated": [str(p) for p in args.generated]})

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "evaluation.json", json.dumps({**result, "items": {"real": real, "generated": generated}},
                                                          indent=2) + "\n")
    lines = format_rows(real + generated, "csv").splitlines()
    sets = ["real"] * len(real) + ["generated"] * len(generated)
    atomic_write_text(out / "scores.csv", "\n".join(["set," + lines[0], *(f"{s},{line}" for s, line in
                                                                         zip(sets, lines[1:]))]) + "\n")

    def panel(key: str):
        def draw(ax: Any) -> None:
            plot_histograms(ax, {"real": [r[key] for r in real], "generated": [r[key] for r in generated]},
                            bins=30, xlabel=key,
                            title=f"{key}: distinguishability {result['metrics'][key]['distinguishability']:.3f}")
        return draw

    keys = [k for k in ("r_dist", "lcc_distance") if k in result["metrics"]] or list(result["metrics"])
    save_panels(out / "r_dist_hist.png", [panel(k) for k in keys], cols=2)

    real_head, gen_head = f"real (n={result['n_real']})", f"generated (n={result['n_generated']})"
    print(f"{'metric':<14} {real_head:>20} {gen_head:>20} "
          f"{'distinguishability':>19}")
    for key, m in result["metrics"].items():
        print(f"{key:<14} {m['real']['mean']:>11.4f} ± {m['real']['std']:<6.4f} "
              f"{m['generated']['mean']:>11.4f} ± {m['generated']['std']:<6.4f} {m['distinguishability']:>19.3f}")
    print("distinguishability: share of (real, generated) pairs where the real item scores as more real "
          "(lower distance, higher reward), ties counting half; 0.5 = chance")
    print(f"wrote {out / 'evaluation.json'}, {out / 'scores.csv'}, {out / 'r_dist_hist.png'}")
    return 0
