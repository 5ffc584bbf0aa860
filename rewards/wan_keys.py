"""Wan2.1 transformer names: diffusers (``WanTransformer3DModel``) <-> original Wan / ComfyUI.

One table serves three places: the trainer's ComfyUI LoRA export, the ComfyUI LoRA loader (which accepts our
diffusers/peft adapters), and the tiny test checkpoint that ComfyUI loads. It lives in the core, below both
``nodes/`` and ``trainer/``, because neither may import the other.

Names are module paths (``blocks.0.attn1.to_q``); a parameter name is a module path plus ``.weight``/``.bias``
(or a bare parameter such as ``scale_shift_table``). Unknown names raise ``KeyError``: a name that would not load
must never be silently dropped.
"""

from __future__ import annotations

import re

import torch

__all__ = [
    "diffusers_to_wan",
    "wan_to_diffusers",
    "diffusers_state_dict_to_wan",
    "peft_lora_to_comfyui",
    "comfyui_lora_to_peft",
    "COMFYUI_PREFIX",
]

COMFYUI_PREFIX = "diffusion_model."

# Top-level modules (and bare parameters) of the transformer.
_TOP = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
}
# Inside a block (after `blocks.N.`). Diffusers' norm2 is the cross-attention norm, Wan's norm3 (and vice versa).
_BLOCK = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
    "norm1": "norm1",
    "norm2": "norm3",
    "norm3": "norm2",
    "scale_shift_table": "modulation",
}
_TOP_INV = {v: k for k, v in _TOP.items()}
_BLOCK_INV = {v: k for k, v in _BLOCK.items()}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_PARAM_SUFFIXES = (".weight", ".bias")


def _convert(name: str, top: dict[str, str], block: dict[str, str], what: str) -> str:
    m = _BLOCK_RE.match(name)
    if m:
        idx, rest = m.groups()
        if rest in block:
            return f"blocks.{idx}.{block[rest]}"
        for suffix in _PARAM_SUFFIXES:
            if rest.endswith(suffix) and rest[: -len(suffix)] in block:
                return f"blocks.{idx}.{block[rest[: -len(suffix)]]}{suffix}"
    else:
        if name in top:
            return top[name]
        for suffix in _PARAM_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] in top:
                return top[name[: -len(suffix)]] + suffix
    raise KeyError(f"no {what} name for Wan module/parameter {name!r}")


def diffusers_to_wan(name: str) -> str:
    """``blocks.0.attn1.to_q`` -> ``blocks.0.self_attn.q`` (module or parameter name)."""
    return _convert(name, _TOP, _BLOCK, "original-Wan")


def wan_to_diffusers(name: str) -> str:
    """``blocks.0.self_attn.q`` -> ``blocks.0.attn1.to_q`` (module or parameter name)."""
    return _convert(name, _TOP_INV, _BLOCK_INV, "diffusers")


def diffusers_state_dict_to_wan(state: dict[str, torch.Tensor], *, prefix: str = "") -> dict[str, torch.Tensor]:
    """Full transformer weights in diffusers names -> original Wan names (optionally prefixed, e.g. for ComfyUI)."""
    return {prefix + diffusers_to_wan(k): v for k, v in state.items()}


_LORA_RE = re.compile(r"^(?:transformer\.|base_model\.model\.)?(.+?)\.(lora_A|lora_B)(?:\.[A-Za-z0-9_]+)?\.weight$")


def peft_lora_to_comfyui(
    state: dict[str, torch.Tensor], alpha: float | dict[str, float]
) -> dict[str, torch.Tensor]:
    """A diffusers/peft LoRA (``[transformer.]blocks.0.attn1.to_q.lora_A.weight``) -> ComfyUI's Wan format
    (``diffusion_model.blocks.0.self_attn.q.lora_A.weight`` + ``.alpha``), with the same effective scale.

    ``alpha`` is peft's ``lora_alpha`` (one number, or per diffusers module name). Every key must convert.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _LORA_RE.match(key)
        if not m:
            raise KeyError(f"not a peft LoRA weight name: {key!r}")
        module, part = m.groups()
        wan = COMFYUI_PREFIX + diffusers_to_wan(module)
        out[f"{wan}.{part}.weight"] = value
        a = alpha.get(module) if isinstance(alpha, dict) else alpha
        if a is None:
            raise KeyError(f"no lora_alpha given for module {module!r}")
        out[f"{wan}.alpha"] = torch.tensor(float(a))
    return out


_COMFY_LORA_RE = re.compile(
    r"^(?:diffusion_model\.|lora_unet_)?(.+?)\.(lora_A|lora_B|lora_down|lora_up)(?:\.weight)?$"
)


def comfyui_lora_to_peft(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """ComfyUI/original-Wan LoRA -> (peft state dict with ``transformer.`` diffusers names, alphas per module).

    Accepts ``lora_A``/``lora_B`` and ``lora_down``/``lora_up`` pairs with optional ``.alpha`` (no alpha means
    ``alpha = rank``, i.e. scale 1, as ComfyUI does).
    """
    weights: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    ranks: dict[str, int] = {}
    for key, value in state.items():
        if key.endswith(".alpha"):
            module = key[: -len(".alpha")]
            module = module[len(COMFYUI_PREFIX):] if module.startswith(COMFYUI_PREFIX) else module
            alphas[wan_to_diffusers(module)] = float(value)
            continue
        m = _COMFY_LORA_RE.match(key)
        if not m:
            raise KeyError(f"not a Wan LoRA weight name: {key!r}")
        module, part = m.groups()
        dmod = wan_to_diffusers(module)
        part = {"lora_down": "lora_A", "lora_up": "lora_B"}.get(part, part)
        weights[f"transformer.{dmod}.{part}.weight"] = value
        if part == "lora_A":
            ranks[dmod] = int(value.shape[0])
    for dmod, rank in ranks.items():
        alphas.setdefault(dmod, float(rank))
    return weights, alphas
