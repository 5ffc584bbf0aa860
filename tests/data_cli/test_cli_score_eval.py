"""`latent-rewards score` / `evaluate` / `demo`: output formats, values, videos, and one-line errors."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from latent_rewards import ShellLCC
from latent_rewards.rewards.errors import DataError
from latent_rewards.trainer.cli import main
from latent_rewards.trainer.data import VideoEncoder, load_latent_file
from latent_rewards.trainer.report import distinguishability


def _expected(reward_dir, z):
    m = ShellLCC.from_pretrained(reward_dir).metrics(z[None])
    return {k: float(v[0]) for k, v in m.items()}


def test_score_formats_and_layouts(tmp_path, tiny_fit, shell_data, capsys):
    reward = str(tiny_fit.out_dir)
    z = load_latent_file(shell_data / "real" / "r00.safetensors")
    torch.save(z.permute(1, 0, 2, 3).bfloat16(), tmp_path / "official.pt")  # [T, 16, H, W] bf16
    torch.save(torch.cat([z, z.exp()]), tmp_path / "meanlogvar.pt")  # 32 channels
    inputs = [str(shell_data / "real" / "r00.safetensors"), str(tmp_path / "official.pt"),
              str(tmp_path / "meanlogvar.pt")]
    exp = _expected(reward, z)
    exp_bf16 = _expected(reward, z.bfloat16().float())

    assert main(["score", reward, *inputs, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["input"] for r in rows] == inputs and all(r["kind"] == "latent" for r in rows)
    assert rows[0]["shape"] == [16, 2, 12, 12]
    for row, e in zip(rows, [exp, exp_bf16, exp]):
        for k in ("r_dist", "lcc_distance", "reward"):
            assert row[k] == pytest.approx(e[k], rel=1e-6)
    assert rows[0]["reward"] == pytest.approx(-rows[0]["r_dist"])

    assert main(["score", reward, *inputs, "--format", "csv"]) == 0
    parsed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["input"] for r in parsed] == inputs
    assert float(parsed[0]["r_dist"]) == pytest.approx(exp["r_dist"], rel=1e-6)
    assert parsed[0]["shape"] == "16x2x12x12"

    assert main(["score", reward, str(shell_data / "real")]) == 0  # a folder, table format
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["input", "kind", "C"] and table[0].split()[-3:] == ["r_dist", "lcc_distance",
                                                                                       "reward"]
    assert len(table) == 7 and f"{exp['r_dist']:.4f}" in table[1]


def test_score_videos_encoded_on_the_fly(tmp_path, tiny_fit, tiny_vae_dirs, textured_video_factory, capsys):
    video = textured_video_factory(tmp_path / "clip.mp4", frames=12)
    args = ["--vae", str(tiny_vae_dirs[1]), "--fps", "12", "--frames", "9", "--size", "64x32"]
    assert main(["score", str(tiny_fit.out_dir), str(video), "--format", "json", *args]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["kind"] == "video" and row["shape"] == [16, 3, 4, 8]
    z = VideoEncoder.from_pretrained(tiny_vae_dirs[0]).encode_file(video, fps=12, frames=9, size="64x32")
    assert row["r_dist"] == pytest.approx(_expected(tiny_fit.out_dir, z)["r_dist"], rel=1e-5)


def test_evaluate_real_vs_distorted(tmp_path, tiny_fit, shell_data, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_fit.out_dir), "--real", str(shell_data / "real"), "--generated",
                 str(shell_data / "distorted"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "distinguishability" in text and "r_dist" in text
    result = json.loads((out / "evaluation.json").read_text())
    assert result["n_real"] == 6 and result["n_generated"] == 6
    real = [r["r_dist"] for r in result["items"]["real"]]
    gen = [r["r_dist"] for r in result["items"]["generated"]]
    m = result["metrics"]["r_dist"]
    assert m["distinguishability"] == pytest.approx(distinguishability(real, gen))
    assert m["distinguishability"] == 1.0  # noise pushes every clip off the shell
    assert m["real"]["mean"] == pytest.approx(sum(real) / 6) and m["generated"]["mean"] > m["real"]["mean"]
    assert result["metrics"]["reward"]["real_is"] == "higher"
    assert result["metrics"]["reward"]["distinguishability"] == pytest.approx(1.0)
    rows = list(csv.DictReader(io.StringIO((out / "scores.csv").read_text())))
    assert [r["set"] for r in rows] == ["real"] * 6 + ["generated"] * 6
    assert (out / "r_dist_hist.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_inputs_are_one_line_errors(tmp_path, tiny_fit, shell_data, capsys):
    reward = str(tiny_fit.out_dir)
    (tmp_path / "empty").mkdir()
    save_file({"z": torch.randn(8, 2, 4, 4)}, str(tmp_path / "eight.safetensors"))
    save_file({"z": torch.full((16, 2, 4, 4), float("nan"))}, str(tmp_path / "nan.safetensors"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x01" * 999)
    good = str(shell_data / "real" / "r00.safetensors")
    cases = [
        ("no latent or video files", ["score", reward, str(tmp_path / "empty")]),
        ("16 channels", ["score", reward, str(tmp_path / "eight.safetensors")]),
        ("NaN or Inf", ["score", reward, str(tmp_path / "nan.safetensors")]),
        ("not a latent-rewards config", ["score", str(tmp_path / "foreign"), good]),
        ("is a file", ["score", str(tmp_path / "foreign.pt"), good]),
        ("no such folder, and not a Hub repository id", ["score", str(tmp_path / "no_reward"), good]),
        ("no such file or folder", ["score", reward, str(tmp_path / "missing.safetensors")]),
        ("corrupt.mp4", ["score", reward, str(tmp_path / "corrupt.mp4"), "--vae", str(tmp_path / "no_vae")]),
        ("no such file or folder", ["evaluate", reward, "--real", str(tmp_path / "nope"), "--generated", good]),
        ("no latent or video files", ["evaluate", reward, "--real", good, "--generated", str(tmp_path / "empty")]),
    ]
    for words, argv in cases:
        assert main(argv) == 2, words
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"latent-rewards {argv[0]}: error:") and words in err, err
    # --debug shows the exception itself.
    with pytest.raises(DataError):
        main(["--debug", "score", reward, str(tmp_path / "empty")])


def test_demo_end_to_end_quiet(tmp_path):
    """`latent-rewards demo --quiet` exactly as a user runs it: all three sections, only the report on stdout."""
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}  # third-party deprecation noise is not the demo's output
    proc = subprocess.run([sys.executable, "-m", "latent_rewards.trainer.cli", "demo", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress lines, no trainer log lines
    assert proc.stdout == (out / "report.txt").read_text()
    report = json.loads((out / "report.json").read_text())
    assert list(report["sections"]) == ["manifold", "guidance", "fine-tune"]
    res = report["sections"]["manifold"]
    sets = res["sets"]
    assert sets["real"]["r_dist"]["mean"] < sets["distorted"]["r_dist"]["mean"]
    assert sets["blurred"]["r_dist"]["mean"] < sets["real"]["r_dist"]["mean"]
    assert sets["blurred"]["lcc_distance"]["mean"] < sets["real"]["lcc_distance"]["mean"]  # plain LCC rewards blur
    assert res["distinguishability"]["real_vs_distorted"]["band_reward"] > 0.9
    assert res["distinguishability"]["real_vs_blurred"]["band_reward"] > 0.9
    assert all(res["checks"].values())
    assert res["train_r_dist"]["mean"] == pytest.approx(1.0, abs=0.1)
    assert proc.stdout.startswith("latent-rewards demo") and "What the paper claims" in proc.stdout
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert ShellLCC.from_pretrained(out / "reward").config.num_bases == 48


def test_demo_bad_arguments_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    cases = [
        (["--out", str(tmp_path / "a_file")], "is a file; the demo writes a folder"),
        (["--out", str(tmp_path / "a_file" / "sub"), "--quiet"], "a_file is a file"),  # errors show when quiet
        (["--out", str(tmp_path / "d"), "--sections", "nope"], "unknown demo section"),
    ]
    for extra, words in cases:
        assert main(["demo", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("latent-rewards demo: error:") and words in err, err
    assert (tmp_path / "a_file").read_text() == "x" and not (tmp_path / "d").exists()


def test_demo_help_describes_every_section():
    from latent_rewards.trainer.cli import build_parser
    from latent_rewards.trainer.demo import SECTIONS

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    text = " ".join(sub.choices["demo"].format_help().split())
    for section in SECTIONS:
        assert f"{section.name}:" in text
    assert "about 15 s on 2 CPU cores" in text and "minute" not in text
