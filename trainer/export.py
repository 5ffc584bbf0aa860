"""What a checkpoint folder holds, written in one place so checkpoints, ``best/`` and pushes agree.

``OUTPUT_DIR/checkpoint-<step>/`` (and ``OUTPUT_DIR/best/``, without ``training_state/``)::

    pytorch_lora_weights.safetensors   diffusers/peft LoRA: pipe.load_lora_weights(folder)
    <name>_comfyui.safetensors         the same LoRA in ComfyUI's Wan names (diffusion_model.*, .alpha)
    README.md                          model card: recipe, reward, best step, metrics, usage
    training_config.yaml               the resolved config
    metrics.json                       this step's training and validation numbers, and the validation history
    validation/video_XX.mp4            validation videos of this step (when it was validated)
    training_state/                    exact resume: trainable weights (fp32), optimizer, scheduler, RNG, loop state

A full fine-tune writes ``transformer/`` (diffusers ``save_pretrained``) instead of the LoRA file, and the ComfyUI
file holds the whole transformer in original Wan names. Everything is written inside an
:func:`~latent_rewards.rewards.hub.atomic_directory`, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..rewards.errors import CheckpointError
from .config import DEFAULT_MODEL
from .modeling import is_tiny

__all__ = [
    "LORA_WEIGHTS_NAME",
    "TRAINING_STATE_DIR",
    "comfyui_file_name",
    "lora_state_dict",
    "save_adapter",
    "save_transformer",
    "write_model_card",
    "model_card",
    "usage_section",
    "set_card_repo_id",
    "LOCAL_LOCATION",
    "save_training_state",
    "load_training_state",
    "list_checkpoints",
    "latest_checkpoint",
    "prune_checkpoints",
]

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
TRAINING_STATE_DIR = "training_state"
CHECKPOINT_PREFIX = "checkpoint-"


def comfyui_file_name(name: str) -> str:
    """File name of the ComfyUI-format weights of run ``name`` (``<name>_comfyui.safetensors``)."""
    return f"{name}_comfyui.safetensors"


# ------------------------------------------------------------------------------------------------ weights
def lora_state_dict(transformer: torch.nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The LoRA weights in peft names without the adapter name (``blocks.0.attn1.to_q.lora_A.weight``).

    ``state`` is the transformer's full state dict when it had to be gathered (FSDP); default: the module's own.
    """
    if state is None:
        from peft.utils import get_peft_model_state_dict

        lora = get_peft_model_state_dict(transformer)
    else:
        # A gathered state dict: select the adapter's weights by name. (peft finds them by walking the module tree,
        # whose names carry FSDP1's `_fsdp_wrapped_module.` segments inside wrapped blocks, and then misses them.)
        adapter = re.escape(next(iter(transformer.peft_config)))
        pattern = re.compile(rf"^(.+)\.(lora_A|lora_B)\.{adapter}\.weight$")
        lora = {f"{m[1]}.{m[2]}.weight": v for k, v in state.items() if (m := pattern.match(k))}
    return {k: v.detach().to("cpu").contiguous() for k, v in lora.items()}


def save_adapter(
    folder: Path,
    transformer: torch.nn.Module,
    *,
    name: str,
    finetune: str,
    state: dict[str, torch.Tensor] | None = None,
) -> list[str]:
    """Write the trained weights in diffusers and ComfyUI formats into ``folder``; returns the file names.

    ``state``: the full transformer state dict if it was gathered across processes (FSDP).
    """
    from safetensors.torch import save_file

    from ..rewards.wan_keys import diffusers_state_dict_to_wan, peft_lora_to_comfyui

    comfy = comfyui_file_name(name)
    if finetune == "lora":
        from diffusers import WanPipeline

        lora = lora_state_dict(transformer, state)
        peft_config = transformer.peft_config["default"]
        WanPipeline.save_lora_weights(
            str(folder), transformer_lora_layers=lora, weight_name=LORA_WEIGHTS_NAME,
            transformer_lora_adapter_metadata=peft_config.to_dict(),
        )
        comfy_state = peft_lora_to_comfyui(lora, float(peft_config.lora_alpha))
        save_file({k: v.contiguous() for k, v in comfy_state.items()}, str(folder / comfy),
                  metadata={"format": "pt", "source": "latent-rewards"})
        return [LORA_WEIGHTS_NAME, comfy]
    if state is None:
        state = transformer.state_dict()
    state = {k: _own_storage(v.detach().to("cpu").contiguous()) for k, v in state.items()}
    save_transformer(folder / "transformer", transformer, state)
    save_file(diffusers_state_dict_to_wan(state), str(folder / comfy), metadata={"format": "pt"})
    return ["transformer", comfy]


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied if it is a view into a larger buffer (gathered FSDP weights can be), which safetensors
    refuses to write; tensors that own their storage are not copied (a 14B state dict is 57 GB)."""
    whole = t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return t if whole else t.clone()


def save_transformer(folder: Path, transformer: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Write ``state`` in diffusers' layout (``config.json``, ``diffusion_pytorch_model*.safetensors`` in 10 GB
    shards plus their index), loadable with ``WanTransformer3DModel.from_pretrained(folder)``.

    diffusers' own ``save_pretrained`` always reads the module's state dict, which under FSDP holds only this
    process's shards; the state given here is the gathered one.
    """
    from huggingface_hub import save_torch_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    transformer.save_config(folder)
    # FSDP2 swaps the module's class for a generated subclass ("FSDPWanTransformer3DModel"): record diffusers' own.
    cls = next(c for c in type(transformer).__mro__ if c.__module__.startswith("diffusers."))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["_class_name"] = cls.__name__
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_torch_state_dict(
        state, folder, filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size="10GB"
    )


