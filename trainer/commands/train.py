"""``latent-rewards train CONFIG.yaml [key=value ...]``: reward fine-tuning of Wan2.1 (LoRA or full)."""

from __future__ import annotations

import argparse


def _add_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in output_dir (which must exist); by default a run "
                        "continues from one when there is one")
    g.add_argument("--resume-from", metavar="CHECKPOINT", default=None, help="continue from this checkpoint folder")
    g.add_argument("--no-resume", action="store_true", help="start fresh (output_dir must hold no checkpoints)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train`` on the CLI's sub-parsers."""
    p = sub.add_parser(
        "train",
        help="fine-tune Wan2.1 with a latent reward (LoRA or full; Shell-LCC recipe)",
        description=(
            "Fine-tune a Wan2.1 text-to-video model with a latent reward. CONFIG is a YAML file or a built-in name "
            "(tiny-cpu, shell_lcc_wan1.3b, shell_lcc_wan1.3b_lora, shell_lcc_wan14b_band); overrides use the "
            "config's own keys, dotted for sections, e.g. `output_dir=runs/x max_steps=12 lora.rank=8 "
            "reward.path=runs/manifold`. The config is validated before any model is loaded. A run continues from "
            "the newest checkpoint in output_dir when there is one; Ctrl-C saves a checkpoint and stops. Several "
            "GPUs: "
            "`accelerate launch -m latent_rewards.trainer CONFIG.yaml [overrides]` (DDP), or with "
            "`--config_file trainer/configs/accelerate_fsdp.yaml` to shard the transformer with FSDP."
        ),
    )
    p.add_argument("config", help="YAML config file or built-in config name")
    # REMAINDER so options may follow the overrides (`train cfg max_steps=3 --no-progress`); they are split in run().
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value ...",
                   help="config overrides, e.g. max_steps=12 lora.rank=8")
    _add_flags(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Validate the config (before any model is loaded), then train; returns 130 when interrupted."""
    from ..config import dump_config, load_config

    late = argparse.ArgumentParser(
        prog="latent-rewards train CONFIG [key=value ...]",
        description="Options after the overrides (see `latent-rewards train --help` for everything).",
    )
    _add_flags(late)
    # Options take their values with them (`--resume-from CKPT`); what is left are the overrides.
    extra, overrides = late.parse_known_args(args.overrides)
    unknown = [a for a in overrides if a.startswith("-")]
    if unknown:
        late.error(f"unrecognized arguments: {' '.join(unknown)}")
    for key, value in vars(extra).items():
        if value not in (None, False):
            setattr(args, key, value)
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    resume = "never" if args.no_resume else ("latest" if args.resume else args.resume_from)
    from ..loop import train

    result = train(cfg, resume=resume, progress=not args.no_progress)
    if not result.main_process:
        return 130 if result.interrupted else 0
    where = f"best step {result.best_step} in {result.best_dir}" if result.best_dir else "no best/ export"
    print(f"trained to step {result.step}; {where}; run folder {result.output_dir}")
    if result.stop_reason:
        print(result.stop_reason)
    return 130 if result.interrupted else 0
