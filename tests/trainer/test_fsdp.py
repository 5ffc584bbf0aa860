"""FSDP for real: 2 CPU processes (gloo) started by ``accelerate launch`` with an FSDP config, the tiny model sharded
by Wan block, a few steps with validation, checkpoints and a resume.

* LoRA with a KL term (the reference is the sharded model with its adapters disabled), under FSDP1 with FULL_SHARD
  and ``use_orig_params`` (where the unwrapped module holds only shards, so any forward that bypasses the FSDP
  module crashes; the shipped config switched to version 1 as its header says), stopped after step 1 and resumed
  to step 2, and under FSDP2 (``fully_shard``, the shipped ``trainer/configs/accelerate_fsdp.yaml`` as is) in one go.
* A full fine-tune (the 14B recipe's mode) under FSDP2: the gathered transformer is exported in diffusers' layout.

accelerate enables FSDP only on accelerators, so the runs go through ``fsdp_cpu_worker.py`` (see there). The
sharded runs must agree with each other (resume included) and with the unsharded model: the base validation equals
the unsharded model's, and each exported LoRA, loaded into a plain pipeline, reproduces its run's validation.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from latent_rewards.trainer.config import ACCELERATE_FSDP_CONFIG
from trainer_test_helpers import metrics_records

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("fsdp_cpu_worker.py")
COMMON = ("batch_size=1", "checkpoint_every=1", "validation.every=1", "validation.num_videos=2",
          "validation.num_inference_steps=3", "max_steps=2")
LORA = ("method.kl_weight=0.1",)
FULL = ("finetune=full", "optimizer.lr=1e-4", "gradient_checkpointing=true")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp1_config(folder: Path) -> Path:
    """The shipped config switched to FSDP1 as its header describes (FULL_SHARD, use_orig_params)."""
    data = yaml.safe_load(ACCELERATE_FSDP_CONFIG.read_text())
    fsdp = data["fsdp_config"]
    fsdp.pop("fsdp_reshard_after_forward")
    fsdp.update(fsdp_version=1, fsdp_sharding_strategy="FULL_SHARD", fsdp_use_orig_params=True)
    # accelerate's FSDP1 plugin implements this broadcast for accelerator devices only; every rank builds the same
    # deterministic tiny model anyway.
    fsdp["fsdp_sync_module_states"] = False
    path = folder / "accelerate_fsdp1.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _launch(config_file: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(config_file), "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", str(_free_port()), str(WORKER), "tiny-cpu", *overrides,
           "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, tiny_overrides):
    root = tmp_path_factory.mktemp("fsdp")
    runs = {}
    out = root / "fsdp1"
    first = _launch(_fsdp1_config(root), tiny_overrides(out, *COMMON, *LORA, "max_steps=1"))
    second = _launch(_fsdp1_config(root), tiny_overrides(out, *COMMON, *LORA))
    runs["fsdp1"] = (out, first.stderr + second.stderr)
    assert "resumed from" in second.stderr and f"{out / 'checkpoint-1'}" in second.stderr
    for name, extra in (("fsdp2", LORA), ("fsdp2-full", FULL)):
        out = root / name
        runs[name] = (out, _launch(ACCELERATE_FSDP_CONFIG, tiny_overrides(out, *COMMON, *extra)).stderr)
    return runs


def _unsharded_validation_reward(run: Path, reward_dir: Path, text_cache: Path, export: Path | None = None) -> float:
    """The trainer's validation of ``run`` (same prompts, seeds, sampler and size) with an ordinary, unsharded
    pipeline, for the base model or an exported checkpoint (LoRA or full transformer)."""
    from diffusers import WanPipeline, WanTransformer3DModel
    from latent_rewards.pipelines.tiny import tiny_scheduler, tiny_wan_transformer, tiny_wan_vae
    from latent_rewards.rewards.hub import load_reward
    from latent_rewards.trainer.modeling import TextEmbeddingCache

    full = export is not None and (export / "transformer").is_dir()
    transformer = WanTransformer3DModel.from_pretrained(str(export / "transformer")) if full else tiny_wan_transformer()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=tiny_wan_vae(), scheduler=tiny_scheduler("unipc"),
                       transformer=transformer)
    if export is not None and not full:
        pipe.load_lora_weights(str(export))
    cache = TextEmbeddingCache("tiny", cache_dir=text_cache, max_sequence_length=32)
    latents = []
    prompts = yaml.safe_load((run / "config.yaml").read_text())["prompts"]
    for i, prompt in enumerate(prompts[:2]):  # validation.num_videos=2: the first training prompts
        with torch.no_grad():
            latents.append(pipe(
                prompt_embeds=cache.batch([prompt]), height=32, width=32, num_frames=5, num_inference_steps=3,
                guidance_scale=1.0, generator=torch.Generator("cpu").manual_seed(42 + i), output_type="latent",
            ).frames.float())
    return float(load_reward(reward_dir).metrics(torch.cat(latents))["reward"].mean())


@pytest.mark.parametrize("run", ["fsdp1", "fsdp2", "fsdp2-full"])
def test_sharded_run_validates_and_exports_what_the_unsharded_model_computes(fsdp_runs, reward_dir, text_cache, run):
    out, log = fsdp_runs[run]
    assert f"distributed: {run[:5].upper()}, 2 process(es)" in log
    assert [r["step"] for r in metrics_records(out, "train")] == [1, 2]
    validation = {r["step"]: r["reward"] for r in metrics_records(out, "validation")}
    assert sorted(validation) == [0, 1, 2]
    # Step 0: the base model's validation, sampled through the sharded model, is the unsharded model's.
    assert validation[0] == pytest.approx(_unsharded_validation_reward(out, reward_dir, text_cache), rel=1e-5)
    # Step 2: the exported (gathered) weights reproduce the sharded model's validation, and training moved it.
    ckpt = out / "checkpoint-2"
    if run.endswith("full"):  # diffusers' class name, not FSDP2's generated subclass
        assert json.loads((ckpt / "transformer" / "config.json").read_text())["_class_name"] == "WanTransformer3DModel"
    else:
        assert all(r["kl"] > 0 for r in metrics_records(out, "train")[1:])  # the LoRA-disabled reference, sharded
    assert validation[2] == pytest.approx(_unsharded_validation_reward(out, reward_dir, text_cache, ckpt), rel=1e-5)
    assert validation[2] != pytest.approx(validation[0], rel=1e-5)
    state = ckpt / "training_state"
    assert (state / "random_state_0.pt").is_file() and (state / "random_state_1.pt").is_file()
    assert json.loads((state / "trainer_state.json").read_text())["num_processes"] == 2
    assert (out / "best" / ("transformer" if run.endswith("full") else "pytorch_lora_weights.safetensors")).exists()


def test_fsdp1_resumed_equals_fsdp2_uninterrupted(fsdp_runs):
    """Two sharding implementations, one of them stopped and resumed (weights, optimizer, RNG restored through
    the sharded state-dict paths), give the same run."""
    from safetensors.torch import load_file

    (a, _), (b, _) = fsdp_runs["fsdp1"], fsdp_runs["fsdp2"]
    for kind in ("train", "validation"):
        ra, rb = metrics_records(a, kind), metrics_records(b, kind)
        assert [r["step"] for r in ra] == [r["step"] for r in rb]
        for x, y in zip(ra, rb):
            for key in ("loss", "reward", "grad_norm", "kl"):
                if key in x:
                    assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (kind, x["step"], key)
    la = load_file(str(a / "checkpoint-2" / "pytorch_lora_weights.safetensors"))
    lb = load_file(str(b / "checkpoint-2" / "pytorch_lora_weights.safetensors"))
    assert la.keys() == lb.keys() and len(la) == 42
    for k in la:
        torch.testing.assert_close(la[k], lb[k], rtol=1e-5, atol=1e-6)
