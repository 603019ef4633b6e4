"""HPS v2 / v2.1 (Human Preference Score, tgxs002/HPSv2): an open_clip ViT-H-14 fine-tuned on
human preferences. Score = raw cosine of the L2-normalised image and text features, no logit
scale (about 0.25-0.30 for SD images with v2.0; the HPS tables print it x100).

Matches ``hpsv2.score()`` (hpsv2 1.2.0, SCORERS.md section 4) with these decisions:

* **Version**: ``version="v2.0"`` by default, like ``hpsv2.score()`` / ``img_score.score()``
  (``evaluate()`` defaults to v2.1). v2.1 was released in Feb 2024, after the Social Reward
  paper, whose HPS v2 numbers can therefore only be v2.0. The two versions' scores are not
  comparable with each other.
* **Resize antialiasing**: the reference resizes the *tensor* with torchvision's default
  ``antialias``, which was "no antialiasing" up to torchvision 0.16 and ``True`` from 0.17,
  so its scores depend on the installed torchvision. We make it explicit:
  ``antialias=False`` by default, which is what HPS v2 was trained and benchmarked with (and
  what any 2023 run, such as Social Reward's, used); ``antialias=True`` reproduces
  ``hpsv2`` installed next to torchvision >= 0.17.
* **Non-square images whose longer side is already 224**: the reference skips resizing *and
  padding*, returning a non-224 tensor that cannot be batched (and that the ViT rejects). We
  pad them like every other image (no resize needed): the same result the reference gives
  for any other size, and identical to it for square 224 px inputs.
* **RGBA**: the reference keeps RGBA images as 4 channels, which its 3-channel patch
  embedding rejects; we convert every image with PIL's ``convert("RGB")`` (alpha dropped), as
  the reference does for every other mode (LA, P with transparency, L, I;16, CMYK, ...): our
  RGBA pixels are the reference's first three channels.
* **Precision**: weights are loaded in fp32 (the files may be fp16 and are cast up, as
  ``load_state_dict`` into the reference's fp32 model does). The reference runs the forward
  under ``torch.cuda.amp.autocast()``, so on a GPU its scores are fp16-quantised;
  ``autocast=None`` (default) does the same (fp16 autocast on CUDA, plain fp32 elsewhere);
  ``autocast=False`` gives full-precision scores on a GPU.
* **Loading**: the HPS file is ``{'state_dict': ...}`` for open_clip ViT-H-14, loaded with
  ``torch.load(weights_only=True)`` into a freshly built model. Unlike ``hpsv2.score()`` we
  never download the 3.9 GB LAION base weights first (they are overwritten anyway), and we load
  the checkpoint once, not on every call.

Tokenisation is open_clip's ``tokenize`` (OpenAI cleaning, 77 tokens, truncated with EOT forced),
the same tokenizer as the vendored copy in hpsv2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from sr_finetune.errors import UserError
from sr_finetune.models import resolve_device, resolve_dtype

from .base import RewardModel, encode_distinct_rows, register_reward
from .causal_text import encode_text_up_to_eot
from .loading import build_on_meta, ensure_materialized, read_checkpoint_mapped, restore_causal_mask
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, convert_rgb, open_clip_tokens_key

HPS_HUB_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
MODEL_CONFIG_FILE = "open_clip_config.json"  # optional, beside a local checkpoint: its architecture
DEFAULT_VERSION = "v2.0"

# open_clip's ViT-H-14 (HPS v2's backbone): plain GELU, 224 px, patch 14.
VIT_H_14_CONFIG: dict[str, Any] = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}
# Same architecture family at toy width/depth, for tests: real vocabulary, context and image size.
TINY_HPS_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
_NAMED_CONFIGS = {"ViT-H-14": VIT_H_14_CONFIG, "tiny": TINY_HPS_CONFIG}


# --------------------------------------------------------------------------- preprocessing


def resize_longest_and_pad(pixels: torch.Tensor, size: int = 224, antialias: bool = False) -> torch.Tensor:
    """hpsv2's ``ResizeMaxSize`` on a [C, H, W] tensor (or a batch [B, C, H, W]; differentiable): bicubic resize so the longer side is
    ``size`` (new dims by Python ``round``, which sends .5 to even), then zero-pad to a centred
    square with left/top = pad // 2. Images whose longer side is already ``size`` are only padded
    (the reference returns them unpadded, see the module docstring)."""
    height, width = pixels.shape[-2:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        height, width = round(height * scale), round(width * scale)
        pixels = TF.resize(pixels, [height, width], interpolation=InterpolationMode.BICUBIC, antialias=antialias)
    pad_h, pad_w = size - height, size - width
    if pad_h or pad_w:
        # torchvision order: left, top, right, bottom
        pixels = TF.pad(pixels, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return pixels


def hps_preprocess(image: Image.Image, size: int = 224, antialias: bool = False) -> torch.Tensor:
    """PIL image -> normalised [3, size, size] tensor, as hpsv2's validation transform: RGB,
    ToTensor, resize-longest-and-pad *before* normalising (so padding becomes -mean/std)."""
    pixels = TF.to_tensor(convert_rgb(image))
    pixels = resize_longest_and_pad(pixels, size, antialias)
    return TF.normalize(pixels, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


# --------------------------------------------------------------------------- model


class HPSv2Reward(RewardModel):
    """HPS v2 scorer around an open_clip ``CLIP``; see the module docstring for its options."""

    name = "hpsv2"

    def __init__(self, model: torch.nn.Module, *, version: str = DEFAULT_VERSION, antialias: bool = False, autocast: bool | None = None):
        super().__init__()
        self.model = model
        self.version = version
        self.antialias = antialias
        self.autocast = autocast
        # plain ints, so that the CPU-side methods never touch the parameters
        self.image_size = _as_int_size(model.visual.image_size)
        self.context_length = int(model.context_length)

    @property
    def preprocess_key(self) -> str:
        return f"hpsv2-{self.image_size}" + ("-antialias" if self.antialias else "")

    @property
    def tokenize_key(self) -> str:
        return open_clip_tokens_key(self.context_length)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        return hps_preprocess(image, self.image_size, self.antialias)

    @property
    def is_differentiable(self) -> bool:
        return True

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """The reference's own tensor transform on the batch: it already resizes a float tensor
        (torch bicubic, ``antialias`` as configured, no clamp), so no PIL step is mimicked."""
        return TF.normalize(resize_longest_and_pad(images, self.image_size, self.antialias), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        from open_clip.tokenizer import tokenize

        return tokenize(list(prompts), context_length=self.context_length)

    def encode(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised image and text features, [N, D] each."""
        dtype = next(self.model.parameters()).dtype
        image_features = self.model.encode_image(pixel_values.to(dtype), normalize=True)
        text_features = encode_distinct_rows(self._text_features, input_ids)
        return image_features, text_features

    def _text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        return encode_text_up_to_eot(self.model, input_ids, normalize=True)

    def score(self, pixel_values: torch.Tensor, text_inputs: torch.Tensor) -> torch.Tensor:
        device_type = pixel_values.device.type
        use_amp = self.autocast if self.autocast is not None else device_type == "cuda"
        with torch.autocast(device_type=device_type, dtype=torch.float16, enabled=use_amp):
            image_features, text_features = self.encode(pixel_values, text_inputs)
            # row-wise dot product as a batched matmul: under autocast this rounds once to fp16,
            # exactly like the reference's diag(image_features @ text_features.T)
            scores = torch.bmm(image_features[:, None, :], text_features[:, :, None])
        return scores.reshape(-1).float()


