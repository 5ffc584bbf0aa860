"""Training configuration: YAML -> typed dataclasses, validated before anything heavy is loaded.

A config is one YAML file (see ``trainer/configs/``) plus optional ``key=value`` overrides that use the config's
own keys, dotted for nested sections::

    latent-rewards train trainer/configs/tiny-cpu.yaml output_dir=runs/x max_steps=12 lora.rank=8

Values of overrides are parsed as YAML (``8`` is an int, ``[a, b]`` a list, ``null`` None). Every field is checked
against its type and range here, with a :class:`~latent_rewards.rewards.errors.ConfigError` that names the field
(``lora.rank: expected a positive integer, got -1``), so a bad config fails in milliseconds, not after a model
download. The recipe (``method``) and the rollout strategy (``rollout``) own their settings dataclasses; their
sections are validated against them (see :func:`register_method` / :func:`register_rollout`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..pipelines import DEFAULT_WAN_MODEL
from ..rewards.errors import ConfigError

__all__ = [
    "TrainConfig",
    "LoraSettings",
    "RewardSettings",
    "VideoSettings",
    "OptimizerSettings",
    "ValidationSettings",
    "MonitorSettings",
    "LoggingSettings",
    "HubSettings",
    "MethodSection",
    "RolloutSection",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "parse_overrides",
    "config_to_dict",
    "dump_config",
    "parse_section",
    "check_lora_target",
    "BUILTIN_CONFIGS",
    "builtin_config_path",
    "DEFAULT_MODEL",
    "DEFAULT_PROMPTS",
    "ACCELERATE_FSDP_CONFIG",
    "WAN_LORA_MODULES",
    "read_prompts",
]

#: The generator trained by default (the one ``latent-rewards generate`` samples by default).
DEFAULT_MODEL = DEFAULT_WAN_MODEL
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: The prompt set shipped with the package (``prompts: default``).
DEFAULT_PROMPTS = Path(__file__).resolve().parent / "prompts" / "default.txt"
#: Names accepted instead of a path, e.g. ``latent-rewards train tiny-cpu``.
BUILTIN_CONFIGS = ("shell_lcc_wan1.3b", "shell_lcc_wan1.3b_lora", "shell_lcc_wan14b_band", "tiny-cpu")
#: An accelerate config for sharding the transformer with FSDP (``accelerate launch --config_file ...``).
ACCELERATE_FSDP_CONFIG = CONFIG_DIR / "accelerate_fsdp.yaml"

#: The layers of diffusers' ``WanTransformer3DModel`` that LoRA can adapt (its ``nn.Linear`` modules; ``*`` is a
#: block index). ``add_k_proj``/``add_v_proj`` and ``image_embedder`` exist only in image-to-video checkpoints.
#: Known statically so that a bad ``lora.targets`` fails before any model is loaded; a test builds the model on
#: the meta device and checks this list against it.
WAN_LORA_MODULES = (
    "blocks.*.attn1.to_q", "blocks.*.attn1.to_k", "blocks.*.attn1.to_v", "blocks.*.attn1.to_out.0",
    "blocks.*.attn2.to_q", "blocks.*.attn2.to_k", "blocks.*.attn2.to_v", "blocks.*.attn2.to_out.0",
    "blocks.*.attn2.add_k_proj", "blocks.*.attn2.add_v_proj",
    "blocks.*.ffn.net.0.proj", "blocks.*.ffn.net.2",
    "condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2",
    "condition_embedder.time_proj",
    "condition_embedder.text_embedder.linear_1", "condition_embedder.text_embedder.linear_2",
    "condition_embedder.image_embedder.ff.net.0.proj", "condition_embedder.image_embedder.ff.net.2",
    "proj_out",
)


def builtin_config_path(name: str) -> Path:
    """Path of a config shipped with the package (``tiny-cpu``, ``shell_lcc_wan1.3b``, ...)."""
    return CONFIG_DIR / f"{name.removesuffix('.yaml')}.yaml"


# ------------------------------------------------------------------------------------------------ sections
@dataclass
class LoraSettings:
    """peft ``LoraConfig`` on the diffusers transformer (module names as in ``WanTransformer3DModel``)."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    #: Module name suffixes. ``to_q``... match both self- and cross-attention (the authors' ``q,k,v,o``);
    #: add ``ffn.net.0.proj`` / ``ffn.net.2`` for the feed-forward layers.
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])

    def validate(self, path: str) -> None:
        """Raise :class:`ConfigError` naming the field (``<path>.<field>``) if a value is out of range."""
        _positive(self.rank, f"{path}.rank", integer=True)
        _positive(self.alpha, f"{path}.alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{path}.dropout: expected a number in [0, 1), got {self.dropout}")
        if not self.targets or not all(t.strip() for t in self.targets):
            raise ConfigError(f"{path}.targets: expected a non-empty list of module names, e.g. [to_q, to_k]")
        for target in self.targets:
            check_lora_target(target, f"{path}.targets")


