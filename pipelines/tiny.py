"""A tiny, deterministic, random Wan2.1-shaped pipeline for offline runs and tests.

Same layout as Wan2.1 (16 latent channels, VAE strides 4x8x8, patch (1, 2, 2), text width 4096, UMT5 text
encoder, UniPC flow-matching scheduler) at a size that runs a full pipeline on CPU in well under a second:
transformer inner dim 128 (1 head of 128), FFN 256, 2 layers. ComfyUI can load the same transformer (see
``rewards.wan_keys``). The tokenizer is a byte-level tokenizer built in code, so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import PreTrainedTokenizerFast, UMT5EncoderModel

__all__ = [
    "TINY_MODEL_ID",
    "TINY_TRANSFORMER_CONFIG",
    "tiny_wan_transformer",
    "tiny_wan_vae",
    "tiny_text_encoder",
    "tiny_tokenizer",
    "tiny_scheduler",
    "build_tiny_wan_pipeline",
    "build_tiny_wan_i2v_pipeline",
    "save_tiny_wan_pipeline",
]

#: What `--model tiny` / `model: tiny` mean.
TINY_MODEL_ID = "tiny"

TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 1,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 256,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}

TINY_VAE_CONFIG: dict[str, Any] = {
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 2, 2, 2],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
}


def _seeded(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def tiny_wan_transformer(seed: int = 0, **overrides: Any) -> "WanTransformer3DModel":
    """The tiny ``WanTransformer3DModel`` (fp32, eval mode), identical for the same seed."""
    from diffusers import WanTransformer3DModel

    _seeded(seed)
    model = WanTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, **overrides})
    # diffusers zero-inits nothing here, but random output heads at default scale give huge velocities;
    # shrink them so tiny samples stay in a latent range like a real model's.
    with torch.no_grad():
        model.proj_out.weight.mul_(0.1)
    return model.eval()


def tiny_wan_vae(seed: int = 0) -> "AutoencoderKLWan":
    """A tiny ``AutoencoderKLWan`` with Wan2.1's strides (4, 8, 8), 16 latent channels and normalisation."""
    from diffusers import AutoencoderKLWan

    _seeded(seed)
    return AutoencoderKLWan(**TINY_VAE_CONFIG).eval()


def tiny_text_encoder(seed: int = 0) -> "UMT5EncoderModel":
    """A one-layer ``UMT5EncoderModel`` with output width 4096 (the Wan transformer's text_dim)."""
    from transformers import UMT5Config, UMT5EncoderModel

    _seeded(seed)
    cfg = UMT5Config(
        vocab_size=259, d_model=4096, d_kv=8, d_ff=16, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return UMT5EncoderModel(cfg).eval()


def tiny_tokenizer() -> "PreTrainedTokenizerFast":
    """A byte-level tokenizer (259 ids: pad, eos, unk and 256 bytes) built without any download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def tiny_scheduler(kind: str = "unipc") -> Any:
    """Wan's default scheduler (UniPC, flow prediction, shift 3) or the flow-matching Euler scheduler."""
    if kind == "unipc":
        from diffusers import UniPCMultistepScheduler

        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    if kind == "euler":
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(shift=3.0)
    raise ValueError(f"unknown scheduler kind {kind!r}; expected 'unipc' or 'euler'")


def build_tiny_wan_pipeline(pipeline_cls: type | None = None, *, seed: int = 0, scheduler: str = "unipc") -> Any:
    """A complete tiny Wan text-to-video pipeline of ``pipeline_cls`` (default ``WanPipeline``)."""
    if pipeline_cls is None:
        from diffusers import WanPipeline as pipeline_cls  # noqa: N813
    return pipeline_cls(
        tokenizer=tiny_tokenizer(),
        text_encoder=tiny_text_encoder(seed),
        vae=tiny_wan_vae(seed),
        scheduler=tiny_scheduler(scheduler),
        transformer=tiny_wan_transformer(seed),
    )


def save_tiny_wan_pipeline(path: str | Path, *, seed: int = 0, scheduler: str = "unipc") -> Path:
    """Write the tiny pipeline as a diffusers folder that ``from_pretrained`` loads offline."""
    pipe = build_tiny_wan_pipeline(seed=seed, scheduler=scheduler)
    pipe.save_pretrained(str(path))
    return Path(path)


#: Width of the tiny CLIP vision tower's hidden states (the I2V transformer's ``image_dim``).
TINY_IMAGE_DIM = 32


def tiny_image_encoder(seed: int = 0):
    """A two-layer ``CLIPVisionModel`` on 32x32 images (Wan2.1 I2V reads its penultimate hidden states)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    _seeded(seed)
    cfg = CLIPVisionConfig(
        hidden_size=TINY_IMAGE_DIM, intermediate_size=64, projection_dim=TINY_IMAGE_DIM, num_hidden_layers=2,
        num_attention_heads=2, image_size=32, patch_size=8,
    )
    return CLIPVisionModel(cfg).eval()


def tiny_image_processor():
    """CLIP preprocessing to 32x32 (the PIL implementation: no torchvision needed)."""
    try:  # transformers >= 5 names the PIL backend explicitly; the plain name warns without torchvision
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as proc_cls
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as proc_cls
    return proc_cls(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def build_tiny_wan_i2v_pipeline(
    pipeline_cls: type | None = None, *, seed: int = 0, scheduler: str = "unipc", wan22: bool = False,
    **components: Any,
):
    """A complete tiny Wan image-to-video pipeline of ``pipeline_cls`` (default ``WanImageToVideoPipeline``).

    ``wan22=False``: Wan2.1 I2V layout (CLIP image tower; the transformer reads 36 channels: latents, mask and
    image condition, plus image cross-attention). ``wan22=True``: Wan2.2-style (no image tower,
    ``expand_timesteps``: the first latent frame is replaced by the encoded image). ``components`` replace the
    built ones (e.g. share a text encoder with another tiny pipeline).
    """
    if pipeline_cls is None:
        from diffusers import WanImageToVideoPipeline as pipeline_cls  # noqa: N813
    if wan22:
        parts: dict[str, Any] = dict(transformer=tiny_wan_transformer(seed), expand_timesteps=True)
    else:
        width = TINY_TRANSFORMER_CONFIG["num_attention_heads"] * TINY_TRANSFORMER_CONFIG["attention_head_dim"]
        parts = dict(
            transformer=tiny_wan_transformer(seed, in_channels=36, image_dim=TINY_IMAGE_DIM, added_kv_proj_dim=width),
            image_processor=tiny_image_processor(),
            image_encoder=tiny_image_encoder(seed),
        )
    for name, make in (("tokenizer", tiny_tokenizer), ("text_encoder", lambda: tiny_text_encoder(seed)),
                       ("vae", lambda: tiny_wan_vae(seed)), ("scheduler", lambda: tiny_scheduler(scheduler))):
        if name not in components:
            parts[name] = make()
    return pipeline_cls(**{**parts, **components})
