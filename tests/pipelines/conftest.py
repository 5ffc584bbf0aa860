"""Fixtures for the diffusers integration tests: one tiny guided Wan pipeline per session, reset before each test."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def _session_pipe():
    from latent_rewards.pipelines import RewardGuidedWanPipeline
    from latent_rewards.pipelines.tiny import build_tiny_wan_pipeline

    pipe = build_tiny_wan_pipeline(RewardGuidedWanPipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(_session_pipe):
    """The session's tiny ``RewardGuidedWanPipeline`` with no reward, default guidance and Wan's UniPC scheduler."""
    from latent_rewards.pipelines.tiny import tiny_scheduler

    p = _session_pipe
    p.__dict__.pop("_latent_reward_state", None)
    p.scheduler = tiny_scheduler("unipc")
    yield p
    p.__dict__.pop("_latent_reward_state", None)


@pytest.fixture
def plain_pipe(pipe):
    """diffusers' own ``WanPipeline`` over the same component objects."""
    from diffusers import WanPipeline

    p = WanPipeline(**pipe.components)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def reward(small_shell_lcc):
    """A small random Shell-LCC (64 anchors): the tiny model's samples sit far from its shell, so the gradient
    of R_dist is informative and guidance lowers it reliably."""
    return small_shell_lcc(0)
