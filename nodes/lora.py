"""``LatentRewardsLoraLoader``: load a Wan2.1 LoRA (ours or anyone's) onto a MODEL, every key or an error.

ComfyUI's own LoRA loader only understands original-Wan module names (``diffusion_model.blocks.0.self_attn.q``)
and silently skips other keys with a log line. Reward LoRAs trained with diffusers/peft use diffusers names
(``transformer.blocks.0.attn1.to_q``); this node converts them with the core key map (adding ``.alpha`` from the
adapter's ``lora_alpha`` so the scale matches peft), accepts ComfyUI's native format as is, and refuses any file
of which a single key would not be applied.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import comfy.lora
import comfy.lora_convert
import comfy.weight_adapter
import torch
from comfy_api.latest import io, ui

from ..rewards.errors import CheckpointError
from ..rewards.wan_keys import COMFYUI_PREFIX, peft_lora_to_comfyui, wan_to_diffusers
from .folders import NONE_FOUND, list_lora_files, resolve_hub_repo, resolve_lora_file
from .types import CATEGORY

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher

__all__ = ["LatentRewardsLoraLoader", "lora_to_comfyui", "lora_patches", "apply_lora"]

log = logging.getLogger(__name__)

#: Header key where diffusers' ``save_lora_weights`` stores the peft ``LoraConfig`` (per component prefix).
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
_DIFFUSERS_HINTS = (".attn1.", ".attn2.", ".ffn.net.", "condition_embedder.", "proj_out.")
_FORMATS_HELP = (
    "expected a Wan2.1 LoRA in diffusers/peft format (transformer.blocks.N.attn1.to_q.lora_A.weight) or ComfyUI "
    "format (diffusion_model.blocks.N.self_attn.q.lora_A.weight + .alpha)"
)


# ---------------------------------------------------------------------------------------------- reading
def _read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        # One read for the tensors and the header (peft/diffusers keep the LoRA config there); normal tensors.
        with torch.inference_mode(False), safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if not state:
        raise CheckpointError(f"{path}: holds no tensors; {_FORMATS_HELP}")
    return state, meta


def _peft_config(path: Path, meta: dict[str, str]) -> dict[str, Any] | None:
    """The peft LoraConfig of a diffusers/peft file: safetensors header (diffusers) or adapter_config.json (peft)."""
    raw = meta.get(ADAPTER_METADATA_KEY)
    if raw:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: unreadable {ADAPTER_METADATA_KEY} in the safetensors header") from None
        prefixed = {k.split(".", 1)[1]: v for k, v in data.items() if k.startswith("transformer.")}
        return prefixed or data
    cfg_file = path.parent / "adapter_config.json"
    if cfg_file.is_file():
        try:
            return json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{cfg_file}: unreadable ({e})") from None
    return None


def _alpha_for(module: str, rank: int, cfg: dict[str, Any] | None) -> float:
    """ComfyUI ``.alpha`` giving the same scale as peft (ComfyUI scales by alpha / rank)."""
    if cfg is None:
        return float(rank)  # no config: scale 1, as diffusers assumes for adapters saved without metadata
    alpha = cfg.get("lora_alpha")
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    alpha = float(rank if alpha is None else alpha)
    if cfg.get("use_rslora"):
        alpha *= math.sqrt(rank)  # peft: alpha / sqrt(r)
    return alpha


def _looks_diffusers(keys: list[str]) -> bool:
    return any(k.startswith(("transformer.", "base_model.model.")) or any(h in k for h in _DIFFUSERS_HINTS) for k in keys)


def lora_to_comfyui(
    state: dict[str, torch.Tensor], *, peft_config: dict[str, Any] | None, source: str
) -> tuple[dict[str, torch.Tensor], str]:
    """Any supported LoRA state dict -> ComfyUI's Wan format, and a description of the format found."""
    keys = list(state)
    if not _looks_diffusers(keys):
        if all(k.startswith(("blocks.", "head.", "text_embedding.", "time_embedding.", "patch_embedding.")) for k in keys):
            # Original Wan names without a prefix: ComfyUI needs "diffusion_model.".
            return {COMFYUI_PREFIX + k: v for k, v in state.items()}, "original Wan names (prefixed for ComfyUI)"
        return dict(state), "ComfyUI"
    try:
        out = peft_lora_to_comfyui(state, alpha=1.0)  # placeholder alphas, set per module below
    except KeyError as e:
        raise CheckpointError(f"{source}: key {e.args[0]!r} has no ComfyUI equivalent; {_FORMATS_HELP}") from None
    for key in [k for k in out if k.endswith(".alpha")]:
        wan_module = key[len(COMFYUI_PREFIX) : -len(".alpha")]
        rank = int(out[f"{COMFYUI_PREFIX}{wan_module}.lora_A.weight"].shape[0])
        out[key] = torch.tensor(_alpha_for(wan_to_diffusers(wan_module), rank, peft_config))
    note = "" if peft_config is not None else " (no lora_alpha found: alpha = rank, scale 1)"
    return out, "diffusers/peft, converted to ComfyUI Wan names" + note


