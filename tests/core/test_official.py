"""Import of the authors' checkpoint format, checked against the official formula on random weights."""

import subprocess
import sys

import pytest
import torch

from latent_rewards.rewards import CheckpointError, ShellLCC, load_official_shell_lcc, load_reward
from latent_rewards.trainer.cli import main as cli_main
from official_formula import official_distance_reward


def _official_checkpoint(path, *, hidden=48, bases=96, prefix="module.", seed=0):
    """A file in the official format: {'epoch', 'model': state dict (DDP-prefixed), 'optimizer', 'config'}."""
    torch.manual_seed(seed)
    ref = ShellLCC(num_bases=bases, hidden_dim=hidden)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
        ref.predictor[1].running_mean.normal_(0, 0.5)
        ref.predictor[1].running_var.uniform_(0.3, 3.0)
        ref.predictor[1].num_batches_tracked.fill_(1234)
    state = {prefix + k: v.clone() for k, v in ref.state_dict().items()}
    config = {
        "embedding_dim": 16, "num_bases": bases, "hidden_dim": hidden, "lr": 1e-3, "epochs_lcc": 500,
        "epochs_shell": 100, "data_dir": "/data/latents", "save_dir": "./runs/run1", "resume_lcc": None,
        "lambda_usage": 0.1, "lambda_basis_to_patch": 0.1, "num_frames": 16,
    }
    torch.save({"epoch": 100, "model": state, "optimizer": {"state": {}, "param_groups": []}, "config": config}, path)
    return state


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_converted_reward_equals_official_distance_reward(tmp_path, prefix):
    state = _official_checkpoint(tmp_path / "shell_lcc.pth", prefix=prefix)
    model = load_official_shell_lcc(tmp_path / "shell_lcc.pth")
    g = torch.Generator().manual_seed(3)
    for shape in [(1, 16, 4, 6, 10), (3, 16, 2, 5, 7)]:
        z = torch.randn(*shape, generator=g) * 1.5
        official = official_distance_reward(state, z)
        # the official value is the mean over all voxels of the batch; ours is per sample (equal-size samples)
        ours = model.distance(z).mean()
        assert ours.item() == pytest.approx(official.item(), rel=1e-5)


def test_convert_cli_writes_a_loadable_folder(tmp_path, capsys):
    state = _official_checkpoint(tmp_path / "shell_lcc.pth")
    rc = cli_main(["convert", str(tmp_path / "shell_lcc.pth"), str(tmp_path / "out"), "--reward-mode", "band",
                   "--tau", "0.444"])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    reward = load_reward(tmp_path / "out")
    assert reward.config.num_bases == 96 and reward.config.hidden_dim == 48
    assert reward.config.reward_mode == "band" and reward.config.tau == 0.444
    z = torch.randn(1, 16, 3, 4, 4)
    assert reward.distance(z).item() == pytest.approx(official_distance_reward(state, z).item(), rel=1e-5)


def test_foreign_and_unsafe_files_are_refused(tmp_path, capsys):
    torch.save({"state_dict": {"conv.weight": torch.zeros(2)}}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="not a Shell-LCC checkpoint"):
        load_official_shell_lcc(tmp_path / "foreign.pth")

    (tmp_path / "garbage.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_official_shell_lcc(tmp_path / "garbage.pth")

    with pytest.raises(CheckpointError, match="no such file"):
        load_official_shell_lcc(tmp_path / "missing.pth")

    # A pickle carrying an arbitrary object must not be executed: weights_only refuses it.
    torch.save({"model": {"basis": torch.zeros(4, 16)}, "config": {"hook": _Evil()}}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_official_shell_lcc(tmp_path / "evil.pth")

    # Inconsistent config vs weights
    state = _official_checkpoint(tmp_path / "ok.pth")
    torch.save({"model": state, "config": {"num_bases": 4096}}, tmp_path / "inconsistent.pth")
    with pytest.raises(CheckpointError, match="config says num_bases=4096 but the weights have 96"):
        load_official_shell_lcc(tmp_path / "inconsistent.pth")

    # The CLI: one line, exit code 2, no traceback.
    rc = cli_main(["convert", str(tmp_path / "foreign.pth"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "not a Shell-LCC checkpoint" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_console_script_entry_point(tmp_path):
    _official_checkpoint(tmp_path / "m.pth")
    proc = subprocess.run(
        [sys.executable, "-m", "latent_rewards.trainer.cli", "convert", str(tmp_path / "m.pth"), str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "model.safetensors").is_file()
