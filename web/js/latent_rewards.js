// latent-rewards ComfyUI frontend extension (dependency-free).
//
// * Guided runs: the backend sends "latent_rewards.trace" websocket events (node = the sampler node, guidance_node =
//   the Latent Reward Guidance / Guider node) after every sampling step; a small chart of the mean reward per step
//   is drawn under both nodes (filled dots = guided steps), placed along the schedule progress (the axis of the
//   start/end window, 0 at the left edge, 1 at the right) when the trace carries it.
// * Scoring: LatentRewardsScore / LatentRewardsBestOf return ui.latent_rewards = [{kind, scores, ...}]; the scores
//   are drawn as bars under the node.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "latent_rewards.trace_and_scores";
const TRACE_EVENT = "latent_rewards.trace";
const SCORE_NODES = new Set(["LatentRewardsScore", "LatentRewardsBestOf"]);
const CHART_H = 64;

// ComfyUI may serve this folder under two names (WEB_DIRECTORY and pyproject [tool.comfy] web): register once.
if (!globalThis.__latentRewardsExtension) {
  globalThis.__latentRewardsExtension = true;

  const traces = new Map(); // node id -> last trace event

  const mean = (xs) => (xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : NaN);
  const fmt = (v) => (Number.isFinite(v) ? (Math.abs(v) >= 100 ? v.toFixed(1) : v.toPrecision(4)) : "-");

  function frame(ctx, node, title) {
    const x = 0;
    const y = node.size[1] + 6;
    const w = node.size[0];
    ctx.save();
    ctx.fillStyle = "rgba(20,20,28,0.85)";
    ctx.fillRect(x, y, w, CHART_H);
    ctx.fillStyle = "#ccc";
    ctx.font = "11px sans-serif";
    ctx.fillText(title, x + 6, y + 13);
    return { x: x + 6, y: y + 18, w: w - 12, h: CHART_H - 24 };
  }

  function drawTrace(ctx, node, event) {
    const values = (event.trace?.rewards || []).map(mean);
    const guided = event.trace?.guided || [];
    const progress = event.trace?.progress || [];
    if (!values.length) return;
    const lo = Math.min(...values);
    const hi = Math.max(...values);
    const span = hi - lo || 1;
    const title = `${event.kind} reward per step: ${fmt(values[0])} \u2192 ${fmt(values[values.length - 1])}` +
      (event.done ? "" : " \u2026");
    const box = frame(ctx, node, title);
    const onAxis = progress.length === values.length;
    const px = (i) =>
      box.x + (onAxis ? progress[i] * box.w : values.length === 1 ? box.w / 2 : (i * box.w) / (values.length - 1));
    const py = (v) => box.y + box.h - ((v - lo) / span) * box.h;
    ctx.strokeStyle = "#7ec8ff";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    values.forEach((v, i) => (i ? ctx.lineTo(px(i), py(v)) : ctx.moveTo(px(i), py(v))));
    ctx.stroke();
    values.forEach((v, i) => {
      ctx.beginPath();
      ctx.arc(px(i), py(v), 2.5, 0, 2 * Math.PI);
      if (guided[i]) {
        ctx.fillStyle = "#7ec8ff";
        ctx.fill();
      } else {
        ctx.strokeStyle = "#888";
        ctx.stroke();
      }
    });
    ctx.restore();
  }

  function drawScores(ctx, node, payload) {
    const scores = payload.scores || [];
    if (!scores.length) return;
    const order = payload.order;
    const title = `${payload.kind}: ` + scores.slice(0, 6).map(fmt).join(", ") + (scores.length > 6 ? ", \u2026" : "") +
      (order ? `  (kept #${order.join(", #")})` : "");
    const box = frame(ctx, node, title);
    const lo = Math.min(0, ...scores);
    const hi = Math.max(0, ...scores);
    const span = hi - lo || 1;
    const bw = box.w / scores.length;
    const zero = box.y + box.h - ((0 - lo) / span) * box.h;
    scores.forEach((s, i) => {
      const top = box.y + box.h - ((s - lo) / span) * box.h;
      ctx.fillStyle = order && order.includes(i) ? "#9be39b" : "#7ec8ff";
      ctx.fillRect(box.x + i * bw + 1, Math.min(top, zero), Math.max(1, bw - 2), Math.abs(zero - top) || 1);
    });
    ctx.restore();
  }

  function findNode(id) {
    const graph = app.graph;
    if (!graph || id === null || id === undefined) return null;
    return graph.getNodeById(Number(id)) || graph.getNodeById(id) || null;
  }

  app.registerExtension({
    name: EXTENSION,

    setup() {
      api.addEventListener(TRACE_EVENT, (event) => {
        const detail = event.detail || {};
        for (const id of [detail.node, detail.guidance_node]) {
          if (id === null || id === undefined) continue;
          traces.set(String(id), detail);
          findNode(id)?.setDirtyCanvas?.(true, true);
        }
      });
    },

    async beforeRegisterNodeDef(nodeType, nodeData) {
      const drawForeground = nodeType.prototype.onDrawForeground;
      nodeType.prototype.onDrawForeground = function (ctx) {
        const result = drawForeground?.apply(this, arguments);
        if (this.flags?.collapsed) return result;
        const trace = traces.get(String(this.id));
        if (trace) drawTrace(ctx, this, trace);
        else if (this.__latentRewardsScores) drawScores(ctx, this, this.__latentRewardsScores);
        return result;
      };
      if (SCORE_NODES.has(nodeData.name)) {
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
          const result = onExecuted?.apply(this, arguments);
          const payload = message?.latent_rewards?.[0];
          if (payload) {
            this.__latentRewardsScores = payload;
            this.setDirtyCanvas?.(true, true);
          }
          return result;
        };
      }
    },
  });
}
