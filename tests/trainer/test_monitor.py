"""The reward-hacking watch: image statistics with known answers, and the selection / early-stop rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from latent_rewards.trainer.config import MonitorSettings
from latent_rewards.trainer.monitor import (
    RewardHackingMonitor,
    content_change,
    high_frequency_ratio,
    laplacian_variance,
    to_grey,
    video_statistics,
)


def _checkerboard(n=32):
    y, x = np.mgrid[:n, :n]
    return ((x + y) % 2).astype(np.float32)


def test_laplacian_variance_known_values():
    assert laplacian_variance(torch.full((2, 16, 16), 0.7)) == pytest.approx(0.0, abs=1e-12)
    # A 0/1 checkerboard gives a Laplacian of -4 on ones and +4 on zeros: variance 16.
    assert laplacian_variance(torch.from_numpy(_checkerboard())[None]) == pytest.approx(16.0)
    # A linear ramp has zero Laplacian.
    ramp = torch.linspace(0, 1, 32).repeat(32, 1)[None]
    assert laplacian_variance(ramp) == pytest.approx(0.0, abs=1e-10)


def test_high_frequency_ratio_known_values():
    n = 64
    x = np.arange(n)
    smooth = np.sin(2 * np.pi * x / 32)[None, :].repeat(n, 0)  # 1/32 cycles per pixel: radius 1/16 of Nyquist
    assert high_frequency_ratio(torch.tensor(smooth)[None]) == pytest.approx(0.0, abs=1e-6)
    assert high_frequency_ratio(torch.tensor(_checkerboard(n))[None]) == pytest.approx(1.0, abs=1e-6)
    noise = torch.rand(4, n, n, generator=torch.Generator().manual_seed(0))
    # White noise spreads energy evenly: the share outside the disc of radius 1/4 (of the [-1, 1]^2 square).
    assert high_frequency_ratio(noise) == pytest.approx(1 - np.pi * 0.25**2 / 4, abs=0.03)
    # Brightness does not count (the mean is removed).
    assert high_frequency_ratio(noise + 5.0) == pytest.approx(high_frequency_ratio(noise), rel=1e-5)


def test_content_change_and_grey():
    a = np.full((3, 8, 8, 3), 100, dtype=np.uint8)
    assert content_change(a, a) == 0.0
    assert content_change(a, a + 10) == pytest.approx(10 / 255)
    assert to_grey(np.ones((1, 2, 2, 3), dtype=np.float32)).allclose(torch.ones(1, 2, 2))
    stats = video_statistics(np.repeat((_checkerboard(16) * 255).astype(np.uint8)[None, :, :, None], 3, axis=-1))
    assert stats["lap"] == pytest.approx(16.0, rel=1e-3) and stats["hf"] == pytest.approx(1.0, abs=1e-6)


def _metrics(lap=1.0, hf=1.0, change=0.05):
    return {"lap_ratio": lap, "hf_ratio": hf, "change": change}


def test_rule_keeps_the_best_unflagged_step_and_stops_with_the_reason():
    mon = RewardHackingMonitor(MonitorSettings(patience=2, real_radius=0.9, min_radius_fraction=0.8))
    assert mon.update(0, reward=-1.0, r_dist=1.0, metrics=_metrics()).is_best is False  # the base is no candidate
    r1 = mon.update(10, reward=-0.95, r_dist=0.95, metrics=_metrics(lap=1.5, hf=1.3))
    assert r1.healthy and r1.is_best and mon.best_step == 10
    r2 = mon.update(20, reward=-0.90, r_dist=0.90, metrics=_metrics(lap=2.4, hf=1.8))
    assert r2.healthy and r2.is_best and mon.best_step == 20
    r3 = mon.update(30, reward=-0.85, r_dist=0.85, metrics=_metrics(lap=1.1, hf=2.5))  # hf >> lap
    assert not r3.healthy and "high-frequency noise" in r3.flags[0] and not r3.stop and mon.best_step == 20
    r4 = mon.update(40, reward=-0.70, r_dist=0.70, metrics=_metrics(lap=3.0, hf=3.0, change=0.3))
    assert {f.split(" (")[0] for f in r4.flags} == {"content drift", "collapse towards the mean"}
    assert r4.stop and "stopped early at step 40" in r4.reason and "best step 20" in r4.reason
    assert mon.best_step == 20  # a higher reward from a flagged step is not selected
    # State survives a resume.
    again = RewardHackingMonitor(MonitorSettings(patience=2, real_radius=0.9))
    again.load_state_dict(mon.state_dict())
    assert again.best_step == 20 and again.stop_reason == r4.reason and len(again.history) == 5


def test_rule_edges():
    mon = RewardHackingMonitor(MonitorSettings(patience=0))
    r = mon.update(5, reward=float("nan"), r_dist=None, metrics=_metrics())
    assert r.flags == ["non-finite metric"] and not r.stop  # patience 0: report, never stop
    mon.update(6, reward=-1.0, r_dist=None, metrics=_metrics(lap=0.5, hf=1.4))  # hf vs max(lap, 1)
    assert mon.best_step == 6
    off = RewardHackingMonitor(MonitorSettings(enabled=False, patience=1))
    assert off.update(1, reward=0.0, r_dist=None, metrics=_metrics(hf=9.0)).healthy


def test_measure_against_base_videos():
    rng = np.random.default_rng(0)
    base = [(rng.random((4, 32, 32, 3)) * 64 + 96).astype(np.uint8) for _ in range(3)]
    noisy = [np.clip(b.astype(int) + rng.integers(-60, 60, b.shape), 0, 255).astype(np.uint8) for b in base]
    mon = RewardHackingMonitor(MonitorSettings())
    mon.set_baseline(base)
    same = mon.measure(base, base)
    assert same["lap_ratio"] == pytest.approx(1.0) and same["hf_ratio"] == pytest.approx(1.0) and same["change"] == 0
    m = mon.measure(noisy, base)
    assert m["lap_ratio"] > 1.5 and m["change"] > 0.05
