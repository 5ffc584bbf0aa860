"""``python -m latent_rewards.trainer CONFIG.yaml [key=value ...]`` = ``latent-rewards train ...``.

This is the entry point for several processes: ``accelerate launch -m latent_rewards.trainer CONFIG.yaml``.
"""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv and argv[0] in ("-h", "--help"):
        sys.exit(main(["train", "--help"]))
    sys.exit(main(["train", *argv]))
