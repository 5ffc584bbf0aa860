"""Peak memory and time of one reward fine-tuning step: latent reward (ours) vs the pixel-space ReFL step it replaces.

Both steps share everything up to the predicted clean latent: the same Wan2.1-1.3B-wide transformer (width 1536,
12 heads of 128, FFN 8960, text width 4096; fewer layers than the real 30), LoRA rank 16 on q/k/v/o, gradient
checkpointing on its blocks, the Shell-LCC rollout (one pass from pure noise at sigma ~ U[0.7, 1],
``x0_hat = eps - sigma * v``, through :class:`latent_rewards.trainer.rollouts.OneStepFromNoise`), then
``loss.backward()`` and an AdamW step on the LoRA weights.

* **latent** (ours): ``loss = R_dist(x0_hat)`` with a Shell-LCC of the paper's size (4096 anchors, hidden 512,
  random weights: memory and time do not depend on the values), in fp32, chunked.
* **pixel** (the ReFL baseline): ``x0_hat`` is de-normalised and decoded by the real-architecture Wan2.1 VAE
  decoder (diffusers ``AutoencoderKLWan()`` default config, 127 M parameters, frozen) **with gradients**, then a
  pixel-space reward network scores the frames: a small per-frame conv net (3 -> 32 -> 64 -> 128 channels, stride
  2 each, SiLU, global mean, linear -> 1; 0.1 M parameters), standing in for a VLM reward model, which would only
  add memory to the baseline.

Each variant runs in its own subprocess (so one cannot inherit the other's allocator peak). Memory is the peak
resident set size during the steps minus the peak after setup (``ru_maxrss``; on CUDA:
``torch.cuda.max_memory_allocated`` minus the allocation after setup); time is the median of the timed steps after
one warm-up step. Goal (issue): latent <= 20 % of the pixel step's memory and <= 70 % of its time.

    python bench/bench_train_memory.py --quick            # smoke run: 1 layer, 5 frames at 128x128 (CPU, ~1 min)
    python bench/bench_train_memory.py                    # default: 4 layers, 9 frames at 224x128 (~9 GiB peak)
    python bench/bench_train_memory.py --layers 30 --height 480 --width 832 --frames 17 --device cuda

The pixel step's memory grows with frames x height x width (about 34 KiB per decoded pixel-frame on CPU), so the
defaults are sized for a 24 GiB CPU host; use the flags for real sizes on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def _build(args: argparse.Namespace, device: torch.device):
    from latent_rewards.pipelines.tiny import tiny_wan_transformer
    from peft import LoraConfig

    # The tiny model's Wan2.1 layout at the 1.3B model's width (random weights, seed 0).
    transformer = tiny_wan_transformer(
        0, num_attention_heads=12, attention_head_dim=128, text_dim=4096, ffn_dim=8960, num_layers=args.layers
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    transformer.to(device=device, dtype=dtype).requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    transformer.enable_gradient_checkpointing()
    transformer.train()
    return transformer, dtype


class PixelReward(torch.nn.Module):
    """A small per-frame conv net on RGB in [-1, 1]: the pixel-space reward model of the ReFL baseline."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(64, 128, 3, stride=2, padding=1), torch.nn.SiLU(),
        )
        self.head = torch.nn.Linear(128, 1)

    def forward(self, video: torch.Tensor) -> torch.Tensor:  # [B, 3, F, H, W]
        b, c, f, h, w = video.shape
        frames = video.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        return self.head(self.net(frames).mean(dim=(2, 3))).view(b, f).mean(1)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def worker(args: argparse.Namespace) -> dict:
    from latent_rewards.rewards.latent_space import WAN21
    from latent_rewards.rewards.shell_lcc import ShellLCC
    from latent_rewards.trainer.rollouts import OneStepFromNoise, RolloutRandom, TransformerDenoiser, latent_shape

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    transformer, dtype = _build(args, device)
    shape = latent_shape(1, args.frames, args.height, args.width)
    text = torch.randn(1, args.text_len, 4096, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    denoiser = TransformerDenoiser(transformer, dtype=dtype)
    rollout = OneStepFromNoise()
    random = RolloutRandom.from_seed(0)
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    if args.mode == "latent":
        reward = ShellLCC().to(device).freeze()  # paper size: 4096 anchors, hidden 512

        def objective(x0: torch.Tensor) -> torch.Tensor:
            return reward.distance(x0.float()).mean()
    else:
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan().to(device).eval().requires_grad_(False)  # real Wan2.1 VAE architecture
        pixel_reward = PixelReward().to(device).eval().requires_grad_(False)

        def objective(x0: torch.Tensor) -> torch.Tensor:
            video = vae.decode(WAN21.denormalise(x0.float()), return_dict=False)[0]
            return -pixel_reward(video).mean()

    def step() -> float:
        out = rollout(denoiser, text, shape, random)  # transformer in its dtype (bf16 on CUDA)
        loss = objective(out.x0)  # reward / decode + pixel reward in fp32, as in training
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = _rss_mib()
    times = []
    for _ in range(1 + args.repeats):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mib = _rss_mib() - base_rss
    timed = times[1:] if len(times) > 1 else times
    return {"mode": args.mode, "peak_mib": peak_mib, "step_s": statistics.median(timed), "all_steps_s": times,
            "setup_rss_mib": base_rss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 layer, 5 frames at 128x128, 1 timed step")
    p.add_argument("--layers", type=int, default=None, help="transformer layers (1.3B has 30; default 4, quick 1)")
    p.add_argument("--height", type=int, default=None, help="video height in pixels (default 128, quick 128)")
    p.add_argument("--width", type=int, default=None, help="video width in pixels (default 224, quick 128)")
    p.add_argument("--frames", type=int, default=None, help="frames, 4k+1 (default 9, quick 5)")
    p.add_argument("--text-len", type=int, default=64, help="text tokens (Wan pads to 512; default 64)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps after the warm-up (default 2, quick 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--mode", choices=["latent", "pixel"], help=argparse.SUPPRESS)  # worker subprocess
    args = p.parse_args()
    q = args.quick
    args.layers = args.layers or (1 if q else 4)
    args.height = args.height or 128
    args.width = args.width or (128 if q else 224)
    args.frames = args.frames or (5 if q else 9)
    args.repeats = args.repeats if args.repeats is not None else (1 if q else 2)
    if args.mode:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    print(f"one training step, Wan2.1-1.3B width ({args.layers} layers), LoRA r16, {args.frames} frames at "
          f"{args.width}x{args.height}, device {args.device}, {args.threads} threads")
    results = {}
    for mode in ("latent", "pixel"):
        cmd = [sys.executable, __file__, "--mode", mode, "--layers", str(args.layers), "--height", str(args.height),
               "--width", str(args.width), "--frames", str(args.frames), "--text-len", str(args.text_len),
               "--repeats", str(args.repeats), "--device", args.device, "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"{mode} worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(line[len("RESULT "):])
        r = results[mode]
        print(f"  {mode:6s}: peak +{r['peak_mib']:9.1f} MiB   step {r['step_s']:8.3f} s   "
              f"(steps {', '.join(f'{t:.2f}' for t in r['all_steps_s'])} s)")
    mem = results["latent"]["peak_mib"] / max(results["pixel"]["peak_mib"], 1e-9)
    tim = results["latent"]["step_s"] / results["pixel"]["step_s"]
    print(f"memory ratio latent/pixel: {mem:.3f} (goal <= 0.20: {'met' if mem <= 0.20 else 'NOT met'})")
    print(f"time ratio   latent/pixel: {tim:.3f} (goal <= 0.70: {'met' if tim <= 0.70 else 'NOT met'})")


if __name__ == "__main__":
    main()
