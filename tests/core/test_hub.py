import json
from pathlib import Path
import shutil

import pytest
import torch

import latent_rewards
from latent_rewards.rewards import CheckpointError, ConfigError, LatentReward, ShellLCC, load_reward
from latent_rewards.rewards import hub


def _z(seed=0):
    return torch.randn(2, 16, 2, 3, 3, generator=torch.Generator().manual_seed(seed))


def test_save_load_round_trip(tmp_path, small_shell_lcc):
    m = small_shell_lcc(seed=2)
    m.set_reward_mode("band", tau=0.444)
    out = m.save_pretrained(tmp_path / "reward")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kind"] == "shell-lcc" and cfg["latent_space"] == "wan2.1"
    assert cfg["num_bases"] == 64 and cfg["hidden_dim"] == 32 and cfg["embedding_dim"] == 16
    assert cfg["reward_mode"] == "band" and cfg["tau"] == 0.444
    assert cfg["latent_rewards_version"] == latent_rewards.__version__
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: latent-rewards") and "shell-lcc" in card

    for loaded in (ShellLCC.from_pretrained(out), LatentReward.from_pretrained(out), load_reward(str(out))):
        assert isinstance(loaded, ShellLCC)
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        assert loaded.config == m.config
        z = _z()
        assert torch.equal(loaded.reward(z), m.reward(z))
    assert load_reward(m) is m


def test_overwrite_is_atomic_and_failure_keeps_previous(tmp_path, small_shell_lcc, monkeypatch):
    target = tmp_path / "reward"
    first = small_shell_lcc(seed=1)
    first.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        small_shell_lcc(seed=5).save_pretrained(target)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reward"]  # no temp folders left behind

    second = small_shell_lcc(seed=5)
    second.save_pretrained(target)
    assert torch.equal(load_reward(target).basis, second.basis)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reward"]


def test_load_errors(tmp_path, small_shell_lcc):
    with pytest.raises(CheckpointError, match="no such folder"):
        load_reward(tmp_path / "missing" / "reward")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="expected config.json"):
        load_reward(empty)
    a_file = tmp_path / "x.pth"
    a_file.write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="is a file"):
        load_reward(a_file)

    good = small_shell_lcc().save_pretrained(tmp_path / "good")
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_reward(broken)

    other_kind = tmp_path / "other"
    shutil.copytree(good, other_kind)
    cfg = json.loads((other_kind / "config.json").read_text())
    (other_kind / "config.json").write_text(json.dumps({**cfg, "kind": "no-such-reward"}))
    with pytest.raises(ConfigError, match="unknown reward kind 'no-such-reward'"):
        load_reward(other_kind)

    resized = tmp_path / "resized"
    shutil.copytree(good, resized)
    (resized / "config.json").write_text(json.dumps({**cfg, "num_bases": 65}))
    with pytest.raises(CheckpointError, match="shapes do not match"):
        load_reward(resized)

    (resized / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable config"):
        load_reward(resized)


def test_from_pretrained_checks_the_class(tmp_path, small_shell_lcc):
    folder = small_shell_lcc().save_pretrained(tmp_path / "r")

    class OtherReward(LatentReward):
        kind = "other-test-reward"

    with pytest.raises(CheckpointError, match="holds a 'shell-lcc' reward"):
        OtherReward.from_pretrained(folder)


def _fill_hub_cache(cache, repo_id, folder, revision_hash="a" * 40):
    """The huggingface_hub cache layout: models--user--name/{refs/main, snapshots/<hash>/files}."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo_dir / "snapshots" / revision_hash
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        shutil.copy(f, snap / f.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision_hash)


def test_from_hub_id_through_offline_cache(tmp_path, small_shell_lcc):
    m = small_shell_lcc(seed=11)
    folder = m.save_pretrained(tmp_path / "reward")
    cache = tmp_path / "cache"
    _fill_hub_cache(cache, "someone/shell-lcc-test", folder)
    loaded = load_reward("someone/shell-lcc-test", cache_dir=cache, local_files_only=True)
    assert torch.equal(loaded.reward(_z()), m.reward(_z()))
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        load_reward("someone/not-cached", cache_dir=cache, local_files_only=True)
    with pytest.raises(CheckpointError, match="not a Hub repository id"):
        load_reward("not a repo id!")


def test_push_to_hub_uploads_the_saved_folder(tmp_path, small_shell_lcc, monkeypatch):
    """Everything up to the network call is real; the two HfApi calls that would reach the Hub are captured."""
    from huggingface_hub import HfApi

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload"] = (repo_id, kwargs)
        calls["files"] = {p.name: p.read_bytes() for p in __import__("pathlib").Path(folder_path).iterdir()}

        class Info:
            commit_url = f"https://huggingface.co/{repo_id}/commit/abc"

        return Info()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    m = small_shell_lcc(seed=4)
    url = m.push_to_hub("someone/my-manifold", private=True, token="hf_secret")
    assert url.endswith("/commit/abc")
    assert calls["create"] == ("someone/my-manifold", {"private": True, "exist_ok": True})
    assert set(calls["files"]) == {"config.json", "model.safetensors", "README.md"}
    # what was uploaded loads back to the same reward
    up = tmp_path / "uploaded"
    up.mkdir()
    for name, data in calls["files"].items():
        (up / name).write_bytes(data)
    assert torch.equal(load_reward(up).reward(_z()), m.reward(_z()))
    with pytest.raises(CheckpointError, match="not a Hub repository id"):
        m.push_to_hub("no-slash")


def test_atomic_write_text(tmp_path):
    p = tmp_path / "sub" / "log.json"
    hub.atomic_write_text(p, "one")
    hub.atomic_write_text(p, "two")
    assert p.read_text() == "two" and sorted(x.name for x in p.parent.iterdir()) == ["log.json"]


def test_push_failure_is_one_clear_line_without_the_token(small_shell_lcc, monkeypatch):
    from huggingface_hub import HfApi

    def offline(self, repo_id, **kwargs):
        raise ConnectionError(f"cannot reach https://huggingface.co with Authorization: Bearer hf_supersecret for {repo_id}")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    with pytest.raises(CheckpointError) as info:
        small_shell_lcc().push_to_hub("someone/x", token="hf_supersecret")
    message = str(info.value)
    assert "could not upload to the Hub repository someone/x" in message and "ConnectionError" in message
    assert "hf_supersecret" not in message and "\n" not in message


def test_atomic_writes_give_ordinary_permissions(tmp_path, small_shell_lcc):
    """mkdtemp/mkstemp are owner-only; what we save must be readable like any file (e.g. by a ComfyUI server)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        folder = small_shell_lcc().save_pretrained(tmp_path / "reward")
        hub.atomic_write_text(tmp_path / "note.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert stat.S_IMODE((folder / "config.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "note.txt").stat().st_mode) == 0o644


def test_hub_only_resolution_ignores_a_local_folder_of_that_name(tmp_path, small_shell_lcc, monkeypatch):
    m = small_shell_lcc(seed=12)
    cache = tmp_path / "cache"
    _fill_hub_cache(cache, "someone/manifold", m.save_pretrained(tmp_path / "saved"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "someone" / "manifold").mkdir(parents=True)  # a folder that would shadow the repo id
    assert hub.resolve_pretrained("someone/manifold", cache_dir=cache, local_files_only=True) == Path("someone/manifold")
    folder = hub.resolve_pretrained("someone/manifold", cache_dir=cache, local_files_only=True, hub_only=True)
    assert torch.equal(load_reward(folder).basis, m.basis)
