"""Other paths through the loop: a recipe registered from outside (the seam PRFL/VELR use) that makes a step
non-finite (skipped, weights untouched), the regularisers' reference model, full fine-tuning, and DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from latent_rewards.trainer.config import load_config
from latent_rewards.trainer.loop import Trainer
from latent_rewards.trainer.methods import ShellLCCRecipe, register_method
from safetensors.torch import load_file
from trainer_test_helpers import metrics_records


@register_method
class NaNOnSecondStep(ShellLCCRecipe):
    """Shell-LCC whose second optimizer step has a NaN loss; KL and anti-drift on (LoRA-disabled reference). It also
    uses the seams later recipes need: extra texts to encode (SFT captions) and decoding latents to pixels."""

    name = "test_nan_on_second_step"

    def extra_prompts(self):
        return ["an extra caption"]

    def training_step(self, ctx, batch):
        extra = ctx.text_embeds(["an extra caption"])  # encoded with the training prompts
        assert extra.shape[0] == 1 and extra.abs().sum() > 0
        if ctx.step == 0:
            video = ctx.decode(torch.zeros(1, *ctx.sample_shape))[0]  # the generator's VAE, for pixel judges
            assert str(video.dtype) == "uint8" and video.shape[-1] == 3
        result = super().training_step(ctx, batch)
        if ctx.step == 1:  # ctx.step counts finished steps: this is step 2
            result.loss = result.loss * float("nan")
        return result


def test_a_non_finite_step_is_skipped_and_leaves_the_weights_alone(tmp_path, tiny_overrides):
    out = tmp_path / "nan"
    cfg = load_config("tiny-cpu", tiny_overrides(
        out, "method.name=test_nan_on_second_step", "method.kl_weight=0.5", "method.anti_drift_weight=1.0",
        "method.anti_drift_margin=0.0", "max_steps=3", "checkpoint_every=1", "keep_last=3", "validation.every=0",
        "batch_size=1",
    ))
    result = Trainer(cfg, progress=False).train()
    assert result.step == 3
    lines = metrics_records(out, "train")
    assert [r["skipped"] for r in lines] == [0.0, 1.0, 0.0]
    assert lines[1]["loss"] is None and lines[0]["loss"] is not None  # strict JSON: NaN written as null
    assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-12)  # step 1: LoRA B = 0, the model is its reference
    assert lines[2]["kl"] > 0 and lines[2]["drift"] > 0  # after an update the reference differs
    state = {s: load_file(str(out / f"checkpoint-{s}" / "training_state" / "trainable.safetensors")) for s in (1, 2, 3)}
    assert all(torch.equal(state[1][k], state[2][k]) for k in state[1])  # the skipped step changed nothing
    assert any(not torch.equal(state[2][k], state[3][k]) for k in state[2])  # training went on
    opt = {s: torch.load(out / f"checkpoint-{s}" / "training_state" / "optimizer.pt", weights_only=True) for s in (1, 2)}
    assert opt[1]["state"][0]["step"] == opt[2]["state"][0]["step"]


def test_full_finetune_exports_a_transformer_and_resumes_exactly(tmp_path, tiny_overrides):
    from diffusers import WanTransformer3DModel
    from latent_rewards.pipelines.tiny import tiny_wan_transformer

    common = ("finetune=full", "optimizer.lr=1e-4", "method.kl_weight=0.1", "checkpoint_every=1", "validation.every=0",
              "batch_size=1", "gradient_checkpointing=true")
    full = tmp_path / "full"
    Trainer(load_config("tiny-cpu", tiny_overrides(full, *common, "max_steps=2")), progress=False).train()
    split = tmp_path / "split"
    Trainer(load_config("tiny-cpu", tiny_overrides(split, *common, "max_steps=1")), progress=False).train()
    Trainer(load_config("tiny-cpu", tiny_overrides(split, *common, "max_steps=2")), progress=False).train()
    assert [r["loss"] for r in metrics_records(split, "train")] == [r["loss"] for r in metrics_records(full, "train")]
    ck = full / "checkpoint-2"
    assert not (ck / "pytorch_lora_weights.safetensors").exists()
    tuned = WanTransformer3DModel.from_pretrained(str(ck / "transformer")).state_dict()
    again = WanTransformer3DModel.from_pretrained(str(split / "checkpoint-2" / "transformer")).state_dict()
    base = tiny_wan_transformer().state_dict()
    assert all(torch.equal(tuned[k], again[k]) for k in tuned)
    assert any(not torch.equal(tuned[k], base[k]) for k in base)
    comfy = load_file(str(ck / "tiny-shell-lcc_comfyui.safetensors"))
    assert "blocks.0.self_attn.q.weight" in comfy and len(comfy) == len(tuned)  # original Wan names, every weight


@pytest.mark.slow
def test_ddp_two_processes_train_resume_and_write_one_state_per_rank(tmp_path, tiny_overrides):
    out = tmp_path / "ddp"
    args = [*tiny_overrides(out, "checkpoint_every=1", "validation.every=0", "batch_size=1"), "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "latent_rewards.trainer",
           "tiny-cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for steps in (1, 2):  # the second launch resumes from checkpoint-1
        proc = subprocess.run([*cmd, *args, f"max_steps={steps}"], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("trained to step") == 1  # only the main process reports
    assert "resumed from" in proc.stderr
    state = out / "checkpoint-2" / "training_state"
    assert (state / "random_state_0.pt").is_file() and (state / "random_state_1.pt").is_file()
    assert json.loads((state / "trainer_state.json").read_text())["num_processes"] == 2
    r0, r1 = (torch.load(state / f"random_state_{i}.pt", weights_only=True) for i in (0, 1))
    assert not torch.equal(r0["rollout"]["local"], r1["rollout"]["local"])  # different noise per rank
    assert torch.equal(r0["rollout"]["shared"], r1["rollout"]["shared"])  # same step indices on every rank
    assert [r["step"] for r in metrics_records(out, "train")] == [1, 2]
