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


def test_generate_cli_writes_mp4_and_json(reward, tmp_path, capsys):
    import av

    from latent_rewards.trainer.cli import main

    reward.save_pretrained(tmp_path / "reward")
    out = tmp_path / "out"
    argv = ["generate", "--model", "tiny", "--reward", str(tmp_path / "reward"), "--prompt", "a cat",
            "--best-of", "2", "--guidance-scale", "0.05", "--guidance-end", "0.8", "--steps", "3", "--frames", "5",
            "--seed", "4", "--save-all", "--fps", "8", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "generation.json").read_text())
    assert report["settings"]["reward_guidance"]["scale"] == 0.05 and report["settings"]["steps"] == 3
    assert report["settings"]["seeds"] == [4, 5] and report["settings"]["device"] == "cpu"
    assert [c["seed"] for c in report["candidates"]] == [4, 5]
    best = report["best"]
    assert best["reward"] == max(c["reward"] for c in report["candidates"])
    for cand in report["candidates"]:
        assert len(cand["trace"]["sigmas"]) == 3 and cand["trace"]["guided"][0] is True
        with av.open(str(out / cand["file"])) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 5 and frames[0].shape == (64, 64, 3)
    assert f"seed-{best['seed']}.mp4" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [(["--guidance-end", "1.5"], "end=1.5"), (["--best-of", "0"], "best-of"),
     (["--reward", "no/such-reward-xyz"], "no/such-reward-xyz")],
)
def test_generate_cli_bad_input_is_one_line_exit_2(reward, tmp_path, capsys, extra, message):
    from latent_rewards.trainer.cli import main

    reward.save_pretrained(tmp_path / "reward")
    argv = ["generate", "--model", "tiny", "--reward", str(tmp_path / "reward"), "--prompt", "x",
            "--out", str(tmp_path / "out"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists()


def test_demo_section_guided_beats_unguided(pipe, reward, tmp_path):
    from latent_rewards.pipelines.demo import guided_vs_unguided

    reward.save_pretrained(tmp_path / "reward")
    ctx = SimpleNamespace(reward_path=tmp_path / "reward", seed=0, log=lambda message: None)
    section = guided_vs_unguided(ctx, seeds=(0, 1), steps=4, pipe=pipe)
    res = section["results"]
    assert all(g < u for g, u in zip(res["r_dist_guided"], res["r_dist_unguided"]))
    assert res["checks"]["guidance_lowers_r_dist_every_seed"]
    assert any("guidance lowers" in line for line in section["lines"]) and len(section["panels"]) == 1
    with pytest.raises(ConfigError, match="manifold"):
        guided_vs_unguided(SimpleNamespace(reward_path=None), pipe=pipe)
