import weakref

import pytest
import torch

from latent_rewards.rewards import ConfigError, LatentShapeError, MissingInputError, NonFiniteError, ShellLCC
from official_formula import official_distance_flat, official_skeleton_flat


def _z(b=2, t=3, h=4, w=5, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 16, t, h, w, generator=g) * scale


def _flat(z):
    return z.permute(0, 2, 3, 4, 1).reshape(-1, 16)


def test_architecture_matches_paper_size():
    m = ShellLCC()  # paper defaults: 4096 anchors, hidden 512
    n_params = sum(p.numel() for p in m.parameters())
    assert n_params == 2_456_097  # the "2.5M manifold parameters" of the project page
    assert m.basis.shape == (4096, 16) and m.global_scale.shape == (1,) and m.global_bias.shape == (1, 16)


def test_public_methods_shapes_and_definitions(small_shell_lcc):
    m = small_shell_lcc()
    z = _z()
    z_hat = m.skeleton(z)
    r = m.distance_map(z)
    assert z_hat.shape == z.shape and z_hat.dtype == torch.float32
    assert r.shape == (2, 3, 4, 5)
    assert torch.all(r >= 0)
    # R_dist is the per-sample mean of the map; lcc distance is the mean Euclidean residual.
    assert torch.allclose(m.distance(z), r.flatten(1).mean(1))
    expected_lcc = torch.linalg.vector_norm(z - z_hat, dim=1).flatten(1).mean(1)
    assert torch.allclose(m.lcc_distance(z), expected_lcc, atol=1e-6)
    # r is the residual divided by the learned shell scale exp(g) + eps.
    scale = torch.exp(m.surface_head(_flat(z_hat))) + 1e-6
    r_manual = torch.linalg.vector_norm((_flat(z) - _flat(z_hat)) / scale, dim=1)
    assert torch.allclose(r.reshape(-1), r_manual, atol=1e-5)


def test_matches_official_formula_values(small_shell_lcc):
    m = small_shell_lcc(seed=3)
    z = _z(seed=4)
    state = m.state_dict()
    assert torch.allclose(_flat(m.skeleton(z)), official_skeleton_flat(state, _flat(z)), atol=1e-6)
    assert torch.allclose(m.distance_map(z).reshape(-1), official_distance_flat(state, _flat(z)), rtol=1e-5)


def test_reward_modes(small_shell_lcc):
    m = small_shell_lcc()
    z = _z()
    d = m.distance(z)
    assert torch.allclose(m.reward(z), -d)
    m.set_reward_mode("band", tau=0.5)
    assert torch.allclose(m.reward(z), -(d - 0.5).abs())
    assert torch.allclose(m.metrics(z)["reward"], -(d - 0.5).abs())
    with pytest.raises(ConfigError, match="tau"):
        ShellLCC(num_bases=8, hidden_dim=8, reward_mode="band")
    with pytest.raises(ConfigError, match="reward_mode"):
        m.set_reward_mode("sharp")
    assert m.reward_mode == "band"  # a failed switch leaves the old mode


def test_radial_endpoints(small_shell_lcc):
    m = small_shell_lcc()
    z = _z()
    assert torch.allclose(m.radial(z, 0.0), m.skeleton(z))
    assert torch.allclose(m.radial(z, 1.0), z, atol=1e-6)
    per_sample = m.radial(z, torch.tensor([0.0, 1.0]))
    assert torch.allclose(per_sample[0], m.skeleton(z)[0]) and torch.allclose(per_sample[1], z[1], atol=1e-6)


def test_metrics_agree_with_methods(small_shell_lcc):
    m = small_shell_lcc()
    z = _z()
    met = m.metrics(z)
    assert torch.allclose(met["r_dist"], m.distance(z))
    assert torch.allclose(met["lcc_distance"], m.lcc_distance(z))


