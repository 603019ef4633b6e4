"""Three scorers on an OpenAI CLIP ViT (SCORERS.md sections 1-3):

* ``social_reward``: Picsart's Social Reward, a fine-tuned OpenAI ViT-L/14. Score = raw cosine
  ``<e_t/|e_t|, e_i/|e_i|>`` (no logit scale), computed as validate.py does
  (``bmm(text[:, None, :], image[:, :, None])``). The reference runs in fp32 (``clip.load(...,
  "cpu")`` then ``.to(device)``), which is our default. No weights are published, so ``weights``
  (a checkpoint the training code saved) is required.
* ``clip``: the vanilla CLIP alignment score, the same raw cosine on the published OpenAI
  ViT-L/14 (``weights=None``). ImageReward's ``CLIPScore`` runs fp16 on CUDA; ``dtype="fp16"``
  reproduces that, the default fp32 gives the exact cosine.
* ``aesthetic``: the LAION improved-aesthetic-predictor v2 (``sac+logos+ava1-l14-linearMSE.pth``),
  an MLP with no activations (one affine map in eval mode) on the **L2-normalised** ViT-L/14 image
  embedding, zero norms left as they are (norm taken as 1, as the reference's numpy helper
  does); the MLP always runs in fp32, as the reference's. ``weights`` is the head file (default:
  downloaded, see :data:`AESTHETIC_HUB_FILE`), ``clip_weights`` the backbone (default: OpenAI
  ViT-L/14). The prompt is ignored (``tokenize`` returns an empty [N, 0] tensor).

Preprocessing is openai/CLIP's transform (``reward.preprocess``); tokenisation is open_clip's
``tokenize`` (= ``clip.tokenize(..., truncate=True)``: 77 tokens, SOT 49406, EOT 49407 forced last
on truncation, zero padding). Checkpoint formats: see ``reward.openai_clip``.

**Shared backbone.** ``clip`` and ``aesthetic`` loaded on the same CLIP file, device and dtype
hold the *same* :class:`~reward.openai_clip.OpenAICLIPBackbone` module (``share_backbone=True``,
the default), and that backbone caches the image features of the last batch. A scoring run that
loads both through ``load_reward`` and scores the same pixel batch with each therefore runs the
ViT-L/14 image tower once per batch, with no change to the run itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from PIL import Image

from sr_finetune.errors import UserError
from sr_finetune.models import resolve_device

from .base import PromptFreeReward, RewardModel, encode_distinct_rows, register_reward
from .openai_clip import OpenAICLIPBackbone, download_openai_vit_l_14, load_openai_clip_backbone, resolve_weights_file
from .preprocess import open_clip_tokens_key, openai_clip_key, openai_clip_tensor_transform, openai_clip_transform

logger = logging.getLogger(__name__)

# The aesthetic head's canonical home is the GitHub repo christophschuhmann/improved-aesthetic-
# predictor (file in the repo root); the default download is its Hugging Face hub mirror, checked
# against the GitHub file's sha256.
AESTHETIC_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_HUB_FILE = ("camenduru/improved-aesthetic-predictor", AESTHETIC_FILENAME)
AESTHETIC_GITHUB_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/" + AESTHETIC_FILENAME
AESTHETIC_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
OPEN_CLIP_HUB_WEIGHTS = "open_clip_model.safetensors"  # file name when a CLIP hub spec names none


# --------------------------------------------------------------------------- scorers


class CLIPScoreReward(RewardModel):
    """Raw cosine of the L2-normalised CLIP text and image embeddings (the ``clip`` metric)."""

    name = "clip"

    def __init__(self, backbone: OpenAICLIPBackbone):
        super().__init__()
        self.backbone = backbone
        self.transform = openai_clip_transform(backbone.image_size)
        self.context_length = backbone.context_length

    @property
    def preprocess_key(self) -> str:
        return openai_clip_key(self.backbone.image_size)

    @property
    def tokenize_key(self) -> str:
        return open_clip_tokens_key(self.context_length)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    @property
    def is_differentiable(self) -> bool:
        return True

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        return openai_clip_tensor_transform(images, self.backbone.image_size)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        from open_clip.tokenizer import tokenize

        return tokenize(list(prompts), context_length=self.context_length)

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The unnormalised CLIP image embedding (cached per batch: free after ``score``)."""
        return self.backbone.encode_image(pixel_values)

    def score(self, pixel_values: torch.Tensor, text_inputs: torch.Tensor) -> torch.Tensor:
        image = self.backbone.encode_image(pixel_values)
        text = encode_distinct_rows(self.backbone.encode_text, text_inputs)
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        return torch.bmm(text[:, None, :], image[:, :, None]).reshape(-1).float()


