"""Run by test_fit.py under `accelerate launch` with 2 CPU processes: fit, then save each process's weights."""

import os
import sys

import torch

from latent_rewards.trainer.fit_manifold import FitConfig, fit_manifold

data, out = sys.argv[1], sys.argv[2]
cfg = FitConfig(anchors=16, hidden=16, lcc_steps=12, shell_steps=8, batch_voxels=256, checkpoint_every=5,
                log_every=2, max_latent_frames=None, hist_clips=4)
seen = []
res = fit_manifold(data, out, cfg, progress=False, callback=lambda step, logs: seen.append(step))
rank = int(os.environ["RANK"])
torch.save({"state": res.reward.state_dict(), "steps": seen, "main": res.is_main_process},
           os.path.join(os.path.dirname(out), f"rank{rank}.pt"))
