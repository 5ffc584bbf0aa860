"""Shell-LCC scoring: our chunked implementation vs the authors' formula, side by side in one process.

Scores one 81-frame 480p Wan2.1 latent ``[1, 16, 21, 60, 104]`` (131,040 voxels) with the paper-size manifold
(4096 anchors, hidden 512), forward (no grad) and forward + backward (gradient w.r.t. the latent), with

* **ours**: ``ShellLCC.distance`` (chunked; per-voxel gradient fused into the forward pass), and
* **official**: the authors' ``distance_reward`` formula computed straightforwardly, the whole ``N x M`` softmax
  at once with plain autograd (``tests/official_formula.py``),

on the same random weights. Prints wall time and peak extra memory of each, their ratios, whether values and
gradients agree, and the achieved GFLOP/s of both against a plain fp32 matrix product of the same shape as the
dominant layer (``N x 512 @ 512 x 4096``) measured in the same run: the ceiling this machine reaches.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process RSS sampled every millisecond by a
thread, minus the RSS just before the measured call. The script re-executes itself with glibc's
``MALLOC_MMAP_THRESHOLD_=131072`` so that every tensor above 128 KiB is its own mapping, returned to the OS when
freed: RSS then follows live tensor memory instead of the allocator's cached heap.

On a GPU it also times the TF32 and bf16 paths of ours against fp32 and reports their relative reward error.

    python bench/bench_shell_lcc.py            # full size (needs ~10 GiB RAM for the official baseline)
    python bench/bench_shell_lcc.py --quick    # small smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from official_formula import official_distance_flat  # noqa: E402

from latent_rewards.rewards import ShellLCC  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakMemory:
    """Peak extra memory of a block: CUDA allocator peak, or sampled RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = rss_bytes()
            self._stop = threading.Event()
            self._max = self.base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, rss_bytes()) - self.base


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (allocator, kernels)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def matmul_seconds(n: int, k: int, m: int, device: torch.device, repeats: int) -> float:
    """Best time of a plain fp32 ``[n, k] @ [k, m]`` product into a preallocated output: the compute ceiling,
    without the cost of faulting in gigabytes of fresh pages for the result."""
    a = torch.randn(n, k, device=device)
    b = torch.randn(k, m, device=device)
    c = torch.empty(n, m, device=device)
    secs, _ = timed(lambda: torch.mm(a, b, out=c), device, repeats)
    return secs


def reward_flops(n: int, d: int, h: int, m: int) -> float:
    """Forward FLOPs of one scoring pass (matmuls + softmax), per the architecture."""
    matmuls = 2 * n * (d * h + h * h + h * m + m * d + d * h + h * d)
    softmax = 5 * n * m
    return float(matmuls + softmax)


