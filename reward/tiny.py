"""Tiny weights for all six scorers, in the real file formats, for tests and the CPU demo.

``make_tiny_rewards(out_dir)`` writes::

    social_reward.pt          OpenAI-layout CLIP state dict, as Social Reward training saves it
    clip.pt                   OpenAI TorchScript archive (the layout of OpenAI's ViT-L-14.pt)
    aesthetic.pth             LAION linearMSE head on the clip.pt embeddings
    hpsv2/                    HPS_v2_compressed.pt + open_clip_config.json
    pickscore/                transformers CLIPModel + the laion processor files
    imagereward/              ImageReward.pt + med_config.json

and returns the ``weights`` / ``options`` of a ``score:`` section that loads them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .clip_scorers import make_tiny_aesthetic_head
from .hpsv2 import make_tiny_hpsv2
from .imagereward import make_tiny_imagereward
from .openai_clip import TINY_OPENAI_CLIP, make_tiny_openai_clip
from .pickscore import make_tiny_pickscore

METRICS = ["social_reward", "clip", "aesthetic", "hpsv2", "imagereward", "pickscore"]


def tiny_reward_settings(out_dir: str | os.PathLike) -> dict[str, Any]:
    """``{"metrics", "weights", "options"}`` for the tiny scorers in ``out_dir`` (no files written)."""
    out = Path(out_dir)
    weights = {
        "social_reward": str(out / "social_reward.pt"),
        "clip": str(out / "clip.pt"),
        "aesthetic": str(out / "aesthetic.pth"),
        "hpsv2": str(out / "hpsv2"),
        "imagereward": str(out / "imagereward"),
        "pickscore": str(out / "pickscore"),
    }
    options = {"aesthetic": {"clip_weights": weights["clip"]}}
    return {"metrics": list(METRICS), "weights": weights, "options": options}


def make_tiny_rewards(out_dir: str | os.PathLike, seed: int = 0) -> dict[str, Any]:
    """Write tiny seeded weights of all six scorers to ``out_dir``; return their score settings.

    Each scorer gets its own seed, so the six metrics rank images differently."""
    settings = tiny_reward_settings(out_dir)
    weights = settings["weights"]
    make_tiny_openai_clip(weights["social_reward"], seed=seed + 1, fmt="state_dict")
    make_tiny_openai_clip(weights["clip"], seed=seed, fmt="torchscript")
    make_tiny_aesthetic_head(weights["aesthetic"], embed_dim=TINY_OPENAI_CLIP["embed_dim"], seed=seed + 2)
    make_tiny_hpsv2(weights["hpsv2"], seed=seed + 3)
    make_tiny_imagereward(weights["imagereward"], seed=seed + 4)
    make_tiny_pickscore(weights["pickscore"], seed=seed + 5)
    return settings


__all__ = ["METRICS", "make_tiny_rewards", "tiny_reward_settings"]
