"""Latent data: latent files and folders, a streaming voxel sampler for fitting, video decoding and VAE encoding.

Latent files
    One latent per file, ``[C, T, H, W]`` in the *normalised* space of a named VAE family (Wan2.1: 16 channels).
    :func:`load_latent_file` reads a safetensors file holding exactly one tensor (any key name) or a ``.pt`` tensor
    file (``torch.load(weights_only=True)``, nothing else is unpickled). It accepts ``[C, T, H, W]`` and the
    official extractor's ``[T, C, H, W]``; the layout is decided by which dimension equals the channel count. When
    both do (a 16-frame Wan latent ``[16, 16, H, W]``), ``[C, T, H, W]`` is assumed unless the file's metadata
    (``layout``), the folder's manifest or the caller says ``TCHW``. Files with ``2 C`` channels (posterior mean
    concatenated with log-variance) keep the first ``C``. A leading batch dimension of size 1 is dropped.

Latent folders
    :func:`save_latent_file` writes ``[C, T, H, W]`` safetensors atomically, recording ``layout``, ``latent_space``
    and the source in the file's metadata. A folder's manifest is JSON Lines, one object per latent
    (``file``, ``source``, ``shape``, ``layout``, ``latent_space`` and encoding settings), in ``manifest.jsonl``
    or, for ``encode --shard i/n``, ``manifest-<i>-of-<n>.jsonl`` (one writer per file; readers merge them all).

Fitting data
    :class:`VoxelSampler` streams batches of 16-d voxels: a pure function of ``(seed, step, rank)``, so a resumed
    run draws exactly the batches an uninterrupted one would, with no stream state to save; clips are read
    lazily through a small LRU cache, so memory stays flat as the data set grows.

Videos
    :func:`decode_video` (PyAV) samples frames at a target fps, keeps ``N = 4k + 1`` of them, cover-resizes and
    centre-crops to a bucket and scales to ``[-1, 1]``. :class:`VideoEncoder` runs diffusers' ``AutoencoderKLWan``
    (posterior mean) and normalises with the latent space, after checking that the VAE's own
    ``latents_mean/std`` are that space's constants.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..pipelines import DEFAULT_WAN_MODEL
from ..rewards.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    LatentShapeError,
    LatentSpaceMismatchError,
    NonFiniteError,
)
from ..rewards.hub import atomic_write_file, looks_like_repo_id
from ..rewards.latent_space import WAN21, LatentSpace, get_latent_space
from .modeling import is_tiny

__all__ = [
    "LATENT_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "LAYOUTS",
    "load_latent_file",
    "save_latent_file",
    "read_latent_metadata",
    "LatentItem",
    "list_latent_items",
    "read_manifest",
    "append_manifest",
    "manifest_name",
    "VoxelSampler",
    "parse_size",
    "choose_bucket",
    "decode_video",
    "load_vae",
    "VideoEncoder",
    "input_kind",
    "expand_inputs",
    "load_input",
    "encode_videos",
    "parse_shard",
]

logger = logging.getLogger(__name__)

LATENT_EXTENSIONS = (".safetensors", ".pt", ".pth")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif", ".mpg", ".mpeg", ".ts", ".flv")
LAYOUTS = ("CTHW", "TCHW")
#: Whose ``vae/`` encodes videos by default: the default Wan2.1 pipeline.
DEFAULT_VAE = DEFAULT_WAN_MODEL
MANIFEST_GLOB = "manifest*.jsonl"


# ============================================================================================== latent files
def _normalise_layout(layout: str | None) -> str | None:
    if layout is None or str(layout).lower() in ("", "auto"):
        return None
    value = str(layout).upper()
    if value not in LAYOUTS:
        raise ConfigError(f"layout must be 'auto', 'CTHW' or 'TCHW', got {layout!r}")
    return value


def _read_safetensors(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            meta = dict(f.metadata() or {})
            if len(keys) != 1:
                raise DataError(
                    f"{path}: expected a safetensors file holding exactly one latent tensor, found "
                    f"{len(keys)} tensors {keys[:8]}"
                )
            return f.get_tensor(keys[0]), meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def _read_torch(path: Path) -> torch.Tensor:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise DataError(
            f"{path}: refused to load: it holds objects other than tensors and plain containers "
            f"(latent-rewards only reads tensors; {str(e).splitlines()[0]})"
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError, AttributeError) as e:
        raise DataError(f"{path}: not a readable PyTorch tensor file ({str(e).splitlines()[0]})") from None
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        raise DataError(
            f"{path}: expected a tensor file holding exactly one latent tensor, found a dict with "
            f"{len(tensors)} tensors {list(tensors)[:8]}"
        )
    raise DataError(f"{path}: expected a saved tensor, found a {type(obj).__name__}")


def _sniff(path: Path) -> str | None:
    """``"safetensors"``, ``"torch"`` or ``None`` from the first bytes of a file."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return None
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:2] in (b"\x80\x02", b"\x80\x04", b"\x80\x05"):
        return "torch"
    return None


