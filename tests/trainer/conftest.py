"""Fixtures of the trainer tests: a small Shell-LCC reward folder, a shared text-embedding cache, overrides that
shrink the tiny-cpu config further, and one short training run shared by the export/push tests."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

#: Few, short prompts: the tiny text encoder (width 4096) is the slowest part of a tiny run's setup.
PROMPTS = ["a cat on a sofa", "a red car at night", "waves on a beach", "a man reading a book"]


@pytest.fixture(scope="session")
def reward_dir(tmp_path_factory) -> Path:
    """A small random Shell-LCC (64 anchors, hidden 32) with non-trivial BatchNorm statistics, saved."""
    from latent_rewards import ShellLCC

    torch.manual_seed(0)
    m = ShellLCC(num_bases=64, hidden_dim=32)
    bn = m.predictor[1]
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("reward") / "shell-lcc"
    m.freeze().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("text_cache")


@pytest.fixture(scope="session")
def tiny_overrides(reward_dir, text_cache):
    """``make(output_dir, *extra) -> [key=value, ...]`` for the tiny-cpu config, shrunk for tests."""

    def make(output_dir: Path, *extra: str) -> list[str]:
        return [
            f"reward.path={reward_dir}",
            f"output_dir={output_dir}",
            f"text_cache_dir={text_cache}",
            "prompts=[" + ", ".join(PROMPTS) + "]",
            "max_sequence_length=32",
            "logging.report_to=none",
            *extra,
        ]

    return make


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_overrides):
    """8 steps of tiny-cpu (validation and checkpoints every 4, TensorBoard on): ``(trainer, result)``."""
    from latent_rewards.trainer.config import load_config
    from latent_rewards.trainer.loop import Trainer

    logging.getLogger("latent_rewards").setLevel(logging.INFO)
    out = tmp_path_factory.mktemp("run") / "tiny"
    cfg = load_config("tiny-cpu", tiny_overrides(out, "max_steps=8", "keep_last=1", "logging.report_to=tensorboard"))
    trainer = Trainer(cfg, progress=False)
    result = trainer.train()
    return trainer, result
