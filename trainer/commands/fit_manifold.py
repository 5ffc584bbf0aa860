"""``latent-rewards fit-manifold``: fit a Shell-LCC manifold (two stages) to a folder of latents."""

from __future__ import annotations

import argparse

from ..fit_manifold import FitConfig

_D = FitConfig()


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "fit-manifold",
        help="fit a Shell-LCC manifold reward to a folder of latents",
        description=(
            "Stage 1 fits the LCC skeleton (anchors initialised from real voxels, amortised softmax coder, Adam); "
            "stage 2 fits the shell head with the skeleton frozen. Voxels are streamed from the latent files "
            "(memory stays flat as the data set grows). Writes a reward folder (config.json + model.safetensors, "
            "loaded by `score`, `evaluate`, ShellLCC.from_pretrained), train_log.jsonl, fit_summary.json and "
            "r_dist_hist.png. A checkpoint is written every --checkpoint-every steps; rerun with --resume to "
            "continue exactly where a killed run stopped. Runs under `accelerate launch` on several processes "
            "(--batch-voxels is per process)."
        ),
    )
    p.add_argument("latent_dir", metavar="LATENT_DIR", help="folder of latent files (.safetensors / .pt)")
    p.add_argument("--out", required=True, help="output reward folder")
    p.add_argument("--anchors", type=int, default=_D.anchors, help=f"LCC anchors M (default {_D.anchors}, the paper)")
    p.add_argument("--hidden", type=int, default=_D.hidden, help=f"hidden width of coder and shell head (default {_D.hidden})")
    p.add_argument("--lcc-steps", type=int, default=_D.lcc_steps, help=f"stage-1 steps (default {_D.lcc_steps})")
    p.add_argument("--shell-steps", type=int, default=_D.shell_steps, help=f"stage-2 steps (default {_D.shell_steps})")
    p.add_argument("--batch-voxels", type=int, default=_D.batch_voxels,
                   help=f"voxels per step and process (default {_D.batch_voxels}; memory ~ batch x anchors)")
    p.add_argument("--clips-per-step", type=int, default=_D.clips_per_step,
                   help=f"clips the voxels of one step come from, per process (default {_D.clips_per_step})")
    p.add_argument("--max-latent-frames", type=int, default=_D.max_latent_frames,
                   help="use the first N latent frames of each clip (default 16, as the authors; 0 = all)")
    p.add_argument("--lr", type=float, default=_D.lr, help=f"Adam learning rate of stage 1 (default {_D.lr})")
    p.add_argument("--shell-lr", type=float, default=_D.shell_lr, help=f"Adam learning rate of stage 2 (default {_D.shell_lr})")
    p.add_argument("--usage-reg", type=float, default=0.0,
                   help="weight of the anchor-usage KL regulariser (default 0 = off; the authors use 0.1 when on)")
    p.add_argument("--basis-reg", type=float, default=0.0,
                   help="weight of the anchor-to-nearest-voxel regulariser (default 0 = off; 0.1 when on)")
    p.add_argument("--log-scale-weight", type=float, default=_D.log_scale_weight,
                   help=f"weight of the shell head's log-scale penalty (default {_D.log_scale_weight})")
    p.add_argument("--seed", type=int, default=_D.seed, help="seed of initialisation and voxel sampling")
    p.add_argument("--layout", choices=["auto", "CTHW", "TCHW"], default="auto",
                   help="latent layout of the files (default auto; use TCHW for official [T,16,H,W] files "
                        "with exactly 16 latent frames)")
    p.add_argument("--checkpoint-every", type=int, default=_D.checkpoint_every,
                   help=f"steps between checkpoints (default {_D.checkpoint_every})")
    p.add_argument("--log-every", type=int, default=_D.log_every, help=f"steps between log lines (default {_D.log_every})")
    p.add_argument("--hist-clips", type=int, default=_D.hist_clips,
                   help=f"training clips scored for the R_dist histogram (default {_D.hist_clips})")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out (if any)")
    p.add_argument("--overwrite", action="store_true", help="start over even if --out holds an earlier fit")
    p.add_argument("--max-steps-this-run", type=int, default=None,
                   help="stop after this many steps (with a checkpoint); continue later with --resume")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from ..fit_manifold import fit_manifold

    cfg = FitConfig(
        anchors=args.anchors, hidden=args.hidden, lcc_steps=args.lcc_steps, shell_steps=args.shell_steps,
        batch_voxels=args.batch_voxels, lr=args.lr, shell_lr=args.shell_lr, seed=args.seed,
        clips_per_step=args.clips_per_step, max_latent_frames=args.max_latent_frames or None,
        lambda_usage=args.usage_reg, lambda_basis=args.basis_reg, log_scale_weight=args.log_scale_weight,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every, hist_clips=args.hist_clips,
        layout=None if args.layout == "auto" else args.layout,
    )
    res = fit_manifold(args.latent_dir, args.out, cfg, resume=args.resume, overwrite=args.overwrite,
                       max_steps_this_run=args.max_steps_this_run, progress=not args.no_progress)
    if not res.is_main_process:
        return 0
    if not res.finished:
        print(f"stopped at step {res.step}/{res.total_steps}; checkpoint in {res.out_dir}/checkpoint; "
              "run the same command with --resume to continue")
        return 0
    r = res.summary.get("train_r_dist", {})
    v = res.summary.get("train_voxel_r", {})
    print(f"wrote {res.out_dir}: training R_dist per clip {r.get('mean', float('nan')):.4f} ± "
          f"{r.get('std', float('nan')):.4f} over {r.get('n', 0)} clips (mean voxel r {v.get('mean', float('nan')):.4f})")
    return 0