def _lora_target_matches(target: str, module: str) -> bool:
    """peft's rule for a list of targets (the module name equals the target or ends with ``.target``), with ``*``
    in ``module`` standing for any block index."""
    t, m = target.split("."), module.split(".")
    return len(t) <= len(m) and all(a == b or (b == "*" and a.isdigit()) for a, b in zip(t, m[len(m) - len(t):]))


def check_lora_target(target: str, field_name: str = "lora.targets") -> None:
    """Raise :class:`ConfigError` unless ``target`` names at least one Linear layer of the Wan2.1 transformer."""
    if any(_lora_target_matches(target, m) for m in WAN_LORA_MODULES):
        return
    suffixes = sorted({".".join(m.split(".")[-k:]) for m in WAN_LORA_MODULES for k in (1, 2, 3)})
    suffixes = [s for s in suffixes if "*" not in s]
    close = difflib.get_close_matches(target, suffixes, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"{field_name}: {target!r} is not a Linear layer of the Wan2.1 transformer{hint} (targets are module-name "
        "suffixes of diffusers' WanTransformer3DModel: to_q, to_k, to_v, to_out.0, attn1.to_q (self-attention "
        "only), attn2.to_k (cross-attention only), ffn.net.0.proj, ffn.net.2, proj_out, ...)"
    )


@dataclass
class RewardSettings:
    """The frozen reward: a folder or Hub id (``save_pretrained`` format), and how its value becomes the loss."""

    path: str | None = None
    revision: str | None = None
    #: ``plain`` (reward = -R_dist), ``band`` (-|R_dist - tau|), or null to keep the mode saved with the reward.
    mode: Literal["plain", "band"] | None = None
    tau: float | None = None
    #: Voxels per chunk inside Shell-LCC (None: chosen from its memory budget).
    chunk_size: int | None = None

    def validate(self, path: str) -> None:
        """Raise :class:`ConfigError` naming the field (``<path>.<field>``) if a value is out of range."""
        if not self.path:
            raise ConfigError(
                f"{path}.path: required; a reward folder or Hub id, e.g. reward.path=runs/manifold "
                "(fit one with `latent-rewards fit-manifold`)"
            )
        if self.mode == "band":
            if self.tau is None:
                raise ConfigError(f"{path}.tau: reward mode 'band' needs a target radius, e.g. {path}.tau=0.444")
        if self.tau is not None:
            _finite(self.tau, f"{path}.tau")
            if self.tau < 0:
                raise ConfigError(f"{path}.tau: expected >= 0, got {self.tau}")
        if self.chunk_size is not None:
            _positive(self.chunk_size, f"{path}.chunk_size", integer=True)


@dataclass
class VideoSettings:
    """Size of the videos the generator makes during training (pixels; latents are 4x8x8 smaller)."""

    height: int = 480
    width: int = 832
    num_frames: int = 17

    def validate(self, path: str) -> None:
        """Raise :class:`ConfigError` naming the field (``<path>.<field>``) if a value is out of range."""
        for name in ("height", "width"):
            v = getattr(self, name)
            _positive(v, f"{path}.{name}", integer=True)
            if v % 16:
                raise ConfigError(f"{path}.{name}: must be a multiple of 16 (VAE stride 8 x patch 2), got {v}")
        _positive(self.num_frames, f"{path}.num_frames", integer=True)
        if (self.num_frames - 1) % 4:
            raise ConfigError(f"{path}.num_frames: must be 4k+1 (1, 5, 9, 17, 81, ...), got {self.num_frames}")


