"""The BLIP backbone of ImageReward: a ViT image encoder and BLIP's "med" BERT text encoder,
whose layers cross-attend to the image tokens.

Parameter names equal those of BLIP / ImageReward (``models/BLIP/vit.py`` and ``med.py``), so
their state dicts load as they are:

* **Vision**: timm's ``VisionTransformer`` (class token, no pooling, no head) has exactly the key
  layout and math of BLIP's ViT (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
  ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``; LayerNorm eps 1e-6,
  exact GELU, qkv bias); its forward returns all tokens after the final norm, like BLIP's.
* **Text**: our own ``MedBertModel``. transformers' ``BertModel`` cannot stand in for it: its
  cross-attention keys/values are ``hidden_size`` wide (med's take the image width, 1024 for
  ViT-L), it only cross-attends as a causal decoder (med's multimodal encoder is bidirectional),
  and it has token-type embeddings that med lacks. Keys follow med: ``embeddings.{word_embeddings,
  position_embeddings,LayerNorm}``, ``encoder.layer.N.{attention,crossattention}.{self.{query,
  key,value},output.{dense,LayerNorm}}``, ``encoder.layer.N.intermediate.dense``,
  ``encoder.layer.N.output.{dense,LayerNorm}``. Padding is masked with med's additive -10000.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sr_finetune.errors import UserError

# ------------------------------------------------------------------------------------- vision


@dataclasses.dataclass(frozen=True)
class BlipVisionConfig:
    """Sizes of BLIP's ViT. Defaults = ``create_vit('large', 224)``, ImageReward's encoder."""

    image_size: int = 224
    patch_size: int = 16
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.1  # BLIP's 'large' setting; stochastic depth is inactive in eval()


BLIP_VIT_LARGE = BlipVisionConfig()
BLIP_VIT_BASE = BlipVisionConfig(embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.0)


def vision_config_from_dict(config: Mapping[str, Any]) -> BlipVisionConfig:
    names = {f.name for f in dataclasses.fields(BlipVisionConfig)}
    unknown = set(config) - names
    if unknown:
        raise UserError(f"unknown BLIP vision config keys {sorted(unknown)} (expected some of {sorted(names)})")
    return BlipVisionConfig(**config)


def infer_vision_config(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> BlipVisionConfig:
    """Read the ViT's sizes from its weights. The head count is not in any shape: like both BLIP
    ViTs (768/12, 1024/16) we assume 64-dim heads; pass an explicit config otherwise. qkv bias is
    always on, as in BLIP, so that a checkpoint without it is reported as incomplete."""
    try:
        patch = state_dict[prefix + "patch_embed.proj.weight"]
        pos = state_dict[prefix + "pos_embed"]
        fc1 = state_dict[prefix + "blocks.0.mlp.fc1.weight"]
    except KeyError as exc:
        raise UserError(f"the checkpoint has no vision encoder weights ({exc.args[0]} is missing)") from None
    embed_dim, _, patch_size, _ = patch.shape
    grid = round((pos.shape[1] - 1) ** 0.5)
    if grid * grid != pos.shape[1] - 1:
        raise UserError(f"{prefix}pos_embed has {pos.shape[1]} tokens, not 1 + a square patch grid")
    block = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.")
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := block.match(k)))
    if embed_dim % 64:
        raise UserError(f"cannot infer the ViT head count for width {embed_dim}: pass vision_config")
    return BlipVisionConfig(
        image_size=grid * patch_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // 64,
        mlp_ratio=fc1.shape[0] / embed_dim,
        drop_path_rate=BLIP_VIT_LARGE.drop_path_rate,
    )


def build_blip_vit(config: BlipVisionConfig) -> nn.Module:
    """BLIP's ViT as a timm ``VisionTransformer``: ``forward(x)`` -> all tokens [N, 1 + P, D]."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
        drop_path_rate=config.drop_path_rate,
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
        class_token=True,
        global_pool="",
        num_classes=0,
    )


# --------------------------------------------------------------------------------------- text


