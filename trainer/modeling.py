"""Loading the generator's parts for training, and the on-disk text-embedding cache.

``model`` is a diffusers Wan2.1 repository id or folder (subfolders ``transformer``, ``vae``, ``text_encoder``,
``tokenizer``, ``scheduler``; default ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``) or ``tiny`` (the deterministic random
model of :mod:`latent_rewards.pipelines.tiny`). Each part is loaded on its own so the trainer holds only what a
phase needs: the text encoder only while prompts are encoded (then freed), the VAE only for validation (kept on
the CPU between validations; loaded and checked against the latent space by :func:`.data.load_vae`), the
transformer throughout.

Text embeddings are computed once per (model, prompt, max length) and kept in ``text_cache_dir`` as one small
safetensors file per prompt, trimmed to the prompt's tokens; batches are zero-padded back to the full length
exactly as ``WanPipeline.encode_prompt`` pads them.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..rewards.errors import CheckpointError
from ..rewards.hub import atomic_write_file

__all__ = [
    "DTYPES",
    "is_tiny",
    "load_transformer",
    "load_scheduler",
    "load_text_encoder",
    "free",
    "cpu_threads",
    "TextEmbeddingCache",
    "default_text_cache_dir",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def is_tiny(model: str) -> bool:
    """Whether ``model`` names the deterministic random test model (``tiny``) instead of a diffusers repo/folder."""
    from ..pipelines.tiny import TINY_MODEL_ID

    return model == TINY_MODEL_ID


def _from_pretrained(cls: Any, model: str, subfolder: str, revision: str | None, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(model, subfolder=subfolder, revision=revision, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        raise CheckpointError(
            f"model {model!r}: could not load the {subfolder!r} part ({type(e).__name__}: {e}); expected a diffusers "
            "Wan2.1 repository id or folder (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers), or 'tiny'"
        ) from None


def load_transformer(model: str, revision: str | None = None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The ``WanTransformer3DModel`` in ``dtype``."""
    if is_tiny(model):
        from ..pipelines.tiny import tiny_wan_transformer

        model = tiny_wan_transformer()
        return model if dtype == torch.float32 else model.to(dtype)
    from diffusers import WanTransformer3DModel

    return _from_pretrained(WanTransformer3DModel, model, "transformer", revision, torch_dtype=dtype)


def load_scheduler(model: str, revision: str | None = None) -> Any:
    """The model's sampling scheduler (UniPC flow-matching for Wan2.1), used for validation videos."""
    if is_tiny(model):
        from ..pipelines.tiny import tiny_scheduler

        return tiny_scheduler("unipc")
    from diffusers import UniPCMultistepScheduler

    return _from_pretrained(UniPCMultistepScheduler, model, "scheduler", revision)


