"""``latent-rewards generate``: Wan text-to-video with latent-reward guidance and best-of-N, to MP4 + JSON."""

from __future__ import annotations

import argparse
import hashlib
import math
from pathlib import Path
from typing import Any

from ...rewards.guidance import DEFAULT_GUIDANCE_END, DEFAULT_GUIDANCE_START

#: Defaults that depend on the model: (steps, frames, height, width).
_REAL_DEFAULTS = (50, 81, 480, 832)
_TINY_DEFAULTS = (4, 9, 64, 64)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ...pipelines import DEFAULT_WAN_MODEL

    p = sub.add_parser(
        "generate",
        help="generate videos with reward guidance and best-of-N",
        description=(
            "Generate a video with a Wan diffusers pipeline, guided by a latent reward (gradient steps on the "
            "predicted clean latent inside a window of the schedule) and/or chosen best-of-N by that reward. "
            "Writes seed-<SEED>.mp4 (the best candidate; all of them with --save-all) and generation.json with "
            "every candidate's reward, metrics and per-step trace plus the exact settings. Finished candidates are "
            "kept in OUT/candidates, so re-running the same command resumes; they are keyed by the settings, the "
            "reward's content and the model's revision, so a replaced reward or model is regenerated, not reused. "
            "`--model tiny` runs a tiny random model offline on CPU (a smoke test: its videos are noise)."
        ),
    )
    p.add_argument("--model", default=DEFAULT_WAN_MODEL,
                   help=f"Wan diffusers Hub id or folder, or 'tiny' (default {DEFAULT_WAN_MODEL})")
    p.add_argument("--reward", required=True, help="reward folder or Hugging Face Hub id")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (used with --cfg-scale > 1)")
    g = p.add_argument_group("reward guidance")
    g.add_argument("--guidance-scale", type=float, default=0.0,
                   help="reward guidance step per guided step, in latent-std units with rms normalisation "
                        "(0 = off, the reward only scores; try 0.02-0.1)")
    g.add_argument("--guidance-start", type=float, default=DEFAULT_GUIDANCE_START,
                   help="window start: fraction of the sampling schedule (0 = first step, 1 = last), measured like "
                        "ComfyUI's start/end percent; in [0, 1] and <= --guidance-end (default 0)")
    g.add_argument("--guidance-end", type=float, default=DEFAULT_GUIDANCE_END,
                   help="window end: fraction of the sampling schedule (0 = first step, 1 = last), measured like "
                        f"ComfyUI's start/end percent; in [0, 1] (default {DEFAULT_GUIDANCE_END}: the last, low-noise "
                        "steps are left to the model)")
    g.add_argument("--guidance-mode", choices=["cheap", "exact"], default="cheap",
                   help="cheap: gradient at x0_hat (~free); exact: through the transformer (~3x a step)")
    g.add_argument("--guidance-normalize", choices=["rms", "none"], default="rms",
                   help="rms: unit-RMS gradient per sample (default); none: raw gradient times the scale")
    g.add_argument("--guidance-max-step", default="1.0", metavar="RMS|none",
                   help="per-sample RMS cap on one guidance step, > 0 (default 1.0); 'none' = no cap")
    s = p.add_argument_group("sampling")
    s.add_argument("--cfg-scale", type=float, default=5.0,
                   help="classifier-free guidance scale, >= 0 (default 5.0; <= 1 turns CFG off, as in diffusers)")
    s.add_argument("--steps", type=int, default=None, help="denoising steps, >= 1 (default 50; tiny: 4)")
    s.add_argument("--frames", type=int, default=None,
                   help="frames, 4k+1: 1, 5, 9, ..., 81 (Wan's VAE packs 4 frames per latent frame; default 81; "
                        "tiny: 9)")
    s.add_argument("--height", type=int, default=None,
                   help="height in pixels, a multiple of 16 (VAE 8x times patch 2; default 480; tiny: 64)")
    s.add_argument("--width", type=int, default=None,
                   help="width in pixels, a multiple of 16 (default 832; tiny: 64)")
    s.add_argument("--seed", type=int, default=0, help="seed of the first candidate; candidate i uses seed + i")
    s.add_argument("--best-of", type=int, default=1, help="generate N candidates and keep the best (default 1)")
    s.add_argument("--scheduler", choices=["model", "unipc", "euler"], default="model",
                   help="keep the model's scheduler (default) or use UniPC / flow-matching Euler")
    o = p.add_argument_group("output and hardware")
    o.add_argument("--out", required=True, help="output folder")
    o.add_argument("--fps", type=int, default=16, help="frame rate of the MP4 files (default 16, Wan's)")
    o.add_argument("--save-all", action="store_true", help="also write every candidate's MP4")
    o.add_argument("--device", default="auto", help="auto (default: CUDA if available, else CPU), cpu, cuda, cuda:N")
    o.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="transformer/text-encoder dtype (auto: bf16 on CUDA, fp32 on CPU; the VAE stays fp32)")
    o.add_argument("--cpu-offload", action="store_true",
                   help="enable_model_cpu_offload: models move to the GPU one at a time (for small GPUs)")
    return p