@dataclass
class OptimizerSettings:
    """AdamW and the learning-rate schedule (any name diffusers' ``get_scheduler`` knows)."""

    name: Literal["adamw"] = "adamw"
    lr: float = 1e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    warmup_steps: int = 0

    def validate(self, path: str) -> None:
        """Raise :class:`ConfigError` naming the field (``<path>.<field>``) if a value is out of range."""
        _positive(self.lr, f"{path}.lr")
        if self.weight_decay < 0:
            raise ConfigError(f"{path}.weight_decay: expected >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{path}.betas: expected two numbers in [0, 1), got {self.betas}")
        _positive(self.eps, f"{path}.eps")
        if self.warmup_steps < 0:
            raise ConfigError(f"{path}.warmup_steps: expected >= 0, got {self.warmup_steps}")


@dataclass
class ValidationSettings:
    """Validation videos: sampled with the pipeline at a fixed seed, decoded, scored and watched by the monitor."""

    #: A list of prompts or a text file (one per line). Empty: the first ``num_videos`` training prompts.
    prompts: list[str] | str | None = None
    #: Validate every N optimizer steps (0: never; then the last step is the one exported to best/).
    every: int = 10
    num_videos: int = 4
    num_inference_steps: int = 40
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    seed: int = 42
    fps: int = 16
    #: Video size for validation; null keeps the training ``video`` size.
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None

    def validate(self, path: str) -> None:
        """Raise :class:`ConfigError` naming the field (``<path>.<field>``) if a value is out of range."""
        if self.every < 0:
            raise ConfigError(f"{path}.every: expected >= 0 (0 disables validation), got {self.every}")
        _positive(self.num_videos, f"{path}.num_videos", integer=True)
        _positive(self.num_inference_steps, f"{path}.num_inference_steps", integer=True)
        if self.guidance_scale < 0:
            raise ConfigError(f"{path}.guidance_scale: expected >= 0, got {self.guidance_scale}")
        _positive(self.fps, f"{path}.fps", integer=True)
        size = VideoSettings(self.height or 16, self.width or 16, self.num_frames or 1)
        size.validate(path)
        if isinstance(self.prompts, list) and not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise ConfigError(f"{path}.prompts: expected non-empty strings")


@dataclass
class MonitorSettings:
    """The reward-hacking watch (see :mod:`latent_rewards.trainer.monitor` for the rule)."""

    enabled: bool = True
    #: Stop training when the rule has flagged this many validations in a row (0: never stop early).
    patience: int = 2
    #: hf_ratio / lap_ratio above this flags high-frequency noise stamped on the video (reward hacking).
    max_hf_over_lap: float = 1.5
    #: Mean absolute pixel change vs the base model (0..1) above this flags content drift.
    max_change: float = 0.2
    #: R_dist of real data (e.g. 0.88 for the authors' manifold); null skips the radius check.
    real_radius: float | None = None
    #: Flag validations whose mean R_dist falls below this fraction of ``real_radius`` (collapse to the mean).
    min_radius_fraction: float = 0.8
    #: Frames per video used for the image metrics (evenly spaced; 0: all).
    max_frames: int = 16

    def validate(self, path: str) -> None:
        """Raise :class:`ConfigError` naming the field (``<path>.<field>``) if a value is out of range."""
        if self.patience < 0:
            raise ConfigError(f"{path}.patience: expected >= 0, got {self.patience}")
        _positive(self.max_hf_over_lap, f"{path}.max_hf_over_lap")
        _positive(self.max_change, f"{path}.max_change")
        if self.real_radius is not None:
            _positive(self.real_radius, f"{path}.real_radius")
        if not 0.0 <= self.min_radius_fraction <= 1.0:
            raise ConfigError(f"{path}.min_radius_fraction: expected a number in [0, 1], got {self.min_radius_fraction}")
        if self.max_frames < 0:
            raise ConfigError(f"{path}.max_frames: expected >= 0, got {self.max_frames}")


@dataclass
class LoggingSettings:
    """Where metrics go besides ``OUTPUT_DIR/metrics.jsonl`` (always written)."""

    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    log_every: int = 1
    project: str = "latent-rewards"

    def validate(self, path: str) -> None:
        """Raise :class:`ConfigError` naming the field (``<path>.<field>``) if a value is out of range."""
        _positive(self.log_every, f"{path}.log_every", integer=True)


