"""The ``latent-rewards`` command line.

Each sub-command lives in ``trainer/commands/<name>.py`` with ``add_parser(subparsers)`` and ``run(args)``; heavy
imports happen inside ``run`` so ``--help`` stays fast. Errors from bad input (:class:`LatentRewardsError`) are
printed as one line and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ..rewards.errors import LatentRewardsError

#: Sub-command modules, in the order ``--help`` lists them.
COMMANDS: list[str] = [
    "demo",
    "encode",
    "fit_manifold",
    "score",
    "evaluate",
    "generate",
    "train",
    "push",
    "convert",
]


def build_parser() -> argparse.ArgumentParser:
    """The ``latent-rewards`` parser with one sub-parser per module in :data:`COMMANDS`."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="latent-rewards",
        description=(
            "Latent-space video rewards (Shell-LCC, PRFL/PAVRM, VELR): fit and convert rewards, score latents and "
            "videos, guide and fine-tune Wan2.1. Run `latent-rewards COMMAND --help` for each command."
        ),
    )
    parser.add_argument("--version", action="version", version=f"latent-rewards {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f".commands.{name}", __package__)
        p = module.add_parser(sub)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (2 for bad input, 130 when interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s")
    try:
        result = args._run(args)
    except LatentRewardsError as e:
        if debug:
            raise
        print(f"latent-rewards {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"latent-rewards {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