#: Names already warned about an ambiguous layout (one warning per file and process).
_AMBIGUOUS_WARNED: set[str] = set()


def _warn_ambiguous_layout(name: str, shape: tuple[int, ...], channels: int) -> None:
    """Warn once per file: ``[16, 16, H, W]`` is also exactly an official ``[T, 16, H, W]`` file with 16 latent
    frames, and nothing (argument, file metadata, manifest) said which it is."""
    if name in _AMBIGUOUS_WARNED:
        return
    _AMBIGUOUS_WARNED.add(name)
    logger.warning(
        "%s: ambiguous layout: shape %s reads as [C, T, H, W] or as an official [T, C, H, W] latent with %d latent "
        "frames, and neither the file's metadata nor the folder's manifest records which; reading it as "
        "[C, T, H, W]. For an official [T, %d, H, W] file pass --layout TCHW (layout='TCHW' in Python); "
        "--layout CTHW silences this warning.", name, list(shape), shape[0], channels,
    )


def to_cthw(
    x: torch.Tensor, *, space: LatentSpace = WAN21, layout: str | None = None, name: str = "latent"
) -> torch.Tensor:
    """Bring one latent ``[C, T, H, W]`` / ``[T, C, H, W]`` (or ``2 C`` channels) to fp32 ``[C, T, H, W]``."""
    c = space.channels
    layout = _normalise_layout(layout)
    if not isinstance(x, torch.Tensor):
        raise LatentShapeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.ndim == 5 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 4:
        raise LatentShapeError(
            f"{name}: expected one {space.name} latent [{c}, T, H, W] or [T, {c}, H, W] "
            f"(or {2 * c} channels: mean||logvar), got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise LatentShapeError(f"{name}: expected a floating-point latent, got {x.dtype}")
    ok = (c, 2 * c)
    if layout is None:
        if x.shape[0] in ok:
            layout = "CTHW"  # also the choice when both dims fit (documented in the module docstring)
            if x.shape[1] in ok:
                _warn_ambiguous_layout(name, tuple(x.shape), c)
        elif x.shape[1] in ok:
            layout = "TCHW"
        else:
            raise LatentShapeError(
                f"{name}: expected {c} channels ({space.name}; or {2 * c} = mean||logvar) in dim 0 ([C, T, H, W]) "
                f"or dim 1 ([T, C, H, W]), got shape {tuple(x.shape)}"
            )
    if layout == "TCHW":
        x = x.permute(1, 0, 2, 3)
    if x.shape[0] == 2 * c:
        x = x[:c]
    elif x.shape[0] != c:
        raise LatentShapeError(
            f"{name}: layout {layout} needs {c} channels ({space.name}) in the channel dim, got shape "
            f"{tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise LatentShapeError(f"{name}: empty latent of shape {tuple(x.shape)}")
    x = x.float().contiguous()
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{name}: contains NaN or Inf values; expected finite {space.name} latents")
    return x


def load_latent_file(
    path: str | Path,
    *,
    latent_space: str | LatentSpace = WAN21,
    layout: str | None = None,
) -> torch.Tensor:
    """Read one latent file and return it as fp32 ``[C, T, H, W]`` (see the module docstring for formats).

    Args:
        path: a ``.safetensors`` file holding one tensor, or a ``.pt``/``.pth`` tensor file.
        latent_space: the space the caller expects; a file whose metadata names another space is an error.
        layout: ``"CTHW"``, ``"TCHW"`` or ``None``/``"auto"``; overrides the file's metadata.

    Raises:
        DataError: missing/unreadable file, zero or several tensors. LatentShapeError: wrong rank or channels.
        NonFiniteError: NaN/Inf values. LatentSpaceMismatchError: metadata names another latent space.
    """
    space = get_latent_space(latent_space)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such latent file (expected .safetensors or .pt)")
    kind = "safetensors" if path.suffix.lower() == ".safetensors" else None
    if kind is None and path.suffix.lower() in (".pt", ".pth"):
        kind = "torch"
    kind = kind or _sniff(path)
    meta: dict[str, str] = {}
    if kind == "safetensors":
        x, meta = _read_safetensors(path)
    elif kind == "torch":
        x = _read_torch(path)
    else:
        raise DataError(f"{path}: not a latent file (expected a .safetensors or .pt tensor file)")
    file_space = meta.get("latent_space")
    if file_space:
        try:
            space.expect(file_space, what=f"{path.name} is read as {space.name} latents; the file")
        except LatentSpaceMismatchError:
            raise LatentSpaceMismatchError(
                f"{path}: holds {file_space} latents but {space.name} latents were expected"
            ) from None
    return to_cthw(x, space=space, layout=layout or meta.get("layout"), name=str(path))


def read_latent_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors latent file (``{}`` for other files)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if _sniff(path) != "safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return {}


def save_latent_file(
    path: str | Path,
    z: torch.Tensor,
    metadata: dict[str, Any] | None = None,
    *,
    latent_space: str | LatentSpace = WAN21,
) -> Path:
    """Write one normalised latent ``[C, T, H, W]`` as safetensors (key ``latent``), atomically.

    ``metadata`` values are stored as strings (non-strings as JSON); ``layout`` and ``latent_space`` are always
    recorded so readers never have to guess.
    """
    from safetensors.torch import save_file

    space = get_latent_space(latent_space)
    z = to_cthw(z, space=space, layout="CTHW", name=str(path))
    path = Path(path)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta.update({"layout": "CTHW", "latent_space": space.name, "format": "latent-rewards-latent/1"})
    return atomic_write_file(path, lambda tmp: save_file({"latent": z.contiguous()}, tmp, metadata=meta))


# ============================================================================================== folders / manifest
def manifest_name(shard: tuple[int, int] | None = None) -> str:
    """``manifest.jsonl``, or ``manifest-<i>-of-<n>.jsonl`` for one shard of a multi-process encode."""
    if shard is None or shard[1] <= 1:
        return "manifest.jsonl"
    return f"manifest-{shard[0]:05d}-of-{shard[1]:05d}.jsonl"


def read_manifest(folder: str | Path) -> list[dict[str, Any]]:
    """All manifest entries of a latent folder (all ``manifest*.jsonl`` merged; later entries win per file)."""
    folder = Path(folder)
    entries: dict[str, dict[str, Any]] = {}
    for mf in sorted(folder.glob(MANIFEST_GLOB)):
        try:
            lines = mf.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{mf}: unreadable manifest ({e})") from None
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{mf}:{i}: not a JSON object ({e.msg}); expected one JSON object per line") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                raise DataError(f"{mf}:{i}: expected a JSON object with a 'file' field")
            entries[entry["file"]] = entry
    return list(entries.values())


def append_manifest(folder: str | Path, entries: Iterable[dict[str, Any]], *, name: str = "manifest.jsonl") -> None:
    """Append entries to one manifest file (one ``write`` per line in append mode, so lines never interleave)."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for entry in entries:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()


@dataclass(frozen=True)
class LatentItem:
    """One latent file of a data set, with the layout its manifest declares (``None``: decide from the file)."""

    path: Path
    layout: str | None = None

    @property
    def name(self) -> str:
        return self.path.name


def _is_listable(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in LATENT_EXTENSIONS and not p.name.startswith(".")


def list_latent_items(folder: str | Path, *, layout: str | None = None) -> list[LatentItem]:
    """Every latent file under ``folder`` (recursively, sorted), with layouts from its manifests.

    ``layout`` (``CTHW``/``TCHW``) overrides the manifest for all files, e.g. for a folder of official
    ``[T, 16, H, W]`` ``.pt`` files with exactly 16 latent frames.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: no such folder (expected a folder of latent files)")
    if not folder.is_dir():
        raise DataError(f"{folder}: is a file; expected a folder of latent files (.safetensors / .pt)")
    layout = _normalise_layout(layout)
    declared = {}
    for entry in read_manifest(folder):
        declared[(folder / entry["file"]).resolve()] = _normalise_layout(entry.get("layout"))
    items = [
        LatentItem(p, layout or declared.get(p.resolve()))
        for p in sorted(folder.rglob("*"))
        if _is_listable(p)
    ]
    if not items:
        raise DataError(f"{folder}: no latent files found (expected *.safetensors or *.pt; run `latent-rewards encode`)")
    return items


# ============================================================================================== voxel sampler
def _generator(*key: int) -> torch.Generator:
    """A torch generator that is a pure function of the integer key (independent streams per key)."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


class VoxelSampler:
    """Streams batches of latent voxels ``[batch_voxels, C]`` for fitting a manifold.

    * **Deterministic**: :meth:`batch` is a pure function of ``(seed, step, rank)`` (and the file list), so
      resuming at step ``s`` reproduces an uninterrupted run exactly without saving any stream state.
    * **Sharded**: each step takes ``clips_per_step`` clips per process; clip slots ``(step * world_size + rank)
      * clips_per_step + j`` walk through a fresh random permutation of the clips per pass, so within a pass
      every clip is used once and processes never share a clip in the same step (when there are enough clips).
    * **Flat memory**: only the clips of the current step are needed; an LRU cache keeps ``cache_clips`` of
      them (each truncated to ``max_frames`` latent frames, as the paper uses the first 16).

    ``batch_voxels`` is per process; voxels are drawn uniformly (with replacement) from the step's clips.
    """

    def __init__(
        self,
        items: Sequence[LatentItem | str | Path],
        *,
        batch_voxels: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        clips_per_step: int = 2,
        cache_clips: int = 8,
        max_frames: int | None = 16,
        latent_space: str | LatentSpace = WAN21,
    ) -> None:
        self.items = [i if isinstance(i, LatentItem) else LatentItem(Path(i)) for i in items]
        if not self.items:
            raise DataError("no latent files to sample voxels from")
        for name, v, lo in (("batch_voxels", batch_voxels, 1), ("clips_per_step", clips_per_step, 1),
                            ("cache_clips", cache_clips, 1), ("world_size", world_size, 1)):
            if int(v) < lo:
                raise ConfigError(f"{name} must be >= {lo}, got {v}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, {world_size}), got {rank}")
        if max_frames is not None and max_frames < 1:
            raise ConfigError(f"max_frames must be >= 1 or None, got {max_frames}")
        self.batch_voxels, self.seed, self.rank, self.world_size = int(batch_voxels), int(seed), rank, world_size
        self.clips_per_step, self.cache_clips, self.max_frames = int(clips_per_step), int(cache_clips), max_frames
        self.space = get_latent_space(latent_space)
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._perms: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.loads = 0  # clip reads from disk (cache misses), for tests and logs

    def __len__(self) -> int:
        return len(self.items)

    def fingerprint(self) -> str:
        """A short hash of the file list, recorded in checkpoints to detect a changed data set on resume."""
        h = hashlib.sha1()
        for it in self.items:
            h.update(f"{it.path.name}|{it.layout}\n".encode())
        return h.hexdigest()[:16]

    # -- clip selection (pure functions of seed/step/rank) -----------------------------------------
    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms[epoch] = torch.randperm(len(self.items), generator=_generator(self.seed, 1, epoch))
            while len(self._perms) > 4:
                self._perms.popitem(last=False)
        return self._perms[epoch]

    def clips_for_step(self, step: int, rank: int | None = None) -> list[int]:
        """Indices of the clips that process ``rank`` reads at ``step``."""
        rank = self.rank if rank is None else rank
        n, k = len(self.items), self.clips_per_step
        out = []
        for j in range(k):
            slot = (step * self.world_size + rank) * k + j
            epoch, pos = divmod(slot, n)
            out.append(int(self._perm(epoch)[pos]))
        return out

    # -- clip access ----------------------------------------------------------------------------------
    def clip(self, index: int) -> torch.Tensor:
        """Voxels of one clip, ``[N, C]`` fp32 (first ``max_frames`` latent frames), through the LRU cache."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        item = self.items[index]
        z = load_latent_file(item.path, latent_space=self.space, layout=item.layout)
        if self.max_frames is not None:
            z = z[:, : self.max_frames]
        flat = z.permute(1, 2, 3, 0).reshape(-1, z.shape[0]).contiguous()
        self.loads += 1
        self._cache[index] = flat
        while len(self._cache) > self.cache_clips:
            self._cache.popitem(last=False)
        return flat

    def batch(self, step: int) -> torch.Tensor:
        """The batch of this process at ``step``: ``[batch_voxels, C]`` fp32."""
        clips = self.clips_for_step(step)
        g = _generator(self.seed, 2, step, self.rank)
        k, n = len(clips), self.batch_voxels
        parts = []
        for j, ci in enumerate(clips):
            size = n // k + (1 if j < n % k else 0)
            if size == 0:
                continue
            flat = self.clip(ci)
            parts.append(flat[torch.randint(0, flat.shape[0], (size,), generator=g)])
        return torch.cat(parts)

    def initial_voxels(self, n: int, *, max_clips: int = 256) -> torch.Tensor:
        """``n`` distinct real voxels for anchor initialisation, the same on every process (seed only)."""
        perm = torch.randperm(len(self.items), generator=_generator(self.seed, 3))[:max_clips].tolist()
        per_clip = max(1, math.ceil(n / len(perm)))
        g = _generator(self.seed, 4)
        parts, total = [], 0
        for ci in perm:
            flat = self.clip(ci)
            take = min(per_clip, flat.shape[0])
            parts.append(flat[torch.randperm(flat.shape[0], generator=g)[:take]])
            total += take
            if total >= n:
                break
        if total < n:
            raise ConfigError(
                f"anchor initialisation needs {n} real voxels but the data set has only {total} "
                f"(in {len(perm)} clips, first {self.max_frames} latent frames each); use fewer anchors or more data"
            )
        return torch.cat(parts)[:n]


# ============================================================================================== video decoding
#: Aspect buckets (W, H) per resolution name; Wan2.1's standard sizes, multiples of 16.
BUCKETS: dict[str, tuple[tuple[int, int], ...]] = {
    "480p": ((832, 480), (480, 832), (624, 624)),
    "720p": ((1280, 720), (720, 1280), (960, 960)),
}


def parse_size(size: str | tuple[int, int] | None) -> str | tuple[int, int]:
    """``"480p"``/``"720p"`` (aspect buckets) or ``"WxH"`` (fixed; multiples of 8) -> bucket name or ``(W, H)``."""
    if size is None:
        return "480p"
    if isinstance(size, tuple):
        w, h = size
    else:
        s = str(size).strip().lower()
        if s in BUCKETS:
            return s
        m = re.fullmatch(r"(\d+)\s*[x*]\s*(\d+)", s)
        if not m:
            raise ConfigError(f"size must be one of {sorted(BUCKETS)} or WxH (e.g. 832x480), got {size!r}")
        w, h = int(m.group(1)), int(m.group(2))
    if w < 8 or h < 8 or w % 8 or h % 8:
        raise ConfigError(f"size {w}x{h}: width and height must be positive multiples of 8 (the VAE's stride)")
    return (w, h)


def choose_bucket(width: int, height: int, size: str | tuple[int, int]) -> tuple[int, int]:
    """The ``(W, H)`` a ``width x height`` video is resized to: a fixed size, or the bucket closest in aspect."""
    spec = parse_size(size)
    if isinstance(spec, tuple):
        return spec
    ar = math.log(width / height)
    return min(BUCKETS[spec], key=lambda wh: abs(math.log(wh[0] / wh[1]) - ar))


def _cover_crop(frame: torch.Tensor, out_w: int, out_h: int) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> float ``[3, out_h, out_w]`` in [-1, 1]: resize to cover, then centre-crop."""
    x = frame.permute(2, 0, 1).float().unsqueeze(0)
    h, w = x.shape[-2:]
    scale = max(out_w / w, out_h / h)
    new_h, new_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    x = x[0, :, top : top + out_h, left : left + out_w]
    return (x / 127.5 - 1.0).clamp_(-1.0, 1.0)


def _frames_4k1(n: int) -> int:
    return 0 if n < 1 else (n - 1) // 4 * 4 + 1


def decode_video(
    path: str | Path,
    *,
    fps: float = 24.0,
    frames: int = 81,
    size: str | tuple[int, int] = "480p",
) -> torch.Tensor:
    """Decode a video into ``[3, N, H, W]`` fp32 in ``[-1, 1]`` ready for a Wan VAE.

    Frames are sampled at ``fps`` (the frame shown at each time ``k / fps``, nearest in time, as ffmpeg's fps
    filter does), at most ``frames`` of them, and the count is cut to ``N = 4k + 1`` (what a causal video VAE with
    temporal stride 4 encodes without padding). Each frame is resized to cover the bucket and centre-cropped.
    Decoding stops as soon as enough frames are collected, so long videos cost no extra memory.

    Raises:
        DataError: missing, corrupt or non-video files, or a video with no decodable frame.
        ConfigError: ``frames`` not of the form 4k+1, ``fps`` <= 0, bad ``size``.
    """
    import av

    path = Path(path)
    if frames < 1 or (frames - 1) % 4:
        raise ConfigError(f"frames must be of the form 4k+1 (1, 5, ..., 81, 121), got {frames}")
    if not fps > 0:
        raise ConfigError(f"fps must be > 0, got {fps}")
    parse_size(size)
    if not path.is_file():
        raise DataError(f"{path}: no such video file")
    out: list[torch.Tensor] = []
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise DataError(f"{path}: has no video stream (expected a video file such as .mp4)")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = float(stream.average_rate or stream.guessed_rate or 0) or None
            bucket: tuple[int, int] | None = None
            t0: float | None = None
            prev: tuple[float, Any] | None = None
            k = 0

            def emit(frame: Any) -> None:
                nonlocal bucket
                rgb = torch.from_numpy(frame.to_ndarray(format="rgb24"))
                if bucket is None:
                    bucket = choose_bucket(rgb.shape[1], rgb.shape[0], size)
                out.append(_cover_crop(rgb, *bucket))

            for index, frame in enumerate(container.decode(stream)):
                t = frame.time if frame.time is not None else index / (rate or fps)
                t0 = t if t0 is None else t0
                t -= t0
                while k < frames and t >= k / fps - 1e-9:
                    target = k / fps
                    chosen = frame if prev is None or abs(t - target) <= abs(prev[0] - target) else prev[1]
                    emit(chosen)
                    k += 1
                prev = (t, frame)
                if k >= frames:
                    break
            if prev is not None and k < frames:
                # Targets after the last decoded frame but within its display time show the last frame.
                last_t, last = prev
                duration = 1.0 / rate if rate else 1.0 / fps
                while k < frames and k / fps < last_t + duration - 1e-9:
                    emit(last)
                    k += 1
    except DataError:
        raise
    except (av.FFmpegError, OSError, ValueError, RuntimeError, EOFError) as e:
        raise DataError(f"{path}: cannot be decoded as a video ({type(e).__name__}: {e})") from None
    n = _frames_4k1(len(out))
    if n == 0:
        raise DataError(f"{path}: no decodable video frames")
    return torch.stack(out[:n], dim=1)


# ============================================================================================== VAE encoding
def _vae_subfolder(folder: Path) -> str | None:
    if (folder / "model_index.json").is_file() or (folder / "vae" / "config.json").is_file():
        return "vae"
    if (folder / "config.json").is_file():
        return None
    raise CheckpointError(
        f"{folder}: not a diffusers pipeline folder (model_index.json + vae/) or VAE folder (config.json)"
    )


def load_vae(
    source: str | Path = DEFAULT_VAE,
    *,
    latent_space: str | LatentSpace = WAN21,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    local_files_only: bool | None = None,
    revision: str | None = None,
):
    """Load an ``AutoencoderKLWan`` from a Hub id (its ``vae`` subfolder, at ``revision``), a local pipeline folder,
    a VAE folder, or ``tiny`` (the random test model), and check that it encodes into ``latent_space`` (channels
    and ``latents_mean/std``)."""
    space = get_latent_space(latent_space)
    if is_tiny(str(source)):
        from ..pipelines.tiny import tiny_wan_vae

        vae, where = tiny_wan_vae().to(dtype), "the tiny test model"
    else:
        vae, where = _load_pretrained_vae(source, dtype=dtype, local_files_only=local_files_only, revision=revision)
    cfg = vae.config
    if int(getattr(cfg, "z_dim", -1)) != space.channels:
        raise LatentSpaceMismatchError(
            f"VAE from {where} has {getattr(cfg, 'z_dim', '?')} latent channels; the {space.name} space has "
            f"{space.channels}"
        )
    for name, ours in (("latents_mean", space.mean), ("latents_std", space.std)):
        theirs = getattr(cfg, name, None)
        if theirs is None or len(theirs) != len(ours) or not np.allclose(theirs, ours, atol=1e-4):
            raise LatentSpaceMismatchError(
                f"VAE from {where}: its {name} does not match the {space.name} latent space constants, so its "
                f"latents are not the space the reward reads"
            )
    return vae.to(device).eval().requires_grad_(False)


def _load_pretrained_vae(
    source: str | Path, *, dtype: torch.dtype, local_files_only: bool | None, revision: str | None
) -> tuple[Any, str]:
    """``(vae, where)`` from a Hub id, a pipeline folder or a VAE folder (see :func:`load_vae`)."""
    from diffusers import AutoencoderKLWan

    p = Path(str(source)).expanduser()
    kwargs: dict[str, Any] = {"torch_dtype": dtype, "revision": revision}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p}: expected a diffusers pipeline or VAE folder, got a file")
        subfolder = _vae_subfolder(p)
        cfg_path = p / (subfolder or "") / "config.json"
        try:
            cls_name = json.loads(cfg_path.read_text(encoding="utf-8")).get("_class_name")
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{cfg_path}: unreadable VAE config ({e})") from None
        if cls_name not in (None, "AutoencoderKLWan"):
            raise CheckpointError(f"{cfg_path}: holds a {cls_name}, expected an AutoencoderKLWan (Wan2.1 VAE)")
        where, target = str(p), str(p)
    elif looks_like_repo_id(str(source)):
        subfolder, where, target = "vae", f"Hub repository {source}", str(source)
    else:
        raise CheckpointError(f"{source}: no such folder, and not a Hub repository id of the form 'user/name'")
    try:
        vae = AutoencoderKLWan.from_pretrained(target, subfolder=subfolder, **kwargs)
    except (OSError, ValueError, RuntimeError, EnvironmentError) as e:
        hint = "" if p.exists() else "; check the id and the connection (or HF_HUB_OFFLINE), or pass a local folder"
        raise CheckpointError(
            f"could not load an AutoencoderKLWan from {where}: {str(e).splitlines()[0]}{hint}"
        ) from None
    return vae, where


class VideoEncoder:
    """Videos -> normalised latents ``[C, T, H, W]`` with a Wan VAE (posterior mean, no sampling)."""

    def __init__(
        self,
        vae: Any,
        *,
        latent_space: str | LatentSpace = WAN21,
        source: str | None = None,
        tiling: bool = False,
    ) -> None:
        self.vae = vae
        self.space = get_latent_space(latent_space)
        self.source = source
        if tiling and hasattr(vae, "enable_tiling"):
            vae.enable_tiling()

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path = DEFAULT_VAE,
        *,
        latent_space: str | LatentSpace = WAN21,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        tiling: bool = False,
    ) -> "VideoEncoder":
        vae = load_vae(source, latent_space=latent_space, device=device, dtype=dtype)
        return cls(vae, latent_space=latent_space, source=str(source), tiling=tiling)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode_pixels(self, video: torch.Tensor) -> torch.Tensor:
        """``[3, N, H, W]`` in [-1, 1] -> normalised fp32 latent ``[C, T, H/8, W/8]`` on the CPU."""
        if video.ndim != 4 or video.shape[0] != 3:
            raise LatentShapeError(f"expected video pixels [3, N, H, W], got shape {tuple(video.shape)}")
        x = video.unsqueeze(0).to(device=self.device, dtype=self.dtype)
        mean = self.vae.encode(x).latent_dist.mean
        return self.space.normalise(mean.float(), channel_dim=1)[0].cpu()

    def encode_file(
        self, path: str | Path, *, fps: float = 24.0, frames: int = 81, size: str | tuple[int, int] = "480p"
    ) -> torch.Tensor:
        """Decode a video file (see :func:`decode_video`) and encode it."""
        return self.encode_pixels(decode_video(path, fps=fps, frames=frames, size=size))


# ============================================================================================== inputs
def input_kind(path: str | Path) -> str:
    """``"latent"`` or ``"video"``, by extension, else by content (safetensors/torch header, else a video)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in LATENT_EXTENSIONS:
        return "latent"
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if _sniff(path):
        return "latent"
    return "video"


def expand_inputs(paths: Sequence[str | Path], *, kinds: tuple[str, ...] = ("latent", "video")) -> list[Path]:
    """Files as given, folders expanded (recursively, sorted) to their latent and/or video files."""
    exts = tuple(e for k in kinds for e in {"latent": LATENT_EXTENSIONS, "video": VIDEO_EXTENSIONS}[k])
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = [q for q in sorted(p.rglob("*")) if q.is_file() and q.suffix.lower() in exts
                     and not q.name.startswith(".")]
            if not found:
                raise DataError(f"{p}: no {' or '.join(kinds)} files found in this folder (looked for {', '.join(exts)})")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    if not out:
        raise DataError("no inputs given")
    return out


def load_input(
    path: str | Path,
    *,
    encoder: Callable[[], VideoEncoder] | None = None,
    latent_space: str | LatentSpace = WAN21,
    layout: str | None = None,
    fps: float = 24.0,
    frames: int = 81,
    size: str | tuple[int, int] = "480p",
) -> tuple[str, torch.Tensor]:
    """A latent file or a video (encoded on the fly by ``encoder()``, created lazily) -> ``(kind, [C, T, H, W])``."""
    kind = input_kind(path)
    if kind == "latent":
        return kind, load_latent_file(path, latent_space=latent_space, layout=layout)
    if encoder is None:
        raise ConfigError(f"{path}: is a video; scoring videos needs a VAE (--vae)")
    pixels = decode_video(path, fps=fps, frames=frames, size=size)  # a bad file fails before the VAE loads
    return kind, encoder().encode_pixels(pixels)


# ============================================================================================== batch encoding
def parse_shard(value: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (0-based) -> ``(i, n)``."""
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(value))
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise ConfigError(f"--shard must be i/n with 0 <= i < n (e.g. 0/4), got {value!r}")
    return int(m.group(1)), int(m.group(2))


def _output_names(videos: Sequence[Path]) -> list[str]:
    """Latent file names: the video's stem, plus a hash of its path where stems collide."""
    stems = [v.stem for v in videos]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    names = []
    for v, s in zip(videos, stems):
        if counts[s] > 1:
            s = f"{s}-{hashlib.sha1(str(v.resolve()).encode()).hexdigest()[:8]}"
        names.append(f"{s}.safetensors")
    return names


@dataclass
class EncodeResult:
    """What :func:`encode_videos` did for its shard."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def encode_videos(
    videos: Sequence[str | Path],
    out_dir: str | Path,
    *,
    encoder: Callable[[], VideoEncoder],
    fps: float = 24.0,
    frames: int = 81,
    size: str | tuple[int, int] = "480p",
    shard: tuple[int, int] | None = None,
    skip_bad: bool = False,
    progress: bool = True,
) -> EncodeResult:
    """Encode videos into ``out_dir`` (one safetensors latent per clip + manifest), resumably.

    The shard ``(i, n)`` takes every n-th video of the sorted list starting at i. Clips whose latent file
    already exists are skipped (a file is written atomically, so its existence means it is complete); one that
    exists but misses its manifest line (killed in between) gets the line back from the file's metadata.
    ``encoder`` is called once, lazily, so a fully encoded folder does not even load the VAE.
    """
    from tqdm.auto import tqdm

    if frames < 1 or (frames - 1) % 4:
        raise ConfigError(f"--frames must be of the form 4k+1 (e.g. 49, 81, 121), got {frames}")
    size_spec = parse_size(size)
    paths = sorted({Path(v).resolve() for v in videos})
    names = _output_names(paths)
    i, n = shard or (0, 1)
    mine = [(p, nm) for k, (p, nm) in enumerate(zip(paths, names)) if k % n == i]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mname = manifest_name(shard)
    known = {e["file"] for e in read_manifest(out_dir)}
    result = EncodeResult()
    enc: VideoEncoder | None = None
    for path, name in tqdm(mine, desc=f"encode {i}/{n}" if n > 1 else "encode", unit="clip", disable=not progress):
        target = out_dir / name
        if target.is_file():
            if name not in known:
                meta = read_latent_metadata(target)
                try:
                    entry = json.loads(meta.get("entry", "{}"))
                except json.JSONDecodeError:
                    entry = {}
                append_manifest(out_dir, [{**entry, "file": name}], name=mname)
            result.skipped.append(name)
            continue
        try:
            pixels = decode_video(path, fps=fps, frames=frames, size=size_spec)
        except DataError as e:
            if not skip_bad:
                raise
            logger.warning("skipping %s: %s", path, e)
            result.failed.append((str(path), str(e)))
            continue
        if enc is None:
            enc = encoder()
        z = enc.encode_pixels(pixels)
        entry = {
            "file": name,
            "source": str(path),
            "shape": list(z.shape),
            "layout": "CTHW",
            "latent_space": enc.space.name,
            "fps": fps,
            "frames": 1 + (z.shape[1] - 1) * enc.space.temporal_compression,
            "size": [z.shape[3] * enc.space.spatial_compression, z.shape[2] * enc.space.spatial_compression],
            "vae": enc.source,
        }
        save_latent_file(target, z, {"source": str(path), "entry": json.dumps(entry)}, latent_space=enc.space)
        append_manifest(out_dir, [entry], name=mname)
        result.written.append(name)
    return result