# ------------------------------------------------------------------------------------------------ model card
def _fmt(v: Any) -> str:
    """A card cell: ``-`` for missing, 4 significant digits for floats."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


#: Where a local card's usage snippets point; :func:`set_card_repo_id` puts the Hub repo id there on push.
LOCAL_LOCATION = "path/to/this/folder"
_USAGE_BEGIN = "<!-- latent-rewards:usage -->"
_USAGE_END = "<!-- /latent-rewards:usage -->"


def _hub_id(ref: str | None) -> str | None:
    """``ref`` if it names a Hub repository (not a local folder, not the tiny test model), else None."""
    from ..rewards.hub import looks_like_repo_id

    if not ref or is_tiny(ref) or Path(ref).expanduser().exists():
        return None
    return ref if looks_like_repo_id(ref) else None


def _reward_line(reward: dict[str, Any]) -> str:
    """The reward as a reader elsewhere can find it: its Hub id, or a local folder's name marked as such."""
    path = reward.get("path")
    hub = _hub_id(path)
    if hub is not None:
        rev = f" (revision `{reward['revision']}`)" if reward.get("revision") else ""
        return f"[`{hub}`](https://huggingface.co/{hub}){rev}"
    name = Path(str(path)).expanduser().name or str(path)
    return f"`{name}` (a local reward folder at training time, not published on the Hub)"


def usage_section(cfg: dict[str, Any], location: str | None = None) -> str:
    """The card's "Use with diffusers" / "Use in ComfyUI" sections for the adapter at ``location`` (a Hub repo id;
    None: a local folder), between markers so that :func:`set_card_repo_id` can rewrite them."""
    name, model, finetune = cfg["name"], cfg["model"], cfg["finetune"]
    comfy = comfyui_file_name(name)
    where = location or LOCAL_LOCATION
    base = _hub_id(model) or DEFAULT_MODEL
    base_note = "" if _hub_id(model) or is_tiny(model) else f"  # trained on a local copy: {Path(model).name}"
    if finetune == "lora":
        diffusers_use = f"""```python
import torch
from diffusers import WanPipeline

pipe = WanPipeline.from_pretrained("{base}", torch_dtype=torch.bfloat16).to("cuda"){base_note}
pipe.load_lora_weights("{where}")   # reads {LORA_WEIGHTS_NAME}
video = pipe("a cat grooming its fur on a sunny windowsill", num_frames=81, guidance_scale=5.0).frames[0]
```"""
        if location:
            fetch = (f"Download `{comfy}` into `ComfyUI/models/loras/` (`hf download {location} {comfy} "
                     "--local-dir ComfyUI/models/loras`)")
            pack = f"or use the **Latent Reward LoRA Loader** node with `repo_id` set to `{location}/{comfy}`"
        else:
            fetch = f"Copy `{comfy}` to `ComfyUI/models/loras/`"
            pack = f"or the **Latent Reward LoRA Loader** node, which also reads `{LORA_WEIGHTS_NAME}` and Hub ids"
        comfy_use = (
            f"{fetch} and apply it with **LoraLoaderModelOnly** (strength 1.0) on the Wan2.1 diffusion model, {pack}."
        )
    else:
        diffusers_use = f"""```python
from diffusers import WanPipeline, WanTransformer3DModel

transformer = WanTransformer3DModel.from_pretrained("{where}", subfolder="transformer")
pipe = WanPipeline.from_pretrained("{base}", transformer=transformer){base_note}
```"""
        fetch = (f"Download `{comfy}` (`hf download {location} {comfy} --local-dir ComfyUI/models/diffusion_models`)"
                 if location else f"Copy `{comfy}` to `ComfyUI/models/diffusion_models/`")
        comfy_use = f"{fetch} and load it with **Load Diffusion Model**."
    return f"""{_USAGE_BEGIN}
## Use with diffusers

{diffusers_use}

## Use in ComfyUI

{comfy_use}
{_USAGE_END}"""


