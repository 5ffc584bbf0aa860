"""`latent-rewards push`: the dry-run folder is what gets uploaded and it loads back (folder and Hub id); only the
network calls (HfApi.create_repo / upload_folder) are replaced."""

from __future__ import annotations

import shutil
import types
from pathlib import Path

import pytest
import torch
from latent_rewards.rewards.errors import CheckpointError
from latent_rewards.trainer.export import LOCAL_LOCATION, LORA_WEIGHTS_NAME, comfyui_file_name
from latent_rewards.trainer.hub import prepare_upload, resolve_export
from safetensors.torch import load_file

SECRET = "hf_DoNotPrintThisTokenAnywhere0123456789"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _velocity(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    text = torch.randn(1, 8, 4096, generator=g)
    with torch.no_grad():
        return pipe.transformer(hidden_states=x, timestep=torch.tensor([900.0]), encoder_hidden_states=text,
                                return_dict=False)[0]


def test_resolve_export(trained_run, tmp_path):
    _, result = trained_run
    run = result.output_dir
    assert resolve_export(run) == run / "best"
    assert resolve_export(run / "checkpoint-8") == run / "checkpoint-8"
    with pytest.raises(CheckpointError, match="not a training run"):
        resolve_export(tmp_path)
    with pytest.raises(CheckpointError, match="no such folder"):
        resolve_export(tmp_path / "missing")


def test_dry_run_writes_the_upload_folder_and_it_loads_back(trained_run, tmp_path, capsys):
    from diffusers import WanPipeline
    from latent_rewards.pipelines.tiny import build_tiny_wan_pipeline
    from latent_rewards.trainer.cli import main

    trainer, result = trained_run
    out = tmp_path / "upload"
    assert main(["push", str(result.output_dir), "--repo", "someone/tiny-lora", "--dry-run", str(out)]) == 0
    printed = capsys.readouterr().out
    files = _files(out)
    comfy = comfyui_file_name(trainer.config.name)
    assert set(files) == {LORA_WEIGHTS_NAME, comfy, "README.md", "training_config.yaml", "metrics.json"}
    assert all(name in printed for name in files)
    assert files[LORA_WEIGHTS_NAME] == (result.output_dir / "best" / LORA_WEIGHTS_NAME).read_bytes()
    # The card's usage now points at the repository; the rest of the card is the run's own.
    card, local = files["README.md"].decode(), (result.output_dir / "best" / "README.md").read_text()
    assert 'pipe.load_lora_weights("someone/tiny-lora")' in card
    assert f"`repo_id` set to `someone/tiny-lora/{comfy}`" in card and "**Latent Reward LoRA Loader**" in card
    assert f"hf download someone/tiny-lora {comfy} --local-dir ComfyUI/models/loras" in card
    assert LOCAL_LOCATION not in card and "THIS_REPO_OR_FOLDER" not in card
    assert card.split("<!-- latent-rewards:usage -->")[0] == local.split("<!-- latent-rewards:usage -->")[0]
    assert LOCAL_LOCATION in local  # the run's own card is untouched
    # diffusers: the adapter loads and gives the trained model's output.
    pipe = build_tiny_wan_pipeline(WanPipeline)
    base = _velocity(pipe)
    pipe.load_lora_weights(str(out))
    tuned = _velocity(pipe)
    ref = build_tiny_wan_pipeline(WanPipeline)
    ref.load_lora_weights(str(result.output_dir / "best"))
    assert torch.equal(tuned, _velocity(ref)) and not torch.allclose(tuned, base)
    # ComfyUI format: valid safetensors in diffusion_model.* names with alphas.
    state = load_file(str(out / comfy))
    assert state and all(k.startswith("diffusion_model.") for k in state)
    assert {k.rsplit(".", 2)[-2] if not k.endswith("alpha") else "alpha" for k in state} == {"lora_A", "lora_B", "alpha"}


def test_pushed_adapter_loads_from_the_hub_id_through_the_pipeline_mixin(trained_run, tmp_path):
    """The dry-run folder placed in a Hub cache (as a download would) loads by repo id, offline."""
    from latent_rewards.pipelines.tiny import build_tiny_wan_pipeline
    from latent_rewards.pipelines.wan import RewardGuidedWanPipeline

    _, result = trained_run
    folder = prepare_upload(result.output_dir, tmp_path / "upload")
    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, cache / "models--someone--tiny-lora" / "snapshots" / commit)
    (cache / "models--someone--tiny-lora" / "refs").mkdir()
    (cache / "models--someone--tiny-lora" / "refs" / "main").write_text(commit)
    pipe = build_tiny_wan_pipeline(RewardGuidedWanPipeline)
    pipe.load_lora_weights("someone/tiny-lora", cache_dir=str(cache), weight_name=LORA_WEIGHTS_NAME,
                           local_files_only=True)
    ref = build_tiny_wan_pipeline(RewardGuidedWanPipeline)
    ref.load_lora_weights(str(folder))
    assert torch.equal(_velocity(pipe), _velocity(ref))


