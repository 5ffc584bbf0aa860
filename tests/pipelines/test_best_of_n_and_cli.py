"""best_of_n, the `generate` command and the guidance demo section, on the tiny Wan pipeline."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from guided_wan_helpers import CALL, gen

from latent_rewards.rewards.errors import ConfigError

SMALL = {k: v for k, v in CALL.items() if k != "prompt"}


def _count_transformer_calls(pipe):
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_best_of_n_orders_candidates_and_returns_the_best_decoded(pipe, reward):
    from latent_rewards.pipelines import best_of_n

    pipe.load_latent_reward(reward)
    seeds = [11, 3, 7, 5]
    res = best_of_n(pipe, CALL["prompt"], seeds=seeds, progress=False, **SMALL)
    # Every score is the reward of that seed's own run; the best is the highest, the ranking sorted.
    for seed, r in zip(seeds, res.rewards):
        own = pipe(**CALL, generator=gen(seed), output_type="latent")
        assert r == pytest.approx(own.rewards.item(), abs=1e-6)
    assert res.best_index == int(np.argmax(res.rewards)) and res.best_seed == seeds[res.best_index]
    assert [res.rewards[i] for i in res.ranking] == sorted(res.rewards, reverse=True)
    assert len(set(res.rewards)) == len(seeds)
    # Only the winner is decoded, exactly as the pipeline decodes it.
    ref = pipe(**CALL, generator=gen(res.best_seed), output_type="np").frames
    assert np.array_equal(res.frames, ref)
    summary = json.loads(json.dumps(res.as_dict()))
    assert summary["best_seed"] == res.best_seed and len(summary["candidates"]) == 4


def test_best_of_n_with_guidance_batches_and_a_separate_scoring_reward(pipe, plain_pipe, reward, small_shell_lcc):
    from latent_rewards.pipelines import best_of_n

    judge = small_shell_lcc(7)
    plain = best_of_n(plain_pipe, CALL["prompt"], 3, reward=judge, output_type="latent", progress=False, **SMALL)
    pipe.load_latent_reward(reward)
    guided = best_of_n(pipe, CALL["prompt"], 3, output_type="latent", batch_size=2, progress=False,
                       reward_guidance_scale=0.05, **SMALL)
    unguided = best_of_n(pipe, CALL["prompt"], 3, output_type="latent", batch_size=2, progress=False, **SMALL)
    assert all(g > u for g, u in zip(guided.rewards, unguided.rewards))  # guidance on, per candidate
    assert all(t is not None and all(t.guided) and len(t.rewards[0]) == 1 for t in guided.traces)
    torch.testing.assert_close(guided.latents, guided.candidate_latents[guided.best_index])
    # A plain WanPipeline scored by another reward: scores are that reward's.
    for lat, r in zip(plain.candidate_latents, plain.rewards):
        assert r == pytest.approx(judge.reward(lat).item(), abs=1e-6)
    with pytest.raises(ConfigError, match="needs a reward"):
        best_of_n(plain_pipe, CALL["prompt"], 2, progress=False, **SMALL)
    with pytest.raises(ConfigError, match="generator"):
        best_of_n(pipe, CALL["prompt"], 2, generator=gen(0), progress=False, **SMALL)


def test_best_of_n_resumes_from_its_cache(pipe, reward, tmp_path):
    from latent_rewards.pipelines import best_of_n

    pipe.load_latent_reward(reward)
    first = best_of_n(pipe, CALL["prompt"], seeds=[0, 1], cache_dir=tmp_path, cache_key="k1", output_type="latent",
                      progress=False, **SMALL)
    calls, handle = _count_transformer_calls(pipe)
    try:
        again = best_of_n(pipe, CALL["prompt"], seeds=[0, 1, 2], cache_dir=tmp_path, cache_key="k1",
                          output_type="latent", progress=False, **SMALL)
        n_resumed = len(calls)
        best_of_n(pipe, CALL["prompt"], seeds=[0], cache_dir=tmp_path, cache_key="other-settings",
                  output_type="latent", progress=False, **SMALL)
    finally:
        handle.remove()
    per_run = 2 * CALL["num_inference_steps"]  # CFG: two transformer calls per step
    assert n_resumed == per_run  # only seed 2 was generated
    assert len(calls) == 2 * per_run  # a different cache key regenerates
    assert again.rewards[:2] == first.rewards
    assert again.traces[0].as_dict() == first.traces[0].as_dict()


def _generate_argv(reward_dir, out, *extra):
    return ["generate", "--model", "tiny", "--reward", str(reward_dir), "--prompt", "a cat", "--out", str(out),
            *extra]


def test_generate_cli_writes_mp4_and_json(reward, tmp_path, capsys):
    import av

    from latent_rewards.trainer.cli import main

    reward.save_pretrained(tmp_path / "reward")
    out = tmp_path / "out"
    argv = _generate_argv(tmp_path / "reward", out, "--best-of", "2", "--guidance-scale", "0.05", "--guidance-end",
                          "0.8", "--guidance-max-step", "none", "--steps", "3", "--frames", "5", "--seed", "4",
                          "--save-all", "--fps", "8")
    assert main(argv) == 0
    report = json.loads((out / "generation.json").read_text())
    settings = report["settings"]
    assert settings["reward_guidance"]["scale"] == 0.05 and settings["steps"] == 3
    assert settings["reward_guidance"]["max_step"] is None  # 'none': no cap, recorded as such
    assert settings["seeds"] == [4, 5] and settings["device"] == "cpu"
    assert (settings["frames"], settings["height"], settings["width"]) == (5, 64, 64)  # what was generated
    assert len(settings["reward_sha256"]) == 64 and settings["reward_revision"] is None
    assert [c["seed"] for c in report["candidates"]] == [4, 5]
    best = report["best"]
    assert best["reward"] == max(c["reward"] for c in report["candidates"])
    for cand in report["candidates"]:
        assert len(cand["trace"]["sigmas"]) == 3 and cand["trace"]["guided"][0] is True
        with av.open(str(out / cand["file"])) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 5 and frames[0].shape == (64, 64, 3)
    assert f"seed-{best['seed']}.mp4" in capsys.readouterr().out


def test_generate_cli_resume_key_follows_the_reward_content(tmp_path, small_shell_lcc):
    """Replacing the reward folder under the same path must not reuse candidates generated with the old one."""
    from safetensors.torch import load_file

    from latent_rewards.trainer.cli import main

    folder, out = tmp_path / "reward", tmp_path / "out"
    argv = _generate_argv(folder, out, "--best-of", "2", "--guidance-scale", "0.05", "--steps", "3", "--frames", "5")

    def run():
        assert main(argv) == 0
        report = json.loads((out / "generation.json").read_text())
        cands = {c["seed"]: c["reward"] for c in report["candidates"]}
        files = {s: out / "candidates" / f"seed-{s}" / "latents.safetensors" for s in cands}
        return report["settings"], cands, {s: f.stat().st_mtime_ns for s, f in files.items()}, files

    first_reward = small_shell_lcc(0)
    first_reward.save_pretrained(folder)
    settings_a, rewards_a, stamps_a, files = run()
    # Same reward: both candidates are resumed from the cache, not regenerated.
    settings_again, rewards_again, stamps_again, _ = run()
    assert rewards_again == rewards_a and stamps_again == stamps_a
    assert settings_again["reward_sha256"] == settings_a["reward_sha256"]
    # Another reward saved over the same folder: new key, new candidates, scored by the new reward.
    new_reward = small_shell_lcc(5)
    new_reward.save_pretrained(folder)
    settings_b, rewards_b, stamps_b, files = run()
    assert settings_b["reward_sha256"] != settings_a["reward_sha256"]
    assert all(stamps_b[s] != stamps_a[s] for s in stamps_a)
    for seed, path in files.items():
        lat = load_file(str(path))["latents"]
        assert rewards_b[seed] == pytest.approx(new_reward.reward(lat).item(), abs=1e-5)
        assert rewards_b[seed] != pytest.approx(first_reward.reward(lat).item(), abs=1e-5)


def test_reward_and_model_fingerprints_for_hub_ids(tmp_path, small_shell_lcc, monkeypatch):
    """Hub ids resolve through the (offline) huggingface_hub cache: the key holds the snapshot's commit and the
    content hash of what it holds; a new commit of the same repository gives a new fingerprint."""
    import huggingface_hub.constants

    from latent_rewards.pipelines.tiny import save_tiny_wan_pipeline
    from latent_rewards.trainer.commands.generate import model_fingerprint, reward_fingerprint

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def publish(repo, files, commit):
        repo_dir = cache / f"models--{repo.replace('/', '--')}"
        snap = repo_dir / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in files.iterdir():
            if f.is_file():
                (snap / f.name).write_bytes(f.read_bytes())
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / "main").write_text(commit)

    local = small_shell_lcc(0).save_pretrained(tmp_path / "r0")
    publish("someone/reward", local, "a" * 40)
    folder, fp = reward_fingerprint("someone/reward")
    assert folder.name == fp["revision"] == "a" * 40
    assert fp["sha256"] == reward_fingerprint(local)[1]["sha256"]  # same files, same content hash
    assert reward_fingerprint(local)[1]["revision"] is None
    publish("someone/reward", small_shell_lcc(1).save_pretrained(tmp_path / "r1"), "b" * 40)
    _, fp_new = reward_fingerprint("someone/reward")
    assert fp_new["revision"] == "b" * 40 and fp_new["sha256"] != fp["sha256"]

    pipe_dir = save_tiny_wan_pipeline(tmp_path / "wan")
    publish("someone/wan", pipe_dir, "c" * 40)
    assert model_fingerprint("someone/wan") == {"revision": "c" * 40}
    assert model_fingerprint("tiny") == {}
    before = model_fingerprint(pipe_dir)
    assert model_fingerprint(pipe_dir) == before
    (pipe_dir / "model_index.json").write_text((pipe_dir / "model_index.json").read_text() + "\n")
    assert model_fingerprint(pipe_dir) != before  # a changed local model folder invalidates saved candidates


@pytest.mark.parametrize(
    "extra, message",
    [(["--guidance-end", "1.5"], "--guidance-start and --guidance-end are fractions of the sampling schedule"),
     (["--guidance-start", "0.7", "--guidance-end", "0.3"], "start <= end"),
     (["--guidance-max-step", "0"], "--guidance-max-step must be a number > 0 or 'none'"),
     (["--guidance-max-step", "-1"], "--guidance-max-step"),
     (["--guidance-scale", "nan"], "--guidance-scale"),
     (["--height", "60"], "--height must be a positive multiple of 16"),
     (["--width", "0"], "--width must be a positive multiple of 16"),
     (["--frames", "10"], "--frames must be of the form 4k+1"),
     (["--steps", "0"], "--steps must be >= 1"),
     (["--cfg-scale", "-1"], "--cfg-scale must be a finite number >= 0"),
     (["--best-of", "0"], "best-of"),
     (["--seed", "-1"], "--seed"),
     (["--device", "foo"], "unknown device 'foo'; expected one of: auto, cpu"),
     (["--device", f"cuda:{torch.cuda.device_count()}"], "expected one of: auto, cpu"),
     (["--reward", "no/such-reward-xyz"], "no/such-reward-xyz")],
)
def test_generate_cli_bad_input_is_one_line_exit_2(reward, tmp_path, capsys, extra, message):
    from latent_rewards.trainer.cli import main

    reward.save_pretrained(tmp_path / "reward")
    assert main(_generate_argv(tmp_path / "reward", tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_generate_uses_the_shared_device_resolver():
    from latent_rewards.pipelines.wan import resolve_device
    from latent_rewards.rewards.devices import resolve_device as shared

    assert resolve_device is shared


def test_demo_section_guided_beats_unguided(pipe, reward, tmp_path):
    from latent_rewards.pipelines.demo import guided_vs_unguided

    reward.save_pretrained(tmp_path / "reward")
    ctx = SimpleNamespace(reward_path=tmp_path / "reward", seed=0, log=lambda message: None)
    section = guided_vs_unguided(ctx, seeds=(0, 1), steps=4, pipe=pipe)
    res = section["results"]
    assert all(g < u for g, u in zip(res["r_dist_guided"], res["r_dist_unguided"]))
    assert res["checks"]["guidance_lowers_r_dist_every_seed"]
    assert res["window"] == [0.0, 0.8] and res["guided_steps"] == 4  # 4 steps at 0, 0.25, 0.5, 0.75
    narrow = guided_vs_unguided(ctx, seeds=(0,), steps=4, start=0.3, end=0.6, pipe=pipe)["results"]
    assert narrow["guided_steps"] == 1 and narrow["r_dist_guided"][0] < narrow["r_dist_unguided"][0]
    assert any("guidance lowers" in line for line in section["lines"]) and len(section["panels"]) == 1
    with pytest.raises(ConfigError, match="manifold"):
        guided_vs_unguided(SimpleNamespace(reward_path=None), pipe=pipe)
