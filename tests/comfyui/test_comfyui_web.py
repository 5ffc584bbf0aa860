"""The frontend extension (web/js/latent_rewards.js) under Node.js, with ComfyUI's app/api modules stood in.

The ComfyUI frontend is a browser app; here its two module exports the extension uses (``app.registerExtension``
and the ``api`` event target) are small ES modules, and a recording canvas context captures what gets drawn.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from comfy_harness import REPO

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js is not installed (only the JS checks need it)")
SCRIPT = REPO / "web" / "js" / "latent_rewards.js"

_APP = """
export const app = {
  extensions: [],
  registerExtension(ext) {
    if (this.extensions.some((e) => e.name === ext.name)) throw new Error("duplicate extension " + ext.name);
    this.extensions.push(ext);
  },
  graph: { nodes: new Map(), getNodeById(id) { return this.nodes.get(Number(id)) ?? null; } },
};
"""
_API = "export const api = new EventTarget();\n"
_RUN = """
import { app } from "./scripts/app.js";
import { api } from "./scripts/api.js";
// ComfyUI can serve the folder twice (WEB_DIRECTORY and pyproject web): both copies get imported.
await import("./extensions/latent-rewards/latent_rewards.js");
await import("./extensions/latent_rewards_copy/latent_rewards.js");

function recorder() {
  const calls = [];
  const ctx = new Proxy({}, {
    get(target, prop) {
      if (prop === "calls") return calls;
      if (prop in target) return target[prop];
      return (...args) => calls.push([prop, ...args]);
    },
    set(target, prop, value) { target[prop] = value; return true; },
  });
  return ctx;
}
const ext = app.extensions[0];
ext.setup();
function Sampler() {}
Sampler.prototype.onDrawForeground = function () { this.baseDrawn = true; };
function Score() {}
await ext.beforeRegisterNodeDef(Sampler, { name: "KSampler" });
await ext.beforeRegisterNodeDef(Score, { name: "LatentRewardsScore" });
const dirty = [];
const make = (T, id) => Object.assign(new T(), { id, size: [300, 200], setDirtyCanvas() { dirty.push(id); } });
const sampler = make(Sampler, 8);
const score = make(Score, 9);
const idle = make(Sampler, 3);
app.graph.nodes.set(8, sampler);
api.dispatchEvent(new CustomEvent("latent_rewards.trace", { detail: {
  node: "8", guidance_node: "7", kind: "shell-lcc", done: true,
  trace: { sigmas: [1.0, 0.9, 0.6], progress: [0.0, 0.25, 0.75], rewards: [[-4, -4.2], [-3, -3.2], [-2, -2.2]],
           guided: [true, true, false], step_rms: [] },
} }));
score.onExecuted({ latent_rewards: [{ kind: "shell-lcc", scores: [-1.5, -2.0], order: [0] }] });
const c1 = recorder(), c2 = recorder(), c3 = recorder();
sampler.onDrawForeground(c1);
score.onDrawForeground(c2);
idle.onDrawForeground(c3);
const texts = (calls) => calls.filter((c) => c[0] === "fillText").map((c) => c[1]);
const count = (calls, name) => calls.filter((c) => c[0] === name).length;
console.log(JSON.stringify({
  extensions: app.extensions.length, dirty, baseDrawn: sampler.baseDrawn === true,
  samplerTexts: texts(c1.calls), arcs: count(c1.calls, "arc"), fills: count(c1.calls, "fill"),
  arcX: c1.calls.filter((c) => c[0] === "arc").map((c) => c[1]),
  scoreTexts: texts(c2.calls), scoreRects: count(c2.calls, "fillRect"),
  idleCalls: c3.calls.length, idleBaseDrawn: idle.baseDrawn === true,
}));
"""


def test_js_parses_as_an_es_module(tmp_path):
    module = tmp_path / "latent_rewards.mjs"
    shutil.copy(SCRIPT, module)
    proc = subprocess.run([NODE, "--check", str(module)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_js_draws_the_trace_and_the_scores_and_registers_once(tmp_path):
    (tmp_path / "package.json").write_text('{"type": "module"}')
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "app.js").write_text(_APP)
    (tmp_path / "scripts" / "api.js").write_text(_API)
    for folder in ("latent-rewards", "latent_rewards_copy"):
        (tmp_path / "extensions" / folder).mkdir(parents=True)
        shutil.copy(SCRIPT, tmp_path / "extensions" / folder / "latent_rewards.js")
    (tmp_path / "run.js").write_text(_RUN)
    proc = subprocess.run([NODE, "run.js"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["extensions"] == 1
    assert out["dirty"] == [8, 9] and out["baseDrawn"]
    assert out["samplerTexts"] == ["shell-lcc reward per step: -4.100 \u2192 -2.100"]
    assert out["arcs"] == 3 and out["fills"] == 2  # filled dots for the two guided steps
    # Dots sit at the schedule progress across the 288 px chart (6 px margins), not evenly by step index.
    assert out["arcX"] == [6, 6 + 0.25 * 288, 6 + 0.75 * 288]
    assert out["scoreTexts"] == ["shell-lcc: -1.500, -2.000  (kept #0)"] and out["scoreRects"] == 1 + 2
    assert out["idleCalls"] == 0 and out["idleBaseDrawn"]
