"""Video decoding (PyAV) and encoding with a real (tiny) diffusers AutoencoderKLWan."""

from __future__ import annotations

import json

import pytest
import torch

from latent_rewards.rewards.errors import CheckpointError, ConfigError, DataError, LatentSpaceMismatchError
from latent_rewards.trainer.data import VideoEncoder, _cover_crop, decode_video, load_vae


def _grey(values):
    return torch.tensor(values, dtype=torch.float32) / 127.5 - 1


def test_decode_samples_frames_at_target_fps(tmp_path, video_factory):
    path = video_factory(tmp_path / "count.mp4", frames=20, fps=12)
    same = decode_video(path, fps=12, frames=81, size="64x32")
    assert same.shape == (3, 17, 32, 64)  # 20 frames available -> largest 4k+1 = 17
    assert same.dtype == torch.float32 and same.min() >= -1 and same.max() <= 1
    torch.testing.assert_close(same.mean(dim=(0, 2, 3)), _grey([16 + 12 * i for i in range(17)]), atol=0.03, rtol=0)
    half = decode_video(path, fps=6, frames=81, size="64x32")  # every second source frame
    assert half.shape[1] == 9
    torch.testing.assert_close(half.mean(dim=(0, 2, 3)), _grey([16 + 24 * i for i in range(9)]), atol=0.03, rtol=0)
    capped = decode_video(path, fps=12, frames=5, size="64x32")
    assert capped.shape[1] == 5
    torch.testing.assert_close(capped, same[:, :5])
    # A rate above the source repeats frames (each source frame shown twice at 24 fps).
    double = decode_video(path, fps=24, frames=9, size="64x32").mean(dim=(0, 2, 3))
    assert torch.allclose(double[1:9:2], double[2:9:2], atol=0.03)


def test_decode_buckets_and_cover_crop(tmp_path, video_factory):
    path = video_factory(tmp_path / "wide.mp4", frames=5, fps=12, width=96, height=48)
    assert decode_video(path, fps=12, frames=5, size="480p").shape == (3, 5, 480, 832)  # 2:1 -> 16:9 bucket
    # Cover + centre crop: a 2:1 frame cropped to 1:1 keeps the middle half.
    frame = torch.zeros(40, 80, 3, dtype=torch.uint8)
    frame[:, :20] = 255  # left quarter white, removed by the crop
    frame[:, 60:, 2] = 255  # right quarter blue, removed by the crop
    frame[:, 20:60, 1] = 255  # middle half green, kept
    out = _cover_crop(frame, 40, 40)  # same height: no resampling, an exact crop
    assert out.shape == (3, 40, 40)
    torch.testing.assert_close(out[1], torch.ones(40, 40))
    torch.testing.assert_close(out[0], -torch.ones(40, 40))
    torch.testing.assert_close(out[2], -torch.ones(40, 40))
    small = _cover_crop(frame, 20, 20)  # downscaled by 2 (antialiased): only the border columns blend
    assert small.shape == (3, 20, 20)
    torch.testing.assert_close(small[1, :, 1:-1], torch.ones(20, 18))
    torch.testing.assert_close(small[0, :, 1:-1], -torch.ones(20, 18))
    big = _cover_crop(frame, 100, 30)  # 10:3 is wider than 2:1: scale to width, crop rows
    assert big.shape == (3, 30, 100)
    torch.testing.assert_close(big[1, :, 30:70], torch.ones(30, 40))


def test_corrupt_and_non_video_files(tmp_path, video_factory):
    import av

    good = video_factory(tmp_path / "good.mp4", frames=8)
    (tmp_path / "random.mp4").write_bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8).numpy().tobytes())
    (tmp_path / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    (tmp_path / "text.mp4").write_text("not a video at all\n" * 50)
    with av.open(str(tmp_path / "audio.wav"), "w") as c:  # a real media file without a video stream
        s = c.add_stream("pcm_s16le", rate=8000)
        import numpy as np

        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    for name in ["random.mp4", "truncated.mp4", "text.mp4", "audio.wav", "missing.mp4"]:
        with pytest.raises(DataError) as info:
            decode_video(tmp_path / name, fps=12, frames=5, size="64x32")
        assert name in str(info.value)
    with pytest.raises(DataError, match="no video stream"):
        decode_video(tmp_path / "audio.wav", frames=5)
    with pytest.raises(ConfigError, match="4k\\+1"):
        decode_video(good, frames=8)


def test_load_vae_from_folders_and_errors(tmp_path, tiny_vae_dirs):
    from diffusers import AutoencoderKLWan

    from latent_rewards.pipelines.tiny import TINY_VAE_CONFIG

    vae_dir, pipe_dir = tiny_vae_dirs
    a, b = load_vae(vae_dir), load_vae(pipe_dir)
    assert isinstance(a, AutoencoderKLWan) and not a.training
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k
    # A VAE whose normalisation constants are not Wan2.1's encodes into another space.
    other = AutoencoderKLWan(**TINY_VAE_CONFIG, latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
    other.save_pretrained(str(tmp_path / "other_vae"))
    with pytest.raises(LatentSpaceMismatchError, match="latents_mean"):
        load_vae(tmp_path / "other_vae")
    (tmp_path / "not_vae").mkdir()
    with pytest.raises(CheckpointError, match="not a diffusers pipeline folder"):
        load_vae(tmp_path / "not_vae")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(CheckpointError, match="UNet2DModel"):
        load_vae(tmp_path / "unet")
    with pytest.raises(CheckpointError, match="not a Hub repository id"):
        load_vae(tmp_path / "missing" / "deeper" / "path")
    # Hub ids go to huggingface_hub; offline in tests, so the error comes back as a CheckpointError.
    with pytest.raises(CheckpointError, match="Hub repository someone/no-such-wan"):
        load_vae("someone/no-such-wan")


def test_encoder_is_the_normalised_posterior_mean(tmp_path, tiny_vae_dirs, textured_video_factory):
    from latent_rewards.rewards.latent_space import WAN21

    enc = VideoEncoder.from_pretrained(tiny_vae_dirs[0])
    path = textured_video_factory(tmp_path / "tex.mp4", frames=12)
    z = enc.encode_file(path, fps=12, frames=9, size="64x32")
    assert z.shape == (16, 3, 4, 8) and z.dtype == torch.float32
    pixels = decode_video(path, fps=12, frames=9, size="64x32")
    with torch.no_grad():
        mean = enc.vae.encode(pixels[None]).latent_dist.mean[0]
    expected = (mean - torch.tensor(WAN21.mean).view(16, 1, 1, 1)) / torch.tensor(WAN21.std).view(16, 1, 1, 1)
    torch.testing.assert_close(z, expected)
    # Deterministic (posterior mean, no sampling).
    torch.testing.assert_close(enc.encode_pixels(pixels), z)