@dataclass
class HubSettings:
    """Optional upload of ``best/`` when training ends (same as ``latent-rewards push``)."""

    repo_id: str | None = None
    private: bool = True
    push_at_end: bool = False

    def validate(self, path: str) -> None:
        """Raise :class:`ConfigError` naming the field (``<path>.<field>``) if a value is out of range."""
        from ..rewards.hub import looks_like_repo_id

        if self.repo_id is not None and not looks_like_repo_id(self.repo_id):
            raise ConfigError(f"{path}.repo_id: expected a Hub repository id 'user/name', got {self.repo_id!r}")
        if self.push_at_end and not self.repo_id:
            raise ConfigError(f"{path}.push_at_end: needs {path}.repo_id")


@dataclass
class MethodSection:
    """``method:`` the recipe by name (``shell_lcc``) and its own settings (a dataclass the recipe declares)."""

    name: str = "shell_lcc"
    settings: Any = None


@dataclass
class RolloutSection:
    """``rollout:`` the strategy by name; null picks the recipe's default. Its settings are the strategy's."""

    kind: str | None = None
    settings: Any = None


@dataclass
class TrainConfig:
    """A whole training run. Field names are the YAML keys."""

    #: Base name for exported files (``<name>_comfyui.safetensors``) and the model card title.
    name: str = "latent-reward-lora"
    #: A diffusers Wan2.1 repo id or folder (subfolders transformer/vae/text_encoder/tokenizer/scheduler), or
    #: ``tiny`` for the deterministic random test model.
    model: str = DEFAULT_MODEL
    revision: str | None = None
    output_dir: str = "runs/latent-reward-lora"
    method: MethodSection = field(default_factory=MethodSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    reward: RewardSettings = field(default_factory=RewardSettings)
    #: ``lora`` (peft adapters on the transformer) or ``full`` (every transformer weight).
    finetune: Literal["lora", "full"] = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)
    video: VideoSettings = field(default_factory=VideoSettings)
    #: ``default`` (the prompt set shipped in ``trainer/prompts/default.txt``), a text file, or a list.
    prompts: list[str] | str = "default"
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    max_steps: int = 100
    #: Samples per device per micro-batch; effective batch = batch_size x accumulation x processes.
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    #: dtype of the frozen base weights (LoRA weights stay fp32); null: bf16 when mixed_precision is bf16.
    weight_dtype: Literal["fp32", "bf16", "fp16"] | None = None
    gradient_checkpointing: bool = True
    #: Skip an optimizer step whose loss or gradient is NaN/Inf (the step is logged as skipped).
    skip_nonfinite: bool = True
    seed: int = 0
    #: Run on CPU even when a GPU is present.
    cpu: bool = False
    #: torch CPU threads while training (null: torch's default). Tiny models run fastest on 1.
    cpu_threads: int | None = None
    checkpoint_every: int = 10
    #: Keep the last K ``checkpoint-<step>`` folders (``best/`` is kept separately).
    keep_last: int = 3
    #: ``auto``: continue from the newest checkpoint in output_dir if there is one; ``latest``: the same, but it
    #: must exist; ``never``: start fresh (output_dir must hold no checkpoints); or a checkpoint folder.
    resume: str = "auto"
    #: Where text embeddings are cached (keyed by model + prompt). null: ~/.cache/latent_rewards/text_embeds.
    text_cache_dir: str | None = None
    max_sequence_length: int = 512
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    hub: HubSettings = field(default_factory=HubSettings)

    def validate(self, path: str = "") -> None:
        """Check every field (types were checked while parsing); raise :class:`ConfigError` naming the first bad one."""
        if not self.name.strip() or any(c in self.name for c in "/\\:"):
            raise ConfigError(f"name: expected a file-name-safe run name, got {self.name!r}")
        if not self.model.strip():
            raise ConfigError("model: expected a diffusers repo id, a folder, or 'tiny'")
        if not self.output_dir.strip():
            raise ConfigError("output_dir: expected a folder")
        _positive(self.max_steps, "max_steps", integer=True)
        _positive(self.batch_size, "batch_size", integer=True)
        _positive(self.gradient_accumulation_steps, "gradient_accumulation_steps", integer=True)
        _positive(self.max_grad_norm, "max_grad_norm")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every: expected >= 0 (0: only at the end), got {self.checkpoint_every}")
        _positive(self.keep_last, "keep_last", integer=True)
        _positive(self.max_sequence_length, "max_sequence_length", integer=True)
        if self.cpu_threads is not None:
            _positive(self.cpu_threads, "cpu_threads", integer=True)
        if self.seed < 0:
            raise ConfigError(f"seed: expected >= 0, got {self.seed}")
        if isinstance(self.prompts, list):
            if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
                raise ConfigError("prompts: expected 'default', a text file, or a non-empty list of prompts")
        elif self.prompts != "default" and not Path(self.prompts).expanduser().is_file():
            raise ConfigError(f"prompts: {self.prompts!r} is not a file; expected 'default', a file or a list")
        if isinstance(self.validation.prompts, str) and not Path(self.validation.prompts).expanduser().is_file():
            raise ConfigError(f"validation.prompts: {self.validation.prompts!r} is not a file")
        if self.resume not in ("auto", "latest", "never") and not Path(self.resume).expanduser().is_dir():
            raise ConfigError(f"resume: expected 'auto', 'latest', 'never' or a checkpoint folder, got {self.resume!r}")
        for name in ("reward", "lora", "video", "optimizer", "validation", "monitor", "logging", "hub"):
            getattr(self, name).validate(name)
        _check_reward_reference(self.reward)

    def resolved_weight_dtype(self, *, sharded: bool = False) -> str:
        """dtype of the transformer's weights: ``weight_dtype``, else bf16/fp16 for a LoRA's frozen base under
        mixed precision, else fp32. ``sharded`` (FSDP): fp32, the master weights FSDP shards and casts itself."""
        if self.weight_dtype is not None:
            return self.weight_dtype
        if sharded:
            return "fp32"
        if self.finetune == "lora" and self.mixed_precision in ("bf16", "fp16"):
            return self.mixed_precision
        return "fp32"


