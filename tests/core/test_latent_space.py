import pytest
import torch

from latent_rewards.rewards import (
    WAN21,
    LatentShapeError,
    LatentSpaceMismatchError,
    NonFiniteError,
    get_latent_space,
)


def test_wan21_constants_match_diffusers_vae_config():
    import inspect

    from diffusers import AutoencoderKLWan

    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    assert list(WAN21.mean) == pytest.approx(params["latents_mean"].default, abs=1e-6)
    assert list(WAN21.std) == pytest.approx(params["latents_std"].default, abs=1e-6)
    assert WAN21.channels == 16 and WAN21.default_vae == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


def test_normalise_denormalise_round_trip_and_values():
    raw = torch.randn(2, 16, 3, 4, 5) * 3 + 1
    z = WAN21.normalise(raw)
    assert torch.allclose(WAN21.denormalise(z), raw, atol=1e-5)
    # channel 0: (raw - mean0) / std0
    assert torch.allclose(z[:, 0], (raw[:, 0] - WAN21.mean[0]) / WAN21.std[0], atol=1e-6)
    # [C, T, H, W] with channel_dim=0
    assert torch.allclose(WAN21.normalise(raw[0], channel_dim=0), z[0], atol=1e-6)


def test_normalise_keeps_dtype():
    raw = torch.randn(1, 16, 1, 2, 2, dtype=torch.bfloat16)
    assert WAN21.normalise(raw).dtype == torch.bfloat16


def test_lookup_by_alias_and_unknown_name():
    assert get_latent_space("Wan21") is WAN21
    assert get_latent_space("wan2.1") is WAN21
    with pytest.raises(LatentSpaceMismatchError, match="unknown latent space"):
        get_latent_space("sd15")


@pytest.mark.parametrize(
    "shape, message",
    [
        ((16, 3, 4, 5), r"5-D tensor .*add a batch dimension"),
        ((2, 4, 3, 4, 5), r"expected 16 channels"),
        ((2, 3, 16, 4, 5), r"looks like \[B, T, C, H, W\]"),
    ],
)
def test_check_rejects_bad_shapes(shape, message):
    with pytest.raises(LatentShapeError, match=message):
        WAN21.check(torch.zeros(shape))


def test_check_rejects_non_finite_and_non_tensor():
    z = torch.zeros(1, 16, 1, 2, 2)
    z[0, 3, 0, 1, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        WAN21.check(z)
    with pytest.raises(LatentShapeError, match="torch.Tensor"):
        WAN21.check([[1.0]])
    with pytest.raises(LatentShapeError, match="floating-point"):
        WAN21.check(torch.zeros(1, 16, 1, 2, 2, dtype=torch.long))


def test_expect_mismatch_message():
    from latent_rewards.rewards.latent_space import LatentSpace, register_latent_space

    other = register_latent_space(LatentSpace("test-48ch", 48, (0.0,) * 48, (1.0,) * 48))
    with pytest.raises(LatentSpaceMismatchError, match="reads wan2.1 latents but was given test-48ch"):
        WAN21.expect(other)
    WAN21.expect("wan21")


def test_recognise_a_vae_by_its_normalisation_constants():
    import inspect

    from diffusers import AutoencoderKLWan

    from latent_rewards.rewards.latent_space import latent_space_for_constants

    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    mean, std = params["latents_mean"].default, params["latents_std"].default
    assert latent_space_for_constants(mean, std) is WAN21 and WAN21.matches_constants(mean, std)
    assert latent_space_for_constants([0.0] * 16, std) is None
    assert not WAN21.matches_constants(mean[:8], std[:8])