def _as_int_size(size: Any) -> int:
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise UserError(f"hpsv2 needs a square image size, got {tuple(size)}")
        size = size[0]
    return int(size)


def resolve_model_config(model_config: str | os.PathLike | dict | None) -> dict[str, Any]:
    """``None``/``"ViT-H-14"`` -> the real architecture, ``"tiny"`` -> the test one, a dict as is,
    or a JSON file (plain open_clip config, or open_clip's ``{"model_cfg": ...}`` layout)."""
    if model_config is None:
        return json.loads(json.dumps(VIT_H_14_CONFIG))
    if isinstance(model_config, dict):
        config = model_config
    elif str(model_config) in _NAMED_CONFIGS:
        config = _NAMED_CONFIGS[str(model_config)]
    elif Path(model_config).is_file():
        config = json.loads(Path(model_config).read_text())
        config = config.get("model_cfg", config)
    else:
        raise UserError(f"hpsv2 model_config '{model_config}' is neither {sorted(_NAMED_CONFIGS)} nor a JSON file")
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(config)
    if missing:
        raise UserError(f"hpsv2 model_config lacks {sorted(missing)}")
    return json.loads(json.dumps(config))  # deep copy: open_clip mutates the sub-dicts


def build_open_clip_model(model_config: str | os.PathLike | dict | None = None) -> torch.nn.Module:
    """An open_clip ``CLIP`` (randomly initialised, fp32, ``output_dict=True``) for the config."""
    from open_clip.model import CLIP

    return CLIP(**resolve_model_config(model_config), output_dict=True)


