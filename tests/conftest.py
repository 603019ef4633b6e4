"""Shared fixtures and helpers: the real public data beside the repo, a session-wide tiny SD
pipeline, test images in every PIL mode and openai/CLIP's reference transform."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


@pytest.fixture(scope="session")
def finetune_set(tmp_path_factory) -> Path:
    """10 rows: 4 prompts x (chosen, rejected + negative token) and 2 regularisation images, 40x48 px."""
    import numpy as np
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        for role in ("chosen", "rejected"):
            text = f"a photo of animal {i}" + (" t@y quality" if role == "rejected" else "")
            rows.append({"text": text, "role": role, "prompt_id": f"p{i}", "score": float(rng.random())})
    rows += [{"text": f"a laion caption {i}", "role": "regularization", "prompt_id": f"laion{i}", "score": 0.0} for i in range(2)]
    for row in rows:
        row["image"] = PILImage.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    features = Features({"image": Image(), "text": Value("string"), "role": Value("string"), "prompt_id": Value("string"), "score": Value("float32")})
    path = tmp_path_factory.mktemp("finetune_set") / "pairs"
    Dataset.from_list(rows, features=features).save_to_disk(str(path))
    return path


def real_image_files(shared_data: Path, limit: int = 24) -> list[Path]:
    """Real generated images of ../shared/data/images (PNG, JPEG and WEBP, spread over formats)."""
    files = sorted(p for p in (shared_data / "images").rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"})
    by_format: dict[str, list[Path]] = {}
    for path in files:
        by_format.setdefault(path.suffix.lower(), []).append(path)
    picked = [path for group in zip(*by_format.values()) for path in group][:limit]  # round robin over formats
    return picked + [p for p in files if p not in picked][: limit - len(picked)]


def launch_two_cpu_processes(args: list[str], port: int, **env: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` of two gloo processes on the CPU (``args``: the script or ``-m module``
    and its arguments), run from the repository root; returns the finished process."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), *args,
    ]
    environment = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **env)
    return subprocess.run(cmd, capture_output=True, text=True, env=environment, timeout=300, cwd=REPO)


def reset_accelerate_state() -> None:
    """accelerate keeps process-wide singletons; each in-process run builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    """Reset accelerate's singletons after the test (use with ``pytest.mark.usefixtures``)."""
    yield
    reset_accelerate_state()


def load_tiny_reward(settings: dict, name: str):
    """Scorer ``name`` from the ``{"weights", "options"}`` settings ``reward.tiny`` returns."""
    from reward import load_reward

    return load_reward(name, weights=settings["weights"][name], **settings["options"].get(name, {}))


# Every PIL mode a scorer may be handed, as the name of a test image (the two "+transparency"
# ones carry a transparency entry, as PNG files with a tRNS chunk open).
IMAGE_MODES = ("RGB", "RGBA", "LA", "L", "P", "P+transparency", "RGB+transparency", "I;16", "CMYK")


def image_in_mode(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    """A random image in ``mode`` (see ``IMAGE_MODES``). Alpha channels are a real gradient with
    fully transparent columns on the left, over varying colours, so that dropping alpha,
    premultiplying it or compositing onto a background all give different pixels."""
    rng = np.random.default_rng(seed)
    alpha = np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))
    alpha[:, : width // 8] = 0
    if mode in ("RGB", "RGB+transparency"):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        if mode == "RGB+transparency":
            image.info["transparency"] = tuple(int(v) for v in np.asarray(image)[height // 2, width // 2])
        return image
    if mode in ("P", "P+transparency"):
        image = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).convert("P")
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tolist())
        if mode == "P+transparency":
            image.info["transparency"] = int(np.asarray(image)[height // 2, width // 2])
        return image
    if mode == "I;16":
        return Image.frombytes("I;16", (width, height), rng.integers(0, 65536, (height, width), dtype="<u2").tobytes())
    bands = {"L": 1, "LA": 2, "RGBA": 4, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
    if mode in ("LA", "RGBA"):
        pixels[..., -1] = alpha
    return Image.frombytes(mode, (width, height), pixels.tobytes())


def openai_clip_reference_transform(size: int = 224):
    """openai/CLIP's ``_transform(size)`` (ImageReward's too) from torchvision's own transforms:
    resize, centre crop, *then* PIL's RGB conversion, ToTensor, normalise."""
    from torchvision import transforms as T

    from reward.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    return T.Compose(
        [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)]
    )
