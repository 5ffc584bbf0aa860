"""Latent files, folders/manifests, the streaming voxel sampler, input helpers and report statistics."""

from __future__ import annotations

import json
import logging
import pickle

import pytest
import torch
from safetensors.torch import save_file

from latent_rewards.rewards.errors import (
    ConfigError,
    DataError,
    LatentShapeError,
    LatentSpaceMismatchError,
    NonFiniteError,
)
from latent_rewards.trainer.data import (
    VoxelSampler,
    append_manifest,
    choose_bucket,
    expand_inputs,
    input_kind,
    list_latent_items,
    load_latent_file,
    parse_shard,
    parse_size,
    read_latent_metadata,
    read_manifest,
    save_latent_file,
)
from latent_rewards.trainer.report import distinguishability, summary_stats


def _z(c=16, t=3, h=4, w=5, seed=0):
    return torch.randn(c, t, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- latent files
def test_safetensors_any_key_and_both_layouts(tmp_path):
    z = _z()
    save_file({"whatever_name": z}, str(tmp_path / "a.safetensors"))
    save_file({"x": z.permute(1, 0, 2, 3).contiguous()}, str(tmp_path / "b.safetensors"))  # [T, C, H, W]
    assert torch.equal(load_latent_file(tmp_path / "a.safetensors"), z)
    assert torch.equal(load_latent_file(tmp_path / "b.safetensors"), z)


def test_pt_files_bf16_32_channels_and_batch_dim(tmp_path):
    z = _z()
    # The official extractor: [T, 16, H, W] bf16 .pt
    torch.save(z.permute(1, 0, 2, 3).bfloat16(), tmp_path / "official.pt")
    got = load_latent_file(tmp_path / "official.pt")
    assert got.dtype == torch.float32 and torch.equal(got, z.bfloat16().float())
    # mean || logvar: the first 16 channels are the latent
    torch.save(torch.cat([z, torch.full_like(z, -7.0)]), tmp_path / "meanlogvar.pt")
    assert torch.equal(load_latent_file(tmp_path / "meanlogvar.pt"), z)
    torch.save(torch.cat([z, z]).permute(1, 0, 2, 3).clone(), tmp_path / "meanlogvar_tchw.pth")
    assert torch.equal(load_latent_file(tmp_path / "meanlogvar_tchw.pth"), z)
    torch.save({"latent": z[None]}, tmp_path / "dict_batch.pt")
    assert torch.equal(load_latent_file(tmp_path / "dict_batch.pt"), z)


def _layout_warnings(caplog, name):
    return [r for r in caplog.records if r.levelno == logging.WARNING and "ambiguous layout" in r.getMessage()
            and name in r.getMessage()]


def test_ambiguous_16x16_prefers_cthw_unless_told(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="latent_rewards")
    z = _z(t=16)
    tchw = z.permute(1, 0, 2, 3).contiguous()
    torch.save(tchw, tmp_path / "amb.pt")
    assert torch.equal(load_latent_file(tmp_path / "amb.pt"), tchw)  # read as [C, T, H, W]
    # ... with one warning for that file, naming it and the option that settles it, however often it is read.
    assert torch.equal(load_latent_file(tmp_path / "amb.pt"), tchw)
    (warning,) = _layout_warnings(caplog, "amb.pt")
    assert str(tmp_path / "amb.pt") in warning.getMessage() and "--layout TCHW" in warning.getMessage()
    assert "[16, 16, 4, 5]" in warning.getMessage()
    caplog.clear()
    assert torch.equal(load_latent_file(tmp_path / "amb.pt", layout="TCHW"), z)
    save_file({"z": tchw}, str(tmp_path / "amb.safetensors"), metadata={"layout": "TCHW"})
    assert torch.equal(load_latent_file(tmp_path / "amb.safetensors"), z)  # metadata decides
    save_latent_file(tmp_path / "ours.safetensors", z)  # our own files record their layout
    assert torch.equal(load_latent_file(tmp_path / "ours.safetensors"), z)
    torch.save(_z(t=15), tmp_path / "plain.pt")  # 15 latent frames: not ambiguous
    load_latent_file(tmp_path / "plain.pt")
    # A manifest can declare the layout of files that carry no metadata.
    folder = tmp_path / "folder"
    folder.mkdir()
    torch.save(tchw, folder / "clip.pt")
    append_manifest(folder, [{"file": "clip.pt", "layout": "TCHW"}])
    (item,) = list_latent_items(folder)
    assert item.layout == "TCHW"
    assert torch.equal(load_latent_file(item.path, layout=item.layout), z)
    assert list_latent_items(folder, layout="CTHW")[0].layout == "CTHW"
    assert torch.equal(VoxelSampler([item], batch_voxels=8, seed=0).clip(0), z.permute(1, 2, 3, 0).reshape(-1, 16))
    assert not [r for r in caplog.records if "ambiguous layout" in r.getMessage()]
    # A folder of such files without a manifest (the official extractor's output): one warning per file, even when
    # the sampler reads its clips again and again.
    bare = tmp_path / "bare"
    for i in range(3):
        bare.mkdir(exist_ok=True)
        torch.save(_z(t=16, seed=i).permute(1, 0, 2, 3).contiguous(), bare / f"c{i}.pt")
    sampler = VoxelSampler(list_latent_items(bare), batch_voxels=16, seed=0, cache_clips=1)
    for step in range(6):
        sampler.batch(step)
    assert sorted(len(_layout_warnings(caplog, f"c{i}.pt")) for i in range(3)) == [1, 1, 1]


def test_save_latent_file_round_trip_metadata_and_atomic(tmp_path):
    z = _z()
    path = save_latent_file(tmp_path / "sub" / "clip.safetensors", z, {"source": "v.mp4", "fps": 24})
    assert torch.equal(load_latent_file(path), z)
    meta = read_latent_metadata(path)
    assert meta["layout"] == "CTHW" and meta["latent_space"] == "wan2.1" and meta["source"] == "v.mp4"
    assert json.loads(meta["fps"]) == 24
    assert sorted(p.name for p in path.parent.iterdir()) == ["clip.safetensors"]  # no temp files left
    with pytest.raises(NonFiniteError):
        save_latent_file(tmp_path / "bad.safetensors", torch.full((16, 1, 2, 2), float("nan")))
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda p: save_file({"a": _z(), "b": _z()}, str(p)), DataError, ["exactly one", "'a'", "'b'"]),
        (lambda p: save_file({}, str(p)), DataError, ["exactly one", "0 tensors"]),
        (lambda p: save_file({"z": torch.randn(16, 4, 4)}, str(p)), LatentShapeError, ["[16, T, H, W]", "(16, 4, 4)"]),
        (lambda p: save_file({"z": torch.randn(8, 3, 4, 4)}, str(p)), LatentShapeError, ["16 channels", "(8, 3, 4, 4)"]),
        (lambda p: save_file({"z": torch.randn(2, 16, 3, 4, 4)}, str(p)), LatentShapeError, ["(2, 16, 3, 4, 4)"]),
        (lambda p: save_file({"z": _z().index_fill_(1, torch.tensor([1]), float("inf"))}, str(p)), NonFiniteError,
         ["NaN or Inf"]),
        (lambda p: save_file({"z": torch.zeros(16, 2, 2, 2, dtype=torch.int32)}, str(p)), LatentShapeError,
         ["floating-point"]),
        (lambda p: p.write_bytes(b"\x00\x01garbage" * 10), DataError, ["not a latent file"]),
        (lambda p: save_file({"z": _z()}, str(p), metadata={"latent_space": "other16"}), LatentSpaceMismatchError,
         ["other16", "wan2.1"]),
    ],
    ids=["two-tensors", "zero-tensors", "rank3", "8-channels", "batch2", "inf", "int", "garbage", "other-space"],
)
def test_bad_safetensors_files(tmp_path, make, error, words):
    from latent_rewards.rewards.latent_space import LatentSpace, register_latent_space

    register_latent_space(LatentSpace(name="other16", channels=16, mean=(0.0,) * 16, std=(1.0,) * 16))
    # "garbage" has an unknown suffix, so the content sniffing path is covered too.
    path = tmp_path / ("bad.bin" if error is DataError and "not a latent file" in words else "bad.safetensors")
    make(path)
    with pytest.raises(error) as info:
        load_latent_file(path)
    msg = str(info.value)
    assert str(path) in msg
    for w in words:
        assert w in msg