def resolve_hps_checkpoint(weights: str | os.PathLike | None, version: str = DEFAULT_VERSION) -> Path:
    """A local HPS ``.pt`` file: ``weights`` as a file, or the version's file inside a folder,
    or downloaded from a hub repo (``None`` -> ``xswu/HPSv2``)."""
    if version not in HPS_FILES:
        raise UserError(f"unknown hpsv2 version '{version}' (expected one of {sorted(HPS_FILES)})")
    filename = HPS_FILES[version]
    if weights is not None and Path(weights).is_file():
        return Path(weights)
    if weights is not None and Path(weights).is_dir():
        path = Path(weights) / filename
        if not path.is_file():
            raise UserError(f"hpsv2 weights folder {weights} has no {filename} (version {version})")
        return path
    repo = HPS_HUB_REPO if weights is None else str(weights)
    if repo.count("/") != 1 or repo.startswith((".", "/")):
        raise UserError(f"hpsv2 weights '{weights}' is not a file, a folder or a hub repo id")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, filename))


def load_hps_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of an HPS file (``{'state_dict': ...}``, a plain state dict also
    accepted), floating tensors cast to fp32. The file is memory-mapped while it is read and
    every tensor copied out, so nothing refers to the file afterwards."""
    checkpoint = read_checkpoint_mapped(path)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not an HPS checkpoint ({{'state_dict': tensors}})")
    return {k: v.to(torch.float32 if v.is_floating_point() else v.dtype, copy=True) for k, v in state.items()}


@register_reward("hpsv2", concurrent_load=True)
def load_hpsv2(
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    *,
    version: str = DEFAULT_VERSION,
    model_config: str | os.PathLike | dict | None = None,
    antialias: bool = False,
    autocast: bool | None = None,
) -> HPSv2Reward:
    """Load HPS v2 (``version="v2.0"``) or v2.1 from ``weights`` (file, folder, hub repo; None =
    ``xswu/HPSv2``). ``model_config``: ``None`` = the ``open_clip_config.json`` beside a local
    checkpoint if there is one, else ViT-H-14; or ``"ViT-H-14"``, ``"tiny"``, a dict or a JSON file."""
    path = resolve_hps_checkpoint(weights, version)
    if model_config is None and (path.parent / MODEL_CONFIG_FILE).is_file():
        model_config = path.parent / MODEL_CONFIG_FILE
    model = build_on_meta(lambda: build_open_clip_model(model_config))  # no random init: every weight is loaded
    try:
        model.load_state_dict(load_hps_state_dict(path), strict=True, assign=True)
    except RuntimeError as exc:
        raise UserError(f"{path} does not fit the hpsv2 model_config: {str(exc).splitlines()[0]}") from None
    restore_causal_mask(model)
    ensure_materialized(model, path)
    model = model.to(device=resolve_device(str(device)), dtype=resolve_dtype(dtype)).eval()
    return HPSv2Reward(model, version=version, antialias=antialias, autocast=autocast).eval()


def make_tiny_hpsv2(
    out_dir: str | os.PathLike,
    seed: int = 0,
    version: str = DEFAULT_VERSION,
    dtype: torch.dtype = torch.float16,
    model_config: str | os.PathLike | dict = "tiny",
) -> Path:
    """Write an HPS checkpoint with seeded random weights in the real file format and name:
    ``out_dir/HPS_v2_compressed.pt`` = ``{'state_dict': ...}`` in ``dtype``, with the architecture
    in ``out_dir/open_clip_config.json`` so ``load_hpsv2(out_dir)`` needs nothing else.
    ``model_config``: ``"tiny"`` (``TINY_HPS_CONFIG``, for tests) or ``"ViT-H-14"`` (the real size)."""
    config = resolve_model_config(model_config)
    torch.manual_seed(seed)
    model = build_open_clip_model(config)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    del model
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / HPS_FILES[version]
    torch.save({"state_dict": state}, path)
    (out / MODEL_CONFIG_FILE).write_text(json.dumps({"model_cfg": config}, indent=2))
    return path


__all__ = [
    "HPS_FILES",
    "MODEL_CONFIG_FILE",
    "HPSv2Reward",
    "TINY_HPS_CONFIG",
    "VIT_H_14_CONFIG",
    "hps_preprocess",
    "load_hpsv2",
    "make_tiny_hpsv2",
    "resize_longest_and_pad",
]
