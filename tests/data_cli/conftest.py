"""Fixtures of the data / fitting / CLI tests: test videos written with PyAV, a tiny Wan VAE saved as a VAE
folder and as a diffusers pipeline folder, a synthetic latent data set with a known shell manifold, and a small
reward fitted on it once per session."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest


def _mux(path: Path, images, *, fps: int, width: int, height: int, codec: str = "mpeg4",
         options: dict[str, str] | None = None) -> Path:
    """Encode RGB uint8 frames ``[height, width, 3]`` into a video file with PyAV."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if options:
            stream.options = options
        for img in images:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_video(path: Path, *, frames: int = 20, fps: int = 12, width: int = 80, height: int = 48,
                codec: str = "mpeg4", values: list[int] | None = None) -> Path:
    """A test video whose frame ``i`` is a uniform grey ``values[i]`` (default ``16 + 12 i``), so decoded frames
    identify which source frame they came from."""
    values = values or [16 + 12 * i for i in range(frames)]
    images = (np.full((height, width, 3), v, dtype=np.uint8) for v in values[:frames])
    return _mux(path, images, fps=fps, width=width, height=height, codec=codec,
                options={"qscale": "1"} if codec == "mpeg4" else None)


def write_textured_video(path: Path, *, frames: int = 12, fps: int = 12, width: int = 96, height: int = 64,
                         seed: int = 0) -> Path:
    """A test video with smooth random colour patterns (something a VAE has to work on)."""
    g = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    phase = g.uniform(0, 6, size=3)

    def image(i: int) -> np.ndarray:
        img = np.stack([np.sin(6 * xx + 4 * yy + phase[c] + 0.3 * i) for c in range(3)], axis=-1)
        return ((img * 0.5 + 0.5) * 255).astype(np.uint8)

    return _mux(path, (image(i) for i in range(frames)), fps=fps, width=width, height=height)


@pytest.fixture(scope="session")
def video_factory():
    return write_video


@pytest.fixture(scope="session")
def textured_video_factory():
    return write_textured_video


@pytest.fixture(scope="session")
def tiny_vae_dirs(tmp_path_factory):
    """``(vae_folder, pipeline_folder)``: the tiny Wan VAE saved alone and as the ``vae/`` of a pipeline folder."""
    from latent_rewards.pipelines.tiny import tiny_wan_vae

    root = tmp_path_factory.mktemp("tiny_vae")
    vae = tiny_wan_vae(seed=0)
    vae.save_pretrained(str(root / "vae_only"))
    pipe = root / "pipeline"
    vae.save_pretrained(str(pipe / "vae"))
    (pipe / "model_index.json").write_text(json.dumps(
        {"_class_name": "WanPipeline", "_diffusers_version": "0.42.1", "vae": ["diffusers", "AutoencoderKLWan"]}))
    return root / "vae_only", pipe


@pytest.fixture(scope="session")
def shell_world():
    from latent_rewards.trainer.demo import ShellWorld

    return ShellWorld(seed=3, frames=2, height=12, width=12)


@pytest.fixture(scope="session")
def shell_data(tmp_path_factory, shell_world):
    """Folders of synthetic latents: ``train`` (12 clips), ``real`` (held-out, 6) and ``distorted`` (6)."""
    from latent_rewards.trainer.data import save_latent_file
    from latent_rewards.trainer.demo import distort

    root = tmp_path_factory.mktemp("shell_data")
    for i in range(12):
        save_latent_file(root / "train" / f"c{i:02d}.safetensors", shell_world.clip(i, split=0))
    for i in range(6):
        z = shell_world.clip(i, split=1)
        save_latent_file(root / "real" / f"r{i:02d}.safetensors", z)
        save_latent_file(root / "distorted" / f"d{i:02d}.safetensors", distort(z, strength=0.1, seed=i))
    return root


TINY_FIT = dict(anchors=24, hidden=32, lcc_steps=300, shell_steps=200, batch_voxels=1024, clips_per_step=4, seed=0,
                checkpoint_every=1000, log_every=10, max_latent_frames=None, hist_clips=12)


@pytest.fixture(scope="session")
def tiny_fit(tmp_path_factory, shell_data):
    """A small Shell-LCC fitted on ``shell_data/train`` (single-threaded: tiny models run fastest that way)."""
    from latent_rewards.trainer.fit_manifold import FitConfig, fit_manifold
    from latent_rewards.trainer.modeling import cpu_threads

    out = tmp_path_factory.mktemp("tiny_fit") / "reward"
    with cpu_threads(1):  # session fixtures run before the per-test one-thread fixture
        return fit_manifold(shell_data / "train", out, FitConfig(**TINY_FIT), progress=False)
