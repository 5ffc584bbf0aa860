"""Shell-LCC: the data manifold of high-quality latents as a reward (Zhang et al., ECCV 2026).

The whole model in one file, like the authors' ``manifold/shell_lcc.py`` (parameter names and shapes match it,
so official checkpoints load without renaming):

* **LCC skeleton.** ``M`` anchors ``basis`` ``[M, d]`` and an amortised coder ``predictor``
  (Linear-BatchNorm-ReLU-Linear-ReLU-Linear) whose softmax gives local coordinates ``gamma`` on the simplex.
  The skeleton point of a latent voxel ``z`` (one 16-d vector) is
  ``z_hat = global_scale * gamma(z) @ basis + global_bias``.
* **Shell.** ``surface_head`` maps ``z_hat`` to ``g``; ``sigma = exp(g)`` is a per-dimension local scale, and the
  normalised distance of a voxel is ``r = || (z - z_hat) / (sigma + eps) ||``. Training puts real voxels on the
  unit shell ``r = 1``; ``R_dist`` of a video is the mean ``r`` over its voxels.
* **Reward.** ``-R_dist`` (plain, the paper's setting) or ``-|R_dist - tau|`` (band), set in the config.

Numerics: everything in fp32 (optionally TF32/bf16 for the two large matrix products on GPU), evaluated in chunks
of voxels so memory does not grow with ``voxels x anchors``. The scoring methods always use the BatchNorm running
statistics, so each voxel is scored independently; for a scalar-per-voxel output (``r``, the LCC distance) the
gradient w.r.t. ``z`` is then computed chunk by chunk in the forward pass and only ``[N, d]`` is kept for backward.
Training the manifold (``lcc_loss``, ``shell_loss``) uses the module normally, BatchNorm in training mode.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .base import LatentReward, RewardInput, register_reward
from .errors import ConfigError

__all__ = ["ShellLCCConfig", "ShellLCC"]

REWARD_MODES = ("plain", "band")
PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass
class ShellLCCConfig:
    """Sizes and reward mode of a Shell-LCC manifold (what ``config.json`` records).

    The paper's manifold: 4096 anchors, hidden width 512 (2.46 M parameters) on Wan2.1 latents.
    """

    embedding_dim: int = 16
    num_bases: int = 4096
    hidden_dim: int = 512
    latent_space: str = "wan2.1"
    reward_mode: str = "plain"
    tau: float | None = None
    eps: float = 1e-6

    def validate(self) -> None:
        for name in ("embedding_dim", "num_bases", "hidden_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"shell-lcc config: {name} must be a positive integer, got {v!r}")
        if self.reward_mode not in REWARD_MODES:
            raise ConfigError(f"shell-lcc config: reward_mode must be one of {REWARD_MODES}, got {self.reward_mode!r}")
        if self.reward_mode == "band":
            if self.tau is None or not math.isfinite(float(self.tau)) or float(self.tau) < 0:
                raise ConfigError("shell-lcc config: reward_mode 'band' needs a finite tau >= 0 (e.g. tau=0.444)")
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise ConfigError(f"shell-lcc config: eps must be > 0, got {self.eps!r}")
        from .latent_space import get_latent_space

        space = get_latent_space(self.latent_space)
        if space.channels != self.embedding_dim:
            raise ConfigError(
                f"shell-lcc config: embedding_dim {self.embedding_dim} does not match the {space.name} latent "
                f"space ({space.channels} channels)"
            )


def _softmax_backward_(grad: torch.Tensor, out: torch.Tensor) -> None:
    """In place: ``grad <- out * (grad - <out, grad>)`` row-wise (the softmax backward), with ATen's fused kernel
    when available (about 4x faster on CPU than the composed in-place formula)."""
    try:
        torch._softmax_backward_data(grad, out, 1, out.dtype, grad_input=grad)
    except (AttributeError, RuntimeError, TypeError):
        dot = torch.bmm(out.unsqueeze(1), grad.unsqueeze(2)).view(-1, 1)
        grad.sub_(dot).mul_(out)


class _FusedVoxelScalar(torch.autograd.Function):
    """A per-voxel scalar (``r`` or the LCC distance) whose gradient w.r.t. each voxel is computed in the forward
    pass by :meth:`ShellLCC._fused_scalar`; backward is a product with the saved ``[N, d]`` gradient. Valid because
    each voxel's value depends only on that voxel (BatchNorm uses its running statistics)."""

    @staticmethod
    def forward(ctx: Any, zf: torch.Tensor, model: "ShellLCC", kind: str) -> torch.Tensor:
        values, _, grads = model._fused_scalar(zf, kind, need_grad=True)
        ctx.save_for_backward(grads)
        return values

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (g,) = ctx.saved_tensors
        return grad_out.unsqueeze(1) * g, None, None


