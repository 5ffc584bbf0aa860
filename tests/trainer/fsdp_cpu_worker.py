"""``latent-rewards train`` under accelerate's FSDP, on CPU with gloo (started by ``accelerate launch``).

accelerate turns FSDP on only for accelerator devices: on a CPU it falls back to plain multi-process (DDP) even
when ``accelerate launch`` exported the FSDP settings. This worker switches accelerate's state to FSDP right
after the trainer built its ``Accelerator`` (the plugin is read from those exported ``FSDP_*`` variables), so
accelerate's real FSDP code (wrapping, gradient clipping, gathered state dicts) and the trainer's FSDP paths run
unchanged on CPU. Nothing else is replaced.
"""

from __future__ import annotations

import sys

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from latent_rewards.trainer import loop
from latent_rewards.trainer.cli import main

_build_accelerator = loop.Trainer._accelerator


def _fsdp_accelerator(self):
    acc = _build_accelerator(self)
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch exported
    for state in (PartialState(), acc.state):  # AcceleratorState re-reads PartialState on every construction
        state.distributed_type = DistributedType.FSDP
        state.device = torch.device("cpu")  # FSDP1 compares it with the CPU compute device ("cpu", not "cpu:0")
    acc.state.fsdp_plugin = plugin  # (the tests run with mixed_precision "no": no FSDP precision policy to set)
    return acc


loop.Trainer._accelerator = _fsdp_accelerator

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
