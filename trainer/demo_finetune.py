"""Demo section "fine-tune": a few Shell-LCC LoRA steps on the tiny Wan model with the demo's fitted reward, then
the adapter is reloaded into a fresh diffusers pipeline to show that the reward moved.

It runs the real trainer (config ``tiny-cpu``: one-step rollout from noise at sigma in [0.7, 1], plain reward
``-R_dist``, LoRA on the tiny transformer) and the real export, so what the demo prints is what a user gets from
``latent-rewards train`` and ``pipe.load_lora_weights``. Two numbers are reported, base vs fine-tuned, at fixed
seeds: ``R_dist`` of the one-step prediction ``x0_hat = eps - sigma * v`` (what the recipe optimises) and of
videos sampled with the pipeline (what a user sees; on a random toy model this may move less).
"""

from __future__ import annotations

import shutil
from typing import Any

import torch

from .demo import DemoContext, DemoSection, SectionOutput, register_section
from .modeling import cpu_threads

__all__ = ["finetune_section", "DEMO_PROMPTS"]

DEMO_PROMPTS = ["a red fox trotting through snow", "waves crashing on black rocks", "a chef tossing vegetables",
                "a hot air balloon over fields"]


def _one_step_r_dist(pipe: Any, reward: Any, prompts: list[str], sigma: float = 0.85, seed: int = 0) -> float:
    from .rollouts import TransformerDenoiser

    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(len(prompts), 16, 2, 4, 4, generator=g)
    with torch.no_grad():
        text, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=32)
        v = TransformerDenoiser(pipe.transformer).velocity(eps, torch.full((len(prompts),), sigma), text, grad=False)
    return float(reward.distance(eps - sigma * v).mean())


def _sampled_r_dist(pipe: Any, reward: Any, prompts: list[str], seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    latents = pipe(prompt=prompts, height=32, width=32, num_frames=5, num_inference_steps=4, guidance_scale=1.0,
                   generator=g, output_type="latent", max_sequence_length=32).frames
    return float(reward.metrics(latents.float())["r_dist"].mean())


def finetune_section(ctx: DemoContext) -> SectionOutput:
    """Train 8 LoRA steps on the tiny model with ``ctx.reward_path``, reload the adapter, compare rewards."""
    with cpu_threads(1):
        return _finetune_section_body(ctx)


def _finetune_section_body(ctx: DemoContext) -> SectionOutput:
    from diffusers import WanPipeline

    from ..pipelines.tiny import build_tiny_wan_pipeline
    from ..rewards.errors import ConfigError
    from ..rewards.hub import load_reward
    from .config import load_config
    from .loop import Trainer

    if ctx.reward_path is None:
        raise ConfigError("the fine-tune demo section needs the reward fitted by the 'manifold' section; run both")
    out = ctx.out / "finetune"
    shutil.rmtree(out, ignore_errors=True)  # a demo run starts fresh
    steps = 8
    cfg = load_config("tiny-cpu", [
        f"reward.path={ctx.reward_path}", f"output_dir={out}", f"text_cache_dir={out / 'text-cache'}",
        "prompts=[" + ", ".join(DEMO_PROMPTS) + "]", "max_sequence_length=32", f"max_steps={steps}",
        f"checkpoint_every={steps}", "validation.every=0", "logging.report_to=none", f"seed={ctx.seed}",
    ])
    ctx.log(f"fine-tune: {steps} Shell-LCC LoRA steps on the tiny Wan model (one pass from noise, sigma in [0.7, 1])")
    result = Trainer(cfg, progress=False).train()
    reward = load_reward(ctx.reward_path)

    pipe = build_tiny_wan_pipeline(WanPipeline)
    pipe.set_progress_bar_config(disable=True)
    base_one = _one_step_r_dist(pipe, reward, DEMO_PROMPTS, seed=ctx.seed)
    base_sampled = _sampled_r_dist(pipe, reward, DEMO_PROMPTS, seed=ctx.seed)
    pipe.load_lora_weights(str(result.best_dir))  # the exported diffusers adapter, as a user loads it
    tuned_one = _one_step_r_dist(pipe, reward, DEMO_PROMPTS, seed=ctx.seed)
    tuned_sampled = _sampled_r_dist(pipe, reward, DEMO_PROMPTS, seed=ctx.seed)

    losses = [rec["loss"] for rec in _train_records(out)]
    results = {
        "steps": result.step,
        "adapter": str(result.best_dir),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "one_step_r_dist": {"base": base_one, "finetuned": tuned_one},
        "sampled_r_dist": {"base": base_sampled, "finetuned": tuned_sampled},
        "reward_changed": tuned_one != base_one,
    }
    lines = [
        f"trained {result.step} LoRA steps (tiny-cpu recipe); adapter reloaded from {result.best_dir}",
        f"R_dist of the one-step prediction (the training objective, lower is better): "
        f"base {base_one:.4f} -> fine-tuned {tuned_one:.4f} ({tuned_one - base_one:+.4f})",
        f"R_dist of sampled videos (4 UniPC steps): base {base_sampled:.4f} -> fine-tuned {tuned_sampled:.4f} "
        f"({tuned_sampled - base_sampled:+.4f})",
    ]

    def panel(ax: Any) -> None:
        ax.plot(range(1, len(losses) + 1), losses, marker="o")
        ax.set_title("fine-tune: Shell-LCC loss (R_dist of x0_hat) per step")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")

    return SectionOutput(results=results, lines=lines, panels=[panel])


def _train_records(out: Any) -> list[dict[str, Any]]:
    import json

    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("type") == "train"]


register_section(DemoSection("fine-tune", "Fine-tune: Shell-LCC LoRA steps on the tiny Wan, reloaded in diffusers",
                             finetune_section))
