"""``latent-rewards score``: score latent files or videos with a reward (table, JSON or CSV)."""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data import DEFAULT_VAE

if TYPE_CHECKING:
    import torch

#: Metrics shown first, in this order; others follow alphabetically.
_FIRST = ("r_dist", "lcc_distance", "reward")


def add_video_arguments(p: argparse.ArgumentParser) -> None:
    """Options for inputs that may be videos (shared by ``score`` and ``evaluate``)."""
    p.add_argument("--vae", default=DEFAULT_VAE,
                   help=f"VAE for video inputs: Wan pipeline Hub id/folder or VAE folder (default {DEFAULT_VAE})")
    p.add_argument("--fps", type=float, default=24.0, help="video inputs: frame rate to sample at (default 24)")
    p.add_argument("--frames", type=int, default=81, help="video inputs: maximum frames, 4k+1 (default 81)")
    p.add_argument("--size", default="480p", help="video inputs: 480p, 720p or WxH (default 480p)")
    p.add_argument("--layout", choices=["auto", "CTHW", "TCHW"], default="auto",
                   help="latent inputs: layout (default auto: the dim with 16 channels; CTHW when both are 16)")
    p.add_argument("--device", default="auto", help="auto (default: CUDA if available, else CPU), cpu, cuda, cuda:N")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "score",
        help="score latents or videos with a reward",
        description=(
            "Score latent files (safetensors holding one tensor, or .pt tensors; [C,T,H,W] or [T,C,H,W]) and "
            "videos (encoded on the fly with --vae) with a reward folder or Hub id. Prints one row per input: "
            "R_dist (mean normalised distance to the shell; real data sit near the training radius), the plain "
            "LCC distance and the reward (higher is better)."
        ),
    )
    p.add_argument("reward", metavar="REWARD", help="reward folder or Hugging Face Hub id")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="latent files, videos, or folders of them")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table", help="output format (default table)")
    add_video_arguments(p)
    return p


def score_files(
    reward: Any,
    inputs: Sequence[str | Path],
    *,
    vae: str = DEFAULT_VAE,
    fps: float = 24.0,
    frames: int = 81,
    size: str = "480p",
    layout: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Score every input (files, or folders expanded to their latents and videos) -> one dict per item with
    ``input``, ``kind``, ``shape`` (``[C, T, H, W]``) and the reward's metrics (floats)."""
    import torch
    from tqdm.auto import tqdm

    from ..data import VideoEncoder, expand_inputs, load_input
    from .encode import resolve_device_dtype

    dev, dtype = resolve_device_dtype(device, "auto")
    reward = reward.to(dev)
    space = reward.latent_space

    @functools.cache
    def encoder() -> VideoEncoder:  # loaded on the first video only
        return VideoEncoder.from_pretrained(vae, latent_space=space, device=dev, dtype=dtype)

    rows = []
    paths = expand_inputs(inputs)
    for path in tqdm(paths, desc="score", unit="item", disable=not progress or len(paths) < 2):
        kind, z = load_input(path, encoder=encoder, latent_space=space, layout=layout, fps=fps, frames=frames,
                             size=size)
        with torch.no_grad():
            metrics = reward.metrics(z[None].to(dev))
        keys = [k for k in _FIRST if k in metrics] + sorted(k for k in metrics if k not in _FIRST)
        rows.append({"input": str(path), "kind": kind, "shape": list(z.shape),
                     **{k: float(metrics[k][0]) for k in keys}})
    return rows


def metric_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [k for k in rows[0] if k not in ("input", "kind", "shape")] if rows else []


def format_rows(rows: Sequence[dict[str, Any]], fmt: str) -> str:
    """Rows as an aligned table, JSON or CSV."""
    keys = metric_keys(rows)
    if fmt == "json":
        return json.dumps(list(rows), indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["input", "kind", "shape", *keys])
        for r in rows:
            w.writerow([r["input"], r["kind"], "x".join(map(str, r["shape"])), *(repr(r[k]) for k in keys)])
        return buf.getvalue().rstrip("\n")
    header = ["input", "kind", "C x T x H x W", *keys]
    body = [[r["input"], r["kind"], "x".join(map(str, r["shape"])),
             *(f"{r[k]:.4f}" if math.isfinite(r[k]) else str(r[k]) for k in keys)] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines += ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(b, widths))) for b in body]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ...rewards.hub import load_reward
    from ...rewards.devices import resolve_device

    device = resolve_device(args.device)  # a bad --device fails before anything is loaded
    reward = load_reward(args.reward)
    rows = score_files(reward, args.inputs, vae=args.vae, fps=args.fps, frames=args.frames, size=args.size,
                       layout=None if args.layout == "auto" else args.layout, device=device)
    print(format_rows(rows, args.format))
    return 0
