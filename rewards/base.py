"""The reward interface shared by Shell-LCC, PAVRM and VELR ensembles.

A reward is a frozen ``torch.nn.Module`` that maps latents of a named, normalised latent space
``[B, C, T, H, W]`` to one value per sample, **higher is better**. It declares which inputs it reads:

* ``x0``: the clean (or predicted clean) latent (Shell-LCC, VELR);
* ``x_t`` + ``timestep``: a noisy latent and its flow-matching time in [0, 1] (PAVRM);
* ``text_embeds``: the prompt's text-encoder output ``[B, L, D]`` (PAVRM, VELR).

Callers (pipelines, nodes, the trainer) pass what they have; :meth:`LatentReward.check_inputs` says clearly what
is missing. Save/load/push follow huggingface_hub conventions (``save_pretrained`` / ``from_pretrained`` /
``push_to_hub``) and are implemented once in :mod:`.hub`.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .errors import ConfigError, MissingInputError
from .latent_space import LatentSpace, get_latent_space

__all__ = ["RewardInput", "LatentReward", "register_reward", "reward_class_for_kind", "available_rewards"]


class RewardInput(str, enum.Enum):
    """The inputs a reward can read."""

    X0 = "x0"
    NOISY = "x_t"
    TIMESTEP = "timestep"
    TEXT = "text_embeds"


_REWARD_CLASSES: dict[str, type["LatentReward"]] = {}


def register_reward(cls: type["LatentReward"]) -> type["LatentReward"]:
    """Class decorator: make ``cls`` loadable by :func:`~latent_rewards.rewards.load_reward` via its ``kind``."""
    if not getattr(cls, "kind", None):
        raise TypeError(f"{cls.__name__} needs a non-empty `kind`")
    _REWARD_CLASSES[cls.kind] = cls
    return cls


def reward_class_for_kind(kind: str) -> type["LatentReward"]:
    try:
        return _REWARD_CLASSES[kind]
    except KeyError:
        raise ConfigError(
            f"unknown reward kind {kind!r} in config.json; this version of latent-rewards knows "
            f"{available_rewards()} (upgrade latent-rewards if the reward is newer)"
        ) from None


def available_rewards() -> list[str]:
    return sorted(_REWARD_CLASSES)


class LatentReward(nn.Module):
    """Base class of all latent rewards.

    Subclasses set ``kind`` (the name written to ``config.json``), ``config_class`` (a dataclass with at least a
    ``latent_space`` field) and ``required_inputs``, and implement :meth:`reward`.
    """

    kind: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    required_inputs: ClassVar[frozenset[RewardInput]] = frozenset({RewardInput.X0})
    #: Name of the weights file inside a saved folder.
    weights_name: ClassVar[str] = "model.safetensors"

    def __init__(self, config: Any) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise ConfigError(f"{type(self).__name__} expects a {self.config_class.__name__}, got {type(config)}")
        validate = getattr(config, "validate", None)
        if callable(validate):
            validate()
        self.config = config

    # ------------------------------------------------------------------ description
    @property
    def latent_space(self) -> LatentSpace:
        return get_latent_space(self.config.latent_space)

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def needs_noisy_latents(self) -> bool:
        return RewardInput.NOISY in self.required_inputs

    @property
    def needs_text(self) -> bool:
        return RewardInput.TEXT in self.required_inputs

    def expect_latent_space(self, space: LatentSpace | str) -> None:
        """Raise :class:`~.errors.LatentSpaceMismatchError` if ``space`` is not the space this reward reads."""
        self.latent_space.expect(space, what=f"this {self.kind} reward")

    def check_inputs(
        self,
        x0: torch.Tensor | None = None,
        *,
        x_t: torch.Tensor | None = None,
        timestep: torch.Tensor | float | None = None,
        text_embeds: torch.Tensor | None = None,
    ) -> None:
        """Check that every required input is present and that latents have this reward's layout."""
        given = {
            RewardInput.X0: x0,
            RewardInput.NOISY: x_t,
            RewardInput.TIMESTEP: timestep,
            RewardInput.TEXT: text_embeds,
        }
        missing = [k.value for k in sorted(self.required_inputs, key=lambda k: k.value) if given[k] is None]
        if missing:
            raise MissingInputError(
                f"the {self.kind} reward needs {', '.join(missing)}; "
                f"it reads {sorted(k.value for k in self.required_inputs)}"
            )
        for name, z in (("x0", x0), ("x_t", x_t)):
            if z is not None:
                self.latent_space.check(z, name=name)

    def select_inputs(
        self,
        *,
        x0: torch.Tensor | None = None,
        x_t: torch.Tensor | None = None,
        timestep: torch.Tensor | float | None = None,
        text_embeds: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Of what a caller has, the keyword arguments of :meth:`reward` this reward reads (by ``required_inputs``),
        so guidance and the trainer can pass "whatever they have" to any reward."""
        given = {
            RewardInput.X0: ("x0", x0),
            RewardInput.NOISY: ("x_t", x_t),
            RewardInput.TIMESTEP: ("timestep", timestep),
            RewardInput.TEXT: ("text_embeds", text_embeds),
        }
        return {name: value for key, (name, value) in given.items() if key in self.required_inputs}

    # ------------------------------------------------------------------ scoring
    def reward(
        self,
        x0: torch.Tensor | None = None,
        *,
        x_t: torch.Tensor | None = None,
        timestep: torch.Tensor | float | None = None,
        text_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One reward per sample, ``[B]``, higher is better, differentiable w.r.t. the latent inputs."""
        raise NotImplementedError

    def metrics(self, x0: torch.Tensor | None = None, *, maps: bool = False, **inputs: Any) -> dict[str, torch.Tensor]:
        """Named per-sample metrics (always including ``reward``) for reports and tables. No gradient.

        With ``maps=True`` a reward that has per-voxel maps adds them from the same pass (Shell-LCC:
        ``distance_map`` ``[B, T, H, W]``); other rewards ignore it."""
        with torch.no_grad():
            return {"reward": self.reward(x0, **inputs)}

    def forward(self, x0: torch.Tensor | None = None, **inputs: Any) -> torch.Tensor:
        return self.reward(x0, **inputs)

    # ------------------------------------------------------------------ config
    def config_dict(self) -> dict[str, Any]:
        """What ``config.json`` records: the reward kind, its sizes, latent space and reward mode."""
        from .. import __version__

        return {"kind": self.kind, **dataclasses.asdict(self.config), "latent_rewards_version": __version__}

    @classmethod
    def config_from_dict(cls, data: dict[str, Any]) -> Any:
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(data) - fields - {"kind", "latent_rewards_version"})
        if unknown:
            raise ConfigError(
                f"config.json has fields {unknown} that a {cls.kind} reward does not know "
                "(was it written by a newer latent-rewards?)"
            )
        try:
            return cls.config_class(**{k: v for k, v in data.items() if k in fields})
        except TypeError as e:
            raise ConfigError(f"config.json does not describe a {cls.kind} reward: {e}") from None

    def load_weights(self, state: dict[str, torch.Tensor], *, source: str = "state dict") -> None:
        """Load a state dict strictly; missing, unexpected or mis-shaped tensors are a :class:`CheckpointError`."""
        from .errors import CheckpointError

        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise CheckpointError(
                f"{source} does not match a {self.kind} reward of this config: "
                f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
            )
        wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
        if wrong:
            raise CheckpointError(f"{source}: tensor shapes do not match the config: {wrong[:4]}")
        self.load_state_dict(state, strict=True)

    def freeze(self) -> "LatentReward":
        """Eval mode, no parameter gradients: how a reward is used for scoring, guidance and fine-tuning."""
        self.eval()
        self.requires_grad_(False)
        return self

    # ------------------------------------------------------------------ save / load / push
    def save_pretrained(self, save_directory: str | Path, *, model_card: str | None = None) -> Path:
        """Write ``config.json``, ``model.safetensors`` and a model card ``README.md`` atomically."""
        from .hub import save_reward

        return save_reward(self, save_directory, model_card=model_card)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        map_location: str | torch.device = "cpu",
    ) -> "LatentReward":
        """Load a reward from a local folder or a Hub repository id (downloaded into the huggingface_hub cache).

        Called on :class:`LatentReward` itself, it returns the class named by ``config.json``; called on a
        subclass, it checks that the folder holds that kind of reward. The reward comes back frozen
        (eval mode, no parameter gradients).
        """
        from .hub import load_reward_folder, resolve_pretrained

        folder = resolve_pretrained(
            path_or_repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
        )
        return load_reward_folder(folder, expected_class=cls, map_location=map_location)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload latent reward",
        revision: str | None = None,
        create_pr: bool = False,
    ) -> str:
        """Save to a temporary folder and upload it with huggingface_hub. Returns the commit URL."""
        from .hub import push_reward

        return push_reward(
            self, repo_id, private=private, token=token, commit_message=commit_message,
            revision=revision, create_pr=create_pr,
        )

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, latent_space={self.config.latent_space!r}"
