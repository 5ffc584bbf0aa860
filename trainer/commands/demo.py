"""``latent-rewards demo``: the offline CPU tour (synthetic manifold, fit, score; later: guidance, fine-tuning)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo",
        help="run the offline CPU demo and write a report",
        description=(
            "Builds a small synthetic latent data set with a known shell-shaped manifold, fits a Shell-LCC reward "
            "on it, scores held-out real latents against distorted (noisy) and blurred ones, and writes "
            "report.txt, report.png and report.json (plus the data and the fitted reward) to --out. Offline, "
            "CPU only, about a minute."
        ),
    )
    p.add_argument("--out", default="latent-rewards-demo", help="output folder (default ./latent-rewards-demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and the fit (default 0)")
    p.add_argument("--sections", default=None,
                   help="comma-separated section names to run (default: all; see report.json for names)")
    p.add_argument("--quiet", action="store_true", help="print only the final report")
    return p


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    sections = [s.strip() for s in args.sections.split(",") if s.strip()] if args.sections else None
    result = run_demo(args.out, seed=args.seed, sections=sections, verbose=not args.quiet)
    print(result["report"])
    return 0