@register_reward
class ShellLCC(LatentReward):
    """Shell-LCC manifold reward.

    Example::

        reward = ShellLCC.from_pretrained("path/or/user-repo")
        r_dist = reward.distance(z)      # [B], lower = closer to the data manifold
        score = reward.reward(z)         # [B], higher is better (-R_dist or -|R_dist - tau|)
    """

    kind = "shell-lcc"
    config_class = ShellLCCConfig
    required_inputs = frozenset({RewardInput.X0})

    def __init__(self, config: ShellLCCConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config if config is not None else ShellLCCConfig(**kwargs))
        d, m, h = self.config.embedding_dim, self.config.num_bases, self.config.hidden_dim
        self.basis = nn.Parameter(torch.empty(m, d))
        nn.init.xavier_uniform_(self.basis)
        self.global_scale = nn.Parameter(torch.ones(1))
        self.global_bias = nn.Parameter(torch.zeros(1, d))
        self.predictor = nn.Sequential(
            nn.Linear(d, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, m)
        )
        self.surface_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d))
        #: Voxels per chunk; ``None`` picks it from ``memory_budget_mb`` (about 6 live ``chunk x M`` fp32 tensors).
        self.chunk_size: int | None = None
        self.memory_budget_mb: float = 192.0
        #: "fp32" (default, exact), "tf32" or "bf16": precision of the two large matrix products on CUDA.
        self.precision: str = "fp32"

    # ------------------------------------------------------------------ configuration helpers
    @property
    def reward_mode(self) -> str:
        return self.config.reward_mode

    def set_reward_mode(self, mode: str, tau: float | None = None) -> "ShellLCC":
        """Switch between ``plain`` (-R_dist) and ``band`` (-|R_dist - tau|); validated like the config."""
        old = (self.config.reward_mode, self.config.tau)
        self.config.reward_mode, self.config.tau = mode, (tau if tau is not None else self.config.tau)
        try:
            self.config.validate()
        except ConfigError:
            self.config.reward_mode, self.config.tau = old
            raise
        return self

    def _chunk(self) -> int:
        if self.chunk_size is not None:
            if self.chunk_size < 1:
                raise ConfigError(f"chunk_size must be >= 1, got {self.chunk_size}")
            return int(self.chunk_size)
        per_voxel = 6 * 4 * (self.config.num_bases + 2 * self.config.hidden_dim)
        return int(max(256, min(65536, self.memory_budget_mb * 2**20 // per_voxel)))

    @contextlib.contextmanager
    def _matmul_precision(self) -> Any:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.precision == "tf32" and self.basis.is_cuda:
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                yield
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev
        else:
            yield

    def _big_matmul(self, a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``a @ w.T + bias`` for the two ``x M`` products; bf16 inputs with fp32 result when asked."""
        if self.precision == "bf16":
            out = F.linear(a.bfloat16(), w.bfloat16(), None if bias is None else bias.bfloat16())
            return out.float()
        return F.linear(a, w, bias)

    # ------------------------------------------------------------------ per-voxel maths ([n, d] fp32)
    def _coordinates(self, zf: torch.Tensor) -> torch.Tensor:
        """Local coordinates gamma ``[n, M]`` with the BatchNorm running statistics (scoring semantics)."""
        lin0, bn, _, lin1, _, lin2 = self.predictor
        h = F.linear(zf, lin0.weight, lin0.bias)
        h = F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        h = F.relu(F.linear(F.relu(h), lin1.weight, lin1.bias))
        return torch.softmax(self._big_matmul(h, lin2.weight, lin2.bias), dim=1)

    def _reconstruct(self, gamma: torch.Tensor) -> torch.Tensor:
        return self._big_matmul(gamma, self.basis.t()) * self.global_scale + self.global_bias

    def _skeleton_flat(self, zf: torch.Tensor) -> torch.Tensor:
        return self._reconstruct(self._coordinates(zf))

    def _shell_scale(self, z_hat: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.surface_head(z_hat)) + self.config.eps

    def _r_flat(self, zf: torch.Tensor) -> torch.Tensor:
        z_hat = self._skeleton_flat(zf)
        return torch.linalg.vector_norm((zf - z_hat) / self._shell_scale(z_hat), dim=1)

    def _lcc_flat(self, zf: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(zf - self._skeleton_flat(zf), dim=1)

    # ------------------------------------------------------------------ chunked evaluation
    def _flatten(self, z: torch.Tensor) -> torch.Tensor:
        self.latent_space.check(z, name="latents")
        c = z.shape[1]
        return z.to(device=self.basis.device, dtype=torch.float32).permute(0, 2, 3, 4, 1).reshape(-1, c)

    def _params_need_grad(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def _needs_grad(self, zf: torch.Tensor) -> bool:
        """Whether autograd will want a gradient from this call (w.r.t. the latent or the manifold's weights)."""
        return torch.is_grad_enabled() and (zf.requires_grad or self._params_need_grad())

    def _voxel_scalar(self, zf: torch.Tensor, kind: str) -> torch.Tensor:
        """Per-voxel ``r`` (``kind="shell"``) or LCC distance (``kind="lcc"``), chunked, differentiable."""
        with self._matmul_precision():
            if not self._needs_grad(zf):
                return self._fused_scalar(zf, kind, need_grad=False)[0]
            if self._params_need_grad():
                # Gradients also flow to the manifold's own parameters: plain autograd, each chunk recomputed in
                # backward so that only chunk inputs are kept.
                fn = self._r_flat if kind == "shell" else self._lcc_flat
                chunk = self._chunk()
                return torch.cat(
                    [checkpoint(fn, zf[i : i + chunk], use_reentrant=False) for i in range(0, zf.shape[0], chunk)]
                )
            return _FusedVoxelScalar.apply(zf, self, kind)

    @torch.no_grad()
    def _fused_scalar(
        self, zf: torch.Tensor, kind: str, *, need_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Hand-fused forward (and per-voxel gradient) of ``r`` / the LCC distance over chunks of voxels.

        Returns ``(values, lcc_values, grads)``: ``values`` of ``kind``, the LCC distances (free by-product) and,
        if ``need_grad``, ``d value / d z`` per voxel ``[N, d]``. Same maths as autograd through the model, but
        BatchNorm is folded into the first layer, the two ``chunk x M`` buffers (coordinates and their gradient)
        are allocated once and reused, and the softmax and its backward run in place, so the ``N x M`` work runs at
        matrix-product speed with memory bounded by one chunk.
        """
        n_total, d = zf.shape
        m = self.config.num_bases
        chunk = min(self._chunk(), max(n_total, 1))
        lin0, bn, _, lin1, _, lin2 = self.predictor
        bn_scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        w0 = lin0.weight * bn_scale[:, None]
        b0 = (lin0.bias - bn.running_mean) * bn_scale + bn.bias
        w1, b1, w2, b2 = lin1.weight, lin1.bias, lin2.weight, lin2.bias
        hw0, hb0, hw2, hb2 = (self.surface_head[0].weight, self.surface_head[0].bias,
                              self.surface_head[2].weight, self.surface_head[2].bias)
        alpha, beta, eps = self.global_scale, self.global_bias, self.config.eps
        low = self.precision == "bf16"
        basis = self.basis.bfloat16() if low else self.basis
        w2_mm = w2.bfloat16() if low else w2

        gamma_buf = torch.empty(chunk, m, device=zf.device, dtype=torch.float32)
        grad_buf = torch.empty(chunk, m, device=zf.device, dtype=torch.float32) if need_grad else None
        values = torch.empty(n_total, device=zf.device, dtype=torch.float32)
        lcc_values = torch.empty(n_total, device=zf.device, dtype=torch.float32)
        grads = torch.empty(n_total, d, device=zf.device, dtype=torch.float32) if need_grad else None

        for i in range(0, n_total, chunk):
            zc = zf[i : i + chunk]
            n = zc.shape[0]
            gamma = gamma_buf[:n]
            # coder: (Linear+BN) -> ReLU -> Linear -> ReLU -> Linear(M) -> softmax, in place
            h1 = torch.addmm(b0, zc, w0.t())
            mask1 = h1 > 0
            h1.clamp_min_(0)
            h2 = torch.addmm(b1, h1, w1.t())
            mask2 = h2 > 0
            h2.clamp_min_(0)
            if low:
                gamma.copy_(F.linear(h2.bfloat16(), w2_mm, b2.bfloat16()))
            else:
                torch.addmm(b2, h2, w2.t(), out=gamma)
            torch.softmax(gamma, dim=1, out=gamma)
            coords = gamma.bfloat16() if low else gamma
            z_hat = torch.mm(coords, basis).float() * alpha + beta
            u = zc - z_hat
            lcc = torch.linalg.vector_norm(u, dim=1)
            lcc_values[i : i + n] = lcc
            if kind == "shell":
                h3 = torch.addmm(hb0, z_hat, hw0.t())
                mask3 = h3 > 0
                h3.clamp_min_(0)
                e = torch.exp(torch.addmm(hb2, h3, hw2.t()))
                s = e + eps
                q = u / s
                r = torch.linalg.vector_norm(q, dim=1)
            else:
                q, r = u, lcc
            values[i : i + n] = r
            if not need_grad:
                continue
            dq = q / r.clamp_min(1e-30).unsqueeze(1)  # d||q||/dq (0 where q = 0, as autograd's norm)
            if kind == "shell":
                du = dq / s
                dg = -dq * q / s * e  # through s = exp(g) + eps
                dz_hat = -du + torch.mm(torch.mm(dg, hw2) * mask3, hw0)
            else:
                du = dq
                dz_hat = -du
            dgamma = grad_buf[:n]
            torch.mm(dz_hat * alpha, self.basis.t(), out=dgamma)
            _softmax_backward_(dgamma, gamma)
            dh2 = (torch.mm(dgamma.bfloat16(), w2_mm).float() if low else torch.mm(dgamma, w2)) * mask2
            dh1 = torch.mm(dh2, w1) * mask1
            grads[i : i + n] = du + torch.mm(dh1, w0)
        return values, lcc_values, grads

    def _voxel_vector(self, zf: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        chunk = self._chunk()
        with self._matmul_precision():
            if not self._needs_grad(zf):
                with torch.no_grad():
                    return torch.cat([fn(zf[i : i + chunk]) for i in range(0, zf.shape[0], chunk)])
            return torch.cat(
                [checkpoint(fn, zf[i : i + chunk], use_reentrant=False) for i in range(0, zf.shape[0], chunk)]
            )

    @staticmethod
    def _unflatten_map(values: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        b, _, t, h, w = z.shape
        return values.view(b, t, h, w)

    @staticmethod
    def _unflatten_latent(values: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = z.shape
        return values.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)

    # ------------------------------------------------------------------ public API
    def skeleton(self, z: torch.Tensor) -> torch.Tensor:
        """The LCC reconstruction ``z_hat`` of every voxel, ``[B, C, T, H, W]`` fp32."""
        return self._unflatten_latent(self._voxel_vector(self._flatten(z), self._skeleton_flat), z)

    def distance_map(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised distance ``r`` of every voxel to the shell, ``[B, T, H, W]`` (real data sit near 1)."""
        return self._unflatten_map(self._voxel_scalar(self._flatten(z), "shell"), z)

    def distance(self, z: torch.Tensor) -> torch.Tensor:
        """``R_dist`` per sample, ``[B]``: the mean of :meth:`distance_map` over the sample's voxels."""
        return self.distance_map(z).flatten(1).mean(dim=1)

    def lcc_distance(self, z: torch.Tensor) -> torch.Tensor:
        """The plain-LCC baseline per sample, ``[B]``: mean Euclidean ``||z - z_hat||`` over voxels."""
        return self._unflatten_map(self._voxel_scalar(self._flatten(z), "lcc"), z).flatten(1).mean(dim=1)

    def reward_from_distance(self, r_dist: torch.Tensor) -> torch.Tensor:
        """The configured reward for given ``R_dist`` values: ``-R_dist`` or ``-|R_dist - tau|``."""
        if self.config.reward_mode == "band":
            return -(r_dist - float(self.config.tau)).abs()
        return -r_dist

    def reward(
        self,
        x0: torch.Tensor | None = None,
        *,
        x_t: torch.Tensor | None = None,
        timestep: torch.Tensor | float | None = None,
        text_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``-R_dist`` (plain) or ``-|R_dist - tau|`` (band) per sample, ``[B]``; only ``x0`` is read."""
        self.check_inputs(x0, x_t=x_t, timestep=timestep, text_embeds=text_embeds)
        return self.reward_from_distance(self.distance(x0))

    def radial(self, z: torch.Tensor, r: float | torch.Tensor) -> torch.Tensor:
        """Points on the line through the skeleton and ``z``: ``z_hat + r (z - z_hat)``.

        ``r = 0`` gives the (blurry) local mean, ``r = 1`` gives ``z`` back, ``r > 1`` pushes off the shell.
        ``r`` is a number or a tensor broadcastable to ``[B, 1, 1, 1, 1]`` (e.g. shape ``[B]``).
        """
        z_hat = self.skeleton(z)
        if isinstance(r, torch.Tensor) and r.ndim == 1:
            r = r.view(-1, 1, 1, 1, 1)
        if isinstance(r, torch.Tensor):
            r = r.to(z_hat)
        return z_hat + r * (z.to(z_hat) - z_hat)

    def metrics(self, x0: torch.Tensor | None = None, *, maps: bool = False, **inputs: Any) -> dict[str, torch.Tensor]:
        """``r_dist``, ``lcc_distance`` and ``reward`` per sample in one chunked pass (no gradient); with
        ``maps=True`` also ``distance_map`` (the per-voxel ``r``, as :meth:`distance_map`) from the same pass."""
        self.check_inputs(x0, **inputs)
        with self._matmul_precision():
            r, lcc, _ = self._fused_scalar(self._flatten(x0), "shell", need_grad=False)
        b = x0.shape[0]
        r_dist = r.view(b, -1).mean(1)
        out = {
            "r_dist": r_dist,
            "lcc_distance": lcc.view(b, -1).mean(1),
            "reward": self.reward_from_distance(r_dist),
        }
        if maps:
            out["distance_map"] = self._unflatten_map(r, x0)
        return out

    # ------------------------------------------------------------------ fitting (used by trainer/fit_manifold)
    @torch.no_grad()
    def init_anchors(self, voxels: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Initialise the anchors with ``M`` randomly chosen real voxels ``[N, d]`` (N >= M)."""
        m = self.config.num_bases
        if voxels.ndim != 2 or voxels.shape[1] != self.config.embedding_dim or voxels.shape[0] < m:
            raise ConfigError(
                f"anchor initialisation needs at least {m} voxels of dim {self.config.embedding_dim}, "
                f"got {tuple(voxels.shape)}; use fewer anchors or more data"
            )
        idx = torch.randperm(voxels.shape[0], generator=generator)[:m]
        self.basis.copy_(voxels[idx].to(self.basis))

    def lcc_loss(
        self, zf: torch.Tensor, *, lambda_usage: float = 0.0, lambda_basis: float = 0.0
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Stage-1 loss on voxels ``[N, d]``: reconstruction MSE + locality ``sum_k gamma_k ||z - c_k||^2``,
        plus the optional usage-KL and anchor-to-nearest-voxel regularisers (BatchNorm in the module's mode)."""
        gamma = torch.softmax(self.predictor(zf), dim=1)
        z_hat = (gamma @ self.basis) * self.global_scale + self.global_bias
        recon = F.mse_loss(z_hat, zf)
        # ||z - c||^2 expanded so no [N, M, d] tensor is formed; clamped at 0 against round-off.
        dist_sq = torch.relu(
            zf.pow(2).sum(1, keepdim=True) + self.basis.pow(2).sum(1).unsqueeze(0) - 2 * zf @ self.basis.t()
        )
        locality = (gamma * dist_sq).sum(1).mean()
        loss = recon + locality
        logs = {"recon": float(recon.detach()), "locality": float(locality.detach())}
        if lambda_usage > 0:
            usage = gamma.mean(0) + 1e-8
            usage = usage / usage.sum()
            kl = (usage * (usage.log() + math.log(usage.numel()))).sum()
            loss = loss + lambda_usage * kl
            logs["usage_kl"] = float(kl.detach())
        if lambda_basis > 0:
            nearest = dist_sq.detach().argmin(0)  # nearest voxel of each anchor
            b2p = (self.basis - zf[nearest]).pow(2).sum(1).mean()
            loss = loss + lambda_basis * b2p
            logs["basis_to_voxel"] = float(b2p.detach())
        logs["loss"] = float(loss.detach())
        return loss, logs

    def shell_loss(self, zf: torch.Tensor, *, log_scale_weight: float = 0.01) -> tuple[torch.Tensor, dict[str, float]]:
        """Stage-2 loss on voxels ``[N, d]`` with the skeleton frozen: ``mean (r - 1)^2 + 0.01 mean g^2``."""
        with torch.no_grad():
            z_hat = self._skeleton_flat(zf)
        g = self.surface_head(z_hat)
        r = torch.linalg.vector_norm((zf - z_hat) / (torch.exp(g) + self.config.eps), dim=1)
        shell = (r - 1.0).pow(2).mean()
        reg = g.pow(2).mean()
        loss = shell + log_scale_weight * reg
        return loss, {
            "shell": float(shell.detach()), "log_scale_reg": float(reg.detach()),
            "mean_r": float(r.detach().mean()), "loss": float(loss.detach()),
        }

    def skeleton_parameters(self) -> list[nn.Parameter]:
        return [self.basis, self.global_scale, self.global_bias, *self.predictor.parameters()]

    def shell_parameters(self) -> list[nn.Parameter]:
        return list(self.surface_head.parameters())
