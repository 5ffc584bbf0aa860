import pytest
import torch

from latent_rewards.rewards.wan_keys import (
    comfyui_lora_to_peft,
    diffusers_state_dict_to_wan,
    diffusers_to_wan,
    peft_lora_to_comfyui,
    wan_to_diffusers,
)


@pytest.fixture(scope="module")
def tiny_state():
    from latent_rewards.pipelines.tiny import tiny_wan_transformer

    return tiny_wan_transformer().state_dict()


def test_full_state_dict_round_trips_through_diffusers_own_converter(tiny_state):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    wan = diffusers_state_dict_to_wan(tiny_state)
    assert "head.modulation" in wan and "blocks.0.self_attn.q.weight" in wan and "blocks.1.norm3.weight" in wan
    assert "time_projection.1.weight" in wan and "text_embedding.2.bias" in wan
    back = convert_wan_transformer_to_diffusers(dict(wan))
    assert set(back) == set(tiny_state)
    assert all(torch.equal(back[k], tiny_state[k]) for k in tiny_state)


def test_names_are_inverse_and_unknown_names_raise(tiny_state):
    for k in tiny_state:
        assert wan_to_diffusers(diffusers_to_wan(k)) == k
    assert diffusers_to_wan("blocks.3.attn2.add_k_proj") == "blocks.3.cross_attn.k_img"
    with pytest.raises(KeyError, match="no original-Wan name"):
        diffusers_to_wan("blocks.0.attn1.to_qkv")
    with pytest.raises(KeyError):
        wan_to_diffusers("unknown_module.weight")


def test_lora_formats_round_trip_and_load_in_diffusers():
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers

    g = torch.Generator().manual_seed(0)
    peft_sd = {}
    for block in (0, 1):
        for mod in ("attn1.to_q", "attn1.to_out.0", "attn2.to_k", "ffn.net.0.proj"):
            out_f = 256 if mod == "ffn.net.0.proj" else 128
            peft_sd[f"transformer.blocks.{block}.{mod}.lora_A.weight"] = torch.randn(4, 128, generator=g)
            peft_sd[f"transformer.blocks.{block}.{mod}.lora_B.weight"] = torch.randn(out_f, 4, generator=g)
    comfy = peft_lora_to_comfyui(peft_sd, alpha=8.0)
    assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in comfy
    assert "diffusion_model.blocks.1.ffn.0.lora_B.weight" in comfy
    assert comfy["diffusion_model.blocks.0.cross_attn.k.alpha"].item() == 8.0

    weights, alphas = comfyui_lora_to_peft(comfy)
    assert set(weights) == set(peft_sd) and all(torch.equal(weights[k], peft_sd[k]) for k in peft_sd)
    assert set(alphas.values()) == {8.0}

    # diffusers' own loader reads our ComfyUI file and folds alpha/rank into the weights.
    converted = _convert_non_diffusers_wan_lora_to_diffusers(dict(comfy))
    a = converted["transformer.blocks.0.attn1.to_q.lora_A.weight"]
    b = converted["transformer.blocks.0.attn1.to_q.lora_B.weight"]
    delta = b @ a
    expected = (8.0 / 4) * peft_sd["transformer.blocks.0.attn1.to_q.lora_B.weight"] @ peft_sd[
        "transformer.blocks.0.attn1.to_q.lora_A.weight"
    ]
    assert torch.allclose(delta, expected, rtol=1e-5, atol=1e-5)


def test_lora_conversion_rejects_unknown_keys():
    with pytest.raises(KeyError):
        peft_lora_to_comfyui({"transformer.blocks.0.attn1.to_q.weight": torch.zeros(1)}, alpha=1.0)
    with pytest.raises(KeyError):
        peft_lora_to_comfyui({"transformer.blocks.0.attn9.to_q.lora_A.weight": torch.zeros(1)}, alpha=1.0)
    weights, alphas = comfyui_lora_to_peft(
        {"lora_unet_blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 8),
         "lora_unet_blocks.0.self_attn.q.lora_up.weight": torch.zeros(8, 2)}
    )
    assert alphas == {"blocks.0.attn1.to_q": 2.0}  # no alpha -> scale 1, as ComfyUI does
