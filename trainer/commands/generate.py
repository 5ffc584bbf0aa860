"""``latent-rewards generate``: Wan text-to-video with latent-reward guidance and best-of-N, to MP4 + JSON."""

from __future__ import annotations

import argparse
from typing import Any

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
            "kept in OUT/candidates, so re-running the same command resumes. `--model tiny` runs a tiny random "
            "model offline on CPU (a smoke test: its videos are noise)."
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
    g.add_argument("--guidance-start", type=float, default=0.0,
                   help="window start as a fraction of denoising progress 1 - sigma, in [0, 1] (default 0)")
    g.add_argument("--guidance-end", type=float, default=1.0,
                   help="window end as a fraction of denoising progress, in [0, 1] (default 1)")
    g.add_argument("--guidance-mode", choices=["cheap", "exact"], default="cheap",
                   help="cheap: gradient at x0_hat (~free); exact: through the transformer (~3x a step)")
    g.add_argument("--guidance-normalize", choices=["rms", "none"], default="rms",
                   help="rms: unit-RMS gradient per sample (default); none: raw gradient times the scale")
    g.add_argument("--guidance-max-step", type=float, default=1.0,
                   help="per-sample RMS cap on one step (default 1.0; 0 = no cap)")
    s = p.add_argument_group("sampling")
    s.add_argument("--cfg-scale", type=float, default=5.0, help="classifier-free guidance scale (default 5.0)")
    s.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; tiny: 4)")
    s.add_argument("--frames", type=int, default=None, help="frames, 4k+1 (default 81; tiny: 9)")
    s.add_argument("--height", type=int, default=None, help="height in pixels (default 480; tiny: 64)")
    s.add_argument("--width", type=int, default=None, help="width in pixels (default 832; tiny: 64)")
    s.add_argument("--seed", type=int, default=0, help="seed of the first candidate; candidate i uses seed + i")
    s.add_argument("--best-of", type=int, default=1, help="generate N candidates and keep the best (default 1)")
    s.add_argument("--scheduler", choices=["model", "unipc", "euler"], default="model",
                   help="keep the model's scheduler (default) or use UniPC / flow-matching Euler")
    o = p.add_argument_group("output and hardware")
    o.add_argument("--out", required=True, help="output folder")
    o.add_argument("--fps", type=int, default=16, help="frame rate of the MP4 files (default 16, Wan's)")
    o.add_argument("--save-all", action="store_true", help="also write every candidate's MP4")
    o.add_argument("--device", default="auto", help="auto (CUDA if present), cuda, cuda:1, cpu")
    o.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="transformer/text-encoder dtype (auto: bf16 on CUDA, fp32 on CPU; the VAE stays fp32)")
    o.add_argument("--cpu-offload", action="store_true",
                   help="enable_model_cpu_offload: models move to the GPU one at a time (for small GPUs)")
    return p


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    from ...pipelines.tiny import TINY_MODEL_ID

    steps, frames, height, width = _TINY_DEFAULTS if args.model == TINY_MODEL_ID else _REAL_DEFAULTS
    return {
        "model": args.model,
        "reward": str(args.reward),
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "reward_guidance": {
            "scale": args.guidance_scale, "start": args.guidance_start, "end": args.guidance_end,
            "mode": args.guidance_mode, "normalize": args.guidance_normalize,
            "max_step": args.guidance_max_step if args.guidance_max_step > 0 else None,
        },
        "cfg_scale": args.cfg_scale,
        "steps": args.steps if args.steps is not None else steps,
        "frames": args.frames if args.frames is not None else frames,
        "height": args.height if args.height is not None else height,
        "width": args.width if args.width is not None else width,
        "scheduler": args.scheduler,
        "seeds": [args.seed + i for i in range(args.best_of)],
    }


def run(args: argparse.Namespace) -> int:
    import hashlib
    import json
    from pathlib import Path

    from ...pipelines.best_of_n import best_of_n, decode_latents
    from ...pipelines.video import write_video
    from ...pipelines.wan import load_wan_pipeline, resolve_device, resolve_dtype
    from ...rewards.errors import ConfigError
    from ...rewards.guidance import GuidanceConfig
    from ...rewards.hub import atomic_write_text, load_reward

    if args.best_of < 1:
        raise ConfigError(f"--best-of must be >= 1, got {args.best_of}")
    settings = _settings(args)
    GuidanceConfig(**settings["reward_guidance"]).validate()  # bad windows/scales fail before any loading
    for key in ("steps", "frames", "height", "width"):
        if settings[key] < 1:
            raise ConfigError(f"--{key} must be >= 1, got {settings[key]}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    reward = load_reward(args.reward)
    out = Path(args.out)

    pipe = load_wan_pipeline(
        args.model, device=device, dtype=dtype, cpu_offload=args.cpu_offload,
        scheduler=None if args.scheduler == "model" else args.scheduler,
    )
    pipe.load_latent_reward(reward)
    pipe.set_reward_guidance(**settings["reward_guidance"])
    run_info = {**settings, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                "scheduler_class": type(pipe.scheduler).__name__}
    key_fields = {k: v for k, v in run_info.items() if k != "seeds"}
    cache_key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()

    result = best_of_n(
        pipe, args.prompt, seeds=settings["seeds"], output_type="np", cache_dir=out / "candidates",
        cache_key=cache_key, negative_prompt=args.negative_prompt, guidance_scale=args.cfg_scale,
        num_inference_steps=settings["steps"], num_frames=settings["frames"], height=settings["height"],
        width=settings["width"],
    )
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
