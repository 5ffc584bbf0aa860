"""Fit a Shell-LCC manifold to a folder of latents: the authors' two-stage recipe, steps-based and resumable.

Stage 1 (LCC skeleton): anchors initialised from real voxels, the coder and anchors trained with Adam on
``mse(z_hat, z) + sum_k gamma_k ||z - c_k||^2`` (+ optional usage-KL and anchor-to-voxel regularisers, off by
default; the authors use 0.1 when enabled). Stage 2 (shell): skeleton frozen, BatchNorm in eval mode, only the shell
head trained on ``mean (r - 1)^2 + 0.01 mean g^2``. Batches are ``batch_voxels`` random voxels from
``clips_per_step`` clips per process (:class:`~.data.VoxelSampler`), a pure function of ``(seed, step, rank)``.

Runs as one process or under ``accelerate launch`` (DDP of the loss module; gradients averaged across processes,
so ``batch_voxels`` is per process; only the main process writes). The output folder ``out`` is, at the end, a
reward folder (``config.json`` + ``model.safetensors`` + model card, loaded by ``ShellLCC.from_pretrained``) that
also holds ``train_log.jsonl``, ``fit_summary.json``, ``r_dist_hist.png``, ``train_curves.png`` and the last
training checkpoint (``checkpoint/state.pt``, safe to delete). While training, ``out`` holds only the log and the
checkpoint; the finished folder replaces it in one rename. A checkpoint (model, optimizer, step, stage, RNG) is
written atomically every ``checkpoint_every`` steps and at the stage boundary; ``resume=True`` continues from it and
gives the same weights and losses as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..rewards.errors import CheckpointError, ConfigError
from ..rewards.hub import atomic_directory, atomic_write_file, atomic_write_text, reward_model_card, save_reward
from ..rewards.latent_space import get_latent_space
from ..rewards.shell_lcc import ShellLCC
from .data import VoxelSampler, _generator, list_latent_items
from .report import plot_curves, plot_histograms, save_panels, summary_stats

__all__ = ["FitConfig", "FitResult", "fit_manifold", "load_fit_checkpoint", "CHECKPOINT_FORMAT"]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "latent-rewards-fit-manifold/1"
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.pt"
LOG_FILE = "train_log.jsonl"
#: Fields that change the optimisation trajectory: a resumed run must use the same values.
_TRAJECTORY_FIELDS = (
    "anchors", "hidden", "lr", "shell_lr", "seed", "batch_voxels", "clips_per_step", "max_latent_frames",
    "lambda_usage", "lambda_basis", "log_scale_weight", "latent_space", "layout",
)


@dataclass
class FitConfig:
    """Hyper-parameters of a manifold fit. Defaults follow the paper's model (4096 anchors, hidden 512, Adam
    1e-3, first 16 latent frames, 2 clips per process and step); the step counts are this project's choice for
    about 1k clips (the authors train 500 + 100 epochs of all voxels)."""

    anchors: int = 4096
    hidden: int = 512
    lcc_steps: int = 20000
    shell_steps: int = 5000
    batch_voxels: int = 65536
    lr: float = 1e-3
    shell_lr: float = 1e-3
    seed: int = 0
    clips_per_step: int = 2
    max_latent_frames: int | None = 16
    cache_clips: int = 8
    lambda_usage: float = 0.0
    lambda_basis: float = 0.0
    log_scale_weight: float = 0.01
    checkpoint_every: int = 500
    log_every: int = 10
    hist_clips: int = 256
    latent_space: str = "wan2.1"
    layout: str | None = None

    def validate(self) -> None:
        for name in ("anchors", "hidden", "batch_voxels", "clips_per_step", "cache_clips", "checkpoint_every",
                     "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"fit-manifold: {name} must be a positive integer, got {v!r}")
        for name in ("lcc_steps", "shell_steps", "hist_clips"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"fit-manifold: {name} must be an integer >= 0, got {v!r}")
        for name in ("lr", "shell_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"fit-manifold: {name} must be > 0, got {getattr(self, name)!r}")
        for name in ("lambda_usage", "lambda_basis", "log_scale_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"fit-manifold: {name} must be >= 0, got {getattr(self, name)!r}")
        if self.max_latent_frames is not None and self.max_latent_frames < 1:
            raise ConfigError(f"fit-manifold: max_latent_frames must be >= 1, got {self.max_latent_frames}")
        get_latent_space(self.latent_space)

    @property
    def total_steps(self) -> int:
        return self.lcc_steps + self.shell_steps


@dataclass
class FitResult:
    """What :func:`fit_manifold` returns (on every process; ``reward`` is the trained model, frozen)."""

    out_dir: Path
    reward: ShellLCC
    step: int
    total_steps: int
    finished: bool
    summary: dict[str, Any] = field(default_factory=dict)
    is_main_process: bool = True


class _Objective(nn.Module):
    """The loss of the current stage as a module's forward, so DDP averages its gradients."""

    def __init__(self, reward: ShellLCC, cfg: FitConfig) -> None:
        super().__init__()
        self.reward = reward
        self.cfg = cfg
        self.stage = 1

    def forward(self, zf: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if self.stage == 1:
            return self.reward.lcc_loss(zf, lambda_usage=self.cfg.lambda_usage, lambda_basis=self.cfg.lambda_basis)
        return self.reward.shell_loss(zf, log_scale_weight=self.cfg.log_scale_weight)


# ---------------------------------------------------------------------------------------------- checkpoints
def load_fit_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a fit checkpoint (``weights_only=True``) and check that it is one."""
    path = Path(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable fit-manifold checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a latent-rewards fit-manifold checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def _check_resumable(saved: dict[str, Any], cfg: FitConfig, step: int, path: Path) -> None:
    diff = [f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in _TRAJECTORY_FIELDS if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise ConfigError(
            f"{path}: cannot resume with different settings ({'; '.join(diff)}); use the original settings or "
            "--overwrite to start over"
        )
    if saved.get("lcc_steps") != cfg.lcc_steps and step >= min(int(saved.get("lcc_steps", 0)), cfg.lcc_steps):
        raise ConfigError(
            f"{path}: the checkpoint is at step {step}, past stage 1 ({saved.get('lcc_steps')} LCC steps); "
            "--lcc-steps can only change while stage 1 is still running"
        )


# ---------------------------------------------------------------------------------------------- the fit
def _set_stage(reward: ShellLCC, stage: int) -> list[nn.Parameter]:
    reward.requires_grad_(False)
    params = reward.skeleton_parameters() if stage == 1 else reward.shell_parameters()
    for p in params:
        p.requires_grad_(True)
    # Stage 1 trains BatchNorm with batch statistics; stage 2 freezes the skeleton, BatchNorm in eval mode.
    reward.train(stage == 1)
    return params


def _prepare_out(out: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """Check the output folder; return the checkpoint to resume from, if any (main process only)."""
    ckpt = out / CHECKPOINT_DIR / STATE_FILE
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; expected a folder")
    if ckpt.is_file() and resume:
        return ckpt
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            what = "a checkpoint from an earlier fit" if ckpt.is_file() else "files"
            raise ConfigError(
                f"--out {out} already holds {what}; pass --resume to continue a fit or --overwrite to start over"
            )
        # Remove only what a fit writes while running; the finished folder replaces the rest atomically.
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        (out / LOG_FILE).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return None


def _model_card(reward: ShellLCC, cfg: FitConfig, summary: dict[str, Any]) -> str:
    r = summary.get("train_r_dist", {})
    lines = [
        reward_model_card(reward).rstrip(),
        "",
        "## Training",
        "",
        f"Fitted with `latent-rewards fit-manifold` on {summary.get('clips', '?')} clips: {cfg.lcc_steps} LCC steps "
        f"and {cfg.shell_steps} shell steps of {cfg.batch_voxels} voxels per process "
        f"({summary.get('world_size', 1)} process(es)), seed {cfg.seed}.",
    ]
    if r.get("n"):
        lines.append(f"Training-set R_dist per clip: {r['mean']:.3f} ± {r['std']:.3f} (n={r['n']}).")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def _training_distances(reward: ShellLCC, sampler: VoxelSampler, cfg: FitConfig) -> dict[str, Any]:
    """Per-clip R_dist / LCC distance on up to ``hist_clips`` training clips, and per-voxel r on one batch."""
    c = sampler.space.channels
    order = torch.randperm(len(sampler), generator=_generator(cfg.seed, 6))[: cfg.hist_clips].tolist()
    r_dist, lcc = [], []
    for ci in order:
        flat = sampler.clip(ci)
        m = reward.metrics(flat.t().reshape(1, c, -1, 1, 1))
        r_dist.append(float(m["r_dist"][0]))
        lcc.append(float(m["lcc_distance"][0]))
    voxels = sampler.batch(cfg.total_steps)
    voxel_r = reward.distance_map(voxels.t().reshape(1, c, -1, 1, 1)).flatten()
    return {"r_dist": r_dist, "lcc_distance": lcc, "voxel_r": voxel_r.tolist()}


def _write_outputs(out: Path, reward: ShellLCC, cfg: FitConfig, sampler: VoxelSampler, world_size: int) -> dict[str, Any]:
    dists = _training_distances(reward, sampler, cfg)
    summary = {
        "clips": len(sampler),
        "world_size": world_size,
        "steps": cfg.total_steps,
        "train_r_dist": summary_stats(dists["r_dist"]),
        "train_lcc_distance": summary_stats(dists["lcc_distance"]),
        "train_voxel_r": summary_stats(dists["voxel_r"]),
        "config": dataclasses.asdict(cfg),
    }
    log = _read_log(out / LOG_FILE)
    with atomic_directory(out) as tmp:
        save_reward(reward, tmp, model_card=_model_card(reward, cfg, summary))
        if (out / LOG_FILE).is_file():
            shutil.copy2(out / LOG_FILE, tmp / LOG_FILE)
        if (out / CHECKPOINT_DIR).is_dir():
            shutil.copytree(out / CHECKPOINT_DIR, tmp / CHECKPOINT_DIR)
        (tmp / "fit_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        save_panels(
            tmp / "r_dist_hist.png",
            [
                lambda ax: plot_histograms(ax, {"training clips": dists["r_dist"]}, bins=30, title="R_dist per clip",
                                           xlabel="R_dist (mean r over a clip)", density=False),
                lambda ax: plot_histograms(ax, {"training voxels": dists["voxel_r"]}, bins=60,
                                           title="r per voxel", xlabel="r", markers={"shell r = 1": 1.0}),
            ],
        )
        stages = {"stage 1 (LCC)": [e for e in log if e.get("stage") == 1 and "loss" in e],
                  "stage 2 (shell)": [e for e in log if e.get("stage") == 2 and "loss" in e]}
        stages = {k: v for k, v in stages.items() if v}
        if stages:
            save_panels(tmp / "train_curves.png", [
                lambda ax: plot_curves(ax, {k: [e["loss"] for e in v] for k, v in stages.items()},
                                       x={k: [e["step"] for e in v] for k, v in stages.items()},
                                       title="training loss", xlabel="step", ylabel="loss", logy=True),
            ], cols=1)
    return summary


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return out


def fit_manifold(
    latent_dir: str | Path,
    out_dir: str | Path,
    config: FitConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    max_steps_this_run: int | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    accelerator: Any = None,
    progress: bool = True,
) -> FitResult:
    """Fit a Shell-LCC manifold to the latents in ``latent_dir`` and write the reward folder ``out_dir``.

    Args:
        latent_dir: folder of latent files (``latent-rewards encode`` output or official ``.pt`` latents).
        out_dir: output folder (see the module docstring for its contents).
        config: hyper-parameters (:class:`FitConfig`).
        resume: continue from ``out_dir/checkpoint`` if present (else start fresh).
        overwrite: start over even if ``out_dir`` holds an earlier fit or other files.
        max_steps_this_run: stop (with a checkpoint) after this many steps; resume later.
        callback: ``callback(step, logs)`` after every step, on every process.
        accelerator: an ``accelerate.Accelerator`` (created if omitted).
        progress: show a tqdm progress bar (main process).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    cfg = config or FitConfig()
    cfg.validate()
    # A torchrun/`accelerate launch --multi_gpu` start without CUDA is a multi-CPU run (gloo): accelerate only
    # sets that up when asked for the CPU explicitly.
    acc = accelerator or Accelerator(cpu="LOCAL_RANK" in os.environ and not torch.cuda.is_available())
    out = Path(out_dir).expanduser().absolute()
    items = list_latent_items(latent_dir, layout=cfg.layout)
    sampler = VoxelSampler(
        items, batch_voxels=cfg.batch_voxels, seed=cfg.seed, rank=acc.process_index, world_size=acc.num_processes,
        clips_per_step=cfg.clips_per_step, cache_clips=cfg.cache_clips, max_frames=cfg.max_latent_frames,
        latent_space=cfg.latent_space,
    )
    # The main process validates the folder; the others learn the outcome from the checkpoint's presence.
    error: BaseException | None = None
    if acc.is_main_process:
        try:
            _prepare_out(out, resume=resume, overwrite=overwrite)
        except BaseException as e:  # re-raised after the barrier so other ranks do not hang
            error = e
    acc.wait_for_everyone()
    if error is not None:
        raise error
    state_path = out / CHECKPOINT_DIR / STATE_FILE
    ckpt_path = state_path if (resume and state_path.is_file()) else None

    torch.manual_seed(cfg.seed)
    reward = ShellLCC(num_bases=cfg.anchors, hidden_dim=cfg.hidden, latent_space=cfg.latent_space)
    step, opt_state, opt_stage = 0, None, 0
    if ckpt_path is not None:
        state = load_fit_checkpoint(ckpt_path)
        step = int(state["step"])
        _check_resumable(state["config"], cfg, step, ckpt_path)
        reward.load_weights(state["model"], source=str(ckpt_path))
        opt_state, opt_stage = state.get("optimizer"), int(state.get("optimizer_stage", 0))
        torch.set_rng_state(state["rng"])
        if state.get("data_fingerprint") != sampler.fingerprint() or state.get("world_size") != acc.num_processes:
            logger.warning("the data set or the number of processes changed since the checkpoint; the resumed run "
                           "will not match an uninterrupted one exactly")
        if acc.is_main_process:  # drop log lines past the checkpoint, as if the run had never gone further
            log = [e for e in _read_log(out / LOG_FILE) if e.get("step", 0) <= step]
            atomic_write_text(out / LOG_FILE, "".join(json.dumps(e) + "\n" for e in log))
        logger.info("resuming from %s at step %d/%d", ckpt_path, step, cfg.total_steps)
    else:
        reward.init_anchors(sampler.initial_voxels(cfg.anchors), generator=_generator(cfg.seed, 5))

    objective = _Objective(reward, cfg).to(acc.device)
    total = cfg.total_steps
    stop_at = total if max_steps_this_run is None else min(total, step + max(0, int(max_steps_this_run)))
    model = optimizer = None
    stage = 0

    def checkpoint() -> None:
        if acc.is_main_process:
            state = {
                "format": CHECKPOINT_FORMAT,
                "step": step,
                "optimizer_stage": stage,
                "model": {k: v.detach().cpu() for k, v in reward.state_dict().items()},
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "config": dataclasses.asdict(cfg),
                "rng": torch.get_rng_state(),
                "data_fingerprint": sampler.fingerprint(),
                "world_size": acc.num_processes,
            }
            atomic_write_file(state_path, lambda tmp: torch.save(state, tmp))
        acc.wait_for_everyone()

    bar = tqdm(total=total, initial=step, desc="fit-manifold", unit="step",
               disable=not (progress and acc.is_main_process), dynamic_ncols=True)
    t_start = time.time()
    try:
        while step < stop_at:
            want = 1 if step < cfg.lcc_steps else 2
            if want != stage:
                stage = want
                objective.stage = stage
                params = _set_stage(reward, stage)
                opt = torch.optim.Adam(params, lr=cfg.lr if stage == 1 else cfg.shell_lr)
                if opt_state is not None and opt_stage == stage:
                    opt.load_state_dict(opt_state)
                opt_state = None
                acc.free_memory()  # forget the previous stage's wrappers before wrapping again
                model, optimizer = acc.prepare(objective, opt)
                bar.set_description("stage 1 (LCC)" if stage == 1 else "stage 2 (shell)")
            zf = sampler.batch(step).to(acc.device)
            loss, logs = model(zf)
            acc.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step in (cfg.lcc_steps, total, stop_at):
                keys = sorted(logs)
                vals = acc.reduce(torch.tensor([logs[k] for k in keys], device=acc.device), reduction="mean")
                entry = {"step": step, "stage": stage, **{k: float(v) for k, v in zip(keys, vals.tolist())},
                         "lr": cfg.lr if stage == 1 else cfg.shell_lr,
                         "voxels_seen": step * cfg.batch_voxels * acc.num_processes,
                         "elapsed_s": round(time.time() - t_start, 3)}
                bar.set_postfix(loss=f"{entry['loss']:.4g}")
                if acc.is_main_process:
                    with open(out / LOG_FILE, "a", encoding="utf-8") as f:
                        f.write(json.dumps(entry) + "\n")
            if callback is not None:
                callback(step, logs)
            if step % cfg.checkpoint_every == 0 or step in (cfg.lcc_steps, total, stop_at):
                checkpoint()
    finally:
        bar.close()
    if stage == 0 and ckpt_path is None:
        checkpoint()  # no step run and nothing resumed: still leave a resumable state (all ranks: it syncs)

    reward = acc.unwrap_model(model).reward if model is not None else reward
    reward.freeze()
    finished = step >= total
    summary: dict[str, Any] = {}
    if finished:
        if acc.is_main_process:
            summary = _write_outputs(out, reward, cfg, sampler, acc.num_processes)
        acc.wait_for_everyone()
    return FitResult(out_dir=out, reward=reward, step=step, total_steps=total, finished=finished, summary=summary,
                     is_main_process=acc.is_main_process)
