"""Test-only stand-in for torchvision.transforms (see the package docstring)."""


def __getattr__(name: str):
    raise AttributeError(f"torchvision.transforms is stubbed out in the latent-rewards ComfyUI tests ({name!r})")