def test_bad_torch_files(tmp_path, capsys):
    with pytest.raises(DataError, match="no such latent file"):
        load_latent_file(tmp_path / "missing.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="not a readable PyTorch tensor file"):
        load_latent_file(tmp_path / "corrupt.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(DataError, match="refused to load"):
        load_latent_file(tmp_path / "evil.pt")
    assert "unpickled!" not in capsys.readouterr().out
    torch.save({"a": _z(), "b": _z()}, tmp_path / "two.pt")
    with pytest.raises(DataError, match="exactly one latent tensor"):
        load_latent_file(tmp_path / "two.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(DataError, match="found a list"):
        load_latent_file(tmp_path / "list.pt")


# ---------------------------------------------------------------------------------------------- folders
def test_folder_listing_manifest_and_errors(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        list_latent_items(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no latent files found"):
        list_latent_items(tmp_path / "empty")
    save_latent_file(tmp_path / "f.safetensors", _z())
    with pytest.raises(DataError, match="is a file"):
        list_latent_items(tmp_path / "f.safetensors")
    d = tmp_path / "d"
    save_latent_file(d / "b.safetensors", _z())
    save_latent_file(d / "sub" / "a.safetensors", _z())
    (d / ".hidden.safetensors").write_bytes(b"partial")
    (d / "notes.txt").write_text("x")
    assert [i.path.name for i in list_latent_items(d)] == ["b.safetensors", "a.safetensors"]
    append_manifest(d, [{"file": "b.safetensors", "layout": "CTHW"}], name="manifest-00000-of-00002.jsonl")
    append_manifest(d, [{"file": "sub/a.safetensors", "layout": "CTHW", "v": 1}], name="manifest.jsonl")
    append_manifest(d, [{"file": "sub/a.safetensors", "layout": "CTHW", "v": 2}], name="manifest.jsonl")
    entries = {e["file"]: e for e in read_manifest(d)}
    assert set(entries) == {"b.safetensors", "sub/a.safetensors"} and entries["sub/a.safetensors"]["v"] == 2
    (d / "manifest.jsonl").write_text('{"file": "x"}\nnot json\n')
    with pytest.raises(DataError, match=r"manifest.jsonl:2: not a JSON object"):
        read_manifest(d)


# ---------------------------------------------------------------------------------------------- sampler
@pytest.fixture
def clip_folder(tmp_path):
    for i in range(10):
        save_latent_file(tmp_path / f"c{i}.safetensors", torch.full((16, 2, 3, 3), float(i)) + 0.01 * _z(16, 2, 3, 3, i))
    return list_latent_items(tmp_path)


def test_sampler_is_a_pure_function_of_seed_step_rank(clip_folder):
    a = VoxelSampler(clip_folder, batch_voxels=64, seed=1, cache_clips=2)
    b = VoxelSampler(clip_folder, batch_voxels=64, seed=1, cache_clips=2)
    seq = [a.batch(s) for s in range(12)]
    # A fresh sampler asked for the steps in another order (as after a resume) gives the same batches.
    for s in [7, 3, 11, 0]:
        assert torch.equal(b.batch(s), seq[s])
    assert seq[0].shape == (64, 16)
    assert not torch.equal(seq[0], seq[1])
    assert not torch.equal(VoxelSampler(clip_folder, batch_voxels=64, seed=2).batch(0), seq[0])
    # Voxels come only from the step's clips (clip i has values near i).
    for s in range(5):
        clips = set(a.clips_for_step(s))
        assert set(seq[s].mean(1).round().long().tolist()) <= clips


def test_sampler_sharding_covers_each_clip_once_per_pass(clip_folder):
    world, k, n = 2, 2, len(clip_folder)
    ranks = [VoxelSampler(clip_folder, batch_voxels=8, seed=0, rank=r, world_size=world, clips_per_step=k)
             for r in range(world)]
    used = []
    for step in range(n * 3 // (world * k) + 1):
        step_clips = [ranks[r].clips_for_step(step) for r in range(world)]
        first, last = step * world * k, (step + 1) * world * k - 1
        if first // n == last // n:  # the step lies inside one pass: processes never share a clip
            assert not set(step_clips[0]) & set(step_clips[1])
        used += [c for cl in step_clips for c in cl]
    for p in range(3):  # every pass over the data uses each clip exactly once
        assert sorted(used[p * n : (p + 1) * n]) == list(range(n))
    # Different ranks draw different voxels at the same step.
    assert not torch.equal(ranks[0].batch(0), ranks[1].batch(0))


def test_sampler_memory_is_bounded_by_the_lru_cache(clip_folder):
    s = VoxelSampler(clip_folder, batch_voxels=16, seed=0, cache_clips=3, clips_per_step=2)
    for step in range(20):
        s.batch(step)
        assert len(s._cache) <= 3
    assert s.loads > 10  # clips were read again after eviction, not kept
    s.max_frames = 1
    s._cache.clear()
    assert s.clip(0).shape == (9, 16)  # first latent frame only: 3 x 3 voxels


def test_initial_voxels_distinct_and_rank_independent(clip_folder):
    a = VoxelSampler(clip_folder, batch_voxels=8, seed=5, rank=1, world_size=2).initial_voxels(40)
    b = VoxelSampler(clip_folder, batch_voxels=8, seed=5).initial_voxels(40)
    assert torch.equal(a, b) and a.shape == (40, 16)
    assert torch.unique(a, dim=0).shape[0] == 40
    with pytest.raises(ConfigError, match="only 180"):
        VoxelSampler(clip_folder, batch_voxels=8).initial_voxels(1000)
    with pytest.raises(ConfigError):
        VoxelSampler(clip_folder, batch_voxels=0)
    with pytest.raises(DataError):
        VoxelSampler([], batch_voxels=8)


# ---------------------------------------------------------------------------------------------- inputs
def test_input_kinds_and_expansion(tmp_path):
    save_latent_file(tmp_path / "a.safetensors", _z())
    (tmp_path / "b.mp4").write_bytes(b"")
    torch.save(_z(), tmp_path / "noext")
    (tmp_path / "c.weird").write_bytes(b"???")
    assert input_kind(tmp_path / "a.safetensors") == "latent"
    assert input_kind(tmp_path / "b.mp4") == "video"
    assert input_kind(tmp_path / "noext") == "latent"  # sniffed: a torch zip file
    assert input_kind(tmp_path / "c.weird") == "video"  # unknown content: try to decode it as a video
    assert [p.name for p in expand_inputs([tmp_path])] == ["a.safetensors", "b.mp4"]
    assert [p.name for p in expand_inputs([tmp_path], kinds=("video",))] == ["b.mp4"]
    with pytest.raises(DataError, match="no such file or folder"):
        expand_inputs([tmp_path / "missing.mp4"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no latent or video files"):
        expand_inputs([tmp_path / "empty"])


def test_sizes_buckets_and_shards():
    assert parse_size("480p") == "480p" and parse_size("64x32") == (64, 32)
    assert choose_bucket(1920, 1080, "480p") == (832, 480)
    assert choose_bucket(1080, 1920, "720p") == (720, 1280)
    assert choose_bucket(500, 480, "480p") == (624, 624)
    assert choose_bucket(10, 10, "64x32") == (64, 32)
    for bad in ["1080x", "63x32", "big"]:
        with pytest.raises(ConfigError):
            parse_size(bad)
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) is None
    for bad in ["4/4", "a/b", "1"]:
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)


# ---------------------------------------------------------------------------------------------- report stats
def test_distinguishability_matches_all_pairs_with_half_ties():
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 6, (37,), generator=g).float()
    gen = torch.randint(2, 9, (23,), generator=g).float()
    brute = sum((1.0 if r < q else 0.5 if r == q else 0.0) for r in real for q in gen) / (37 * 23)
    assert distinguishability(real, gen) == pytest.approx(brute)
    assert distinguishability(-real, -gen, lower_is_real=False) == pytest.approx(brute)
    assert distinguishability([1, 2], [3, 4]) == 1.0 and distinguishability([3], [3]) == 0.5
    s = summary_stats([1.0, 2.0, 3.0])
    assert s["n"] == 3 and s["mean"] == 2.0 and s["std"] == pytest.approx((2 / 3) ** 0.5)


def test_atomic_file_writes_leave_the_old_file_on_failure(tmp_path):
    from latent_rewards.rewards.hub import atomic_write_file

    path = save_latent_file(tmp_path / "clip.safetensors", _z())

    def broken(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write_file(path, broken)
    assert torch.equal(load_latent_file(path), _z())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.safetensors"]