@dataclasses.dataclass(frozen=True)
class MedBertConfig:
    """The fields of BLIP's ``med_config.json`` that the encoder uses (others are ignored)."""

    vocab_size: int = 30524
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    encoder_width: int = 768
    add_cross_attention: bool = True
    position_embedding_type: str = "absolute"

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> MedBertConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        made = cls(**{k: v for k, v in config.items() if k in names})
        if made.position_embedding_type != "absolute":
            raise UserError(f"med BERT position_embedding_type '{made.position_embedding_type}' is not supported (only 'absolute')")
        if made.hidden_size % made.num_attention_heads:
            raise UserError(f"med BERT hidden_size {made.hidden_size} is not a multiple of num_attention_heads {made.num_attention_heads}")
        return made

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> MedBertConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read med config {path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _activation(name: str) -> nn.Module:
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise UserError(f"unknown hidden_act '{name}' in med config")
    return ACT2FN[name]


class MedBertEmbeddings(nn.Module):
    """Word + absolute position embeddings, LayerNorm, dropout (no token-type embeddings)."""

    def __init__(self, config: MedBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        return self.dropout(self.LayerNorm(embeddings))


class MedBertSelfAttention(nn.Module):
    """Multi-head attention projections; keys/values read ``kv_width`` features (the image width
    for cross-attention)."""

    def __init__(self, config: MedBertConfig, kv_width: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        return x.view(n, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, additive_mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self._heads(self.query(hidden)), self._heads(self.key(context)), self._heads(self.value(context))
        # softmax(q k^T / sqrt(d) + mask) v, with dropout on the probabilities when training
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask, dropout_p=self.dropout_p if self.training else 0.0)
        n, _, length, _ = out.shape
        return out.transpose(1, 2).reshape(n, length, -1)


class MedBertResidualOutput(nn.Module):
    """``LayerNorm(dropout(dense(x)) + residual)``, after attention and after the feed-forward."""

    def __init__(self, in_features: int, config: MedBertConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class MedBertAttention(nn.Module):
    def __init__(self, config: MedBertConfig, kv_width: int):
        super().__init__()
        self.self = MedBertSelfAttention(config, kv_width)
        self.output = MedBertResidualOutput(config.hidden_size, config)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, additive_mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(hidden, context, additive_mask), hidden)


class MedBertIntermediate(nn.Module):
    def __init__(self, config: MedBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _activation(config.hidden_act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden))


class MedBertLayer(nn.Module):
    """Bidirectional self-attention, then (multimodal mode) cross-attention to the image, then FFN."""

    def __init__(self, config: MedBertConfig):
        super().__init__()
        self.attention = MedBertAttention(config, config.hidden_size)
        if config.add_cross_attention:
            self.crossattention = MedBertAttention(config, config.encoder_width)
        self.intermediate = MedBertIntermediate(config)
        self.output = MedBertResidualOutput(config.intermediate_size, config)

    def forward(self, hidden, self_mask=None, image_tokens=None, image_mask=None) -> torch.Tensor:
        hidden = self.attention(hidden, hidden, self_mask)
        if image_tokens is not None:
            hidden = self.crossattention(hidden, image_tokens, image_mask)
        return self.output(self.intermediate(hidden), hidden)


class MedBertEncoder(nn.Module):
    def __init__(self, config: MedBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(MedBertLayer(config) for _ in range(config.num_hidden_layers))


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """[N, L] 1/0 mask -> [N, 1, 1, L] additive mask, 0 to attend and -10000 to ignore, as med."""
    if mask is None:
        return None
    return (1.0 - mask[:, None, None, :].to(dtype)) * -10000.0


class MedBertModel(nn.Module):
    """BLIP's med ``BertModel(add_pooling_layer=False)`` in encoder mode: bidirectional text
    self-attention, plus cross-attention to ``encoder_hidden_states`` when they are given (med's
    ``mode='multimodal'``); without them it is the plain text encoder (``mode='text'``)."""

    def __init__(self, config: MedBertConfig):
        super().__init__()
        self.config = config
        self.embeddings = MedBertEmbeddings(config)
        self.encoder = MedBertEncoder(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last hidden state [N, L, hidden_size]."""
        if encoder_hidden_states is not None and not self.config.add_cross_attention:
            raise ValueError("this med BERT has no cross-attention layers (add_cross_attention is false)")
        hidden = self.embeddings(input_ids)
        self_mask = _additive_mask(attention_mask, hidden.dtype)
        image_mask = _additive_mask(encoder_attention_mask, hidden.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states.to(hidden.dtype)
        for layer in self.encoder.layer:
            hidden = layer(hidden, self_mask, encoder_hidden_states, image_mask)
        return hidden


# ----------------------------------------------------------------------------------- backbone


class BLIPBackbone(nn.Module):
    """``visual_encoder`` + ``text_encoder``, the parts of BLIP that ImageReward scores with
    (BLIP's ``vision_proj``/``text_proj`` are not used by the score and are left out)."""

    def __init__(self, vision_config: BlipVisionConfig, text_config: MedBertConfig):
        super().__init__()
        if text_config.encoder_width != vision_config.embed_dim:
            # BLIP overwrites med_config's encoder_width with the ViT width; so do we
            text_config = dataclasses.replace(text_config, encoder_width=vision_config.embed_dim)
        self.vision_config = vision_config
        self.text_config = text_config
        self.visual_encoder = build_blip_vit(vision_config)
        self.text_encoder = MedBertModel(text_config)

    def multimodal_features(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text token states [N, L, hidden] after cross-attending to each row's own image tokens
        (all 1 + P of them, with an all-ones image mask)."""
        image_tokens = self.visual_encoder(pixel_values)
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.long, device=image_tokens.device)
        return self.text_encoder(input_ids, attention_mask, encoder_hidden_states=image_tokens, encoder_attention_mask=image_mask)


__all__ = [
    "BLIPBackbone",
    "BLIP_VIT_BASE",
    "BLIP_VIT_LARGE",
    "BlipVisionConfig",
    "MedBertConfig",
    "MedBertModel",
    "build_blip_vit",
    "infer_vision_config",
    "vision_config_from_dict",
]