#: The largest seed a torch.Generator takes (manual_seed reads a signed 64-bit integer).
_MAX_SEED = 2**63 - 1


def parse_max_step(value: str | float | None) -> float | None:
    """``--guidance-max-step``: a finite number > 0, or ``none``/``off`` for no cap."""
    from ...rewards.errors import ConfigError

    if value is None or str(value).strip().lower() in ("none", "off"):
        return None
    try:
        cap = float(value)
    except ValueError:
        cap = math.nan
    if not (math.isfinite(cap) and cap > 0):
        raise ConfigError(f"--guidance-max-step must be a number > 0 or 'none' (no cap), got {value!r}")
    return cap


def check_video_shape(settings: dict[str, Any], *, spatial: int = 16, temporal: int = 4) -> None:
    """Height/width multiples of ``spatial``, frames ``temporal * k + 1``: what the model generates exactly.

    diffusers would otherwise fail deep inside the call (height 60) or silently round (10 frames -> 9).
    """
    from ...rewards.errors import ConfigError

    for key in ("height", "width"):
        v = settings[key]
        if v < spatial or v % spatial:
            near = max(spatial, round(v / spatial) * spatial)
            raise ConfigError(f"--{key} must be a positive multiple of {spatial} (the VAE's spatial stride times "
                              f"the transformer's patch size), got {v}; try {near}")
    f = settings["frames"]
    if f < 1 or (f - 1) % temporal:
        near = max(0, round((f - 1) / temporal)) * temporal + 1
        raise ConfigError(f"--frames must be of the form {temporal}k+1 (1, {temporal + 1}, {2 * temporal + 1}, ..., "
                          f"81; the VAE packs {temporal} frames per latent frame), got {f}; try {near}")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The validated settings of a run, exactly as they are used (bad values raise ConfigError naming the flag)."""
    from ...pipelines.tiny import TINY_MODEL_ID
    from ...rewards.errors import ConfigError
    from ...rewards.guidance import GuidanceConfig

    steps, frames, height, width = _TINY_DEFAULTS if args.model == TINY_MODEL_ID else _REAL_DEFAULTS
    settings = {
        "model": args.model,
        "reward": str(args.reward),
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "reward_guidance": {
            "scale": args.guidance_scale, "start": args.guidance_start, "end": args.guidance_end,
            "mode": args.guidance_mode, "normalize": args.guidance_normalize,
            "max_step": parse_max_step(args.guidance_max_step),
        },
        "cfg_scale": args.cfg_scale,
        "steps": args.steps if args.steps is not None else steps,
        "frames": args.frames if args.frames is not None else frames,
        "height": args.height if args.height is not None else height,
        "width": args.width if args.width is not None else width,
        "scheduler": args.scheduler,
        "seeds": [args.seed + i for i in range(max(args.best_of, 0))],
    }
    if args.best_of < 1:
        raise ConfigError(f"--best-of must be >= 1, got {args.best_of}")
    if not 0 <= args.seed <= _MAX_SEED - (args.best_of - 1):
        raise ConfigError(f"--seed must be >= 0 with seed + best-of - 1 < 2^63, got {args.seed}")
    if settings["steps"] < 1:
        raise ConfigError(f"--steps must be >= 1, got {settings['steps']}")
    if not (math.isfinite(args.cfg_scale) and args.cfg_scale >= 0):
        raise ConfigError(f"--cfg-scale must be a finite number >= 0 (<= 1 turns CFG off), got {args.cfg_scale}")
    if args.fps < 1:
        raise ConfigError(f"--fps must be >= 1, got {args.fps}")
    if not (math.isfinite(args.guidance_scale) and args.guidance_scale >= 0):
        raise ConfigError(f"--guidance-scale must be a finite number >= 0 (0 = off), got {args.guidance_scale}")
    start, end = args.guidance_start, args.guidance_end
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0 and start <= end):  # also false for NaN
        raise ConfigError(f"--guidance-start and --guidance-end are fractions of the sampling schedule in [0, 1] "
                          f"with start <= end, got start={start}, end={end}")
    check_video_shape(settings)
    GuidanceConfig(**settings["reward_guidance"]).validate()
    return settings


def _hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 23):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def reward_fingerprint(reward: str | Path) -> tuple[Path, dict[str, str | None]]:
    """Resolve a reward folder or Hub id -> ``(folder, {"sha256", "revision"})``.

    ``sha256`` covers ``config.json`` and the weights (``*.safetensors``), so a reward folder replaced under the
    same path gets a new fingerprint; ``revision`` is the Hub commit of the snapshot (``None`` for a local folder).
    Load the reward from the returned folder, so what is hashed is what is used.
    """
    from ...rewards.hub import resolve_pretrained

    folder = resolve_pretrained(reward)
    files = [folder / "config.json", *sorted(folder.glob("*.safetensors"))]
    try:
        digest = _hash_files([f for f in files if f.is_file()])
    except OSError as e:
        from ...rewards.errors import CheckpointError

        raise CheckpointError(f"{folder}: cannot read the reward files ({e})") from None
    is_local = Path(str(reward)).expanduser().exists()
    return folder, {"sha256": digest, "revision": None if is_local else folder.name}


def model_fingerprint(model: str | Path) -> dict[str, str | None]:
    """What identifies the generator's weights: ``revision`` (the Hub commit in the local cache) for a Hub id, or
    ``files`` (a digest of file names, sizes and modification times) for a local folder, so replacing the model
    under the same name invalidates saved candidates. The tiny model is deterministic (``{}``)."""
    from ...pipelines.tiny import TINY_MODEL_ID

    if str(model) == TINY_MODEL_ID:
        return {}
    p = Path(str(model)).expanduser()
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(p).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return {"files": h.hexdigest()}
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(str(model), "model_index.json")
    return {"revision": Path(cached).parent.name if isinstance(cached, str) else None}


def run(args: argparse.Namespace) -> int:
    import json

    from ...pipelines.best_of_n import best_of_n, decode_latents
    from ...pipelines.video import write_video
    from ...pipelines.wan import load_wan_pipeline, resolve_dtype
    from ...rewards.hub import atomic_write_text, load_reward
    from ...rewards.devices import resolve_device

    settings = _settings(args)  # bad sizes, windows and scales fail before anything is loaded
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    reward_folder, reward_id = reward_fingerprint(args.reward)
    reward = load_reward(reward_folder)
    out = Path(args.out)

    pipe = load_wan_pipeline(
        args.model, device=device, dtype=dtype, cpu_offload=args.cpu_offload,
        scheduler=None if args.scheduler == "model" else args.scheduler,
    )
    # The model's own strides (Wan2.2's 5B model packs 16x16 pixels per token, not 8x8 x patch 2).
    patch = (pipe.transformer or pipe.transformer_2).config.patch_size
    check_video_shape(settings, spatial=math.lcm(16, pipe.vae_scale_factor_spatial * patch[1],
                                                 pipe.vae_scale_factor_spatial * patch[2]),
                      temporal=pipe.vae_scale_factor_temporal)
    pipe.load_latent_reward(reward)
    pipe.set_reward_guidance(**settings["reward_guidance"])
    run_info = {**settings, "reward_sha256": reward_id["sha256"], "reward_revision": reward_id["revision"],
                "model_fingerprint": model_fingerprint(args.model), "device": str(device),
                "dtype": str(dtype).removeprefix("torch."), "scheduler_class": type(pipe.scheduler).__name__}
    key_fields = {k: v for k, v in run_info.items() if k != "seeds"}
    cache_key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()

    result = best_of_n(
        pipe, args.prompt, seeds=settings["seeds"], output_type="np", cache_dir=out / "candidates",
        cache_key=cache_key, negative_prompt=args.negative_prompt, guidance_scale=args.cfg_scale,
        num_inference_steps=settings["steps"], num_frames=settings["frames"], height=settings["height"],
        width=settings["width"],
    )
    # Record what was generated, read off the video itself.
    run_info["frames"], run_info["height"], run_info["width"] = (int(n) for n in result.frames[0].shape[:3])
    files: dict[int, str] = {}
    best_file = out / f"seed-{result.best_seed}.mp4"
    write_video(result.frames[0], best_file, fps=args.fps)
    files[result.best_seed] = best_file.name
    if args.save_all:
        for seed, lat in zip(result.seeds, result.candidate_latents):
            if seed != result.best_seed:
                path = out / f"seed-{seed}.mp4"
                write_video(decode_latents(pipe, lat.to(pipe._execution_device), "np")[0], path, fps=args.fps)
                files[seed] = path.name
    summary = result.as_dict()
    for cand in summary["candidates"]:
        cand["file"] = files.get(cand["seed"])
    report = {
        "settings": run_info,
        "best": {"seed": result.best_seed, "file": best_file.name, "reward": result.rewards[result.best_index],
                 "metrics": result.metrics[result.best_index]},
        "candidates": summary["candidates"],
    }
    atomic_write_text(out / "generation.json", json.dumps(report, indent=2) + "\n")
    ranked = ", ".join(f"seed {result.seeds[i]}: {result.rewards[i]:.4f}" for i in result.ranking)
    print(f"wrote {best_file} (best of {len(result.seeds)}; rewards {ranked}) and {out / 'generation.json'}")
    return 0
