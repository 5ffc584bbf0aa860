"""`--device`: one resolver for every command; a malformed or missing device is one line naming the choices."""

from __future__ import annotations

import pytest
import torch

from latent_rewards.rewards.errors import ConfigError
from latent_rewards.trainer.cli import main
from latent_rewards.rewards.devices import available_devices, resolve_device

#: A CUDA device this machine does not have (cuda:0 on a CPU-only torch, cuda:N past the last GPU otherwise).
MISSING_CUDA = f"cuda:{torch.cuda.device_count()}"


def test_resolve_device():
    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto") == resolve_device(" AUTO ") == auto
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert available_devices()[:2] == ["auto", "cpu"]
    assert ("cuda" in available_devices()) == torch.cuda.is_available()
    for bad, words in [("foo", "unknown device 'foo'"), ("cuda:x", "unknown device"), ("meta", "not a compute device"),
                       ("cpu:1", "no index"), (MISSING_CUDA, "cuda")]:
        with pytest.raises(ConfigError, match=words) as e:
            resolve_device(bad)
        assert "expected one of: auto, cpu" in str(e.value)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device available"):
            resolve_device("cuda")


def test_every_command_reports_a_bad_device_in_one_line(tmp_path, tiny_fit, shell_data, video_factory, capsys):
    reward, real = str(tiny_fit.out_dir), str(shell_data / "real")
    video = str(video_factory(tmp_path / "v.mp4", frames=5))
    commands = {
        "encode": ["encode", video, "--out", str(tmp_path / "enc")],
        "score": ["score", reward, real],
        "evaluate": ["evaluate", reward, "--real", real, "--generated", real, "--out", str(tmp_path / "ev")],
    }
    for argv in commands.values():
        for device, words in [("foo", "unknown device 'foo'"), (MISSING_CUDA, f"device '{MISSING_CUDA}'")]:
            assert main([*argv, "--device", device]) == 2, (argv[0], device)
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "Traceback" not in err, err
            assert err.startswith(f"latent-rewards {argv[0]}: error: {words}") and "expected one of: auto, cpu" in err
    assert not (tmp_path / "enc").exists() and not (tmp_path / "ev").exists()
    # The same commands run with an explicit CPU device.
    assert main(["score", reward, real, "--device", "cpu", "--format", "json"]) == 0
    assert '"r_dist"' in capsys.readouterr().out
