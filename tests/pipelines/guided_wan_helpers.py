"""What the diffusers-integration tests share besides fixtures (a module with a unique name: several test areas
have a ``conftest``, so ``from conftest import ...`` would be ambiguous in a whole-suite run)."""

from __future__ import annotations

import torch

#: Small call: 9 frames of 64x64 -> latent [B, 16, 3, 8, 8]; few steps and 16 text tokens (the text width is
#: 4096, so 512 tokens would dominate the tiny transformer) keep each call well under a second.
CALL = dict(prompt="a red kite over the sea", num_frames=9, height=64, width=64, num_inference_steps=5,
            max_sequence_length=16)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