def test_push_uploads_exactly_the_dry_run_folder_and_never_prints_the_token(trained_run, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi
    from latent_rewards.trainer.cli import main

    _, result = trained_run
    calls: dict[str, object] = {}

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, "private": private, "exist_ok": exist_ok}
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, **kwargs):
        calls["upload"] = {"repo_id": repo_id, "files": _files(Path(folder_path)), "message": commit_message}
        return types.SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc123")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    assert main(["push", str(result.output_dir), "--repo", "someone/tiny-lora", "--private"]) == 0
    io = capsys.readouterr()
    assert "someone/tiny-lora/commit/abc123" in io.out
    assert calls["create_repo"] == {"repo_id": "someone/tiny-lora", "private": True, "exist_ok": True}
    dry = tmp_path / "dry"
    prepare_upload(result.output_dir, dry, repo_id="someone/tiny-lora")
    uploaded = calls["upload"]["files"]
    assert uploaded == _files(dry)
    assert SECRET not in io.out + io.err
    assert all(SECRET.encode() not in content for content in uploaded.values())


def test_push_rejects_a_bad_repo_id(trained_run, capsys):
    from latent_rewards.trainer.cli import main

    _, result = trained_run
    assert main(["push", str(result.output_dir), "--repo", "not a repo"]) == 2
    assert "user/name" in capsys.readouterr().err


@pytest.fixture(scope="module")
def flagged_run(tmp_path_factory, tiny_overrides):
    """A real run whose every validation is flagged (any content change counts): it has no best/."""
    from latent_rewards.trainer.config import load_config
    from latent_rewards.trainer.loop import Trainer

    out = tmp_path_factory.mktemp("flagged") / "run"
    cfg = load_config("tiny-cpu", tiny_overrides(
        out, "max_steps=2", "validation.every=1", "checkpoint_every=1", "batch_size=1", "validation.num_videos=1",
        "monitor.max_change=1e-9",
    ))
    result = Trainer(cfg, progress=False).train()
    assert result.best_dir is None and result.best_step is None
    return out


def test_a_run_without_best_is_refused_and_says_why(flagged_run, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi
    from latent_rewards.trainer.cli import main

    def no_network(*args, **kwargs):
        raise AssertionError("nothing may be uploaded")

    monkeypatch.setattr(HfApi, "create_repo", no_network)
    monkeypatch.setattr(HfApi, "upload_folder", no_network)
    for extra in ([], ["--dry-run", str(tmp_path / "dry")]):
        assert main(["push", str(flagged_run), "--repo", "someone/tiny-lora", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "has no best/ export" in err
        assert "every validation was flagged by the reward-hacking rule (step 1: content drift (change" in err
        assert f"{flagged_run / 'checkpoint-2'}" in err and "Nothing was uploaded" in err
    assert not (tmp_path / "dry").exists()


def test_an_explicit_flagged_checkpoint_is_pushed_with_a_warning(flagged_run, tmp_path, capsys):
    from latent_rewards.trainer.cli import main

    ckpt = flagged_run / "checkpoint-2"
    assert main(["push", str(ckpt), "--repo", "someone/tiny-lora", "--dry-run", str(tmp_path / "dry")]) == 0
    err = capsys.readouterr().err
    assert "warning: checkpoint-2 (step 2) was flagged by the reward-hacking rule: content drift" in err
    assert "the run's best step is none" in err
    assert (tmp_path / "dry" / LORA_WEIGHTS_NAME).read_bytes() == (ckpt / LORA_WEIGHTS_NAME).read_bytes()


def test_model_card_records_portable_references(reward_dir):
    """A Hub reward is recorded by its id; a local one by its folder name, marked as local (never its path)."""
    from latent_rewards.trainer.config import config_to_dict, load_config
    from latent_rewards.trainer.export import model_card

    def card(*overrides: str, repo_id: str | None = None) -> str:
        cfg = config_to_dict(load_config("tiny-cpu", list(overrides)))
        return model_card({"config": cfg, "step": 4, "best_step": 4, "history": []}, repo_id)

    hub = card("reward.path=someone/shell-lcc", "reward.revision=v1", "model=Wan-AI/Wan2.1-T2V-14B-Diffusers",
               repo_id="me/x")
    assert "- reward: [`someone/shell-lcc`](https://huggingface.co/someone/shell-lcc) (revision `v1`)" in hub
    assert "base_model: Wan-AI/Wan2.1-T2V-14B-Diffusers" in hub
    assert 'WanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-14B-Diffusers"' in hub
    assert 'load_lora_weights("me/x")' in hub
    local = card(f"reward.path={reward_dir}", f"model={reward_dir.parent}")
    assert f"- reward: `{reward_dir.name}` (a local reward folder at training time, not published on the Hub)" in local
    assert str(reward_dir.parent) not in local  # no absolute local path, for the reward or the base model
    assert "base_model:" not in local and f"`{reward_dir.parent.name}` (a local folder)" in local
    full = card("reward.path=someone/shell-lcc", "finetune=full", repo_id="me/x")
    assert 'WanTransformer3DModel.from_pretrained("me/x", subfolder="transformer")' in full
    assert "ComfyUI/models/diffusion_models" in full and "Load Diffusion Model" in full
