"""Write generated frames to an MP4 file (PyAV, H.264), atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..rewards.errors import ConfigError
from ..rewards.hub import atomic_write_file

__all__ = ["frames_to_uint8", "write_video"]


def frames_to_uint8(frames: Any) -> np.ndarray:
    """One video as ``uint8 [F, H, W, 3]`` from what diffusers returns for one video.

    Accepts a float array/tensor in [0, 1] (``output_type="np"``/``"pt"``; channels last or, for tensors,
    ``[F, 3, H, W]``), a ``uint8`` array, or a list of PIL images.
    """
    if isinstance(frames, (list, tuple)):
        frames = np.stack([np.asarray(f.convert("RGB") if hasattr(f, "convert") else f) for f in frames])
    if hasattr(frames, "detach"):  # torch tensor
        t = frames.detach().float().cpu()
        if t.ndim == 4 and t.shape[1] == 3 and t.shape[-1] != 3:
            t = t.permute(0, 2, 3, 1)
        frames = t.numpy()
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ConfigError(f"expected one video as [frames, height, width, 3], got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = (np.clip(np.nan_to_num(arr.astype(np.float32)), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return arr


def write_video(frames: Any, path: str | Path, fps: int = 16, *, crf: int = 18) -> Path:
    """Encode one video (see :func:`frames_to_uint8`) as H.264 MP4 at ``path``; the file appears complete or not
    at all. Odd sizes are padded by one pixel (yuv420p needs even sizes)."""
    import av

    arr = frames_to_uint8(frames)
    _, h, w, _ = arr.shape
    if h % 2 or w % 2:
        arr = np.pad(arr, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")

    def encode(tmp: str) -> None:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=int(fps))
            stream.width, stream.height = arr.shape[2], arr.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            for frame in arr:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)

    return atomic_write_file(path, encode)