# ---------------------------------------------------------------------------------------------- applying
class _ReadRecorder(dict):
    """A state dict that remembers which keys ComfyUI's LoRA parser read (i.e. will apply)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        self.read.add(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        if key in self:
            return self[key]
        return default


def lora_patches(model: Any, comfy_state: dict[str, torch.Tensor], *, source: str) -> dict[str, Any]:
    """ComfyUI patches for ``model`` from a ComfyUI-format LoRA; any key that would not load is an error."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    recorder = _ReadRecorder(comfy.lora_convert.convert_lora(comfy_state))
    patches = comfy.lora.load_lora(recorder, key_map, log_missing=False)
    unread = sorted(set(recorder) - recorder.read)
    if unread:
        raise CheckpointError(
            f"{source}: {len(unread)} of {len(recorder)} keys would not load into this model, e.g. {unread[:4]}; "
            f"{_FORMATS_HELP} (is it a LoRA for this model?)"
        )
    weights = model.model.state_dict()
    wrong = []
    for target, patch in patches.items():
        w = weights.get(target)
        if w is None:
            wrong.append(f"{target}: not in the model")
        elif isinstance(patch, comfy.weight_adapter.LoRAAdapter) and patch.weights[3] is None:
            up, down = patch.weights[0], patch.weights[1]
            if up.shape[0] != w.shape[0] or down.flatten(1).shape[1] != w[0].numel() or up.shape[1] != down.shape[0]:
                wrong.append(f"{target}: up {tuple(up.shape)} x down {tuple(down.shape)} vs weight {tuple(w.shape)}")
    if wrong:
        raise CheckpointError(f"{source}: LoRA shapes do not fit this model: {wrong[:4]} (a LoRA for another model?)")
    return patches


def apply_lora(model: ModelPatcher, patches: dict[str, Any], strength: float, *, source: str) -> ModelPatcher:
    """A clone of ``model`` with the LoRA ``patches`` at ``strength``; :class:`CheckpointError` if any key is left out."""
    patched = model.clone()
    applied = set(patched.add_patches(patches, float(strength)))
    missing = sorted(set(patches) - applied)
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} patched weights are not in the model, e.g. {missing[:4]}")
    return patched


def _pick_hub_file(folder: Path, repo_id: str) -> Path:
    files = sorted(p for p in folder.rglob("*.safetensors") if p.is_file())
    for rule in (
        lambda p: "comfy" in p.name.lower(),
        lambda p: p.name == "pytorch_lora_weights.safetensors",
        lambda p: p.name == "adapter_model.safetensors",
    ):
        hits = [p for p in files if rule(p)]
        if len(hits) == 1:
            return hits[0]
    if len(files) == 1:
        return files[0]
    names = [p.relative_to(folder).as_posix() for p in files]
    raise CheckpointError(
        f"{repo_id}: {'no' if not files else 'several'} .safetensors files {names}; name one as 'user/repo/<file>'"
    )


def _resolve(lora_name: str, repo_id: str) -> Path:
    repo_id = (repo_id or "").strip().strip("/")
    if not repo_id:
        return resolve_lora_file(lora_name)
    parts = repo_id.split("/")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    if filename and not filename.endswith((".safetensors", ".sft")):
        raise CheckpointError(f"{repo_id}: only .safetensors LoRA files are loaded (pickled formats are refused)")
    patterns = [filename, "adapter_config.json"] if filename else ["*.safetensors", "*.json", "README.md"]
    folder = resolve_hub_repo(repo, allow_patterns=patterns, form="'user/name' or 'user/name/file.safetensors'")
    if filename:
        path = folder / filename
        if not path.is_file():
            raise CheckpointError(f"{repo}: no file {filename!r} in the repository")
        return path
    return _pick_hub_file(folder, repo)


class LatentRewardsLoraLoader(io.ComfyNode):
    """Apply a Wan2.1 LoRA (diffusers/peft or ComfyUI format) to a MODEL; every key must load."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        files = list_lora_files() or [NONE_FOUND]
        return io.Schema(
            node_id="LatentRewardsLoraLoader",
            display_name="Latent Reward LoRA Loader",
            category=CATEGORY,
            description=(
                "Loads a Wan2.1 LoRA onto the model: reward LoRAs from latent-rewards in diffusers/peft format "
                "(converted to ComfyUI's Wan names with the right alpha) or ComfyUI format. Unlike the core LoRA "
                "loader, a key that would not apply is an error, never silently skipped. Safetensors only."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The Wan2.1 diffusion model to patch."),
                io.Combo.Input(
                    "lora_name", options=files, default=files[0],
                    tooltip="A .safetensors LoRA under models/loras/. Ignored when repo_id is set.",
                ),
                io.Float.Input(
                    "strength_model", default=1.0, min=-10.0, max=10.0, step=0.01,
                    tooltip="LoRA strength (1 = as trained; 0 = off; negative inverts it).",
                ),
                io.String.Input(
                    "repo_id", default="",
                    tooltip="Optional Hugging Face repo id 'user/name' (or 'user/name/file.safetensors') of a LoRA; "
                    "downloaded into models/latent_rewards/.hub on first use. Overrides lora_name.",
                ),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the LoRA applied.")],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name: str = "", strength_model: float = 1.0, repo_id: str = "", **_: Any) -> str:
        if (repo_id or "").strip():
            return f"hub:{repo_id.strip()}:{strength_model}"
        try:
            st = resolve_lora_file(lora_name).stat()
        except CheckpointError:
            return f"missing:{lora_name}"
        return f"{lora_name}:{st.st_size}:{st.st_mtime_ns}:{strength_model}"

    @classmethod
    def execute(cls, model: Any, lora_name: str, strength_model: float, repo_id: str = "") -> io.NodeOutput:
        path = _resolve(lora_name, repo_id)
        state, meta = _read_lora(path)
        comfy_state, fmt = lora_to_comfyui(state, peft_config=_peft_config(path, meta), source=str(path))
        patches = lora_patches(model, comfy_state, source=str(path))
        patched = apply_lora(model, patches, strength_model, source=str(path))
        msg = f"{path.name}: {fmt}; {len(patches)} weights patched from {len(state)} tensors at strength {strength_model:g}"
        log.info("[latent-rewards] LoRA %s", msg)
        return io.NodeOutput(patched, ui=ui.PreviewText(msg))