@pytest.mark.parametrize("chunk", [1, 7, 64, 100_000])
def test_chunked_equals_unchunked_values_and_gradients(small_shell_lcc, chunk):
    m = small_shell_lcc(seed=5)
    z = _z(seed=6)
    state = m.state_dict()

    # reference: the official formula with plain autograd through the whole N x M graph
    z_ref = z.clone().requires_grad_(True)
    ref = official_distance_flat(state, _flat(z_ref)).view(2, -1).mean(1)
    weights = torch.tensor([0.7, -1.3])
    (ref * weights).sum().backward()

    m.chunk_size = chunk
    z_ours = z.clone().requires_grad_(True)
    ours = m.distance(z_ours)
    (ours * weights).sum().backward()

    assert torch.allclose(ours, ref.detach(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(z_ours.grad, z_ref.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", ["skeleton", "lcc_distance"])
def test_other_methods_are_differentiable_and_chunk_invariant(small_shell_lcc, method):
    m = small_shell_lcc(seed=7)
    z = _z(seed=8)
    grads = []
    for chunk in (5, 100_000):
        m.chunk_size = chunk
        zz = z.clone().requires_grad_(True)
        out = getattr(m, method)(zz)
        out.pow(2).sum().backward()
        grads.append(zz.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert grads[0].abs().sum() > 0


def test_gradient_matches_finite_differences(small_shell_lcc):
    m = small_shell_lcc(seed=9)
    m.double()
    z = _z(b=1, t=1, h=2, w=2, seed=10).double().requires_grad_(True)
    # fp32 inside by design: check against finite differences of the fp32 function with a loose tolerance
    m.float()
    (g,) = torch.autograd.grad(m.distance(z.float()).sum(), z)
    eps = 1e-2
    idx = (0, 3, 0, 1, 0)
    zp, zm = z.detach().clone(), z.detach().clone()
    zp[idx] += eps
    zm[idx] -= eps
    fd = (m.distance(zp.float()) - m.distance(zm.float())).item() / (2 * eps)
    assert g[idx].item() == pytest.approx(fd, rel=2e-2, abs=1e-4)


def test_gradient_reaches_parameters_when_unfrozen(small_shell_lcc):
    m = small_shell_lcc()
    m.requires_grad_(True)
    z = _z().requires_grad_(True)
    m.chunk_size = 9
    m.distance(z).sum().backward()
    assert m.surface_head[0].weight.grad is not None and m.basis.grad is not None
    assert z.grad is not None


def test_backward_keeps_only_per_voxel_gradients(small_shell_lcc):
    """Memory does not grow with voxels x anchors: what autograd saves for backward is O(N x d), not O(N x M)."""
    m = small_shell_lcc(num_bases=512, hidden_dim=32)
    m.chunk_size = 256
    z = _z(b=1, t=4, h=16, w=16).requires_grad_(True)  # 1024 voxels, 512 anchors
    params = {p.data_ptr() for p in m.parameters()} | {b.data_ptr() for b in m.buffers()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append((weakref.ref(t), t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        r = m.distance(z)
    # Tensors of each chunk's transient graph are freed once its gradient is taken; count what stays alive.
    alive = sum(size for ref, size in saved if ref() is not None)
    n_voxels, anchors = 1024, 512
    assert alive <= 4 * n_voxels * 16 * 4  # a few [N, d] fp32 tensors
    assert alive < n_voxels * anchors * 4 / 8
    r.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_fp32_inside_for_half_inputs(small_shell_lcc):
    m = small_shell_lcc()
    z = _z()
    d32 = m.distance(z)
    d16 = m.distance(z.to(torch.bfloat16))
    assert d16.dtype == torch.float32
    assert torch.allclose(d16, m.distance(z.to(torch.bfloat16).float()))
    assert torch.allclose(d16, d32, rtol=2e-2)


def test_bf16_matmul_precision_close_to_fp32(small_shell_lcc):
    m = small_shell_lcc(num_bases=256, hidden_dim=64)
    z = _z(b=1, t=2, h=8, w=8)
    ref = m.distance(z)
    m.precision = "bf16"
    approx = m.distance(z)
    assert torch.allclose(approx, ref, rtol=1e-2)
    m.precision = "fp64"
    with pytest.raises(ConfigError, match="precision"):
        m.distance(z)


def test_scoring_uses_running_statistics_in_any_mode(small_shell_lcc):
    m = small_shell_lcc()
    z = _z()
    d_eval = m.distance(z)
    m.train()
    assert torch.allclose(m.distance(z), d_eval)


def test_bad_inputs(small_shell_lcc):
    m = small_shell_lcc()
    with pytest.raises(LatentShapeError, match="16 channels"):
        m.distance(torch.zeros(1, 4, 2, 2, 2))
    with pytest.raises(LatentShapeError, match="5-D"):
        m.distance(torch.zeros(16, 2, 2, 2))
    bad = _z()
    bad[0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError):
        m.reward(bad)
    with pytest.raises(MissingInputError, match="needs x0"):
        m.reward()
    with pytest.raises(ConfigError, match="embedding_dim 8 does not match"):
        ShellLCC(embedding_dim=8, num_bases=4, hidden_dim=4)
    with pytest.raises(ConfigError, match="num_bases"):
        ShellLCC(num_bases=0)


def test_fitting_losses_train_the_right_parts(small_shell_lcc):
    m = small_shell_lcc()
    m.requires_grad_(True).train()
    zf = _flat(_z())
    loss, logs = m.lcc_loss(zf, lambda_usage=0.1, lambda_basis=0.1)
    loss.backward()
    assert set(logs) >= {"recon", "locality", "usage_kl", "basis_to_voxel", "loss"}
    assert m.basis.grad is not None and m.surface_head[0].weight.grad is None
    m.zero_grad(set_to_none=True)
    loss, logs = m.shell_loss(zf)
    loss.backward()
    assert m.surface_head[0].weight.grad is not None and m.basis.grad is None
    assert logs["mean_r"] > 0


def test_init_anchors_uses_real_voxels(small_shell_lcc):
    m = small_shell_lcc()
    voxels = torch.randn(500, 16)
    m.init_anchors(voxels, generator=torch.Generator().manual_seed(0))
    matches = (m.basis[:, None, :] == voxels[None]).all(-1).any(1)
    assert bool(matches.all())
    with pytest.raises(ConfigError, match="at least 64 voxels"):
        m.init_anchors(torch.randn(10, 16))


def test_select_inputs_keeps_only_what_the_reward_reads(small_shell_lcc):
    m = small_shell_lcc()
    z = _z()
    picked = m.select_inputs(x0=z, x_t=z + 1, timestep=0.5, text_embeds=torch.zeros(2, 3, 8))
    assert set(picked) == {"x0"} and picked["x0"] is z
    assert m.select_inputs(x_t=z) == {"x0": None}  # the reward then says clearly that x0 is missing


def test_metrics_with_maps_gives_the_distance_map_from_the_same_pass(small_shell_lcc):
    m = small_shell_lcc()
    z = _z()
    met = m.metrics(z, maps=True)
    assert torch.allclose(met["distance_map"], m.distance_map(z))
    assert "distance_map" not in m.metrics(z)