def load_text_encoder(model: str, revision: str | None = None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(tokenizer, text_encoder)`` (UMT5 for Wan2.1)."""
    if is_tiny(model):
        from ..pipelines.tiny import tiny_text_encoder, tiny_tokenizer

        return tiny_tokenizer(), tiny_text_encoder().to(dtype)
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = _from_pretrained(AutoTokenizer, model, "tokenizer", revision)
    encoder = _from_pretrained(UMT5EncoderModel, model, "text_encoder", revision, torch_dtype=dtype)
    return tokenizer, encoder.eval()


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """torch's CPU thread count set to ``n`` for the duration of the block (restored afterwards); None: unchanged.
    Tiny models run fastest on one thread, and lose a lot with more on a busy machine."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def free(*modules: Any) -> None:
    """Drop references' memory now (CPU and GPU caches); callers must also drop their own references."""
    del modules
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def default_text_cache_dir() -> Path:
    """Where text embeddings are cached by default: ``$LATENT_REWARDS_CACHE/text_embeds``, else
    ``$XDG_CACHE_HOME/latent_rewards/text_embeds`` (``~/.cache/latent_rewards/text_embeds``)."""
    root = os.environ.get("LATENT_REWARDS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "latent_rewards"
    )
    return Path(root) / "text_embeds"


def _model_key(model: str, revision: str | None) -> str:
    p = Path(model).expanduser()
    if p.is_dir():
        return str(p.resolve())
    return f"{model}@{revision or 'main'}"


class TextEmbeddingCache:
    """Prompt -> Wan text embedding ``[L_prompt, D]``, computed once and stored on disk.

    Keyed by the model (id + revision, or resolved folder), the maximum sequence length and the prompt text, so
    runs that share a model share the cache and a changed prompt is a new entry.
    """

    def __init__(self, model: str, revision: str | None = None, *, cache_dir: str | Path | None = None,
                 max_sequence_length: int = 512) -> None:
        self.model = model
        self.revision = revision
        self.model_key = _model_key(model, revision)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_text_cache_dir()
        self.max_sequence_length = max_sequence_length
        self._memory: dict[str, torch.Tensor] = {}

    def _path(self, prompt: str) -> Path:
        h = hashlib.sha256(f"{self.model_key}\n{self.max_sequence_length}\n{prompt}".encode("utf-8")).hexdigest()
        return self.cache_dir / h[:2] / f"{h}.safetensors"

    def missing(self, prompts: Iterable[str]) -> list[str]:
        """The prompts (deduplicated, in order) with no cached embedding yet."""
        return [p for p in dict.fromkeys(prompts) if p not in self._memory and not self._path(p).is_file()]

    def ensure(self, prompts: Iterable[str], *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               batch_size: int = 8, progress: bool = True) -> int:
        """Compute and store the embeddings of prompts not cached yet; loads the text encoder only if needed
        and frees it afterwards. Returns how many prompts were encoded."""
        todo = self.missing(prompts)
        if not todo:
            return 0
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean
        from tqdm.auto import tqdm

        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" and not is_tiny(self.model) else torch.float32
        tokenizer, encoder = load_text_encoder(self.model, self.revision, dtype)
        encoder.to(device)
        try:
            bar = tqdm(total=len(todo), desc="encode prompts", unit="prompt", disable=not progress)
            for i in range(0, len(todo), batch_size):
                chunk = todo[i : i + batch_size]
                tokens = tokenizer(
                    [prompt_clean(p) for p in chunk], padding="max_length", max_length=self.max_sequence_length,
                    truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
                )
                lengths = tokens.attention_mask.gt(0).sum(dim=1)
                with torch.no_grad():
                    hidden = encoder(tokens.input_ids.to(device), tokens.attention_mask.to(device)).last_hidden_state
                for prompt, h, n in zip(chunk, hidden, lengths):
                    emb = h[: int(n)].detach().to("cpu").contiguous()
                    self._write(prompt, emb)
                    self._memory[prompt] = emb
                bar.update(len(chunk))
            bar.close()
        finally:
            encoder.to("cpu")
            del encoder, tokenizer
            free()
        return len(todo)

    def _write(self, prompt: str, emb: torch.Tensor) -> None:
        from safetensors.torch import save_file

        metadata = {"model": self.model_key, "prompt": prompt[:2000]}
        atomic_write_file(self._path(prompt), lambda tmp: save_file({"prompt_embeds": emb}, tmp, metadata=metadata))

    def get(self, prompt: str) -> torch.Tensor:
        """The cached ``[L_prompt, D]`` embedding (CPU)."""
        emb = self._memory.get(prompt)
        if emb is None:
            from safetensors.torch import load_file

            path = self._path(prompt)
            if not path.is_file():
                raise CheckpointError(f"no cached text embedding for prompt {prompt[:60]!r}; call ensure() first")
            emb = load_file(str(path))["prompt_embeds"]
            self._memory[prompt] = emb
        return emb

    def batch(self, prompts: list[str], *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[B, max_sequence_length, D]``: embeddings zero-padded to the full length, as Wan's pipeline does."""
        embs = [self.get(p) for p in prompts]
        out = torch.zeros(len(embs), self.max_sequence_length, embs[0].shape[-1], dtype=dtype)
        for i, e in enumerate(embs):
            out[i, : e.shape[0]] = e.to(dtype)
        return out.to(device)