def main() -> int:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and "--no-reexec" not in sys.argv:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    sys.argv = [a for a in sys.argv if a != "--no-reexec"]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small latent and manifold (smoke run)")
    ap.add_argument("--shape", default=None, help="latent T,H,W (default 21,60,104: 81 frames 480p)")
    ap.add_argument("--anchors", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()

    t, h_, w_ = (3, 12, 20) if args.quick else (21, 60, 104)
    if args.shape:
        t, h_, w_ = (int(v) for v in args.shape.split(","))
    anchors = args.anchors or (512 if args.quick else 4096)
    hidden = args.hidden or (128 if args.quick else 512)
    repeats = args.repeats or (2 if args.quick else 1)
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = ShellLCC(num_bases=anchors, hidden_dim=hidden)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
        model.global_scale.fill_(1.0)
    model = model.freeze().to(device)
    state = {k: v for k, v in model.state_dict().items()}
    z = torch.randn(1, 16, t, h_, w_, device=device)
    n = t * h_ * w_
    flat = lambda x: x.permute(0, 2, 3, 4, 1).reshape(-1, 16)  # noqa: E731

    def ours_fwd():
        with torch.no_grad():
            return model.distance(z)

    def official_fwd():
        with torch.no_grad():
            return official_distance_flat(state, flat(z)).mean().view(1)

    def ours_fwd_bwd():
        zz = z.clone().requires_grad_(True)
        r = model.distance(zz)
        r.sum().backward()
        return r.detach(), zz.grad

    def official_fwd_bwd():
        zz = z.clone().requires_grad_(True)
        r = official_distance_flat(state, flat(zz)).mean().view(1)
        r.sum().backward()
        return r.detach(), zz.grad

    results: dict[str, dict[str, float]] = {}
    outputs = {}
    for name, fn in [("official_fwd", official_fwd), ("ours_fwd", ours_fwd),
                     ("official_fwd_bwd", official_fwd_bwd), ("ours_fwd_bwd", ours_fwd_bwd)]:
        secs, out = timed(fn, device, repeats)
        with PeakMemory(device) as mem:
            fn()
        results[name] = {"seconds": secs, "peak_extra_mib": mem.peak / 2**20}
        outputs[name] = out
        print(f"  {name:18s} {secs:8.3f} s   peak extra {mem.peak / 2**20:9.1f} MiB", flush=True)

    # the ceiling: a plain fp32 matrix product of the dominant layer's shape
    mm_secs = matmul_seconds(n, hidden, anchors, device, max(2, repeats))
    mm_gflops = 2 * n * hidden * anchors / mm_secs / 1e9

    fwd = reward_flops(n, 16, hidden, anchors)
    val_diff = abs(outputs["ours_fwd"].item() - outputs["official_fwd"].item()) / abs(outputs["official_fwd"].item())
    g_ours, g_off = outputs["ours_fwd_bwd"][1], outputs["official_fwd_bwd"][1]
    grad_diff = ((g_ours - g_off).norm() / g_off.norm()).item()

    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch "
        f"{torch.__version__}, threads {torch.get_num_threads()}"
        + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""),
        "latent": [1, 16, t, h_, w_],
        "voxels": n,
        "anchors": anchors,
        "hidden": hidden,
        "chunk_voxels": model._chunk(),
        "results": results,
        "ratios": {
            "fwd_time_ours_over_official": results["ours_fwd"]["seconds"] / results["official_fwd"]["seconds"],
            "fwd_bwd_time_ours_over_official": results["ours_fwd_bwd"]["seconds"]
            / results["official_fwd_bwd"]["seconds"],
            "fwd_mem_ours_over_official": results["ours_fwd"]["peak_extra_mib"]
            / max(results["official_fwd"]["peak_extra_mib"], 1e-9),
            "fwd_bwd_mem_ours_over_official": results["ours_fwd_bwd"]["peak_extra_mib"]
            / max(results["official_fwd_bwd"]["peak_extra_mib"], 1e-9),
        },
        "gflops": {
            "matmul_ceiling": mm_gflops,
            "ours_fwd": fwd / results["ours_fwd"]["seconds"] / 1e9,
            "official_fwd": fwd / results["official_fwd"]["seconds"] / 1e9,
            "ours_fwd_bwd": 3 * fwd / results["ours_fwd_bwd"]["seconds"] / 1e9,
            "official_fwd_bwd": 3 * fwd / results["official_fwd_bwd"]["seconds"] / 1e9,
        },
        "agreement": {"reward_rel_diff": val_diff, "grad_rel_diff": grad_diff},
    }

    if device.type == "cuda":
        precision = {}
        ref_secs = results["ours_fwd_bwd"]["seconds"]
        ref_val = outputs["ours_fwd"].item()
        for p in ("tf32", "bf16"):
            model.precision = p
            secs, (val, _) = timed(ours_fwd_bwd, device, max(3, repeats))
            precision[p] = {"seconds": secs, "speedup_vs_fp32": ref_secs / secs,
                            "reward_rel_err": abs(val.item() - ref_val) / abs(ref_val)}
        model.precision = "fp32"
        summary["gpu_precision"] = precision

    r, g = summary["ratios"], summary["gflops"]
    print(f"\nShell-LCC scoring, latent {summary['latent']} ({n} voxels), {anchors} anchors, hidden {hidden}")
    print(f"machine: {summary['machine']}")
    print(f"time   ours/official: forward {r['fwd_time_ours_over_official']:.2f}x, "
          f"forward+backward {r['fwd_bwd_time_ours_over_official']:.2f}x")
    print(f"memory ours/official: forward {r['fwd_mem_ours_over_official']:.3f}x, "
          f"forward+backward {r['fwd_bwd_mem_ours_over_official']:.3f}x")
    print(f"GFLOP/s: matmul ceiling {g['matmul_ceiling']:.1f}; forward ours {g['ours_fwd']:.1f} "
          f"({g['ours_fwd'] / g['matmul_ceiling']:.0%}) vs official {g['official_fwd']:.1f} "
          f"({g['official_fwd'] / g['matmul_ceiling']:.0%}); fwd+bwd ours {g['ours_fwd_bwd']:.1f} vs official "
          f"{g['official_fwd_bwd']:.1f}")
    print(f"agreement: reward rel diff {val_diff:.2e}, gradient rel diff {grad_diff:.2e}")
    if "gpu_precision" in summary:
        for p, v in summary["gpu_precision"].items():
            print(f"{p}: {v['speedup_vs_fp32']:.2f}x faster than fp32 (fwd+bwd), reward rel err {v['reward_rel_err']:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
