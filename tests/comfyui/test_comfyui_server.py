"""End to end: a real ComfyUI server with this repository in custom_nodes/, driven through /prompt and /history.

One server for the session (``comfy_server``). Every graph uses the tiny Wan2.1 model, the tiny reward and the
test-only conditioning node; the API-format workflows in workflows/api/ are posted as they are.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from comfy_assets import HUB_REPO, LORA_COMFYUI, LORA_DIFFUSERS, LORA_NOT_A_LORA, REWARD_NAME, TINY_WAN22
from comfy_harness import NODE_IDS, REPO, load_workflow
from safetensors.torch import load_file

pytestmark = pytest.mark.comfyui

WORKFLOWS = [
    "wan21_t2v_reward_guidance",
    "wan21_t2v_reward_guider",
    "wan21_t2v_reward_score",
    "wan21_t2v_best_of_n",
    "wan21_t2v_reward_lora",
]
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def _latent(server, result, node: str) -> torch.Tensor:
    """The tensor a SaveLatent node wrote (its /history entry names the file)."""
    (item,) = result.ui(node)["latents"]
    return load_file(str(server.base / item["type"] / item["subfolder"] / item["filename"]))["latent_tensor"]


def _scores(result, node: str) -> dict:
    return result.ui(node)["latent_rewards"][0]


def _run_ok(server, prompt: dict):
    result = server.run(prompt)
    assert result.ok, (result.rejected, result.error, server.log_tail())
    return result


# ---------------------------------------------------------------------------------------------- registration
def test_object_info_lists_every_node_with_tooltips_and_the_js_is_served(comfy_server):
    info = comfy_server.get("/object_info")
    assert NODE_IDS <= set(info)
    for node_id in NODE_IDS:
        node = info[node_id]
        assert node["description"] and node["category"] == "latent_rewards"
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name}"
    assert info["LatentRewardsLoader"]["output"] == ["LATENT_REWARD"]
    assert info["LatentRewardsScore"]["output_node"] is True
    options = info["LatentRewardsLoader"]["input"]["required"]["reward"][1]["options"]
    assert REWARD_NAME in options and not any(".hub" in o for o in options)
    lora_options = info["LatentRewardsLoraLoader"]["input"]["required"]["lora_name"][1]["options"]
    assert LORA_DIFFUSERS in lora_options and LORA_COMFYUI in lora_options

    scripts = comfy_server.get("/extensions")
    ours = [s for s in scripts if s.endswith("/latent_rewards.js")]
    assert ours, scripts
    for script in ours:  # served under the folder name and the pyproject name; the JS registers itself once
        assert comfy_server.get(script) == (REPO / "web" / "js" / "latent_rewards.js").read_bytes()
    templates = comfy_server.get("/workflow_templates")
    assert sorted(templates["latent-rewards"]) == sorted(WORKFLOWS)


# ---------------------------------------------------------------------------------------------- workflows
def test_guidance_workflow_runs_and_streams_the_reward_trace(comfy_server):
    result = _run_ok(comfy_server, load_workflow("wan21_t2v_reward_guidance.json"))
    traces = result.events("latent_rewards.trace")
    assert [len(t["trace"]["sigmas"]) for t in traces] == [1, 2, 3, 4, 4]
    last = traces[-1]
    assert last["done"] and last["node"] == "8" and last["guidance_node"] == "7" and last["kind"] == "shell-lcc"
    assert all(last["trace"]["guided"]) and len(last["trace"]["rewards"][0]) == 2  # end 0.8 covers all 4 steps
    # The window's axis, streamed with the trace: 4 simple-scheduler steps of Wan's shift-8 schedule.
    assert last["trace"]["progress"] == pytest.approx([0.0, 0.25, 0.5, 0.75], abs=1e-6)
    assert len(_scores(result, "9")["scores"]) == 2
    assert _latent(comfy_server, result, "10").shape == (2, 16, 3, 8, 8)


def test_guider_workflow_runs_with_sampler_custom_advanced(comfy_server):
    prompt = load_workflow("wan21_t2v_reward_guider.json")
    prompt["7"]["inputs"]["end"] = 0.6  # 4 steps at 0, 0.25, 0.5, 0.75 of the schedule: the last is left out
    result = _run_ok(comfy_server, prompt)
    last = result.events("latent_rewards.trace")[-1]
    assert last["done"] and last["node"] == "8" and last["guidance_node"] == "7" and len(last["trace"]["sigmas"]) == 4
    assert last["trace"]["guided"] == [True, True, True, False]
    assert len(_scores(result, "9")["scores"]) == 2


def test_score_workflow_outputs_scores_curve_and_heatmaps(comfy_server):
    result = _run_ok(comfy_server, load_workflow("wan21_t2v_reward_score.json"))
    payload = _scores(result, "9")
    assert payload["kind"] == "shell-lcc" and len(payload["scores"]) == 2
    assert payload["scores"] == pytest.approx([-r for r in payload["metrics"]["r_dist"]])
    assert len(payload["per_frame"]) == 2 and len(payload["per_frame"][0]) == 3
    for video, per_frame in enumerate(payload["per_frame"]):  # R_dist is the mean over (equal-sized) frames
        assert sum(per_frame) / 3 == pytest.approx(payload["metrics"]["r_dist"][video], rel=1e-5)
    assert result.ui("16")["floats"] == pytest.approx(payload["scores"])  # the FLOAT list output
    assert len(result.ui("14")["images"]) == 1  # the curve IMAGE output
    assert len(result.ui("15")["images"]) == 2 * 3  # one heatmap per latent frame per video
    ui = result.ui("9")
    assert "video 1: reward" in ui["text"][0] and len(ui["images"]) == 1 + 2


def test_best_of_n_workflow_keeps_the_best_in_order(comfy_server):
    result = _run_ok(comfy_server, load_workflow("wan21_t2v_best_of_n.json"))
    everything = _latent(comfy_server, result, "17")
    best = _latent(comfy_server, result, "10")
    payload = _scores(result, "9")
    scores, order = payload["scores"], payload["order"]
    assert len(scores) == 4 and order == sorted(range(4), key=lambda i: -scores[i])[:2]
    assert result.ui("16")["ints"] == order
    assert result.ui("16")["floats"] == pytest.approx([scores[i] for i in order])
    assert result.ui("16")["floats"][0] >= result.ui("16")["floats"][1]
    torch.testing.assert_close(best, everything[order])


def test_reward_lora_workflow_runs(comfy_server):
    result = _run_ok(comfy_server, load_workflow("wan21_t2v_reward_lora.json"))
    assert "20 weights patched from 40 tensors" in result.ui("7")["text"][0]


# ---------------------------------------------------------------------------------------------- guidance effect
def _with_unguided_twin(prompt: dict, sampler_id: str = "8") -> dict:
    """Add a copy of the sampler branch that uses the plain model (node 1), scored and saved the same way."""
    p = copy.deepcopy(prompt)
    twin = copy.deepcopy(p[sampler_id])
    if "model" in twin["inputs"]:
        twin["inputs"]["model"] = ["1", 0]
    p["108"] = twin
    p["109"] = {"class_type": "LatentRewardsScore", "inputs": {**p["9"]["inputs"], "latent": ["108", 0]}}
    p["110"] = {"class_type": "SaveLatent", "inputs": {"samples": ["108", 0], "filename_prefix": "latent_rewards/unguided"}}
    return p


def _ksampler_advanced(prompt: dict) -> dict:
    p = copy.deepcopy(prompt)
    ks = p["8"]["inputs"]
    p["8"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "model": ks["model"], "add_noise": "enable", "noise_seed": ks["seed"], "steps": ks["steps"], "cfg": ks["cfg"],
        "sampler_name": ks["sampler_name"], "scheduler": ks["scheduler"], "positive": ks["positive"],
        "negative": ks["negative"], "latent_image": ks["latent_image"], "start_at_step": 0, "end_at_step": 10000,
        "return_with_leftover_noise": "disable",
    }}
    return p


def _sampler_custom_advanced(prompt: dict) -> dict:
    p = copy.deepcopy(prompt)
    ks = p["8"]["inputs"]
    p["11"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": ks["sampler_name"]}}
    p["12"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": ks["scheduler"], "steps": ks["steps"], "denoise": 1.0}}
    p["13"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": ks["seed"]}}
    p["14"] = {"class_type": "CFGGuider", "inputs": {"model": ks["model"], "positive": ks["positive"], "negative": ks["negative"], "cfg": ks["cfg"]}}
    p["8"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["13", 0], "guider": ["14", 0], "sampler": ["11", 0], "sigmas": ["12", 0], "latent_image": ks["latent_image"],
    }}
    return p


@pytest.mark.parametrize("sampler", ["KSampler", "KSamplerAdvanced", "SamplerCustomAdvanced"])
def test_guidance_changes_the_sample_and_lowers_r_dist_with_stock_samplers(comfy_server, sampler):
    prompt = load_workflow("wan21_t2v_reward_guidance.json")
    prompt["7"]["inputs"]["scale"] = 0.3
    if sampler == "KSamplerAdvanced":
        prompt = _ksampler_advanced(prompt)
    elif sampler == "SamplerCustomAdvanced":
        prompt = _sampler_custom_advanced(prompt)
    prompt = _with_unguided_twin(prompt)
    if sampler == "SamplerCustomAdvanced":  # the unguided twin needs its own plain CFG guider
        prompt["114"] = {"class_type": "CFGGuider", "inputs": {**prompt["14"]["inputs"], "model": ["1", 0]}}
        prompt["108"]["inputs"]["guider"] = ["114", 0]
    result = _run_ok(comfy_server, prompt)
    guided, unguided = _latent(comfy_server, result, "10"), _latent(comfy_server, result, "110")
    assert (guided - unguided).abs().max() > 1e-2
    r_guided = _scores(result, "9")["metrics"]["r_dist"]
    r_plain = _scores(result, "109")["metrics"]["r_dist"]
    assert all(g < p - 0.05 for g, p in zip(r_guided, r_plain, strict=True)), (r_guided, r_plain)
    assert result.events("latent_rewards.trace")[-1]["node"] == "8"


# ---------------------------------------------------------------------------------------------- LoRA
def _lora_branches() -> tuple[dict, list[str]]:
    p = load_workflow("wan21_t2v_reward_lora.json")
    del p["9"], p["6"]
    branches = {
        "base": ["1", 0],
        "ours_diffusers": ["7", 0],
        "ours_comfyui": ["207", 0],
        "core_comfyui": ["307", 0],
    }
    p["207"] = {"class_type": "LatentRewardsLoraLoader", "inputs": {**p["7"]["inputs"], "lora_name": LORA_COMFYUI}}
    p["307"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": LORA_COMFYUI, "strength_model": 1.0}}
    for i, (name, model) in enumerate(branches.items()):
        p[f"5{i}8"] = {"class_type": "KSampler", "inputs": {**p["8"]["inputs"], "model": model}}
        p[f"5{i}0"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"5{i}8", 0], "filename_prefix": f"lora/{name}"}}
    del p["8"], p["10"]
    return p, list(branches)


def test_lora_both_formats_and_the_core_loader_give_the_same_model(comfy_server):
    prompt, names = _lora_branches()
    start = len(comfy_server.log_text())
    result = _run_ok(comfy_server, prompt)
    log = comfy_server.log_text()[start:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log
    out = {name: _latent(comfy_server, result, f"5{i}0") for i, name in enumerate(names)}
    torch.testing.assert_close(out["ours_diffusers"], out["ours_comfyui"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["core_comfyui"], out["ours_comfyui"], rtol=1e-5, atol=1e-5)
    assert (out["ours_diffusers"] - out["base"]).abs().max() > 1e-2
    assert "20 weights patched" in result.ui("207")["text"][0]


def test_core_loader_skips_diffusers_keys_which_is_why_the_pack_converts_them(comfy_server):
    prompt, _ = _lora_branches()
    prompt["307"]["inputs"]["lora_name"] = LORA_DIFFUSERS
    start = len(comfy_server.log_text())
    result = _run_ok(comfy_server, prompt)
    log = comfy_server.log_text()[start:]
    assert log.count("lora key not loaded") == 40, log[-2000:]
    torch.testing.assert_close(_latent(comfy_server, result, "530"), _latent(comfy_server, result, "500"))


# ---------------------------------------------------------------------------------------------- bad input
def _score_graph(latent_node: dict, loader_inputs: dict | None = None) -> dict:
    return {
        "1": latent_node,
        "2": {"class_type": "LatentRewardsLoader", "inputs": loader_inputs or {"reward": REWARD_NAME, "repo_id": ""}},
        "3": {"class_type": "LatentRewardsScore", "inputs": {"latent": ["1", 0], "reward": ["2", 0], "latent_format": "wan2.1"}},
    }


def _video(width: int = 64, cls: str = "EmptyHunyuanLatentVideo") -> dict:
    return {"class_type": cls, "inputs": {"width": width, "height": 64, "length": 9, "batch_size": 1}}


def _bad_prompts() -> list[tuple[str, dict, str, str]]:
    lora = load_workflow("wan21_t2v_reward_lora.json")
    bad_lora = copy.deepcopy(lora)
    bad_lora["7"]["inputs"]["lora_name"] = LORA_NOT_A_LORA
    hub_lora = copy.deepcopy(lora)
    hub_lora["7"]["inputs"]["repo_id"] = "latent-rewards-test/no-such-lora"
    wan22 = load_workflow("wan21_t2v_reward_guidance.json")
    wan22["1"]["inputs"]["unet_name"] = TINY_WAN22
    return [
        ("wrong latent channels", _score_graph(_video(cls="EmptyMochiLatentVideo")), "LatentRewardsScore",
         "expected 16 channels"),
        ("image latent", _score_graph({"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}),
         "LatentRewardsScore", "5-D tensor"),
        ("reward for another latent space", wan22, "LatentRewardsGuidance", "reads wan2.1 latents (16 channels) but the model"),
        ("missing reward", _score_graph(_video(), {"reward": REWARD_NAME, "repo_id": "latent-rewards-test/missing"}),
         "LatentRewardsLoader", "not in the local Hugging Face cache"),
        ("missing LoRA", hub_lora, "LatentRewardsLoraLoader", "not in the local Hugging Face cache"),
        ("non-reward file", _score_graph(_video(), {"reward": "not-a-reward", "repo_id": ""}), "LatentRewardsLoader",
         "does not match a shell-lcc reward"),
        ("non-LoRA file", bad_lora, "LatentRewardsLoraLoader", "keys would not load"),
    ]


def test_bad_input_fails_that_prompt_clearly_and_the_server_serves_the_next(comfy_server):
    for i, (what, prompt, node_type, message) in enumerate(_bad_prompts()):
        bad = comfy_server.run(prompt)
        assert not bad.ok and bad.rejected is None, (what, bad.rejected)
        assert bad.error["node_type"] == node_type, (what, bad.error)
        assert message in bad.error["exception_message"], (what, bad.error["exception_message"])
        # Next prompt (a fresh graph: the width changes so nothing comes from the cache), with the Hub reward.
        good = comfy_server.run(_score_graph(_video(64 + 16 * i), {"reward": REWARD_NAME, "repo_id": HUB_REPO}))
        assert good.ok, (what, good.error)
        assert len(good.ui("3")["latent_rewards"][0]["scores"]) == 1


# ---------------------------------------------------------------------------------------------- UI workflows
def _widget_names(spec: dict) -> list[str]:
    """Widget order of a node as the editor stores widgets_values (control_after_generate adds a slot)."""
    names = []
    for section in ("required", "optional"):
        for name in spec["input_order"].get(section, []):
            kind, *opts = spec["input"][section][name]
            opts = opts[0] if opts else {}
            if opts.get("forceInput") or not (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")):
                continue
            names.append(name)
            if opts.get("control_after_generate"):
                names.append("control_after_generate")
    return names


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflow_is_valid_and_matches_its_api_twin(comfy_server, name):
    info = comfy_server.get("/object_info")
    ui = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    api = load_workflow(f"{name}.json")
    nodes = {n["id"]: n for n in ui["nodes"]}
    notes = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert notes and "models/diffusion_models/" in notes[0]["widgets_values"][0]
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        assert nodes[src]["outputs"][src_slot]["type"] == kind and link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id and nodes[dst]["inputs"][dst_slot]["type"] == kind
        assert info[nodes[src]["type"]]["output"][src_slot] == kind
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        spec = info[node["type"]]
        widgets = dict(zip(_widget_names(spec), node["widgets_values"], strict=True))
        if node["type"].startswith("LatentRewards"):
            twin = api[str(node["id"])]
            assert twin["class_type"] == node["type"]
            for key, value in widgets.items():
                if key not in ("reward", "repo_id", "lora_name", "cfg"):
                    assert twin["inputs"][key] == value, (node["type"], key)
            origin = {link[0]: link[1] for link in ui["links"]}
            linked = {i["name"]: nodes[origin[i["link"]]]["type"] for i in node["inputs"] if i["link"] is not None}
            for key, src_type in linked.items():
                src_id = twin["inputs"][key][0]
                assert api[src_id]["class_type"] == src_type or src_type == "CLIPTextEncode", (key, src_type)