class SocialReward(CLIPScoreReward):
    """Picsart's Social Reward: the same cosine as ``clip`` on fine-tuned ViT-L/14 weights."""

    name = "social_reward"


class AestheticHead(torch.nn.Module):
    """The improved-aesthetic-predictor MLP, key layout ``layers.{0,2,4,6,7}``: no activations,
    so in eval mode (dropouts off) it is one affine map ``embed_dim -> 1``."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(embed_dim, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def l2_normalize_keep_zero(x: torch.Tensor) -> torch.Tensor:
    """``x / |x|`` along the last axis with zero norms replaced by 1 (the reference's numpy
    ``normalized``), so an all-zero row stays zero instead of becoming NaN."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / torch.where(norm == 0, torch.ones_like(norm), norm)


class CLIPImageReward(PromptFreeReward):
    """Base of the scores of the CLIP image embedding alone (``aesthetic``, ``social_aesthetic``):
    openai/CLIP's transform, and no prompt (empty tokens)."""

    def __init__(self, backbone: OpenAICLIPBackbone):
        super().__init__()
        self.backbone = backbone  # registered first: its dtype is the one pixels are fed in
        self.transform = openai_clip_transform(backbone.image_size)

    @property
    def preprocess_key(self) -> str:
        return openai_clip_key(self.backbone.image_size)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    @property
    def is_differentiable(self) -> bool:
        return True

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        return openai_clip_tensor_transform(images, self.backbone.image_size)

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The unnormalised CLIP image embedding (cached per batch: free after ``score``)."""
        return self.backbone.encode_image(pixel_values)


class AestheticReward(CLIPImageReward):
    """LAION aesthetic score: ``AestheticHead(e / |e|)`` on the CLIP image embedding ``e``."""

    name = "aesthetic"

    def __init__(self, backbone: OpenAICLIPBackbone, head: AestheticHead):
        super().__init__(backbone)
        self.head = head.float()

    def score(self, pixel_values: torch.Tensor, text_inputs: torch.Tensor | None = None) -> torch.Tensor:
        # normalised in the backbone's dtype (the reference normalises its fp16 array), then fp32
        embeddings = l2_normalize_keep_zero(self.backbone.encode_image(pixel_values))
        return self.head(embeddings.float()).reshape(-1)


# --------------------------------------------------------------------------- loading


def resolve_clip_weights(weights: str | os.PathLike | None) -> Path:
    """A local CLIP checkpoint: ``weights`` as a file or hub spec, or (None) OpenAI ViT-L/14."""
    if weights is None:
        return download_openai_vit_l_14()
    return resolve_weights_file(weights, "CLIP", default_filename=OPEN_CLIP_HUB_WEIGHTS)


def resolve_aesthetic_weights(weights: str | os.PathLike | None) -> Path:
    """A local aesthetic head file: ``weights`` as a file or hub spec, or (None) the hub mirror
    of the GitHub file, whose sha256 is checked (a mismatch is logged, not fatal)."""
    if weights is not None:
        return resolve_weights_file(weights, "aesthetic head", default_filename=AESTHETIC_FILENAME)
    path = resolve_weights_file("/".join(AESTHETIC_HUB_FILE), "aesthetic head")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != AESTHETIC_SHA256:
        logger.warning("aesthetic head %s has sha256 %s, not the GitHub file's %s (%s)", path, digest, AESTHETIC_SHA256, AESTHETIC_GITHUB_URL)
    return path


def load_aesthetic_head(path: str | os.PathLike) -> AestheticHead:
    """An :class:`AestheticHead` (fp32, CPU, eval) from a ``layers.N``-keyed state dict file
    (saved from CUDA tensors, hence ``map_location``); ``{'state_dict': ...}`` also accepted."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path} is not an aesthetic head torch.load can read safely: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or "layers.0.weight" not in state:
        raise UserError(f"{path} is not an improved-aesthetic-predictor head (no layers.0.weight)")
    head = AestheticHead(int(state["layers.0.weight"].shape[1]))
    try:
        head.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{path} does not fit the linearMSE aesthetic head (ReLU variants use other keys): {str(exc).splitlines()[0]}") from None
    return head.eval()


