"""The interface every reward model implements, and the registry that loads them by name.

A reward model splits its work in two so that large scoring runs overlap I/O and compute:

* ``preprocess_image(image)`` and ``tokenize(prompts)`` are pure CPU functions, safe to call
  inside DataLoader workers (they must not touch the model's parameters);
* ``score(pixel_values, text_inputs)`` is one batched forward on the device and returns a
  float tensor of shape [N], one score per (image, prompt) row.

Scorers whose CPU side is identical say so with ``preprocess_key`` / ``tokenize_key`` (e.g.
``"openai-clip-224"`` for openai/CLIP's transform at 224 px): a scoring run computes each key
once per image and feeds the same tensor to every scorer that names it. ``None`` (the default)
means "not shared with any other scorer".
"""

from __future__ import annotations

import abc
import os
from typing import Any, Callable

import torch
from PIL import Image

from sr_finetune.errors import UserError
from sr_finetune.eval_only import eval_only_metrics, mark_eval_only


class NotDifferentiableError(UserError, NotImplementedError):
    """A scorer asked for a gradient it cannot give (no differentiable scoring path)."""


def not_differentiable(name: str, why: str = "") -> NotDifferentiableError:
    """The error for metric ``name`` without a differentiable path; evaluation-only ones say so."""
    if name in eval_only_metrics():
        return NotDifferentiableError(
            f"metric '{name}' is evaluation-only (it judges models and must never train them) and has no "
            "differentiable scoring path; pick a learned reward (clip, aesthetic, pickscore, hpsv2, imagereward, ...)"
        )
    return NotDifferentiableError(f"metric '{name}' has no differentiable scoring path" + (f": {why}" if why else ""))


def no_image_embedding(name: str) -> UserError:
    """The error for metric ``name`` asked for an image embedding it does not have."""
    return UserError(f"metric '{name}' has no image embedding to write (CLIP-backbone scorers have one: clip, social_reward, aesthetic, social_aesthetic)")


class RewardModel(torch.nn.Module, abc.ABC):
    """Base class of all scorers. Subclasses set ``name`` and implement the three methods.

    Scorers that can serve as an online (differentiable) objective also set ``is_differentiable``
    and implement ``preprocess_tensor``: the torch counterpart of ``preprocess_image``.
    """

    name: str = ""

    @property
    def preprocess_key(self) -> str | None:
        """Equal keys promise equal ``preprocess_image`` outputs for every image; None = unique."""
        return None

    @property
    def tokenize_key(self) -> str | None:
        """Equal keys promise equal ``tokenize`` outputs for every prompt list; None = unique."""
        return None

    @abc.abstractmethod
    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> pixel tensor [C, H, W], exactly as the reference implementation does."""

    @abc.abstractmethod
    def tokenize(self, prompts: list[str]) -> Any:
        """Prompts -> token ids (a tensor [N, L] or a dict of tensors), as the reference does."""

    @abc.abstractmethod
    def score(self, pixel_values: torch.Tensor, text_inputs: Any) -> torch.Tensor:
        """Batched scores, float tensor [N]; row i scores image i against prompt i."""

    @property
    def is_differentiable(self) -> bool:
        """True when :meth:`score_tensor` can give gradients with respect to the image."""
        return False

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W], RGB in [0, 1] -> pixel values as ``preprocess_image`` makes them,
        with torch ops only, so gradients flow back to ``images``."""
        raise not_differentiable(self.name)

    def score_tensor(self, images: torch.Tensor, text_inputs: Any) -> torch.Tensor:
        """Scores [B] of images [B, 3, H, W] in [0, 1], differentiable with respect to ``images``.
        ``text_inputs``: the prompts (a list of str) or ``tokenize``'s output for them."""
        if not self.is_differentiable:
            raise not_differentiable(self.name)
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"score_tensor expects float images [B, 3, H, W] in [0, 1], got {tuple(images.shape)} {images.dtype}")
        pixels = self.preprocess_tensor(images)
        if isinstance(text_inputs, (list, tuple)):
            text_inputs = to_device(self.tokenize(list(text_inputs)), pixels.device)
        return self.score(pixels, text_inputs)

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image embedding [N, D] the score is computed from, for scorers that have one (the
        CLIP-backbone scorers: the unnormalised CLIP image embedding); see ``ScoreConfig.embeddings``."""
        raise no_image_embedding(self.name)

    def has_image_embedding(self) -> bool:
        return type(self).embed_image is not RewardModel.embed_image

    @torch.no_grad()
    def score_images(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """Convenience for small inputs: preprocess, tokenize and score in one call."""
        device = next(self.parameters()).device
        pixels = torch.stack([self.preprocess_image(im) for im in images]).to(device)
        text = to_device(self.tokenize(list(prompts)), device)
        return self.score(pixels, text).float().cpu()


class PromptFreeReward(RewardModel):
    """A scorer of the image alone: the prompt becomes an empty [N, 0] token tensor (one shared
    key), which keeps the batching uniform."""

    @property
    def tokenize_key(self) -> str:
        return "empty"

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return torch.zeros(len(prompts), 0, dtype=torch.long)


def to_device(inputs: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move a tensor or a dict of tensors to ``device``; floating tensors also to ``dtype`` if given."""
    if isinstance(inputs, dict):
        return {k: to_device(v, device, dtype) for k, v in inputs.items()}
    if not isinstance(inputs, torch.Tensor):
        return inputs
    if dtype is not None and inputs.is_floating_point():
        return inputs.to(device, dtype)
    return inputs.to(device)