def model_card(info: dict[str, Any], repo_id: str | None = None) -> str:
    """A Hub model card (``README.md``) from what the trainer knows: config, reward, step, metrics, history.

    ``repo_id``: where the adapter is published (usage snippets load it from there); None for a local folder.
    """
    cfg = info["config"]
    name = cfg["name"]
    model = cfg["model"]
    finetune = cfg["finetune"]
    reward = cfg["reward"]
    method = cfg["method"]
    rollout = cfg["rollout"]
    base_id = _hub_id(model)
    base_line = f"base_model: {base_id}\n" if base_id else ""
    model_line = f"`{base_id}`" if base_id else (
        "`tiny` (the deterministic random test model)" if is_tiny(model) else f"`{Path(model).name}` (a local folder)"
    )
    history = info.get("history") or []
    rows = "\n".join(
        f"| {h['step']} | {_fmt(h.get('reward'))} | {_fmt(h.get('r_dist'))} | {_fmt(h.get('lap_ratio'))} | "
        f"{_fmt(h.get('hf_ratio'))} | {_fmt(h.get('change'))} | {'; '.join(h.get('flags') or []) or 'ok'} |"
        for h in history
    ) or "| - | - | - | - | - | - | no validation run |"
    mode = reward.get("mode") or "as saved with the reward"
    tau = f", tau = {reward['tau']}" if reward.get("tau") is not None else ""
    lora = cfg["lora"]
    adapter = (
        f"LoRA rank {lora['rank']}, alpha {lora['alpha']}, targets {', '.join(lora['targets'])}"
        if finetune == "lora" else "full fine-tune of the transformer"
    )
    opt = cfg["optimizer"]
    eff_batch = cfg["batch_size"] * cfg["gradient_accumulation_steps"] * int(info.get("num_processes", 1))
    best = info.get("best_step")
    step = info.get("step")
    selected = info.get("selected", "")
    stop = info.get("stop_reason")
    real_radius = cfg["monitor"]["real_radius"]
    radius = f"`{real_radius}`" if real_radius is not None else "not set: check skipped"
    return f"""---
{base_line}library_name: diffusers
pipeline_tag: text-to-video
tags:
- latent-rewards
- {method['name'].replace('_', '-')}
- {'lora' if finetune == 'lora' else 'full-finetune'}
- wan2.1
- text-to-video
- reward-fine-tuning
license: apache-2.0
---

# {name}

Wan2.1 text-to-video fine-tuned with a **latent reward** by [latent-rewards](https://github.com/latent-rewards/latent-rewards)
(recipe `{method['name']}`, {adapter}). The reward scores latents directly, so training never decodes a video.

This folder is step **{_fmt(step)}**{f' ({selected})' if selected else ''}; best step so far by the
reward-hacking rule: **{_fmt(best)}**.{f' {stop}.' if stop else ''}

## Recipe

- base model: {model_line}
- reward: {_reward_line(reward)}, mode {mode}{tau}
- rollout: `{rollout.get('kind')}` ({', '.join(f'{k} {v}' for k, v in rollout.items() if k != 'kind')})
- method: {', '.join(f'{k} {v}' for k, v in method.items() if k != 'name') or 'defaults'}
- optimizer: {opt['name']}, lr {opt['lr']}, weight decay {opt['weight_decay']}, schedule {opt['scheduler']}, grad clip {cfg['max_grad_norm']}
- effective batch {eff_batch} ({cfg['batch_size']} x {cfg['gradient_accumulation_steps']} accumulation x {info.get('num_processes', 1)} processes), {cfg['max_steps']} steps max, mixed precision {cfg['mixed_precision']}
- video {cfg['video']['width']}x{cfg['video']['height']}, {cfg['video']['num_frames']} frames

## Validation and reward hacking

Every validation decodes the same prompts and seeds as the base model (step 0). `lap` = sharpness (Laplacian
variance) and `hf` = high-frequency energy share, as ratios to the base model; `change` = mean absolute pixel
change vs the base model (0..1). A step is flagged when hf grows more than `{cfg['monitor']['max_hf_over_lap']}` x
max(lap, 1), when change > `{cfg['monitor']['max_change']}`, or when R_dist falls below
`{cfg['monitor']['min_radius_fraction']}` x the real-data radius ({radius}). The best step is
the unflagged one with the highest validation reward. Look at the videos before trusting the numbers.

| step | reward | R_dist | lap (x base) | hf (x base) | change | verdict |
|---|---|---|---|---|---|---|
{rows}

{usage_section(cfg, repo_id)}
"""