@register_reward("clip", concurrent_load=True)
def load_clip(
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    *,
    share_backbone: bool = True,
) -> CLIPScoreReward:
    """CLIP alignment score; ``weights``: a CLIP file or hub spec, None = OpenAI ViT-L/14."""
    backbone = load_openai_clip_backbone(resolve_clip_weights(weights), device, dtype, share=share_backbone)
    return CLIPScoreReward(backbone).eval()


@register_reward("social_reward", concurrent_load=True)
def load_social_reward(
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    *,
    share_backbone: bool = True,
) -> SocialReward:
    """Social Reward; ``weights``: the fine-tuned ViT-L/14 checkpoint (file or owner/repo/file)."""
    if weights is None:
        raise UserError("social_reward needs weights=<checkpoint .pth/.pt/.safetensors saved by Social Reward training>: no weights are published")
    backbone = load_openai_clip_backbone(resolve_weights_file(weights, "social_reward"), device, dtype, share=share_backbone)
    return SocialReward(backbone).eval()


@register_reward("aesthetic", concurrent_load=True)
def load_aesthetic(
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    *,
    clip_weights: str | os.PathLike | None = None,
    share_backbone: bool = True,
) -> AestheticReward:
    """LAION aesthetic score; ``weights``: the head (None = hub mirror of
    ``sac+logos+ava1-l14-linearMSE.pth``), ``clip_weights``: the backbone (None = OpenAI ViT-L/14)."""
    head = load_aesthetic_head(resolve_aesthetic_weights(weights))
    backbone = load_openai_clip_backbone(resolve_clip_weights(clip_weights), device, dtype, share=share_backbone)
    embed_dim = int(backbone.model.text_projection.shape[1])
    if head.layers[0].in_features != embed_dim:
        raise UserError(f"aesthetic head expects {head.layers[0].in_features}-d embeddings, the CLIP backbone gives {embed_dim}-d")
    return AestheticReward(backbone, head.to(resolve_device(str(device)))).eval()


def make_tiny_aesthetic_head(path: str | os.PathLike, embed_dim: int = 32, seed: int = 0) -> Path:
    """Write a seeded random :class:`AestheticHead` state dict (the real file's key layout)."""
    torch.manual_seed(seed)
    head = AestheticHead(embed_dim)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(head.state_dict(), path)
    return path


__all__ = [
    "AESTHETIC_FILENAME",
    "AESTHETIC_HUB_FILE",
    "AestheticHead",
    "AestheticReward",
    "CLIPImageReward",
    "CLIPScoreReward",
    "SocialReward",
    "l2_normalize_keep_zero",
    "load_aesthetic",
    "load_aesthetic_head",
    "load_clip",
    "load_social_reward",
    "make_tiny_aesthetic_head",
]