def read_prompts(spec: list[str] | str) -> list[str]:
    """Prompts from ``default`` (the shipped set), a text file (one per line, ``#`` comments), or a list."""
    if isinstance(spec, list):
        return [p.strip() for p in spec if p.strip()]
    path = DEFAULT_PROMPTS if spec == "default" else Path(spec).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"prompts: cannot read {path} ({e})") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"prompts: {path} holds no prompts (one per line; '#' starts a comment)")
    return prompts


# ------------------------------------------------------------------------------------------------ checks
def _positive(v: Any, name: str, *, integer: bool = False) -> None:
    if integer:
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{name}: expected a positive integer, got {v!r}")
        return
    _finite(v, name)
    if v <= 0:
        raise ConfigError(f"{name}: expected a positive number, got {v!r}")


def _finite(v: Any, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{name}: expected a finite number, got {v!r}")


def _check_reward_reference(reward: RewardSettings) -> None:
    """A reward path must be an existing folder with a config.json, or look like a Hub id (checked on load)."""
    from ..rewards.hub import looks_like_repo_id

    p = Path(str(reward.path)).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ConfigError(
                f"reward.path: {p} is not a reward folder (expected config.json and model.safetensors, "
                "as written by save_pretrained or `latent-rewards fit-manifold`)"
            )
    elif not looks_like_repo_id(str(reward.path)):
        raise ConfigError(f"reward.path: {reward.path!r}: no such folder, and not a Hub id of the form 'user/name'")


# ------------------------------------------------------------------------------------------------ parsing
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (arg,) = typing.get_args(tp)
        return f"a list of {_type_name(arg)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the type hint ``tp`` (coercing the few YAML ambiguities), or raise ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (arg,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, arg, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return parse_section(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-5` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a bug in a settings dataclass, not user input


def _unknown_key_error(key: str, known: list[str], path: str) -> ConfigError:
    full = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {(path + '.' if path else '') + close[0]!r}?" if close else ""
    return ConfigError(f"{full}: unknown field{hint} (known: {', '.join(known)})")


def parse_section(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking every field's type; unknown keys are errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key_error(str(key), list(fields), path)
        kwargs[key] = _coerce(value, hints[key], f"{path}.{key}" if path else key)
    return cls(**kwargs)


def _registry_section(data: Any, path: str, key: str, registry: dict[str, type], default: str | None) -> tuple[str | None, Any]:
    """``method:``/``rollout:`` sections: a name (shorthand) or a mapping with the name plus that entry's fields."""
    if data is None:
        data = {}
    if isinstance(data, str):
        data = {key: data}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a name or a mapping with '{key}', got {data!r}")
    data = dict(data)
    name = data.pop(key, default)
    if name is None:
        return None, data
    if not isinstance(name, str) or name not in registry:
        close = difflib.get_close_matches(str(name), list(registry), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{path}.{key}: unknown {path} {name!r}{hint} (known: {', '.join(sorted(registry))})")
    return name, parse_section(registry[name], data, path)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Validate a plain dict (a parsed YAML file with overrides applied) into a :class:`TrainConfig`."""
    from .methods import METHODS
    from .rollouts import ROLLOUTS

    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a YAML mapping at the top level, got {type(data).__name__}")
    data = dict(data)
    method_name, method_settings = _registry_section(
        data.pop("method", None), "method", "name", {k: v.settings_class for k, v in METHODS.items()}, "shell_lcc"
    )
    rollout_name, rollout_settings = _registry_section(
        data.pop("rollout", None), "rollout", "kind", {k: v.settings_class for k, v in ROLLOUTS.items()},
        METHODS[method_name].default_rollout,
    )
    cfg = parse_section(TrainConfig, data, "")
    cfg.method = MethodSection(method_name, method_settings)
    cfg.rollout = RolloutSection(rollout_name, rollout_settings)
    METHODS[method_name].check_rollout(rollout_name)
    for section, settings in (("method", method_settings), ("rollout", rollout_settings)):
        validate = getattr(settings, "validate", None)
        if callable(validate):
            validate(section)
    cfg.validate()
    return cfg


# ------------------------------------------------------------------------------------------------ overrides
def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``["lora.rank=8", "prompts=[a, b]"]`` -> ``[("lora.rank", 8), ("prompts", ["a", "b"])]`` (values as YAML)."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value using the config's keys, e.g. max_steps=12")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


_SHORTHAND_KEY = {"method": "name", "rollout": "kind"}


def apply_overrides(data: dict[str, Any], overrides: list[tuple[str, Any]] | list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy); unknown keys are caught by validation afterwards."""
    import copy

    if overrides and isinstance(overrides[0], str):
        overrides = parse_overrides(overrides)  # type: ignore[arg-type]
    data = copy.deepcopy(data)
    for key, value in overrides:  # type: ignore[misc]
        parts = key.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if isinstance(child, str) and part in _SHORTHAND_KEY and i == 0:
                child = {_SHORTHAND_KEY[part]: child}
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section (it is {child!r})")
            node[part] = child
            node = child
        last = parts[-1]
        if len(parts) == 1 and last in _SHORTHAND_KEY and isinstance(node.get(last), dict) and isinstance(value, str):
            node[last][_SHORTHAND_KEY[last]] = value  # `method=shell_lcc` keeps the section's other fields
        else:
            node[last] = value
    return data


def load_config(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML file (or a built-in config name, or a dict), apply ``key=value`` overrides, validate."""
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source).expanduser()
        if not path.is_file() and str(source).removesuffix(".yaml") in BUILTIN_CONFIGS:
            path = builtin_config_path(str(source))
        if not path.is_file():
            raise ConfigError(
                f"{source}: no such config file (built-in configs: {', '.join(BUILTIN_CONFIGS)})"
            )
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if data is None:
            data = {}
    if overrides:
        data = apply_overrides(data, overrides)
    return config_from_dict(data)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain data in the YAML layout (method/rollout settings flattened into their sections)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "method":
            out["method"] = {"name": value.name, **_asdict(value.settings)}
        elif f.name == "rollout":
            out["rollout"] = {"kind": value.kind, **_asdict(value.settings)}
        elif dataclasses.is_dataclass(value):
            out[f.name] = _asdict(value)
        else:
            out[f.name] = value
    return out


def _asdict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else {}


def dump_config(cfg: TrainConfig) -> str:
    """YAML text that :func:`load_config` reads back to an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
