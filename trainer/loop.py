"""The training loop (accelerate): generic over recipes, exact to resume, watched for reward hacking.

One optimizer step = ``gradient_accumulation_steps`` micro-batches of ``batch_size`` prompts per process, each
``recipe.training_step`` (rollout + loss) under autocast, then gradient clipping (``max_grad_norm``, 1.0), a
NaN/Inf check (the step is skipped and logged when the loss or the gradient is not finite), AdamW and the LR
schedule. Runs on one device or under ``accelerate launch``: DDP, or FSDP1/FSDP2 through an accelerate config
(``trainer/configs/accelerate_fsdp.yaml``). Under FSDP every forward (training, gradient-free rollout prefixes, the
LoRA-disabled reference, validation sampling) goes through the FSDP module, checkpoints gather the full state, and
what cannot be sharded is refused before any model loads (a frozen full copy for KL with ``finetune: full``;
low-precision master weights).

Around it: text embeddings are computed once and cached on disk, then the text encoder is freed; the VAE lives
on the CPU and visits the accelerator only to decode validation videos; the transformer trains with gradient
checkpointing. Every ``checkpoint_every`` steps a checkpoint folder is written atomically (see
:mod:`.export`), the last ``keep_last`` are kept, and ``best/`` holds the step the monitor selects. Ctrl-C (or
SIGTERM) finishes the current step, saves a checkpoint and stops; a second Ctrl-C aborts at once. A run
restarted on the same ``output_dir`` continues from its newest checkpoint and reproduces the losses of an
uninterrupted run: weights, optimizer, scheduler and every random generator are restored.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..pipelines.best_of_n import decode_latents
from ..pipelines.video import frames_to_uint8, write_video
from ..rewards.base import LatentReward
from ..rewards.errors import CheckpointError, ConfigError, NonFiniteError
from ..rewards.hub import atomic_directory, atomic_write_text
from .config import TrainConfig, config_to_dict, dump_config, read_prompts
from .export import (
    latest_checkpoint,
    list_checkpoints,
    load_training_state,
    prune_checkpoints,
    save_adapter,
    save_training_state,
    write_model_card,
)
from .methods import RecipeContext, TrainBatch, build_method
from .data import load_vae
from .modeling import DTYPES, TextEmbeddingCache, cpu_threads, free, load_scheduler, load_transformer
from .monitor import RewardHackingMonitor, ValidationReport
from .rollouts import RolloutRandom, TransformerDenoiser, build_rollout, latent_shape

__all__ = ["Trainer", "TrainResult", "train", "COMPATIBLE_KEYS"]

logger = logging.getLogger("latent_rewards.trainer")

METRICS_FILE = "metrics.jsonl"
#: Settings that must match the checkpoint a run resumes from (the rest, e.g. max_steps, may change).
COMPATIBLE_KEYS = (
    "model", "revision", "finetune", "lora", "method", "rollout", "reward", "video", "prompts", "optimizer",
    "batch_size", "gradient_accumulation_steps", "max_grad_norm", "mixed_precision", "weight_dtype", "seed",
    "max_sequence_length", "skip_nonfinite",
)
#: Consecutive skipped (non-finite) steps after which training gives up.
MAX_CONSECUTIVE_SKIPS = 10


@dataclass
class TrainResult:
    """What a run produced."""

    output_dir: Path
    step: int
    best_step: int | None
    best_dir: Path | None
    stop_reason: str | None = None
    interrupted: bool = False
    checkpoints: list[Path] = field(default_factory=list)
    last_logs: dict[str, float] = field(default_factory=dict)
    #: False in the other processes of a distributed run (they should not report).
    main_process: bool = True


class _StopRequest:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_StopRequest]:
    """SIGINT/SIGTERM ask the loop to stop after the current step (a second SIGINT raises KeyboardInterrupt)."""
    flag = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.requested = True
        flag.signal_name = signal.Signals(signum).name
        logger.warning(
            "%s: finishing this step, saving a checkpoint, then stopping (Ctrl-C again aborts without saving)",
            flag.signal_name,
        )

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def _float(v: Any) -> float:
    if hasattr(v, "full_tensor"):  # a DTensor (FSDP2's gradient norm)
        v = v.full_tensor()
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


def _check_targets_present(transformer: torch.nn.Module, targets: list[str], model: str) -> None:
    """Each LoRA target must match a layer of this checkpoint (the config check knows every Wan layout; an
    image-to-video layer such as add_k_proj is absent from text-to-video models)."""
    names = [n for n, _ in transformer.named_modules()]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise ConfigError(
                f"lora.targets: {t!r} matches no layer of {model!r} (add_k_proj, add_v_proj and image_embedder "
                "exist only in image-to-video Wan models)"
            )


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs it: ``Trainer(cfg).train()``."""

    def __init__(self, config: TrainConfig, *, resume: str | None = None, progress: bool = True) -> None:
        self.config = config
        self.resume = resume if resume is not None else config.resume
        self.progress = progress
        self.output_dir = Path(config.output_dir).expanduser()

    # ================================================================================= setup
    def _accelerator(self) -> Any:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        cfg = self.config
        report = cfg.logging.report_to
        if report == "wandb":
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise ConfigError("logging.report_to: wandb is not installed (pip install wandb), or use tensorboard")
        log_with = None if report == "none" else report
        return Accelerator(
            mixed_precision=cfg.mixed_precision,
            cpu=cfg.cpu,
            log_with=log_with,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
        )

    def _resume_checkpoint(self) -> Path | None:
        """The checkpoint to resume from (or None), checked against this config before any model is loaded."""
        cfg, out = self.config, self.output_dir
        if self.resume == "never":
            if list_checkpoints(out):
                raise ConfigError(
                    f"resume: 'never' but {out} already holds checkpoints; use another output_dir, delete them, "
                    "or resume=auto to continue"
                )
            return None
        if self.resume in ("auto", "latest"):
            ckpt = latest_checkpoint(out)
            if ckpt is None and self.resume == "latest":
                raise ConfigError(f"resume: no checkpoint to resume from in {out}")
        else:
            ckpt = Path(self.resume).expanduser()
            if not (ckpt / "training_state" / "trainer_state.json").is_file():
                raise ConfigError(f"resume: {ckpt} is not a resumable checkpoint folder (no training_state/)")
        if ckpt is None:
            return None
        saved_cfg = ckpt / "training_config.yaml"
        if saved_cfg.is_file():
            import yaml

            saved = yaml.safe_load(saved_cfg.read_text(encoding="utf-8")) or {}
            now = config_to_dict(cfg)
            diffs = [
                f"{k} ({saved.get(k)!r} -> {now.get(k)!r})" for k in COMPATIBLE_KEYS if saved.get(k) != now.get(k)
            ]
            if diffs:
                raise ConfigError(
                    f"resume: cannot continue {ckpt}: settings differ from the checkpoint's: {'; '.join(diffs)}. "
                    "Use another output_dir (or resume=never) to start a new run"
                )
        return ckpt

    def _setup(self) -> None:
        cfg = self.config
        self._resume_from = self._resume_checkpoint()
        acc = self.acc = self._accelerator()
        self.main = acc.is_main_process
        if not self.main:  # one process reports; the others only warn
            logger.setLevel(logging.WARNING)
        self.device = acc.device
        self.fsdp = self._fsdp_version()
        # Recipe and rollout (cheap objects; the recipe may ask for more texts to encode), then the reward, checked
        # against them and the config before any part of the generator is loaded or any prompt encoded.
        rollout = build_rollout(cfg.rollout.kind, cfg.rollout.settings)
        self.recipe = build_method(cfg.method.name, cfg.method.settings, rollout)
        self._check_distributed_mode()
        self.weight_dtype = DTYPES[cfg.resolved_weight_dtype(sharded=bool(self.fsdp))]
        self.reward = self._load_reward()
        logger.info("%s", self._distributed_summary())
        if self.main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._remove_partial_writes()
            atomic_write_text(self.output_dir / "config.yaml", dump_config(cfg))

        # Prompts and their text embeddings (the text encoder is loaded only for prompts not cached yet).
        self.train_prompts = read_prompts(cfg.prompts)
        vs = cfg.validation
        val_source = read_prompts(vs.prompts) if vs.prompts else self.train_prompts
        self.val_prompts = [val_source[i % len(val_source)] for i in range(vs.num_videos)]
        self.use_cfg = vs.guidance_scale > 1.0
        self.cache = TextEmbeddingCache(
            cfg.model, cfg.revision, cache_dir=cfg.text_cache_dir, max_sequence_length=cfg.max_sequence_length
        )
        wanted = [*self.train_prompts, *self.val_prompts, *([vs.negative_prompt] if self.use_cfg else []),
                  *self.recipe.extra_prompts()]
        with acc.main_process_first():
            n = self.cache.ensure(wanted, device=self.device, progress=self.progress and self.main)
        if n:
            logger.info("encoded %d prompts into %s", n, self.cache.cache_dir)

        # Transformer: frozen base + LoRA (fp32 adapters), or every weight for a full fine-tune.
        torch.manual_seed(cfg.seed)  # LoRA init draws from the global generator
        transformer = load_transformer(cfg.model, cfg.revision, dtype=self.weight_dtype)
        transformer.requires_grad_(False)
        if cfg.finetune == "lora":
            from peft import LoraConfig

            _check_targets_present(transformer, cfg.lora.targets, cfg.model)
            lc = LoraConfig(
                r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                target_modules=list(cfg.lora.targets), init_lora_weights=True,
            )
            try:
                transformer.add_adapter(lc)
            except ValueError as e:
                raise ConfigError(f"lora.targets: {e}") from None
            for p in transformer.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            transformer.requires_grad_(True)
        if cfg.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        self.params = [p for p in transformer.parameters() if p.requires_grad]
        self.trainable_names = [n for n, p in transformer.named_parameters() if p.requires_grad]

        reference = None
        if self.recipe.needs_reference():
            reference = self._reference_fn(transformer)

        # Optimizer and schedule.
        from diffusers.optimization import get_scheduler

        o = cfg.optimizer
        optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
        self.scheduler = get_scheduler(
            o.scheduler, optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=cfg.max_steps
        )
        self.model, self.optimizer = acc.prepare(transformer, optimizer)
        self.transformer = acc.unwrap_model(self.model)
        # Every forward goes through `forward_model`. Under FSDP the unwrapped module's parameters are shards, so
        # gradient-free calls, the LoRA-disabled reference and validation all use the FSDP module, which gathers
        # each block's weights for its forward. Under DDP, gradient-free calls skip the wrapper so its reducer
        # only sees passes that backpropagate. (FSDP2 shards the module in place: both names are one object.)
        self.forward_model = self.model if self.fsdp else self.transformer

        shape = latent_shape(1, cfg.video.num_frames, cfg.video.height, cfg.video.width)
        self.random = RolloutRandom.from_seed(cfg.seed, acc.process_index)
        self.data_generator = torch.Generator().manual_seed(cfg.seed * 7919 + 1 + acc.process_index)
        self.ctx = RecipeContext(
            denoiser=TransformerDenoiser(self.model, self.forward_model, dtype=self.weight_dtype, reference=reference),
            reward=self.reward, random=self.random, sample_shape=shape[1:], device=self.device,
            accelerator=acc, config=cfg,
            text_embeds=lambda prompts: self.cache.batch(prompts, device=self.device, dtype=self.weight_dtype),
            decode=self._decode,
        )
        self.recipe.setup(self.ctx)
        self.monitor = RewardHackingMonitor(cfg.monitor)
        self.vae = None
        self.val_scheduler = None
        self.step = 0
        self.skipped_total = 0
        self._consecutive_skips = 0
        self.last_report: ValidationReport | None = None
        self.validated_step: int | None = None
        if self._resume_from is not None:
            self._load_checkpoint(self._resume_from)

        if acc.log_with:
            init_kwargs = {}
            if cfg.logging.report_to == "tensorboard" and self.step:
                init_kwargs["tensorboard"] = {"purge_step": self.step + 1}
            acc.init_trackers(cfg.logging.project, config=_flat(config_to_dict(cfg)), init_kwargs=init_kwargs)

    def _remove_partial_writes(self) -> None:
        """What a killed run left half-written (``.checkpoint-N.tmp-*`` folders, ``.config.yaml.*`` files):
        never read, removed."""
        import shutil

        for root in (self.output_dir, self.output_dir / "validation"):
            if not root.is_dir():
                continue
            for p in root.iterdir():
                if p.is_dir() and p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                    shutil.rmtree(p, ignore_errors=True)
                elif p.is_file() and p.name.startswith((".config.yaml.", f".{METRICS_FILE}.")):
                    p.unlink(missing_ok=True)

    def _reference_fn(self, transformer: torch.nn.Module) -> Any:
        """The frozen base model's velocity: the same module with LoRA disabled, or a frozen copy (full)."""
        if self.config.finetune == "lora":
            def reference(x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
                self.transformer.disable_adapters()  # peft's switch, on the (possibly sharded) modules themselves
                try:
                    return self.ctx.denoiser._call(self.forward_model, x, sigma, text)
                finally:
                    self.transformer.enable_adapters()
            return reference
        # Not under FSDP (refused in _check_distributed_mode): the copy would be whole on every process.
        frozen = copy.deepcopy(transformer).requires_grad_(False).eval().to(self.device)
        if self.config.gradient_checkpointing:
            frozen.disable_gradient_checkpointing()

        def reference_full(x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            return self.ctx.denoiser._call(frozen, x, sigma, text)
        return reference_full

    # ================================================================================= state
    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "skipped_total": self.skipped_total,
            "monitor": self.monitor.state_dict(),
            "num_processes": self.acc.num_processes,
        }

    def _random_state(self) -> dict[str, Any]:
        import random as pyrandom

        state: dict[str, Any] = {
            "rollout": self.random.state_dict(),
            "data": self.data_generator.get_state(),
            "torch": torch.get_rng_state(),
            "python": pyrandom.getstate(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _set_random_state(self, state: dict[str, Any]) -> None:
        import random as pyrandom

        self.random.load_state_dict(state["rollout"])
        self.data_generator.set_state(state["data"])
        torch.set_rng_state(state["torch"])
        pyrandom.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def _is_fsdp(self) -> bool:
        from accelerate.utils import DistributedType

        return self.acc.distributed_type == DistributedType.FSDP

    def _fsdp_version(self) -> int:
        """0 without FSDP, else accelerate's FSDP version (1: FullyShardedDataParallel, 2: fully_shard)."""
        if not self._is_fsdp():
            return 0
        return int(getattr(self.acc.state.fsdp_plugin, "fsdp_version", 1) or 1)

    def _distributed_summary(self) -> str:
        """One log line saying how the run is spread: ``distributed: FSDP2, 4 process(es), device cuda:0``."""
        acc = self.acc
        if acc.num_processes == 1 and not self.fsdp:
            return f"single process on {acc.device}"
        mode = f"FSDP{self.fsdp}" if self.fsdp else str(acc.distributed_type).rsplit(".", 1)[-1]
        return f"distributed: {mode}, {acc.num_processes} process(es), device {acc.device}"

    def _check_distributed_mode(self) -> None:
        """Refuse, before any model is loaded, the settings a sharded (FSDP) run cannot honour."""
        if not self.fsdp:
            return
        cfg = self.config
        if cfg.weight_dtype not in (None, "fp32"):
            raise ConfigError(
                f"weight_dtype: {cfg.weight_dtype} is not supported under FSDP, which shards fp32 master weights and "
                "computes in the precision of mixed_precision itself; leave weight_dtype null (or fp32)"
            )
        if cfg.finetune == "full" and self.recipe.needs_reference():
            raise ConfigError(
                "method: KL / anti-drift need the frozen base model; for finetune=full under FSDP that is an unsharded "
                "copy of the whole transformer on every process. Use finetune=lora (the reference is then the same "
                "sharded model with its adapters disabled) or set method.kl_weight=0 and method.anti_drift_weight=0"
            )

    def _load_reward(self) -> LatentReward:
        """The frozen fp32 reward, on the device; its folder/Hub id, kind, latent space and reward mode are checked
        against the config and the recipe here, before the text encoder or the transformer is loaded."""
        from ..rewards.errors import LatentRewardsError
        from ..rewards.hub import load_reward

        cfg = self.config
        try:
            reward = load_reward(cfg.reward.path, revision=cfg.reward.revision, map_location="cpu")
            reward.expect_latent_space("wan2.1")
        except LatentRewardsError as e:
            if str(e).startswith("reward."):
                raise
            raise type(e)(f"reward.path: {cfg.reward.path}: {e}") from None
        if cfg.reward.mode is not None:
            if not hasattr(reward, "set_reward_mode"):
                raise ConfigError(f"reward.mode: the {reward.kind} reward has no reward modes; leave reward.mode null")
            reward.set_reward_mode(cfg.reward.mode, cfg.reward.tau)
        if cfg.reward.chunk_size is not None and hasattr(reward, "chunk_size"):
            reward.chunk_size = cfg.reward.chunk_size
        self.recipe.check_reward(reward)
        return reward.float().to(self.device).freeze()

    def _gather_options(self) -> Any:
        """How sharded state is gathered: whole tensors, moved to host memory on an accelerator (then only rank 0
        receives them). On a CPU run they already are in host memory, and FSDP1's offload of CPU tensors crashes."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=self.device.type != "cpu")

    def _full_state(self) -> dict[str, torch.Tensor]:
        """The transformer's full state dict (gathered across processes under FSDP; every process must call)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            return get_model_state_dict(self.model, options=self._gather_options())
        return self.acc.get_state_dict(self.model)

    def _optimizer_state(self) -> dict[str, Any]:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer.optimizer, options=self._gather_options())
        return self.optimizer.state_dict()

    def _load_optimizer_state(self, state: dict[str, Any]) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(
                self.model, self.optimizer.optimizer, state, options=StateDictOptions(full_state_dict=True)
            )
        else:
            self.optimizer.load_state_dict(state)

    def _load_checkpoint(self, ckpt: Path) -> None:
        st = load_training_state(ckpt, self.acc.process_index)
        ts = st["trainer_state"]
        if int(ts.get("num_processes", 1)) != self.acc.num_processes:
            raise CheckpointError(
                f"{ckpt} was saved by {ts.get('num_processes')} processes; resume with the same number "
                f"(this run has {self.acc.num_processes})"
            )
        if self.config.finetune == "lora":
            trainable = st["trainable"]
            if trainable is None:
                raise CheckpointError(f"{ckpt}: training_state/trainable.safetensors is missing")
        else:
            from diffusers import WanTransformer3DModel

            trainable = WanTransformer3DModel.from_pretrained(str(ckpt / "transformer")).state_dict()
        missing = sorted(set(self.trainable_names) - set(trainable))
        if missing:
            raise CheckpointError(f"{ckpt}: trainable weights missing from the checkpoint: {missing[:6]}")
        if self.fsdp:  # sharded parameters: let torch scatter the full tensors
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, {n: trainable[n] for n in self.trainable_names},
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            own = dict(self.transformer.named_parameters())
            with torch.no_grad():
                for name in self.trainable_names:
                    own[name].copy_(trainable[name].to(own[name].dtype))
        self._load_optimizer_state(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self._set_random_state(st["random_state"])
        self.recipe.load_state_dict(st["recipe_state"])
        self.monitor.load_state_dict(ts.get("monitor", {}))
        self.step = int(ts["step"])
        self.skipped_total = int(ts.get("skipped_total", 0))
        if self.main:
            self._truncate_metrics(self.step)
        logger.info("resumed from %s at step %d", ckpt, self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after ``step`` (a crash after the checkpoint), so the log reads as one run."""
        path = self.output_dir / METRICS_FILE
        if not path.is_file():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if int(rec.get("step", 0)) <= step:
                keep.append(line)
        atomic_write_text(path, "".join(k + "\n" for k in keep))

    # ================================================================================= one step
    def _next_batch(self) -> TrainBatch:
        idx = torch.randint(0, len(self.train_prompts), (self.config.batch_size,), generator=self.data_generator)
        prompts = [self.train_prompts[int(i)] for i in idx]
        embeds = self.cache.batch(prompts, device=self.device, dtype=self.weight_dtype)
        return TrainBatch(prompts=prompts, text_embeds=embeds, indices=[int(i) for i in idx])

    def _optimizer_step(self) -> dict[str, float]:
        cfg, acc = self.config, self.acc
        accum = cfg.gradient_accumulation_steps
        sums: dict[str, float] = defaultdict(float)
        nonfinite = False
        for micro in range(accum):
            batch = self._next_batch()
            sync = acc.no_sync(self.model) if micro < accum - 1 and acc.num_processes > 1 else contextlib.nullcontext()
            with sync:
                with acc.autocast():
                    result = self.recipe.training_step(self.ctx, batch)
                loss = result.loss / accum
                if not bool(torch.isfinite(loss.detach())):
                    nonfinite = True
                acc.backward(loss)
            sums["loss"] += _float(result.loss) / accum
            for k, v in result.logs.items():
                if isinstance(v, (int, float, torch.Tensor)) and not k.startswith("_"):
                    sums[k] += _float(v) / accum
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        grad_norm = _float(grad_norm) if grad_norm is not None else float("nan")
        flag = torch.tensor([1.0 if (nonfinite or not math.isfinite(grad_norm)) else 0.0], device=self.device)
        skip = cfg.skip_nonfinite and bool(acc.reduce(flag, reduction="sum").item() > 0)
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_total += 1
            self._consecutive_skips += 1
            if self._consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                raise NonFiniteError(
                    f"{MAX_CONSECUTIVE_SKIPS} optimizer steps in a row had a NaN/Inf loss or gradient; lower "
                    "optimizer.lr or use mixed_precision=bf16"
                )
        else:
            self._consecutive_skips = 0
            self.optimizer.step()
            if not acc.optimizer_step_was_skipped:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        logs = dict(sums)
        if acc.num_processes > 1:  # report the mean over processes, not rank 0's share
            keys = sorted(logs)
            mean = acc.reduce(torch.tensor([logs[k] for k in keys], device=self.device), reduction="mean")
            logs = dict(zip(keys, mean.tolist()))
        logs.update(grad_norm=grad_norm, lr=float(self.scheduler.get_last_lr()[0]), skipped=float(skip))
        return logs

    # ================================================================================= validation
    def _validation_size(self) -> tuple[int, int, int]:
        vs, v = self.config.validation, self.config.video
        return vs.height or v.height, vs.width or v.width, vs.num_frames or v.num_frames

    def _pipeline(self) -> Any:
        from diffusers import WanPipeline

        if self.vae is None:
            self.vae = load_vae(self.config.model, revision=self.config.revision)
            self.val_scheduler = load_scheduler(self.config.model, self.config.revision)
        pipe = WanPipeline(
            tokenizer=None, text_encoder=None, vae=self.vae, scheduler=self.val_scheduler,
            transformer=self.forward_model,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def _generate(self, *, base: bool = False) -> tuple[torch.Tensor, list[np.ndarray]]:
        """Validation latents ``[N, C, T, H, W]`` (normalised) and decoded uint8 videos, at fixed seeds."""
        vs = self.config.validation
        h, w, f = self._validation_size()
        pipe = self._pipeline()  # every process samples the same videos: under FSDP each forward is collective
        ne = self.cache.batch([vs.negative_prompt], device=self.device, dtype=self.weight_dtype) if self.use_cfg else None
        was_training = self.forward_model.training
        self.forward_model.eval()
        if base:
            self.transformer.disable_adapters()
        self.vae.to(self.device)
        latents, videos = [], []
        try:
            for i, prompt in enumerate(self.val_prompts):
                g = torch.Generator("cpu").manual_seed(vs.seed + i)
                pe = self.cache.batch([prompt], device=self.device, dtype=self.weight_dtype)
                with self.acc.autocast():
                    lat = pipe(
                        prompt_embeds=pe, negative_prompt_embeds=ne, height=h, width=w, num_frames=f,
                        num_inference_steps=vs.num_inference_steps, guidance_scale=vs.guidance_scale,
                        generator=g, output_type="latent",
                    ).frames
                videos.append(frames_to_uint8(decode_latents(pipe, lat, "np")[0]))
                latents.append(lat.float().cpu())
        finally:
            if base:
                self.transformer.enable_adapters()
            self.vae.to("cpu")
            if was_training:
                self.forward_model.train()
            free()
        return torch.cat(latents), videos

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        """Normalised latents -> uint8 videos with the VAE (moved to the device for the call only)."""
        pipe = self._pipeline()
        self.vae.to(self.device)
        try:
            return [frames_to_uint8(decode_latents(pipe, z[None].to(self.device), "np")[0]) for z in latents]
        finally:
            self.vae.to("cpu")
            free()

    def _score(self, latents: torch.Tensor) -> tuple[float, float | None]:
        m = self.reward.metrics(latents.to(self.device))
        r_dist = m.get("r_dist")
        return float(m["reward"].mean()), (None if r_dist is None else float(r_dist.mean()))

    def _validation_dir(self, step: int | str) -> Path:
        return self.output_dir / "validation" / (f"step-{step}" if isinstance(step, int) else step)

    def _write_videos(self, folder: Path, videos: list[np.ndarray]) -> None:
        fps = self.config.validation.fps
        for i, v in enumerate(videos):
            write_video(v, folder / f"video_{i:02d}.mp4", fps)

    def _baseline(self) -> list[np.ndarray] | None:
        """The base model's validation videos (generated at step 0, kept as raw frames for exact change)."""
        if getattr(self, "_base_videos", None) is not None:
            return self._base_videos
        base_dir = self._validation_dir("base")
        npz = base_dir / "frames.npz"
        if npz.is_file():
            with np.load(npz, allow_pickle=False) as data:
                self._base_videos = [data[f"video_{i}"] for i in range(len(data.files))]
            return self._base_videos
        if self.step > 0 and self.config.finetune != "lora":
            logger.warning("base validation videos are missing; content change cannot be measured for this run")
            return None
        latents, videos = self._generate(base=self.step > 0)
        reward, r_dist = self._score(latents)
        if self.main:
            with atomic_directory(base_dir) as tmp:
                np.savez(tmp / "frames.npz", **{f"video_{i}": v for i, v in enumerate(videos)})
                self._write_videos(tmp, videos)
                (tmp / "metrics.json").write_text(json.dumps({"reward": reward, "r_dist": r_dist}, indent=2))
        if not self.monitor.history:
            self.monitor.set_baseline(videos)
            rep = self.monitor.update(0, reward=reward, r_dist=r_dist, metrics=self.monitor.measure(videos, None))
            self._log_validation(rep)
        self._base_videos = videos
        return videos

    def _validate(self, step: int) -> ValidationReport:
        base = self._baseline()
        if self.monitor.base_stats is None and base is not None:
            self.monitor.set_baseline(base)
        latents, videos = self._generate()
        reward, r_dist = self._score(latents)
        rep = self.monitor.update(step, reward=reward, r_dist=r_dist, metrics=self.monitor.measure(videos, base))
        if self.main:
            with atomic_directory(self._validation_dir(step)) as tmp:
                self._write_videos(tmp, videos)
                (tmp / "metrics.json").write_text(json.dumps(rep.as_dict(), indent=2) + "\n")
        self._log_validation(rep)
        self.last_report, self.validated_step = rep, step
        return rep

    def _log_validation(self, rep: ValidationReport) -> None:
        logger.info("validation %s", rep.summary())
        rec = {"type": "validation", **{k: v for k, v in rep.as_dict().items() if k != "flags"}, "flags": rep.flags}
        self._append_metrics(rec)
        if self.acc.log_with:
            vals = {f"val/{k}": v for k, v in rep.as_dict().items() if isinstance(v, (int, float)) and v is not None}
            self.acc.log(vals, step=rep.step)

    def _append_metrics(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        # Strict JSON: a NaN/Inf (a skipped step's loss) is written as null.
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.output_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
            f.flush()

    # ================================================================================= writing
    def _card_info(self, step: int, selected: str = "") -> dict[str, Any]:
        return {
            "config": config_to_dict(self.config), "step": step, "best_step": self.monitor.best_step,
            "history": self.monitor.history, "selected": selected, "stop_reason": self.monitor.stop_reason,
            "num_processes": self.acc.num_processes,
        }

    def _write_export(self, folder: Path, step: int, logs: dict[str, float], state: dict[str, torch.Tensor],
                      *, selected: str = "") -> None:
        """Weights in both formats, card, config, metrics and this step's validation videos (main process)."""
        save_adapter(folder, self.transformer, name=self.config.name, finetune=self.config.finetune, state=state)
        atomic_write_text(folder / "training_config.yaml", dump_config(self.config))
        metrics = {
            "step": step, "train": logs,
            "validation": self.last_report.as_dict() if self.validated_step == step and self.last_report else None,
            "best_step": self.monitor.best_step, "stop_reason": self.monitor.stop_reason,
            "history": self.monitor.history,
        }
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        vdir = self._validation_dir(step)
        if self.validated_step == step and vdir.is_dir():
            (folder / "validation").mkdir()
            for mp4 in sorted(vdir.glob("*.mp4")):
                (folder / "validation" / mp4.name).write_bytes(mp4.read_bytes())
        write_model_card(folder, self._card_info(step, selected))

    def _save_checkpoint(self, step: int, logs: dict[str, float]) -> Path:
        from accelerate.utils import gather_object

        random_states = gather_object([self._random_state()])
        full = self._full_state()
        optimizer_state = self._optimizer_state()
        target = self.output_dir / f"checkpoint-{step}"
        if self.main:
            trainable = {n: full[n] for n in self.trainable_names} if self.config.finetune == "lora" else None
            with atomic_directory(target) as tmp:
                self._write_export(tmp, step, logs, full)
                save_training_state(
                    tmp, trainable=trainable, optimizer=optimizer_state, scheduler=self.scheduler.state_dict(),
                    random_states=random_states, trainer_state=self._trainer_state(),
                    recipe_state=self.recipe.state_dict(),
                )
            for removed in prune_checkpoints(self.output_dir, self.config.keep_last):
                logger.debug("removed old checkpoint %s", removed)
        self.acc.wait_for_everyone()
        return target

    def _export_best(self, step: int, logs: dict[str, float], *, selected: str) -> Path:
        best = self.output_dir / "best"
        full = self._full_state()
        if self.main:
            with atomic_directory(best) as tmp:
                self._write_export(tmp, step, logs, full, selected=selected)
        self.acc.wait_for_everyone()
        return best

    # ================================================================================= the run
    def train(self) -> TrainResult:
        """Run until ``max_steps``, an early stop, or Ctrl-C; returns what was produced."""
        with cpu_threads(self.config.cpu_threads):
            return self._train()

    def _train(self) -> TrainResult:
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._setup()
        cfg, acc = self.config, self.acc
        val_every = cfg.validation.every
        logs: dict[str, float] = {}
        stop_reason = self.monitor.stop_reason
        interrupted = False
        if stop_reason:
            logger.info("this run already stopped early: %s", stop_reason)
        if val_every and not stop_reason:
            self._baseline()
        bar = tqdm(
            total=cfg.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
            disable=not (self.progress and self.main),
        )
        start_time = time.time()
        with _stop_on_signals() as stop, logging_redirect_tqdm():
            while self.step < cfg.max_steps and not stop_reason:
                logs = self._optimizer_step()
                self.step += 1
                self.ctx.step = self.step
                self._append_metrics({"type": "train", "step": self.step, **logs})
                if acc.log_with and self.step % cfg.logging.log_every == 0:
                    acc.log({f"train/{k}": v for k, v in logs.items()}, step=self.step)
                self.recipe.on_step_end(self.ctx, self.step, logs)
                bar.update(1)
                bar.set_postfix({k: f"{logs[k]:.4g}" for k in ("loss", "reward") if k in logs})

                last = self.step == cfg.max_steps
                report = None
                if val_every and (self.step % val_every == 0 or last):
                    report = self._validate(self.step)
                    if report.stop:
                        stop_reason = report.reason
                        logger.warning(report.reason)
                flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.device)
                stop_now = bool(acc.reduce(flag, reduction="sum").item() > 0)
                due = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                if due or last or stop_reason or stop_now:
                    self._save_checkpoint(self.step, logs)
                if report is not None and report.is_best:
                    self._export_best(self.step, logs, selected="best by the reward-hacking rule")
                if stop_now:
                    interrupted = True
                    logger.warning(
                        "stopped by %s at step %d; checkpoint saved. Run the same command again (or add --resume) "
                        "to continue", stop.signal_name or "signal", self.step,
                    )
                    break
        bar.close()
        if not val_every and self.step > 0 and not interrupted:
            # Without validation there is no selection rule: the last step is the exported one.
            self.monitor.best_step = self.step
            self._export_best(self.step, logs, selected="last step (validation disabled)")
        best_dir = self.output_dir / "best"
        if self.main and self.monitor.best_step is None and not interrupted and val_every:
            logger.warning("no validation step passed the reward-hacking rule; best/ was not written")
        acc.wait_for_everyone()
        if acc.log_with:
            acc.end_training()
        logger.info("finished at step %d in %.1f s; outputs in %s", self.step, time.time() - start_time, self.output_dir)
        result = TrainResult(
            output_dir=self.output_dir, step=self.step, best_step=self.monitor.best_step,
            best_dir=best_dir if best_dir.is_dir() else None, stop_reason=stop_reason, interrupted=interrupted,
            checkpoints=[p for _, p in list_checkpoints(self.output_dir)], last_logs=logs, main_process=self.main,
        )
        if cfg.hub.push_at_end and self.main and result.best_dir is not None and not interrupted:
            from .hub import push

            url = push(result.best_dir, cfg.hub.repo_id, private=cfg.hub.private)
            logger.info("pushed %s to %s", result.best_dir, url)
        return result


def train(config: TrainConfig, *, resume: str | None = None, progress: bool = True) -> TrainResult:
    """Train with ``config`` (see :class:`Trainer`)."""
    return Trainer(config, resume=resume, progress=progress).train()
