"""``latent-rewards push RUN_DIR_OR_CHECKPOINT --repo user/name``: upload a trained adapter to the Hub."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``push`` on the CLI's sub-parsers."""
    p = sub.add_parser(
        "push",
        help="upload a trained adapter (both formats), its model card and config to the Hugging Face Hub",
        description=(
            "Upload a fine-tuned adapter to the Hub: diffusers LoRA (pytorch_lora_weights.safetensors), ComfyUI LoRA "
            "(*_comfyui.safetensors), model card README.md (its usage snippets pointed at --repo), "
            "training_config.yaml and metrics.json. A run folder uploads its best/ step, the one the reward-hacking "
            "rule selected; a run without best/ is refused: pass one of its checkpoint-<step>/ folders to publish "
            "it anyway. The token comes from HF_TOKEN or `hf auth login` and is never printed."
        ),
    )
    p.add_argument("source", help="training run folder (uploads its best/), checkpoint-<step>/ or best/")
    p.add_argument("--repo", required=True, help="Hub repository id, user/name (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--include-videos", action="store_true", help="also upload the validation MP4s")
    p.add_argument("--dry-run", metavar="OUT", default=None,
                   help="write exactly the folder that would be uploaded to OUT and upload nothing")
    return p


def run(args: argparse.Namespace) -> int:
    """Upload (or with ``--dry-run`` write) the folder of ``args.source``; warns when that step was flagged."""
    import sys

    from ...rewards.errors import CheckpointError
    from ...rewards.hub import looks_like_repo_id
    from ..hub import export_warning, prepare_upload, push, resolve_export

    if not looks_like_repo_id(args.repo):
        raise CheckpointError(f"--repo: {args.repo!r} is not a Hub repository id of the form 'user/name'")
    warning = export_warning(resolve_export(args.source))
    if warning:
        print(f"latent-rewards push: warning: {warning}", file=sys.stderr)
    if args.dry_run:
        out = prepare_upload(args.source, args.dry_run, repo_id=args.repo, include_videos=args.include_videos)
        files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        print(f"dry run: would upload to {args.repo} ({'private' if args.private else 'public'}) from {out}:")
        for f in files:
            print(f"  {f}")
        return 0
    url = push(args.source, args.repo, private=args.private or None, include_videos=args.include_videos)
    print(f"uploaded to {args.repo}: {url}")
    return 0
