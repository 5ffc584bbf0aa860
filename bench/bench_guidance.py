"""Reward-guidance overhead: one guided sampling step vs one unguided step, measured side by side in one run.

The question: what does latent-reward guidance add to one denoising step of Wan2.1-T2V-1.3B at 81 frames 480p
(latent ``[1, 16, 21, 60, 104]``, 32,760 transformer tokens, 512 text tokens, CFG on: two transformer passes)?

What runs here (same process, same threads, repetitions interleaved, medians reported):

* **Unguided step**: a ``WanTransformer3DModel`` with Wan2.1-1.3B's width and head layout (dim 1536 = 12 heads x
  128, FFN 8960, text width 4096, 512 text tokens, random weights) called twice (cond + uncond) and combined with
  CFG, plus the scheduler update. A CPU cannot run 30 layers on 32,760 tokens in reasonable time, so it runs with
  **1 and 2 layers** on **two reduced token counts** ``N1 < N2``.
* **Trace scoring** (what a loaded reward costs at unguided steps): the reward of ``x0_hat``, forward only.
* **Cheap guidance**: ``guide_x0`` (reward forward + backward w.r.t. ``x0_hat``, normalisation, clamp) plus the
  velocity conversion, i.e. exactly what the pipeline mixin adds per guided step, with the **paper-size Shell-LCC
  (4096 anchors, hidden 512) on the full-size latent** (131,040 voxels): not scaled, measured as is.
* **Exact guidance**: the transformer part (the recorded cond/uncond calls replayed with gradients on ``x_t``
  under gradient checkpointing, and the backward pass), on the reduced models, plus the full-size reward.

Scaling the transformer to the full step (stated, not hidden):

* Forward hooks time the transformer blocks inside each step; the rest of the step ``t_fixed`` (patch, time and
  text embeddings, output head, CFG combination, scheduler update) is the remainder. ``t_fixed`` is measured at
  both token counts and extrapolated linearly in ``N`` (its parts are constant or linear in ``N``).
* A block's time is scaled from ``N2`` to 32,760 tokens by the ratio of its analytic FLOPs (projections and FFN
  linear in ``N``, self-attention quadratic). This assumes attention runs at the same FLOP rate as the matrix
  products; where it runs slower (CPUs) the real step is slower and the true overhead smaller, so the estimate
  is an upper bound on the overhead. Full step = ``t_fixed(32760) + 30 * t_block(32760)``.
* Exact mode's transformer part (replay + backward) is scaled by its measured ratio to the unguided step at
  ``N2``: both are the same blocks, forward and backward costs scale alike with layers and tokens.

Overhead % = added time / full unguided step. The analytic FLOP counts are printed beside the times: the reward's
forward + backward is about 2 TFLOP against about 570 TFLOP for a CFG step, so 0.35% is the floor for cheap mode
on hardware that runs both at the same efficiency. On a CPU the scaled step is an estimate (attention efficiency
at 32k tokens is extrapolated); on a GPU, ``--full`` runs the real 30-layer step at full size instead of scaling.

    python bench/bench_guidance.py            # reduced transformer + full-size reward (CPU: several minutes)
    python bench/bench_guidance.py --quick    # small smoke run (seconds)
    python bench/bench_guidance.py --full     # GPU: real 30-layer, 32,760-token step, no scaling
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from latent_rewards.pipelines.guidance_mixin import _CallRecorder, _exact_denoiser, _replay_mode
from latent_rewards.pipelines.tiny import tiny_wan_transformer
from latent_rewards.rewards import ShellLCC
from latent_rewards.rewards.devices import resolve_device
from latent_rewards.rewards.guidance import GuidanceConfig, evaluate_reward, guide_x0, x0_from_velocity

DIM, HEADS, HEAD_DIM, FFN, TEXT_DIM, TEXT_TOKENS, LAYERS_FULL = 1536, 12, 128, 8960, 4096, 512, 30
FULL_LATENT = (1, 16, 21, 60, 104)  # 81 frames 480p (832x480)
CFG = 5.0
SIGMA = 0.7


def full_tokens(latent: tuple[int, ...]) -> int:
    return latent[2] * (latent[3] // 2) * (latent[4] // 2)


def block_flops(n: int, s: int = TEXT_TOKENS, d: int = DIM, f: int = FFN) -> float:
    """FLOPs of one Wan block, one pass: self-attention (projections + N^2 attention), cross-attention, FFN."""
    self_attn = 8 * n * d * d + 4 * n * n * d
    cross = 4 * n * d * d + 4 * s * d * d + 4 * n * s * d
    return self_attn + cross + 4 * n * d * f


def reward_flops(voxels: int, m: int = 4096, h: int = 512, d: int = 16) -> float:
    """Shell-LCC per voxel: predictor (d->h->h->m), softmax, reconstruction (m->d), surface head; x3 for fwd+bwd."""
    fwd = 2 * (d * h + h * h + h * m + m * d + d * h + h * d)
    return 3 * voxels * fwd


def make_transformer(layers: int, device: torch.device, dtype: torch.dtype):
    # The tiny model's Wan2.1 layout at the 1.3B model's width (random weights, seed 0).
    model = tiny_wan_transformer(
        0, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, text_dim=TEXT_DIM, ffn_dim=FFN, num_layers=layers
    )
    model = model.to(device)
    if dtype != torch.float32:
        from diffusers.utils import logging as dlogging

        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()  # the fp32-module notice: timing only, numerics do not matter here
        model = model.to(dtype)
        dlogging.set_verbosity(level)
    return model.eval()


def make_reward(device: torch.device) -> ShellLCC:
    """The paper-size manifold with random weights (timing does not depend on the values)."""
    torch.manual_seed(0)
    return ShellLCC(num_bases=4096, hidden_dim=512).to(device).freeze()


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


class StepBench:
    """One transformer size: the unguided CFG step and the exact-mode transformer part."""

    def __init__(self, layers: int, latent: tuple[int, ...], device: torch.device, dtype: torch.dtype,
                 text_tokens: int = TEXT_TOKENS) -> None:
        self.device, self.latent, self.layers = device, latent, layers
        self.model = make_transformer(layers, device, dtype)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(latent, generator=g).to(device)
        self.cond = torch.randn(1, text_tokens, TEXT_DIM, generator=g).to(device, dtype)
        self.uncond = torch.randn(1, text_tokens, TEXT_DIM, generator=g).to(device, dtype)
        self.t = torch.full((1,), 700.0, device=device)
        self.dtype = dtype

        self.block_s = 0.0
        self._t0 = 0.0
        for block in self.model.blocks:
            block.register_forward_pre_hook(self._block_start)
            block.register_forward_hook(self._block_end)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _block_start(self, *_: Any) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def _block_end(self, *_: Any) -> None:
        self._sync()
        self.block_s += time.perf_counter() - self._t0

    def _call(self, emb: torch.Tensor) -> torch.Tensor:
        return self.model(hidden_states=self.x.to(self.dtype), timestep=self.t, encoder_hidden_states=emb,
                          return_dict=False)[0]

    def unguided(self) -> torch.Tensor:
        self.block_s = 0.0
        with torch.no_grad():
            c, u = self._call(self.cond), self._call(self.uncond)
            v = u + CFG * (c - u)
            self.x_next = self.x + (0.6 - SIGMA) * v.float()  # the Euler update the scheduler does
        return v

    def exact_transformer_part(self) -> None:
        """What exact mode adds beyond the reward: replay cond/uncond with grad on x_t, then backward."""
        rec = _CallRecorder([self.model])
        try:
            v = self.unguided()  # records the two calls, as in the pipeline (not timed separately below)
            denoise = _exact_denoiser(rec, self.x, v, SIGMA)
            self._exact = (rec, denoise)
        finally:
            rec.remove()

    def run_exact(self) -> None:
        _, denoise = self._exact
        leaf = self.x.detach().clone().requires_grad_(True)
        with torch.enable_grad(), _replay_mode([self.model]):
            x0 = denoise(leaf)
            torch.autograd.grad(x0.float().pow(2).sum(), leaf)


def median_times(
    fns: dict[str, Callable[[], Any]], reps: int, device: torch.device, bench: StepBench | None = None
) -> dict[str, float]:
    """Median wall time of each function, repetitions interleaved; with ``bench``, also the median block time
    inside its unguided steps (``"blocks"``)."""
    for fn in fns.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    if bench is not None:
        samples["blocks"] = []
    for _ in range(reps):  # interleaved, so machine load drifts hit all of them alike
        for k, fn in fns.items():
            samples[k].append(timed(fn, device))
            if bench is not None and k == "step":
                samples["blocks"].append(bench.block_s)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run (reduced reward latent too)")
    parser.add_argument("--full", action="store_true", help="GPU: time the real 30-layer full-size step")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per measurement (default 3; quick 1)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reps = args.reps or (1 if args.quick else 3)
    if args.full and device.type != "cuda":
        parser.error("--full needs a GPU (30 layers at 32,760 tokens)")

    reward_latent = (1, 16, 3, 30, 52) if args.quick else FULL_LATENT
    step_latents = [(1, 16, 2, 10, 20), (1, 16, 4, 10, 20)] if args.quick else [(1, 16, 2, 30, 52), (1, 16, 4, 30, 52)]
    n_full = full_tokens(FULL_LATENT)
    voxels = reward_latent[0] * reward_latent[2] * reward_latent[3] * reward_latent[4]
    print(f"device {device} ({platform.processor() or platform.machine()}), dtype {dtype}, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}, reps {reps}")

    # -- the reward at its (full) size: trace scoring, cheap guidance
    reward = make_reward(device)
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(reward_latent, generator=g).to(device)
    v = torch.randn(reward_latent, generator=g).to(device)
    x0 = x0_from_velocity(x_t, v, SIGMA)
    cfg = GuidanceConfig(scale=0.05)

    def cheap() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = guide_x0(reward, x0, SIGMA, cfg, x_t=x_t, velocity=v)
        _ = v - (res.x0 - x0) / SIGMA

    reward_t = median_times({"trace": lambda: evaluate_reward(reward, x0, SIGMA),
                             "cheap": cheap}, reps, device)
    print(f"reward on {list(reward_latent)} ({voxels:,} voxels, 4096 anchors, hidden 512): trace scoring "
          f"{reward_t['trace'] * 1e3:.0f} ms, cheap guidance {reward_t['cheap'] * 1e3:.0f} ms "
          f"({reward_flops(voxels) / reward_t['cheap'] / 1e9:.0f} GFLOP/s on ~{reward_flops(voxels) / 1e12:.2f} TFLOP)")

    # -- the transformer: full size on a GPU, else 1 and 2 layers at two token counts, scaled
    results: dict[str, Any] = {"device": str(device), "dtype": str(dtype), "reps": reps, "quick": args.quick,
                               "reward_latent": list(reward_latent), "reward_s": reward_t}
    text_tokens = 64 if args.quick else TEXT_TOKENS
    if args.full:
        bench = StepBench(LAYERS_FULL, FULL_LATENT, device, dtype)
        bench.exact_transformer_part()
        t = median_times({"step": bench.unguided, "exact": bench.run_exact}, reps, device)
        step_full, exact_full = t["step"], t["exact"]
        results["transformer"] = {"measured_full": t}
        print(f"full 30-layer step at {n_full} tokens: {step_full * 1e3:.0f} ms; exact replay+backward "
              f"{exact_full * 1e3:.0f} ms")
    else:
        layers = 2
        meas: dict[int, dict[str, float]] = {}
        for latent in step_latents:
            bench = StepBench(layers, latent, device, dtype, text_tokens=text_tokens)
            bench.exact_transformer_part()
            meas[full_tokens(latent)] = median_times(
                {"step": bench.unguided, "exact": bench.run_exact}, reps, device, bench=bench)
            del bench
        n1, n2 = sorted(meas)
        fixed = {n: meas[n]["step"] - meas[n]["blocks"] for n in (n1, n2)}
        block = {n: meas[n]["blocks"] / (2 * layers) for n in (n1, n2)}  # one block, one pass
        for n in (n1, n2):
            m = meas[n]
            print(f"  transformer {layers} layers, {n:>5} tokens: CFG step {m['step'] * 1e3:8.1f} ms, of which "
                  f"blocks {m['blocks'] * 1e3:8.1f} ms ({block_flops(n, text_tokens) / block[n] / 1e9:.0f} GFLOP/s); "
                  f"exact replay+backward {m['exact'] * 1e3:8.1f} ms ({m['exact'] / m['step']:.2f}x the step)")
        fixed_full = max(fixed[n2] + (fixed[n2] - fixed[n1]) / (n2 - n1) * (n_full - n2), fixed[n2], 0.0)
        block_full = block[n2] * block_flops(n_full) / block_flops(n2, text_tokens)
        step_full = fixed_full + 2 * LAYERS_FULL * block_full
        exact_ratio = meas[n2]["exact"] / meas[n2]["step"]
        exact_full = exact_ratio * step_full
        results["transformer"] = {"measured": {str(n): m for n, m in meas.items()}, "fixed_s": fixed,
                                  "block_pass_s": block, "fixed_full_s": fixed_full, "block_pass_full_s": block_full,
                                  "exact_ratio": exact_ratio, "layers": layers, "text_tokens": text_tokens}
        print(f"scaled to 30 layers x {n_full} tokens (block time x FLOP ratio "
              f"{block_flops(n_full) / block_flops(n2, text_tokens):.0f}): step {step_full:.1f} s "
              f"(blocks {2 * LAYERS_FULL * block_full:.1f} s, rest {fixed_full:.2f} s); exact transformer part "
              f"{exact_ratio:.2f} x step = {exact_full:.1f} s")

    step_flops = 2 * LAYERS_FULL * block_flops(n_full)
    scale_reward = 1.0 if reward_latent == FULL_LATENT else (n_full * 4) / voxels  # quick: reward scaled up too
    over = {
        "trace_scoring_pct": 100 * reward_t["trace"] * scale_reward / step_full,
        "cheap_pct": 100 * reward_t["cheap"] * scale_reward / step_full,
        "exact_pct": 100 * (exact_full + reward_t["cheap"] * scale_reward) / step_full,
        "floor_pct_flops": 100 * reward_flops(n_full * 4) / step_flops,
    }
    results.update({"full_step_s": step_full, "exact_transformer_s": exact_full, "overhead": over,
                    "analytic": {"step_tflop": step_flops / 1e12, "reward_fwd_bwd_tflop": reward_flops(n_full * 4) / 1e12}})
    print()
    print(f"Overhead on one full 30-layer CFG step at 81x480x832 ({step_flops / 1e12:.0f} TFLOP analytic; "
          f"reward fwd+bwd {reward_flops(n_full * 4) / 1e12:.2f} TFLOP, floor {over['floor_pct_flops']:.2f}%):")
    print(f"  scoring only (reward loaded, outside the window): {over['trace_scoring_pct']:6.2f} %")
    print(f"  cheap guidance (default):                          {over['cheap_pct']:6.2f} %   (goal < 1%)")
    print(f"  exact guidance (through the transformer):          {over['exact_pct']:6.1f} %")
    if args.quick:
        print("  (--quick: reduced sizes, reward time scaled by voxel count; a smoke run, not a result)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
