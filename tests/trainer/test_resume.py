"""Exact resume: a run stopped (max_steps split, kill -9, Ctrl-C) and continued gives the uninterrupted losses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from latent_rewards.rewards.errors import ConfigError
from latent_rewards.trainer.config import load_config
from latent_rewards.trainer.loop import Trainer
from safetensors.torch import load_file
from trainer_test_helpers import metrics_records

STEPS = 4
#: Validation every 2 steps too, so resume also restores the monitor and the base videos.
COMMON = (f"max_steps={STEPS}", "checkpoint_every=1", "keep_last=5", "batch_size=1", "validation.every=2",
          "validation.num_videos=1", "validation.num_inference_steps=2")


def _losses(run_dir: Path) -> list[float]:
    train = metrics_records(run_dir, "train")
    assert [r["step"] for r in train] == list(range(1, len(train) + 1)), "one line per step, in order"
    return [r["loss"] for r in train]


def _lora(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / f"checkpoint-{STEPS}" / "training_state" / "trainable.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_overrides):
    out = tmp_path_factory.mktemp("resume") / "full"
    Trainer(load_config("tiny-cpu", tiny_overrides(out, *COMMON)), progress=False).train()
    return out


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    assert _losses(run_dir) == _losses(reference)  # exactly, not approximately
    a, b = _lora(run_dir), _lora(reference)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    val = lambda d: [(r["step"], r["reward"]) for r in metrics_records(d, "validation")]
    assert val(run_dir) == val(reference)


def test_split_by_max_steps_resumes_exactly(tmp_path, tiny_overrides, uninterrupted):
    out = tmp_path / "split"
    first = Trainer(load_config("tiny-cpu", tiny_overrides(out, *COMMON, "max_steps=2")), progress=False).train()
    assert first.step == 2
    # The same command with a larger max_steps continues from checkpoint-2 (auto-resume).
    second = Trainer(load_config("tiny-cpu", tiny_overrides(out, *COMMON)), progress=False).train()
    assert second.step == STEPS
    _assert_same_run(out, uninterrupted)


def _spawn(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "latent_rewards.trainer", *args, "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"trainer exited early ({proc.returncode}):\n{out}\n{err}")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail(f"timed out waiting for {path}")
        time.sleep(0.02)


def test_kill_9_then_resume_reproduces_the_losses(tmp_path, tiny_overrides, uninterrupted, capsys):
    from latent_rewards.trainer.cli import main

    out = tmp_path / "killed"
    proc = _spawn(["tiny-cpu", *tiny_overrides(out, *COMMON)])
    _wait_for(out / "checkpoint-1" / "training_state" / "trainer_state.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert done and done[-1] < STEPS, "the kill must land before the end for this test to mean anything"
    # `latent-rewards train ... --resume` continues from the newest complete checkpoint.
    assert main(["train", "tiny-cpu", *tiny_overrides(out, *COMMON), "--resume", "--no-progress"]) == 0
    assert f"trained to step {STEPS}" in capsys.readouterr().out
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # half-written folders of the kill are gone
    _assert_same_run(out, uninterrupted)


def test_ctrl_c_saves_a_checkpoint_and_stops_cleanly(tmp_path, tiny_overrides, uninterrupted, caplog):
    """SIGINT, delivered to this process while it trains, is handled by the trainer's own handler."""
    import threading

    out = tmp_path / "interrupted"
    marker = out / "checkpoint-1" / "training_state" / "trainer_state.json"
    trainer = Trainer(load_config("tiny-cpu", tiny_overrides(out, *COMMON)), progress=False)
    main_thread = threading.main_thread().ident
    done = threading.Event()

    def interrupt() -> None:
        while not marker.exists() and not done.is_set():
            time.sleep(0.01)
        if not done.is_set():
            signal.pthread_kill(main_thread, signal.SIGINT)

    watcher = threading.Thread(target=interrupt, daemon=True)
    watcher.start()
    try:
        result = trainer.train()
    finally:
        done.set()
        watcher.join()
    assert result.interrupted and result.step < STEPS
    assert "checkpoint saved" in caplog.text
    # The step it stopped at has a checkpoint (written on the way out), so nothing is lost.
    assert len(_losses(out)) == result.step
    assert (out / f"checkpoint-{result.step}" / "training_state" / "trainer_state.json").is_file()
    resumed = Trainer(load_config("tiny-cpu", tiny_overrides(out, *COMMON)), progress=False).train()
    assert resumed.step == STEPS and not resumed.interrupted
    _assert_same_run(out, uninterrupted)


def test_resume_refuses_a_changed_recipe(tmp_path, tiny_overrides, uninterrupted):
    with pytest.raises(ConfigError, match=r"lora \(.*rank"):
        Trainer(load_config("tiny-cpu", tiny_overrides(uninterrupted, *COMMON, "lora.rank=4"))).train()
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        Trainer(load_config("tiny-cpu", tiny_overrides(uninterrupted, *COMMON)), resume="never").train()
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path / "empty", *COMMON)), resume="latest").train()
