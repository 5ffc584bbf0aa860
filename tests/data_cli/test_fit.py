"""Manifold fitting: losses, the unit shell, outputs, exact resume, folder checks, and two DDP processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from latent_rewards import ShellLCC
from latent_rewards.rewards.errors import CheckpointError, ConfigError
from latent_rewards.trainer.cli import main
from latent_rewards.trainer.fit_manifold import FitConfig, fit_manifold, load_fit_checkpoint


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def test_fit_losses_shell_and_outputs(tiny_fit, shell_data):
    out = tiny_fit.out_dir
    assert tiny_fit.finished and tiny_fit.step == 500
    log = _log(out)
    assert [e["step"] for e in log] == list(range(10, 501, 10))
    s1 = [e["loss"] for e in log if e["stage"] == 1]
    s2 = [e["shell"] for e in log if e["stage"] == 2]
    assert len(s1) == 30 and len(s2) == 20
    assert sum(s1[-3:]) < 0.1 * sum(s1[:3])  # the LCC loss goes down
    assert sum(s2[-3:]) < 0.5 * sum(s2[:3])  # the shell loss goes down
    # After stage 2 real voxels sit on the unit shell.
    summary = json.loads((out / "fit_summary.json").read_text())
    assert summary["train_voxel_r"]["mean"] == pytest.approx(1.0, abs=0.1)
    assert summary["train_r_dist"]["n"] == 12
    # The folder is a reward folder that from_pretrained loads, identical to the trained model.
    loaded = ShellLCC.from_pretrained(out)
    for k, v in tiny_fit.reward.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    for name in ["config.json", "model.safetensors", "README.md", "r_dist_hist.png", "train_curves.png"]:
        assert (out / name).is_file(), name
    assert (out / "r_dist_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Training-set R_dist per clip" in (out / "README.md").read_text()
    assert load_fit_checkpoint(out / "checkpoint" / "state.pt")["step"] == 500
    # The summary's numbers are the saved model's: recompute the training clips' R_dist.
    from latent_rewards.trainer.data import list_latent_items, load_latent_file

    z = torch.stack([load_latent_file(i.path) for i in list_latent_items(shell_data / "train")])
    r = loaded.distance(z)
    assert r.mean().item() == pytest.approx(summary["train_r_dist"]["mean"], rel=1e-5)
    assert r.std(unbiased=False).item() == pytest.approx(summary["train_r_dist"]["std"], rel=1e-4)


RESUME = dict(anchors=12, hidden=16, lcc_steps=20, shell_steps=16, batch_voxels=256, seed=4, checkpoint_every=6,
              log_every=1, max_latent_frames=None, hist_clips=3)


def test_resume_gives_the_uninterrupted_result(tmp_path, shell_data):
    data = shell_data / "train"
    full = fit_manifold(data, tmp_path / "a", FitConfig(**RESUME), progress=False)

    out = tmp_path / "b"
    part = fit_manifold(data, out, FitConfig(**RESUME), progress=False, max_steps_this_run=9)
    assert not part.finished and part.step == 9
    assert not (out / "config.json").exists()  # not a reward folder until finished
    with pytest.raises(CheckpointError):
        ShellLCC.from_pretrained(out)

    def crash(step, logs):
        if step == 29:  # in stage 2; the last checkpoint was at step 24
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        fit_manifold(data, out, FitConfig(**RESUME), progress=False, resume=True, callback=crash)
    assert load_fit_checkpoint(out / "checkpoint" / "state.pt")["step"] == 24
    done = fit_manifold(data, out, FitConfig(**RESUME), progress=False, resume=True)
    assert done.finished
    for k, v in full.reward.state_dict().items():
        assert torch.equal(done.reward.state_dict()[k], v), k
    strip = lambda log: [{k: v for k, v in e.items() if k != "elapsed_s"} for e in log]  # noqa: E731
    assert strip(_log(out)) == strip(_log(tmp_path / "a"))
    assert [e["step"] for e in _log(out)] == list(range(1, 37))


def test_output_folder_checks(tmp_path, shell_data, capsys):
    data = shell_data / "train"
    cfg = dict(RESUME, lcc_steps=3, shell_steps=2)
    fit_manifold(data, tmp_path / "r", FitConfig(**cfg), progress=False)
    with pytest.raises(ConfigError, match="--resume .* --overwrite"):
        fit_manifold(data, tmp_path / "r", FitConfig(**cfg), progress=False)
    with pytest.raises(ConfigError, match="anchors: 12 -> 10"):
        fit_manifold(data, tmp_path / "r", FitConfig(**dict(cfg, anchors=10)), progress=False, resume=True)
    # More shell steps continue a finished fit; --overwrite starts over.
    more = fit_manifold(data, tmp_path / "r", FitConfig(**dict(cfg, shell_steps=4)), progress=False, resume=True)
    assert more.step == 7 and [e["step"] for e in _log(tmp_path / "r")] == list(range(1, 8))
    again = fit_manifold(data, tmp_path / "r", FitConfig(**cfg), progress=False, overwrite=True)
    assert again.step == 5 and len(_log(tmp_path / "r")) == 5
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    with pytest.raises(ConfigError, match="already holds files"):
        fit_manifold(data, tmp_path / "other", FitConfig(**cfg), progress=False)

    # CLI: bad inputs are one line and exit code 2.
    (tmp_path / "empty").mkdir()
    foreign = tmp_path / "foreign"
    (foreign / "checkpoint").mkdir(parents=True)
    torch.save({"model": {}, "epoch": 3}, foreign / "checkpoint" / "state.pt")
    cases = {
        "no latent files found": ["fit-manifold", str(tmp_path / "empty"), "--out", str(tmp_path / "o1")],
        "not a latent-rewards fit-manifold checkpoint": ["fit-manifold", str(data), "--out", str(foreign),
                                                         "--resume", "--anchors", "8"],
        "anchor initialisation needs 100000 real voxels": ["fit-manifold", str(data), "--out", str(tmp_path / "o2"),
                                                           "--anchors", "100000", "--max-latent-frames", "0"],
        "batch_voxels must be a positive integer": ["fit-manifold", str(data), "--out", str(tmp_path / "o3"),
                                                    "--batch-voxels", "0"],
    }
    for words, argv in cases.items():
        assert main(argv) == 2, words
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("latent-rewards fit-manifold: error:") and words in err


def test_optional_regularisers_are_used_when_enabled(tmp_path, shell_data):
    cfg = FitConfig(**dict(RESUME, lcc_steps=3, shell_steps=0, lambda_usage=0.1, lambda_basis=0.1))
    fit_manifold(shell_data / "train", tmp_path / "r", cfg, progress=False)
    entry = _log(tmp_path / "r")[-1]
    assert entry["usage_kl"] >= 0 and entry["basis_to_voxel"] >= 0
    parts = entry["recon"] + entry["locality"] + 0.1 * (entry["usage_kl"] + entry["basis_to_voxel"])
    assert entry["loss"] == pytest.approx(parts, rel=1e-5)


def test_cli_fit_with_max_steps_and_resume(tmp_path, shell_data, capsys):
    base = ["fit-manifold", str(shell_data / "train"), "--out", str(tmp_path / "r"), "--anchors", "8", "--hidden",
            "8", "--lcc-steps", "4", "--shell-steps", "4", "--batch-voxels", "128", "--checkpoint-every", "2",
            "--max-latent-frames", "0", "--no-progress"]
    assert main([*base, "--max-steps-this-run", "5"]) == 0
    assert "stopped at step 5/8" in capsys.readouterr().out
    assert main([*base, "--resume"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert ShellLCC.from_pretrained(tmp_path / "r").config.num_bases == 8


def test_two_processes_under_accelerate(tmp_path, shell_data):
    """`accelerate launch` with 2 CPU processes (gloo DDP): the processes stay identical, rank 0 writes."""
    out = tmp_path / "ddp" / "reward"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "29533", str(Path(__file__).with_name("_ddp_fit.py")),
           str(shell_data / "train"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["main"] and not r1["main"]
    assert r0["steps"] == r1["steps"] == list(range(1, 21))
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k  # gradients were averaged: both processes hold the same model
    summary = json.loads((out / "fit_summary.json").read_text())
    assert summary["world_size"] == 2
    log = _log(out)
    assert [e["step"] for e in log] == list(range(2, 21, 2))  # one writer: no duplicated lines
    assert log[0]["voxels_seen"] == 2 * 256 * 2
    loaded = ShellLCC.from_pretrained(out)
    for k, v in r0["state"].items():
        assert torch.equal(loaded.state_dict()[k], v), k
