"""``latent-rewards encode``: videos -> normalised Wan2.1 latents (one safetensors file per clip + manifest)."""

from __future__ import annotations

import argparse

from ..data import DEFAULT_VAE


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "encode",
        help="encode videos into a folder of normalised latents",
        description=(
            "Decode videos with PyAV, sample frames at --fps, keep N = 4k+1 frames (at most --frames), resize to "
            "cover and centre-crop to a size bucket, scale to [-1, 1], encode with diffusers' AutoencoderKLWan "
            "(posterior mean) and normalise with the Wan2.1 constants. Writes one safetensors latent [16, T, H/8, "
            "W/8] per clip and a manifest (JSON Lines). Clips already encoded are skipped, so a killed run resumes "
            "by running the same command. Under `accelerate launch` each process encodes its own shard."
        ),
    )
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="video files or folders of videos (searched recursively)")
    p.add_argument("--out", required=True, help="output folder for the latents and manifest")
    p.add_argument("--vae", default=DEFAULT_VAE,
                   help=f"diffusers Wan pipeline (Hub id or folder; its vae/ is used) or a VAE folder (default {DEFAULT_VAE})")
    p.add_argument("--fps", type=float, default=24.0, help="frame rate to sample at (default 24, as the authors)")
    p.add_argument("--frames", type=int, default=81,
                   help="maximum frames per clip, of the form 4k+1 (default 81 = 21 latent frames); shorter videos "
                        "keep the largest 4k+1 they have")
    p.add_argument("--size", default="480p",
                   help="480p or 720p (closest-aspect bucket of 16:9, 9:16, 1:1) or WxH (default 480p)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="encode only shard I of N (0-based); default: the accelerate process index, else all")
    p.add_argument("--device", default="auto",
                   help="auto (default: CUDA if available, else CPU), cpu, cuda, cuda:N; under a multi-process "
                        "launcher auto means cuda:LOCAL_RANK")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="VAE precision (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--tiling", action="store_true", help="spatially tiled VAE encoding (less memory for 720p)")
    p.add_argument("--skip-bad", action="store_true",
                   help="log and skip videos that cannot be decoded instead of stopping at the first one")
    return p


def resolve_device_dtype(device: str | None, dtype: str):
    """``--device`` / ``--dtype`` -> torch device and dtype (bf16 on GPU, fp32 on CPU by default).

    Raises:
        ConfigError: a malformed or unavailable device (see :func:`..devices.resolve_device`).
    """
    from ...rewards.devices import resolve_device
    from ..modeling import DTYPES

    dev = resolve_device(device)
    if dtype == "auto":
        return dev, DTYPES["bf16" if dev.type == "cuda" else "fp32"]
    return dev, DTYPES[dtype]


def launcher_shard() -> tuple[tuple[int, int] | None, int]:
    """``((rank, world_size), local_rank)`` when started by accelerate launch / torchrun / mpirun, else ``None``.

    Read from the launcher's environment: encoding needs no process group, only which share of the clips is ours.
    """
    import os

    for size_key, rank_key in (("WORLD_SIZE", "RANK"), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
                               ("PMI_SIZE", "PMI_RANK")):
        world = int(os.environ.get(size_key, "1") or 1)
        if world > 1:
            rank = int(os.environ.get(rank_key, "0") or 0)
            return (rank, world), int(os.environ.get("LOCAL_RANK", rank) or 0)
    return None, 0


def run(args: argparse.Namespace) -> int:
    from ..data import (
        VideoEncoder,
        encode_videos,
        expand_inputs,
        parse_shard,
        parse_size,
    )

    shard = parse_shard(args.shard)
    parse_size(args.size)
    videos = expand_inputs(args.videos, kinds=("video",))
    device = None if args.device in (None, "auto") else args.device
    if shard is None:
        shard, local_rank = launcher_shard()
        if shard is not None and device is None:
            import torch

            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev, dtype = resolve_device_dtype(device, args.dtype)

    def encoder() -> VideoEncoder:
        return VideoEncoder.from_pretrained(args.vae, device=dev, dtype=dtype, tiling=args.tiling)

    result = encode_videos(videos, args.out, encoder=encoder, fps=args.fps, frames=args.frames, size=args.size,
                           shard=shard, skip_bad=args.skip_bad)
    where = f" (shard {shard[0]}/{shard[1]})" if shard else ""
    print(f"encoded {len(result.written)}, skipped {len(result.skipped)} already encoded, "
          f"failed {len(result.failed)}{where} -> {args.out}")
    for _, err in result.failed:
        print(f"  failed: {err}")
    return 1 if result.failed else 0
