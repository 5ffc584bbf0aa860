"""`latent-rewards encode` with the tiny Wan VAE: files, manifest, resume, shards, bad videos."""

from __future__ import annotations

import torch

from latent_rewards.trainer.cli import main
from latent_rewards.trainer.data import VideoEncoder, list_latent_items, load_latent_file, read_manifest

ARGS = ["--fps", "12", "--frames", "9", "--size", "64x32"]


def test_encode_writes_latents_manifest_and_resumes(tmp_path, tiny_vae_dirs, textured_video_factory, capsys):
    vids = tmp_path / "videos"
    a = textured_video_factory(vids / "a.mp4", seed=1)
    b = textured_video_factory(vids / "b.mp4", seed=2)
    b2 = textured_video_factory(vids / "sub" / "b.mp4", seed=3)  # same stem as b.mp4
    out = tmp_path / "latents"
    assert main(["encode", str(vids), "--out", str(out), "--vae", str(tiny_vae_dirs[1]), *ARGS]) == 0
    assert "encoded 3, skipped 0" in capsys.readouterr().out
    entries = {e["source"]: e for e in read_manifest(out)}
    assert set(entries) == {str(a), str(b), str(b2)}
    assert entries[str(a)]["file"] == "a.safetensors"
    assert entries[str(b)]["file"] != entries[str(b2)]["file"]  # colliding stems get distinct names
    assert entries[str(a)]["shape"] == [16, 3, 4, 8] and entries[str(a)]["size"] == [64, 32]
    assert entries[str(a)]["frames"] == 9 and entries[str(a)]["layout"] == "CTHW"
    enc = VideoEncoder.from_pretrained(tiny_vae_dirs[0])
    torch.testing.assert_close(load_latent_file(out / "a.safetensors"),
                               enc.encode_file(a, fps=12, frames=9, size="64x32"))
    assert len(list_latent_items(out)) == 3

    # Killed after writing a latent but before its manifest line: the line is restored from the file.
    (out / "manifest.jsonl").write_text("")
    # Resume: nothing is re-encoded, so even an unusable --vae is never loaded.
    assert main(["encode", str(vids), "--out", str(out), "--vae", str(tmp_path / "no_vae_here"), *ARGS]) == 0
    assert "encoded 0, skipped 3" in capsys.readouterr().out
    assert {e["source"] for e in read_manifest(out)} == {str(a), str(b), str(b2)}


def test_encode_shards_split_the_work(tmp_path, tiny_vae_dirs, textured_video_factory, capsys):
    vids = [textured_video_factory(tmp_path / "v" / f"clip{i}.mp4", frames=5, seed=i) for i in range(3)]
    out = tmp_path / "latents"
    for i in range(2):
        assert main(["encode", *map(str, vids), "--out", str(out), "--vae", str(tiny_vae_dirs[0]),
                     "--shard", f"{i}/2", *ARGS]) == 0
    text = capsys.readouterr().out
    assert "encoded 2, skipped 0 already encoded, failed 0 (shard 0/2)" in text
    assert "encoded 1, skipped 0 already encoded, failed 0 (shard 1/2)" in text
    assert sorted(p.name for p in out.glob("manifest*.jsonl")) == ["manifest-00000-of-00002.jsonl",
                                                                    "manifest-00001-of-00002.jsonl"]
    assert sorted(e["file"] for e in read_manifest(out)) == ["clip0.safetensors", "clip1.safetensors",
                                                             "clip2.safetensors"]


def test_encode_bad_video_stops_or_is_skipped(tmp_path, tiny_vae_dirs, textured_video_factory, capsys):
    good = textured_video_factory(tmp_path / "v" / "good.mp4", frames=5)
    bad = tmp_path / "v" / "broken.mp4"
    bad.write_bytes(b"\x00" * 3000)
    out = tmp_path / "latents"
    base = ["encode", str(tmp_path / "v"), "--out", str(out), "--vae", str(tiny_vae_dirs[0]), *ARGS]
    assert main(base) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]  # tqdm also writes to stderr
    assert len(errors) == 1 and errors[0].startswith("latent-rewards encode: error:") and "broken.mp4" in errors[0]
    assert "Traceback" not in err
    assert main([*base, "--skip-bad"]) == 1
    text = capsys.readouterr().out
    assert "failed 1" in text and "broken.mp4" in text
    assert [e["file"] for e in read_manifest(out)] == ["good.safetensors"]
    assert main(["encode", str(good), "--out", str(out), "--frames", "8"]) == 2
    assert "4k+1" in capsys.readouterr().err


def test_encode_takes_its_shard_from_the_launcher(tmp_path, tiny_vae_dirs, textured_video_factory, capsys,
                                                  monkeypatch):
    """Under `accelerate launch` / torchrun each process encodes the shard given by RANK / WORLD_SIZE."""
    vids = [textured_video_factory(tmp_path / "v" / f"clip{i}.mp4", frames=5, seed=i) for i in range(3)]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    out = tmp_path / "latents"
    assert main(["encode", *map(str, vids), "--out", str(out), "--vae", str(tiny_vae_dirs[0]), *ARGS]) == 0
    assert "(shard 1/2)" in capsys.readouterr().out
    assert [e["file"] for e in read_manifest(out)] == ["clip1.safetensors"]
    assert (out / "manifest-00001-of-00002.jsonl").is_file()
