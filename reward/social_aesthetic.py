"""``social_aesthetic``: an aesthetic scorer learned from social engagement, a small head on CLIP
image embeddings (after Flickr's "production and consumption of quality": engagement as the
label of quality).

The head sees the L2-normalised CLIP image embedding (as LAION's aesthetic head does) and either

* ``classification``: logits of three engagement buckets (low, medium, high); the score is the
  expected bucket value ``sum_k softmax_k * value_k`` with values 0, 0.5, 1; or
* ``regression``: the bucket value itself, trained with MSE; the score is the output.

Both scores live on the same [0, 1] scale. A trained head is two files side by side:
``social_aesthetic.safetensors`` (the weights) and ``social_aesthetic.json`` (the note: objective,
sizes, buckets, and which CLIP it sits on: ``clip.weights``, a file or hub spec, null meaning
OpenAI's ViT-L/14). ``load_reward("social_aesthetic", weights=<folder or .safetensors>)`` loads
both and the CLIP named in the note (``clip_weights=`` overrides it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from sr_finetune.errors import UserError
from sr_finetune.models import resolve_device

from .base import register_reward
from .clip_scorers import CLIPImageReward, l2_normalize_keep_zero, resolve_clip_weights
from .openai_clip import OpenAICLIPBackbone, load_openai_clip_backbone, resolve_weights_file

HEAD_FILE = "social_aesthetic.safetensors"
NOTE_FILE = "social_aesthetic.json"
NOTE_FORMAT = "sr-finetune social_aesthetic head v1"
OBJECTIVES = ("classification", "regression")
BUCKETS = ("low", "medium", "high")
BUCKET_VALUES = (0.0, 0.5, 1.0)


class SocialAestheticHead(torch.nn.Module):
    """Linear (``hidden_dim=0``) or one-hidden-layer MLP on normalised CLIP image embeddings."""

    def __init__(self, embed_dim: int, objective: str = "classification", hidden_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        if objective not in OBJECTIVES:
            raise UserError(f"unknown social_aesthetic objective '{objective}' (expected one of {', '.join(OBJECTIVES)})")
        self.objective = objective
        outputs = len(BUCKETS) if objective == "classification" else 1
        if hidden_dim:
            self.net = torch.nn.Sequential(torch.nn.Linear(embed_dim, hidden_dim), torch.nn.GELU(), torch.nn.Dropout(dropout), torch.nn.Linear(hidden_dim, outputs))
        else:
            self.net = torch.nn.Sequential(torch.nn.Linear(embed_dim, outputs))
        self.register_buffer("bucket_values", torch.tensor(BUCKET_VALUES), persistent=False)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Raw outputs on unnormalised embeddings: bucket logits [N, 3] or values [N, 1]."""
        return self.net(l2_normalize_keep_zero(embeddings.float()))

    def score(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scores [N] on [0, 1]'s scale: expected bucket value, or the regressed value."""
        out = self(embeddings)
        if self.objective == "classification":
            return out.softmax(dim=-1) @ self.bucket_values
        return out[:, 0]


def save_head(head: SocialAestheticHead, out_dir: str | os.PathLike, note: dict[str, Any]) -> Path:
    """Write ``social_aesthetic.safetensors`` and the ``social_aesthetic.json`` note into ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    linears = [m for m in head.net if isinstance(m, torch.nn.Linear)]
    full = {
        "format": NOTE_FORMAT,
        "objective": head.objective,
        "embed_dim": linears[0].in_features,
        "hidden_dim": linears[0].out_features if len(linears) > 1 else 0,
        "buckets": list(BUCKETS),
        "bucket_values": list(BUCKET_VALUES),
        **note,
    }
    save_file({k: v.detach().float().contiguous().cpu() for k, v in head.state_dict().items()}, str(out / HEAD_FILE), metadata={"format": NOTE_FORMAT})
    (out / NOTE_FILE).write_text(json.dumps(full, indent=2), encoding="utf-8")
    return out


def _head_files(weights: str | os.PathLike) -> tuple[Path, Path]:
    """(head file, note file) from a folder, a ``.safetensors`` file or a hub spec owner/repo[/file]."""
    path = Path(weights)
    if path.is_dir():
        return path / HEAD_FILE, path / NOTE_FILE
    if path.is_file():
        return path, path.with_suffix(".json")
    spec = str(weights).rstrip("/")
    if spec.endswith(".safetensors"):
        head_spec, note_spec = spec, spec[: -len(".safetensors")] + ".json"
    else:
        head_spec, note_spec = f"{spec}/{HEAD_FILE}", f"{spec}/{NOTE_FILE}"
    return resolve_weights_file(head_spec, "social_aesthetic"), resolve_weights_file(note_spec, "social_aesthetic note")


def load_head(weights: str | os.PathLike) -> tuple[SocialAestheticHead, dict[str, Any]]:
    """The head (fp32, CPU, eval) and its note."""
    from safetensors.torch import load_file

    head_file, note_file = _head_files(weights)
    for f in (head_file, note_file):
        if not f.is_file():
            raise UserError(f"social_aesthetic weights '{weights}': {f} not found (a trained head is {HEAD_FILE} + {NOTE_FILE})")
    try:
        note = json.loads(note_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"{note_file}: not JSON: {exc}") from None
    if note.get("format") != NOTE_FORMAT:
        raise UserError(f"{note_file}: not a social_aesthetic note (format {note.get('format')!r}, expected {NOTE_FORMAT!r})")
    head = SocialAestheticHead(int(note["embed_dim"]), note["objective"], int(note["hidden_dim"]))
    try:
        head.load_state_dict(load_file(str(head_file)), strict=True)
    except (RuntimeError, OSError) as exc:
        raise UserError(f"{head_file} does not fit the head its note describes: {str(exc).splitlines()[0]}") from None
    return head.eval(), note


class SocialAestheticReward(CLIPImageReward):
    """Engagement-trained aesthetic score on a CLIP backbone; the prompt is ignored."""

    name = "social_aesthetic"

    def __init__(self, backbone: OpenAICLIPBackbone, head: SocialAestheticHead):
        super().__init__(backbone)
        self.head = head.float()

    def score(self, pixel_values: torch.Tensor, text_inputs: torch.Tensor | None = None) -> torch.Tensor:
        return self.head.score(self.backbone.encode_image(pixel_values))


@register_reward("social_aesthetic", concurrent_load=True)
def load_social_aesthetic(
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    *,
    clip_weights: str | os.PathLike | None = None,
    share_backbone: bool = True,
) -> SocialAestheticReward:
    """``weights``: a folder (or ``.safetensors`` file, or hub spec) written by ``train-aesthetic``;
    ``clip_weights``: the backbone, by default the one named in the head's note."""
    if weights is None:
        raise UserError("social_aesthetic needs weights=<folder written by sr-finetune train-aesthetic>: no weights are published")
    head, note = load_head(weights)
    clip = clip_weights if clip_weights is not None else note.get("clip", {}).get("weights")
    backbone = load_openai_clip_backbone(resolve_clip_weights(clip), device, dtype, share=share_backbone)
    embed_dim = int(backbone.model.text_projection.shape[1])
    if embed_dim != note["embed_dim"]:
        raise UserError(f"social_aesthetic head {weights} expects {note['embed_dim']}-d embeddings, the CLIP backbone {clip or 'ViT-L/14'} gives {embed_dim}-d")
    return SocialAestheticReward(backbone, head.to(resolve_device(str(device)))).eval()


__all__ = ["BUCKETS", "BUCKET_VALUES", "SocialAestheticHead", "SocialAestheticReward", "load_head", "load_social_aesthetic", "save_head"]
