"""``latent-rewards convert``: import the authors' Shell-LCC checkpoint into a reward folder."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "convert",
        help="convert an official Shell-LCC .pth into a reward folder",
        description=(
            "Convert the authors' Shell-LCC checkpoint (manifold/shell_lcc.pth: {'model': state_dict, 'config': "
            "{...}}) into a latent-rewards folder (config.json + model.safetensors + README.md) that "
            "from_pretrained, the diffusers mixin and the ComfyUI loader read. The file is read with "
            "weights_only=True; nothing else is unpickled."
        ),
    )
    p.add_argument("checkpoint", help="official .pth file")
    p.add_argument("out_dir", help="reward folder to write (replaced atomically if it exists)")
    p.add_argument("--reward-mode", choices=["plain", "band"], default="plain",
                   help="plain: reward = -R_dist (paper); band: reward = -|R_dist - tau| (default: plain)")
    p.add_argument("--tau", type=float, default=None, help="band target, e.g. 0.444 (the authors' 14B recipe)")
    p.add_argument("--latent-space", default="wan2.1", help="latent space the manifold was fitted on (default wan2.1)")
    return p


def run(args: argparse.Namespace) -> int:
    from ...rewards.official import convert_official_checkpoint

    out = convert_official_checkpoint(
        args.checkpoint, args.out_dir, reward_mode=args.reward_mode, tau=args.tau, latent_space=args.latent_space
    )
    print(f"wrote {out}")
    return 0