def encode_distinct_rows(encode: Callable[[Any], torch.Tensor], tokens: Any) -> torch.Tensor:
    """``encode(tokens)`` with each distinct token row encoded once and the result expanded back
    to one row per input row. A scoring batch holds several images per prompt, so text towers
    that never see the image need only run once per prompt. ``tokens``: a tensor [N, L] or a
    dict of such tensors (a row is distinct when it differs in any of them)."""
    columns = list(tokens.values()) if isinstance(tokens, dict) else [tokens]
    rows = len(columns[0])
    key = torch.cat([c.reshape(rows, -1).long() for c in columns], dim=1)
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
    if len(distinct) == rows:
        return encode(tokens)
    order = torch.arange(rows, device=inverse.device)
    first = torch.full((len(distinct),), rows, device=inverse.device).scatter_reduce_(0, inverse, order, reduce="amin")
    subset = {k: v[first] for k, v in tokens.items()} if isinstance(tokens, dict) else tokens[first]
    return encode(subset)[inverse]


def drop_padding_columns(tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Token columns after the batch's last real token (``attention_mask``) cut off.

    Tokenisers pad to a fixed length so that rows stack; padded positions are masked out as
    keys, so a masked text tower gives the same outputs at the real positions (and the same
    pooled embedding) on the shorter batch, for less work on batches of short prompts. Without
    an ``attention_mask`` the tokens are returned as they are."""
    mask = tokens.get("attention_mask")
    if mask is None:
        return tokens
    used = mask.any(dim=0).nonzero()
    length = int(used.max()) + 1 if len(used) else mask.shape[1]
    if length == mask.shape[1]:
        return tokens
    return {k: v[:, :length] if v.dim() == 2 and v.shape[1] == mask.shape[1] else v for k, v in tokens.items()}


_REGISTRY: dict[str, Callable[..., RewardModel]] = {}
_CONCURRENT_LOADS: set[str] = set()


def register_reward(name: str, concurrent_load: bool = False, eval_only: bool = False) -> Callable[[Callable[..., RewardModel]], Callable[..., RewardModel]]:
    """Decorator: register ``loader(weights=..., device=..., dtype=..., **kwargs) -> RewardModel``.

    ``concurrent_load=True`` promises that the loader changes no process-wide state, so
    :func:`load_rewards` may run it in a thread beside other such loaders. transformers'
    ``from_pretrained`` does change some (torch's default dtype, patched init functions) while it
    builds a model: loaders that call it keep the default. ``eval_only=True`` marks a metric that
    may judge models but never train them (see ``sr_finetune.eval_only``)."""

    def wrap(loader: Callable[..., RewardModel]) -> Callable[..., RewardModel]:
        _REGISTRY[name] = loader
        (_CONCURRENT_LOADS.add if concurrent_load else _CONCURRENT_LOADS.discard)(name)
        if eval_only:
            mark_eval_only(name)
        return loader

    return wrap


def available_rewards() -> list[str]:
    _import_builtin_scorers()
    return sorted(_REGISTRY)


def load_reward(
    name: str, weights: str | None = None, device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32", *, trainable: bool = False, **kwargs: Any
) -> RewardModel:
    """Load a registered reward model; ``weights`` is a hub id or local path (None = published default).

    The scorer comes in eval mode with every parameter frozen (``requires_grad=False``), so a
    reward used as a differentiable objective passes gradients to the image without
    accumulating any of its own. ``trainable=True`` unfreezes every parameter instead (give the
    CLIP scorers ``share_backbone=False`` then, or the shared backbone thaws for all of them);
    reward training builds its models with its own loaders and does not come through here."""
    _import_builtin_scorers()
    if name not in _REGISTRY:
        raise UserError(f"unknown reward model '{name}' (available: {', '.join(sorted(_REGISTRY))})")
    model = _REGISTRY[name](weights=weights, device=device, dtype=dtype, **kwargs)
    model.requires_grad_(trainable)
    return model.eval()


def load_training_reward(name: str, weights: str | None = None, device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32", **kwargs: Any) -> RewardModel:
    """A reward to train on (an online objective's): like :func:`load_reward`, but an
    evaluation-only metric is refused with a one-line ConfigError before anything loads."""
    from sr_finetune.errors import ConfigError
    from sr_finetune.eval_only import refuse_eval_only

    _import_builtin_scorers()
    refuse_eval_only(name, "finetune.online.reward", error=ConfigError)
    return load_reward(name, weights=weights, device=device, dtype=dtype, **kwargs)


def load_rewards(specs: dict[str, dict[str, Any]], device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32") -> dict[str, RewardModel]:
    """Several reward models, ``{name: load_reward kwargs}`` -> ``{name: model}`` in that order.

    Those registered with ``concurrent_load=True`` load at the same time in threads: reading,
    casting and copying weights runs outside the GIL, and at the real sizes loading is mostly the
    kernel faulting in fresh memory, which two CPUs do twice as fast as one (five real-size
    scorers on 2 CPUs: 14.3 s one after another, 10.8 s in threads). The others load one at a
    time afterwards, while nothing else loads."""
    _import_builtin_scorers()
    concurrent = [name for name in specs if name in _CONCURRENT_LOADS]
    loaded: dict[str, RewardModel] = {}
    if len(concurrent) > 1:
        from concurrent.futures import ThreadPoolExecutor

        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        with ThreadPoolExecutor(min(len(concurrent), max(cpus, 2)), thread_name_prefix="load-reward") as pool:
            futures = {name: pool.submit(load_reward, name, device=device, dtype=dtype, **specs[name]) for name in concurrent}
            loaded = {name: future.result() for name, future in futures.items()}
    for name in specs:
        if name not in loaded:
            loaded[name] = load_reward(name, device=device, dtype=dtype, **specs[name])
    return {name: loaded[name] for name in specs}


def _import_builtin_scorers() -> None:
    """Import the modules whose ``@register_reward`` calls fill the registry."""
    import importlib

    for module in ("reward.clip_scorers", "reward.hpsv2", "reward.pickscore", "reward.imagereward", "reward.social_aesthetic", "reward.world"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a real missing dependency, not a scorer not written yet
                raise
