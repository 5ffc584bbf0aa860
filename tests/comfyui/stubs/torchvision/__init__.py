"""Test-only stand-in for torchvision, on the PYTHONPATH of the ComfyUI test server only.

There is no CPU torchvision wheel for this torch build, and ComfyUI imports torchvision at module import time in
code our graphs never run (Cascade, Cosmos, ...). Any attribute access fails loudly, so a graph that really needs
torchvision cannot pass by accident.
"""


def __getattr__(name: str):
    raise AttributeError(f"torchvision is stubbed out in the latent-rewards ComfyUI tests (asked for {name!r})")
