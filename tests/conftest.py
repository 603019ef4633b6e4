"""Shared fixtures: the real public data beside the repo and a session-wide tiny SD pipeline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SR_SHARED_DIR", REPO.parent / "shared"))
SHARED_DATA = SHARED / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder not found at {SHARED_DATA} (set SR_SHARED_DIR)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny SD-2.1-shaped pipeline folder, written once per test session."""
    from sr_finetune.tiny_models import make_tiny_sd_pipeline

    return make_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_rewards(tmp_path_factory) -> dict:
    """Tiny weights of the six scorers, written once per test session; ``reward.tiny``'s settings."""
    from reward.tiny import make_tiny_rewards

    return make_tiny_rewards(tmp_path_factory.mktemp("tiny_rewards") / "rewards")


def real_image_files(shared_data: Path, limit: int = 24) -> list[Path]:
    """Real generated images of ../shared/data/images (PNG, JPEG and WEBP, spread over formats)."""
    files = sorted(p for p in (shared_data / "images").rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"})
    by_format: dict[str, list[Path]] = {}
    for path in files:
        by_format.setdefault(path.suffix.lower(), []).append(path)
    picked = [path for group in zip(*by_format.values()) for path in group][:limit]  # round robin over formats
    return picked + [p for p in files if p not in picked][: limit - len(picked)]


def load_tiny_reward(settings: dict, name: str):
    """Scorer ``name`` from the ``{"weights", "options"}`` settings ``reward.tiny`` returns."""
    from reward import load_reward

    return load_reward(name, weights=settings["weights"][name], **settings["options"].get(name, {}))