def write_model_card(folder: Path, info: dict[str, Any], repo_id: str | None = None) -> None:
    """Write :func:`model_card` as ``folder/README.md``."""
    (folder / "README.md").write_text(model_card(info, repo_id), encoding="utf-8")


def set_card_repo_id(folder: Path, repo_id: str) -> None:
    """Point the usage sections of ``folder/README.md`` at the Hub repo ``repo_id`` (the rest of the card, edits
    included, is kept). The sections are rebuilt from ``folder/training_config.yaml``."""
    import yaml

    card_path = folder / "README.md"
    card = card_path.read_text(encoding="utf-8")
    begin, end = card.find(_USAGE_BEGIN), card.find(_USAGE_END)
    if begin < 0 or end < begin:
        raise CheckpointError(
            f"{card_path}: no usage section to point at {repo_id} (expected the {_USAGE_BEGIN} markers of a "
            "latent-rewards model card)"
        )
    try:
        cfg = yaml.safe_load((folder / "training_config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{folder}: cannot read training_config.yaml for the model card ({e})") from None
    card = card[:begin] + usage_section(cfg, repo_id) + card[end + len(_USAGE_END):]
    card_path.write_text(card, encoding="utf-8")


# ------------------------------------------------------------------------------------------------ training state
def save_training_state(
    folder: Path,
    *,
    trainable: dict[str, torch.Tensor] | None,
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    random_states: Sequence[dict[str, Any]],
    trainer_state: dict[str, Any],
    recipe_state: dict[str, Any],
) -> None:
    """Everything exact resume needs, under ``folder/training_state/``. ``random_states`` has one entry per process."""
    from safetensors.torch import save_file

    d = folder / TRAINING_STATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    if trainable is not None:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}, str(d / "trainable.safetensors"))
    torch.save(optimizer, d / "optimizer.pt")
    torch.save(scheduler, d / "scheduler.pt")
    for rank, state in enumerate(random_states):
        torch.save(state, d / f"random_state_{rank}.pt")
    torch.save(recipe_state, d / "recipe_state.pt")
    (d / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n", encoding="utf-8")


def load_training_state(folder: Path, rank: int = 0) -> dict[str, Any]:
    """Read what :func:`save_training_state` wrote (tensors with ``weights_only=True``: nothing is unpickled)."""
    from safetensors.torch import load_file

    d = folder / TRAINING_STATE_DIR
    if not (d / "trainer_state.json").is_file():
        raise CheckpointError(f"{folder}: not a resumable checkpoint (no {TRAINING_STATE_DIR}/trainer_state.json)")
    rs = d / f"random_state_{rank}.pt"
    if not rs.is_file():
        raise CheckpointError(
            f"{folder}: no random state for process {rank}; resume with the same number of processes it was saved with"
        )
    try:
        out = {
            "trainer_state": json.loads((d / "trainer_state.json").read_text(encoding="utf-8")),
            "optimizer": torch.load(d / "optimizer.pt", weights_only=True, map_location="cpu"),
            "scheduler": torch.load(d / "scheduler.pt", weights_only=True, map_location="cpu"),
            "random_state": torch.load(rs, weights_only=True, map_location="cpu"),
            "recipe_state": torch.load(d / "recipe_state.pt", weights_only=True, map_location="cpu"),
            "trainable": load_file(str(d / "trainable.safetensors")) if (d / "trainable.safetensors").is_file() else None,
        }
    except (OSError, RuntimeError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}: unreadable training state ({e})") from None
    return out


# ------------------------------------------------------------------------------------------------ folders
def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of complete ``checkpoint-<step>`` folders, oldest first."""
    out = []
    if not output_dir.is_dir():
        return out
    for p in output_dir.iterdir():
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit():
            out.append((int(p.name[len(CHECKPOINT_PREFIX):]), p))
    return sorted(out)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest resumable ``checkpoint-<step>`` folder of a run (one with a training state), or None."""
    cks = [p for _, p in list_checkpoints(output_dir) if (p / TRAINING_STATE_DIR / "trainer_state.json").is_file()]
    return cks[-1] if cks else None


def prune_checkpoints(output_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; returns what was removed."""
    cks = list_checkpoints(output_dir)
    removed = []
    for _, p in cks[: max(0, len(cks) - keep_last)]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed
