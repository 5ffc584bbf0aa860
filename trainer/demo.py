"""``latent-rewards demo``: an offline, CPU-only tour of the toolkit on synthetic data with a known answer.

The demo is a list of sections (:data:`SECTIONS`) that run in order on a shared :class:`DemoContext`. Each
section is ``fn(ctx) -> SectionOutput`` (results for ``report.json``, lines for ``report.txt``, panels for
``report.png``) and may leave things in the context for later sections (the first one fits a reward and sets
``ctx.reward_path``). Features add their own section with :func:`register_section`. The three sections run in
about 15 s on 2 CPU cores (plus a few seconds of imports):

* ``manifold`` (here): fit a Shell-LCC reward on synthetic latents and score real / distorted / blurred ones.
* ``guidance`` (:mod:`..pipelines.demo`): a tiny random Wan pipeline sampled with and without reward guidance
  towards the fitted manifold, same seeds.
* ``fine-tune`` (:mod:`.demo_finetune`): a few Shell-LCC LoRA steps on the tiny Wan with the real trainer, the
  adapter reloaded in diffusers, base vs fine-tuned ``R_dist``.

Section "manifold" builds a latent data set whose manifold is known: 16-d voxels ``z = c_k + s_k * rho * u``
with ``u`` a random unit direction, ``rho ~ 1``, and ``c_k``/``s_k`` the centre and anisotropic per-dimension scale
of the cluster that owns the voxel's region (clips are split into spatially coherent regions, one cluster each).
Real voxels thus sit on a shell of radius 1 in each cluster's scaled coordinates, like the paper's real latents.
It fits a small Shell-LCC on it with the real CLI code path (latent files, streaming sampler, two stages), then
scores held-out real clips against distorted (added noise: off the shell, outwards) and blurred (spatial
smoothing: towards the local mean, inside the shell) versions. Expected: the plain LCC distance prefers the blurred
clips (it rewards blur), ``R_dist`` puts real near its training radius, distorted above and blurred below, and the
band reward ``-|R_dist - tau|`` with ``tau`` the training radius ranks real first against both.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..rewards.hub import atomic_write_text
from ..rewards.latent_space import WAN21
from .data import _generator, save_latent_file
from .modeling import cpu_threads
from .report import distinguishability, plot_bars, plot_histograms, save_panels, summary_stats

__all__ = [
    "DemoContext",
    "SectionOutput",
    "DemoSection",
    "SECTIONS",
    "register_section",
    "run_demo",
    "ShellWorld",
    "distort",
    "blur",
]

Panel = Callable[[Any], None]


@dataclass
class DemoContext:
    """What sections share: where to write, the seed, and what earlier sections produced."""

    out: Path
    seed: int = 0
    reward_path: Path | None = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    verbose: bool = True

    def log(self, message: str) -> None:
        if self.verbose:
            print(f"[demo] {message}", flush=True)


@dataclass
class SectionOutput:
    """A section's contribution to the report."""

    results: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    panels: list[Panel] = field(default_factory=list)


@dataclass
class DemoSection:
    name: str
    title: str
    fn: Callable[[DemoContext], SectionOutput]


#: The demo, in order. Later features add sections with :func:`register_section`.
SECTIONS: list[DemoSection] = []


def register_section(section: DemoSection, *, after: str | None = None) -> DemoSection:
    """Add (or replace, by name) a demo section, at the end or right after the section named ``after``."""
    existing = [s.name for s in SECTIONS]
    if section.name in existing:
        SECTIONS[existing.index(section.name)] = section
        return section
    if after is not None and after in existing:
        SECTIONS.insert(existing.index(after) + 1, section)
    else:
        SECTIONS.append(section)
    return section


# ============================================================================================== synthetic manifold
class ShellWorld:
    """A latent distribution with a known shell-shaped manifold (see the module docstring)."""

    def __init__(self, *, seed: int = 0, clusters: int = 6, channels: int = WAN21.channels,
                 frames: int = 3, height: int = 16, width: int = 16, regions: int = 3) -> None:
        g = _generator(seed, 100)
        self.channels, self.frames, self.height, self.width, self.regions = channels, frames, height, width, regions
        self.centres = torch.randn(clusters, channels, generator=g) * 1.5
        # Anisotropic per-dimension scales (log-uniform in [0.15, 0.6]).
        self.scales = torch.exp(torch.empty(clusters, channels).uniform_(-1.9, -0.5, generator=g))
        self.seed = seed

    def clip(self, index: int, *, split: int = 0) -> torch.Tensor:
        """One clip ``[C, T, H, W]``, a pure function of ``(seed, split, index)``."""
        return self.clip_and_regions(index, split=split)[0]

    def clip_and_regions(self, index: int, *, split: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """One clip ``[C, T, H, W]`` and its region map ``[H, W]`` (region ids, static over time)."""
        g = _generator(self.seed, 101, split, index)
        c, t, h, w = self.channels, self.frames, self.height, self.width
        # Regions: nearest of a few random seed points, each owned by one cluster.
        pts = torch.rand(self.regions, 2, generator=g) * torch.tensor([h, w])
        labels = torch.randint(0, self.centres.shape[0], (self.regions,), generator=g)
        yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        d = (yy[None] - pts[:, 0, None, None]) ** 2 + (xx[None] - pts[:, 1, None, None]) ** 2
        region = d.argmin(0)  # [H, W]
        owner = labels[region]  # cluster id per position
        u = torch.randn(t, h, w, c, generator=g)
        u = u / u.norm(dim=-1, keepdim=True)
        rho = 1.0 + 0.03 * torch.randn(t, h, w, 1, generator=g)
        z = self.centres[owner][None] + self.scales[owner][None] * rho * u  # [T, H, W, C]
        return z.permute(3, 0, 1, 2).contiguous(), region


def distort(z: torch.Tensor, *, strength: float = 0.1, seed: int = 0) -> torch.Tensor:
    """Add Gaussian noise (pushes voxels off the shell, outwards)."""
    return z + strength * torch.randn(z.shape, generator=_generator(seed, 102))


def blur(z: torch.Tensor, regions: torch.Tensor | None = None, *, kernel: int = 3) -> torch.Tensor:
    """Spatial box blur per frame, pulling voxels towards their local mean (inside the shell).

    With a region map ``[H, W]`` the average only takes neighbours of the same region: textures are smoothed
    while region edges stay, the over-smoothed "plastic" look of a generator rather than a camera defocus.
    """
    c, t, h, w = z.shape
    x = z.permute(1, 0, 2, 3)  # frames as batch
    pad = (kernel // 2,) * 4
    if regions is None:
        x = F.avg_pool2d(F.pad(x, pad, mode="replicate"), kernel, stride=1)
        return x.permute(1, 0, 2, 3).contiguous()
    onehot = F.one_hot(regions.long()).permute(2, 0, 1).float()  # [R, H, W]
    num = torch.zeros_like(x)
    den = torch.zeros(1, 1, h, w)
    for mask in onehot:
        m = mask[None, None]
        s = F.avg_pool2d(F.pad(x * m, pad), kernel, stride=1)
        cnt = F.avg_pool2d(F.pad(m, pad), kernel, stride=1)
        num += s * m
        den += cnt * m
    return (num / den).permute(1, 0, 2, 3).contiguous()


# ============================================================================================== section 1: manifold
def _manifold_section(ctx: DemoContext) -> SectionOutput:
    with cpu_threads(1):
        return _manifold_section_body(ctx)


def _manifold_section_body(ctx: DemoContext) -> SectionOutput:
    from ..rewards.shell_lcc import ShellLCC
    from .fit_manifold import FitConfig, fit_manifold

    world = ShellWorld(seed=ctx.seed)
    data_dir = ctx.out / "data" / "train"
    n_train, n_test = 32, 24
    ctx.log(f"writing {n_train} synthetic training latents [16, {world.frames}, {world.height}, {world.width}] "
            f"to {data_dir}")
    for i in range(n_train):
        save_latent_file(data_dir / f"clip{i:03d}.safetensors", world.clip(i, split=0), {"source": "demo"})

    cfg = FitConfig(anchors=48, hidden=64, lcc_steps=400, shell_steps=250, batch_voxels=2048, seed=ctx.seed,
                    checkpoint_every=10_000, log_every=25, hist_clips=n_train, max_latent_frames=None)
    ctx.log(f"fitting a Shell-LCC manifold ({cfg.anchors} anchors, hidden {cfg.hidden}; "
            f"{cfg.lcc_steps} LCC + {cfg.shell_steps} shell steps)")
    reward_dir = ctx.out / "reward"
    t_fit = time.time()
    fit = fit_manifold(data_dir, reward_dir, cfg, overwrite=True, progress=ctx.verbose)
    t_fit = time.time() - t_fit
    ctx.reward_path = reward_dir
    reward = ShellLCC.from_pretrained(reward_dir)
    tau = fit.summary["train_r_dist"]["mean"]
    band = ShellLCC.from_pretrained(reward_dir).set_reward_mode("band", tau=tau)

    ctx.log(f"scoring {n_test} held-out real clips vs distorted (noise) vs blurred (3x3 box) versions")
    held_out = [world.clip_and_regions(i, split=1) for i in range(n_test)]
    real = torch.stack([z for z, _ in held_out])
    sets = {
        "real": real,
        "distorted": torch.stack([distort(z, seed=ctx.seed * 1000 + i) for i, z in enumerate(real)]),
        "blurred": torch.stack([blur(z, regions) for z, regions in held_out]),
    }
    scores: dict[str, dict[str, torch.Tensor]] = {}
    for name, z in sets.items():
        m = reward.metrics(z)
        scores[name] = {"r_dist": m["r_dist"], "lcc_distance": m["lcc_distance"],
                        "band_reward": band.metrics(z)["reward"]}
    results: dict[str, Any] = {
        "tau": tau,
        "train_r_dist": fit.summary["train_r_dist"],
        "sets": {n: {k: summary_stats(v) for k, v in s.items()} for n, s in scores.items()},
        "distinguishability": {},
    }
    for other in ("distorted", "blurred"):
        results["distinguishability"][f"real_vs_{other}"] = {
            "r_dist": distinguishability(scores["real"]["r_dist"], scores[other]["r_dist"]),
            "lcc_distance": distinguishability(scores["real"]["lcc_distance"], scores[other]["lcc_distance"]),
            "band_reward": distinguishability(scores["real"]["band_reward"], scores[other]["band_reward"],
                                              lower_is_real=False),
        }

    s = results["sets"]
    lines = [
        f"Synthetic data: {n_train} training clips, clusters with anisotropic noise on a unit shell; reward folder "
        f"{reward_dir}",
        f"Fitted in {t_fit:.1f} s; training R_dist per clip {tau:.3f} "
        f"± {fit.summary['train_r_dist']['std']:.3f} (real voxels sit on the unit shell: mean r "
        f"{fit.summary['train_voxel_r']['mean']:.3f})",
        "",
        f"{'held-out set':<12} {'R_dist':>17} {'LCC distance':>17} {'band reward':>17}",
    ]
    for name in sets:
        lines.append(
            f"{name:<12} "
            + " ".join(f"{s[name][k]['mean']:>8.3f} ± {s[name][k]['std']:<6.3f}" for k in ("r_dist", "lcc_distance", "band_reward"))
        )
    d = results["distinguishability"]
    means = {n: {k: s[n][k]["mean"] for k in s[n]} for n in s}
    checks = {
        "distorted_outside_shell": means["distorted"]["r_dist"] > means["real"]["r_dist"],
        "blurred_inside_shell": means["blurred"]["r_dist"] < means["real"]["r_dist"],
        "plain_lcc_rewards_blur": means["blurred"]["lcc_distance"] < means["real"]["lcc_distance"],
        "band_ranks_real_first": min(d["real_vs_distorted"]["band_reward"], d["real_vs_blurred"]["band_reward"]) > 0.5,
    }
    results["checks"] = checks
    lines += [
        "",
        "Share of (real, other) pairs where real looks more real (1 = always, 0.5 = chance, 0 = always wrong):",
        *(f"  vs {o + ':':<10} R_dist {d[f'real_vs_{o}']['r_dist']:.2f}, LCC distance "
          f"{d[f'real_vs_{o}']['lcc_distance']:.2f}, band reward {d[f'real_vs_{o}']['band_reward']:.2f}"
          for o in ("distorted", "blurred")),
        "",
        "What the paper claims, checked on these numbers:",
        f"  [{'x' if checks['distorted_outside_shell'] else ' '}] distorted latents lie outside the shell "
        f"(R_dist {means['distorted']['r_dist']:.3f} > real {means['real']['r_dist']:.3f})",
        f"  [{'x' if checks['blurred_inside_shell'] else ' '}] blurred latents lie inside it "
        f"(R_dist {means['blurred']['r_dist']:.3f} < real {means['real']['r_dist']:.3f})",
        f"  [{'x' if checks['plain_lcc_rewards_blur'] else ' '}] the plain LCC distance rewards blur "
        f"({means['blurred']['lcc_distance']:.3f} < real {means['real']['lcc_distance']:.3f})",
        f"  [{'x' if checks['band_ranks_real_first'] else ' '}] the band reward -|R_dist - {tau:.3f}| ranks real "
        "first against both",
    ]
    panels: list[Panel] = [
        lambda ax: plot_histograms(ax, {n: v["r_dist"] for n, v in scores.items()}, bins=30,
                                   title="Shell-LCC: R_dist of held-out clips", xlabel="R_dist",
                                   markers={f"tau = {tau:.3f}": tau}),
        lambda ax: plot_bars(ax, {n: s[n]["lcc_distance"]["mean"] for n in sets},
                             errors={n: s[n]["lcc_distance"]["std"] for n in sets},
                             title="plain LCC distance (lower = 'more real')", ylabel="mean ||z - z_hat||"),
    ]
    return SectionOutput(results=results, lines=lines, panels=panels)


register_section(DemoSection("manifold", "Shell-LCC: fit a manifold and score real / distorted / blurred latents",
                             _manifold_section))


def _guidance_section(ctx: DemoContext) -> SectionOutput:
    from ..pipelines.demo import guided_vs_unguided

    with cpu_threads(1):
        return SectionOutput(**guided_vs_unguided(ctx))


register_section(DemoSection("guidance", "Reward guidance: a tiny Wan pipeline, guided vs unguided",
                             _guidance_section), after="manifold")


# ============================================================================================== runner
def run_demo(
    out: str | Path = "latent-rewards-demo",
    *,
    seed: int = 0,
    sections: list[str] | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run the demo sections (all, or those named) and write ``report.txt``, ``report.png`` and ``report.json``.

    With ``verbose=False`` nothing but warnings and errors is printed while it runs (progress lines and the
    trainer's info log are off); the report is returned for the caller to print.

    Raises:
        ConfigError: an unknown section name, or ``out`` (or a parent of it) is a file.
    """
    from ..rewards.errors import ConfigError

    ctx = DemoContext(out=Path(out).expanduser().absolute(), seed=seed, verbose=verbose)
    chosen = SECTIONS if sections is None else [s for s in SECTIONS if s.name in sections]
    unknown = sorted(set(sections or []) - {s.name for s in SECTIONS})
    if unknown:
        raise ConfigError(f"unknown demo section(s) {unknown}; available: {[s.name for s in SECTIONS]}")
    blocker = next((p for p in (ctx.out, *ctx.out.parents) if p.exists() and not p.is_dir()), None)
    if blocker == ctx.out:
        raise ConfigError(f"--out {ctx.out} is a file; the demo writes a folder: pass a new or existing folder")
    if blocker is not None:
        raise ConfigError(f"--out {ctx.out}: {blocker} is a file, so the output folder cannot be created there")
    try:
        ctx.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {ctx.out}: cannot create the output folder ({e.strerror or e})") from None
    with _quiet_logs(not verbose):
        return _run_sections(ctx, chosen, seed)


@contextlib.contextmanager
def _quiet_logs(quiet: bool) -> Iterator[None]:
    """Raise the package's loggers (``latent_rewards.*``: trainer, data, fitting) to WARNING while ``quiet``."""
    if not quiet:
        yield
        return
    root = logging.getLogger(__name__.rsplit(".", 2)[0])
    before = root.level
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(before)


def _run_sections(ctx: DemoContext, chosen: list[DemoSection], seed: int) -> dict[str, Any]:
    text: list[str] = [f"latent-rewards demo (seed {seed})", ""]
    panels: list[Panel] = []
    timings: dict[str, float] = {}
    t_all = time.time()
    for k, section in enumerate(chosen, 1):
        ctx.log(f"section {k}/{len(chosen)}: {section.title}")
        t0 = time.time()
        result = section.fn(ctx)
        timings[section.name] = round(time.time() - t0, 2)
        ctx.results[section.name] = result.results
        text += [f"== {k}. {section.title} ({timings[section.name]:.1f} s)", *result.lines, ""]
        panels += result.panels
    text.append(f"total {time.time() - t_all:.1f} s")
    atomic_write_text(ctx.out / "report.txt", "\n".join(text) + "\n")
    atomic_write_text(ctx.out / "report.json", json.dumps({"seed": seed, "timings_s": timings,
                                                           "sections": ctx.results}, indent=2) + "\n")
    if panels:
        save_panels(ctx.out / "report.png", panels, cols=2, title="latent-rewards demo")
    ctx.log(f"wrote {ctx.out / 'report.txt'}, report.png and report.json")
    return {"out": ctx.out, "results": ctx.results, "timings_s": timings, "report": "\n".join(text)}


# Sections that live in their own modules register themselves when imported.
from . import demo_finetune  # noqa: E402,F401  (section "fine-tune")
