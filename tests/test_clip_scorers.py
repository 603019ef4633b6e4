"""Social Reward, CLIP score and LAION aesthetic scorers: preprocessing, tokenisation and score
formulas pinned against hand-computed values, on tiny OpenAI-layout CLIPs written in every
checkpoint format a user hands us (plain / wrapped state dict, safetensors, TorchScript)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import reward
from reward.clip_scorers import AESTHETIC_FILENAME, AESTHETIC_HUB_FILE, AestheticHead, l2_normalize_keep_zero, make_tiny_aesthetic_head
from reward.openai_clip import TINY_OPENAI_CLIP, is_torchscript_archive, make_tiny_openai_clip, read_openai_state_dict
from reward.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from sr_finetune.errors import UserError

from conftest import IMAGE_MODES, image_in_mode, openai_clip_reference_transform, real_image_files

MEAN = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]
STD = torch.tensor(OPENAI_CLIP_STD)[:, None, None]
SOT, EOT = 49406, 49407
EMBED = TINY_OPENAI_CLIP["embed_dim"]
SUFFIX = {"state_dict": "pth", "wrapped": "pth", "safetensors": "safetensors", "torchscript": "pt"}


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "P":
        image = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L").convert("P")
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tolist())
        return image
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def by_hand(image: Image.Image, resized: tuple[int, int], left: int, top: int) -> torch.Tensor:
    """Resize to ``resized`` (w, h) with PIL bicubic, crop 224 at (left, top), *then* RGB,
    divide by 255, CLIP mean/std."""
    cropped = image.resize(resized, Image.BICUBIC).crop((left, top, left + 224, top + 224)).convert("RGB")
    pixels = torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - MEAN) / STD


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    """The same tiny CLIP (seed 0) in every checkpoint format."""
    root = tmp_path_factory.mktemp("tiny_clip")
    return {fmt: make_tiny_openai_clip(root / f"clip_{fmt}.{suffix}", seed=0, fmt=fmt) for fmt, suffix in SUFFIX.items()}


@pytest.fixture(scope="module")
def head_file(tmp_path_factory) -> Path:
    return make_tiny_aesthetic_head(tmp_path_factory.mktemp("aesthetic") / AESTHETIC_FILENAME, embed_dim=EMBED, seed=0)


@pytest.fixture(scope="module")
def clip(tiny_files):
    return reward.load_reward("clip", weights=tiny_files["state_dict"])


@pytest.fixture(scope="module")
def aesthetic(tiny_files, head_file):
    return reward.load_reward("aesthetic", weights=head_file, clip_weights=tiny_files["state_dict"])


@pytest.fixture(scope="module")
def long_prompt(shared_data) -> str:
    """A real DiffusionDB prompt of more than 100 words (far beyond 77 tokens)."""
    rows = json.loads((shared_data / "prompts" / "diffusiondb_sample" / "refl_data.json").read_text())
    return next(r["text"] for r in rows if len(r["text"].split()) >= 100)


@pytest.fixture(scope="module")
def real_images(shared_data) -> list[Image.Image]:
    paths = sorted((shared_data / "images" / "imagereward_demo").glob("*.webp"))
    paths.append(shared_data / "images" / "sid_lsg" / "example_images" / "figure1" / "000000.png")
    assert len(paths) == 5
    return [Image.open(p) for p in paths]


def pixels_and_ids(model, n: int = 3):
    pixels = torch.stack([model.preprocess_image(random_image(260 + 40 * i, 230, seed=i)) for i in range(n)])
    ids = model.tokenize(["a red car", "a watercolor of a fox, highly detailed", "portrait of an astronaut"][:n])
    return pixels, ids


def collapsed_affine(head: AestheticHead) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode head as one affine map x -> x @ W.T + b, composed layer by layer."""
    weight, bias = torch.eye(head.layers[0].in_features, dtype=torch.float64), torch.zeros(head.layers[0].in_features, dtype=torch.float64)
    for layer in head.layers:
        if isinstance(layer, torch.nn.Linear):
            weight, bias = layer.weight.double() @ weight, layer.weight.double() @ bias + layer.bias.double()
    return weight, bias


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize(
    "size, resized, left, top",
    [
        ((500, 300), (373, 224), 74, 0),  # long side int(224*500/300 = 373.33) = 373; crop (149/2 = 74.5) -> 74 (half to even)
        ((300, 500), (224, 373), 0, 74),  # the same, portrait
        ((454, 448), (227, 224), 2, 0),  # excess 3: round(1.5) = 2 (a floor offset would give 1)
        ((458, 448), (229, 224), 2, 0),  # excess 5: round(2.5) = 2 (int(x + 0.5) would give 3)
    ],
)
def test_preprocess_resizes_short_side_truncates_long_side_and_crops_at_round_half_even(clip, size, resized, left, top):
    image = random_image(*size)
    pixels = clip.preprocess_image(image)
    assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.float32
    assert torch.allclose(pixels, by_hand(image, resized, left, top), atol=1e-6)
    shifted = (left + 1, top) if left else (left, top + 1)
    assert not torch.allclose(pixels, by_hand(image, resized, *shifted), atol=1e-3)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L"])
def test_preprocess_converts_to_rgb_after_resize_and_crop(clip, mode):
    image = random_image(300, 260, mode=mode, seed=3)
    pixels = clip.preprocess_image(image)
    assert torch.allclose(pixels, by_hand(image, (258, 224), 17, 0), atol=1e-6)  # 224*300/260 = 258.46
    if mode in ("RGBA", "P"):  # PIL resizes RGBA premultiplied and P by nearest: converting first differs
        assert not torch.allclose(pixels, by_hand(image.convert("RGB"), (258, 224), 17, 0), atol=1e-3)
    if mode == "L":
        grey = pixels * STD + MEAN
        assert torch.allclose(grey[0], grey[1], atol=1e-6) and torch.allclose(grey[1], grey[2], atol=1e-6)


def test_preprocess_normalises_a_known_pixel_with_the_clip_mean_and_std(clip):
    pixels = clip.preprocess_image(Image.new("RGB", (224, 224), (255, 128, 0)))
    expected = [(255 / 255 - 0.48145466) / 0.26862954, (128 / 255 - 0.4578275) / 0.26130258, (0 - 0.40821073) / 0.27577711]
    for channel, value in enumerate(expected):
        assert torch.allclose(pixels[channel], torch.full((224, 224), value), atol=1e-6)


# --------------------------------------------------------------------------- tokenisation


@pytest.mark.parametrize("mode", IMAGE_MODES)
@pytest.mark.parametrize("scorer", ["clip", "aesthetic"])
def test_preprocess_is_bit_identical_to_torchvisions_compose_in_every_image_mode(scorer, mode, request):
    """Exact by construction: PIL's integer resize, crop and conversion, and ToTensor + Normalize
    as tables of their own values."""
    model, reference = request.getfixturevalue(scorer), openai_clip_reference_transform(224)
    for i, size in enumerate([(64, 64), (97, 255), (301, 180), (512, 512), (224, 224)]):
        image = image_in_mode(mode, *size, seed=i)
        assert torch.equal(model.preprocess_image(image), reference(image)), size


def test_preprocess_is_bit_identical_to_torchvisions_compose_on_real_images(clip, shared_data):
    reference = openai_clip_reference_transform(224)
    files = real_image_files(shared_data)
    assert {p.suffix.lower() for p in files} >= {".png", ".jpg", ".webp"}
    for path in files:
        with Image.open(path) as image:
            assert torch.equal(clip.preprocess_image(image), reference(image)), path


def test_tokenize_adds_sot_eot_and_zero_pads_to_77(clip):
    ids = clip.tokenize(["a photo of a cat", "A  photo\nof a CAT &amp;amp; "])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [SOT, 320, 1125, 539, 320, 2368, EOT]  # the real BPE ids
    assert (ids[0, 7:] == 0).all()
    # whitespace collapsed, lowercased, html unescaped twice ("&amp;amp;" -> "&")
    assert torch.equal(ids[1], clip.tokenize(["a photo of a cat &"])[0]) and ids[1, 6] != EOT


def test_tokenize_truncates_a_long_real_prompt_with_eot_forced_last(clip, long_prompt):
    from open_clip.tokenizer import _tokenizer

    bpe = _tokenizer.encode(long_prompt)
    assert len(bpe) > 100
    ids = clip.tokenize([long_prompt])[0]
    assert ids.shape == (77,) and ids[0] == SOT and ids[-1] == EOT
    assert ids[1:76].tolist() == bpe[:75]
    assert int(ids.argmax()) == 76  # the text feature is read at the EOT position


# --------------------------------------------------------------------------- score formulas


def test_clip_score_is_the_raw_cosine_of_encode_image_and_encode_text(clip):
    pixels, ids = pixels_and_ids(clip)
    with torch.no_grad():
        image = clip.backbone.model.encode_image(pixels).double()
        text = clip.backbone.model.encode_text(ids).double()
        scores = clip.score(pixels, ids)
    expected = (image * text).sum(-1) / (image.norm(dim=-1) * text.norm(dim=-1))  # no logit scale
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert torch.allclose(scores.double(), expected, atol=1e-6)


def test_social_reward_scores_like_clip_on_the_same_weights(clip, tiny_files):
    social = reward.load_reward("social_reward", weights=tiny_files["state_dict"], share_backbone=False)
    assert social.name == "social_reward" and social.backbone is not clip.backbone
    pixels, ids = pixels_and_ids(clip)
    with torch.no_grad():
        assert torch.allclose(social.score(pixels, ids), clip.score(pixels, ids), atol=1e-7)


def test_aesthetic_head_in_eval_mode_is_one_affine_map(aesthetic):
    head = aesthetic.head
    assert not head.training and [type(m).__name__ for m in head.layers].count("Linear") == 5
    x = torch.randn(6, EMBED)
    weight, bias = collapsed_affine(head)
    with torch.no_grad():
        assert torch.allclose(head(x).double(), x.double() @ weight.T + bias, atol=1e-6)


def test_aesthetic_score_is_the_head_on_the_l2_normalised_image_embedding(aesthetic):
    pixels, _ = pixels_and_ids(aesthetic)
    weight, bias = collapsed_affine(aesthetic.head)
    with torch.no_grad():
        embedding = aesthetic.backbone.model.encode_image(pixels).double()
        scores = aesthetic.score(pixels, aesthetic.tokenize(["x"] * 3))
    expected = (embedding / embedding.norm(dim=-1, keepdim=True)) @ weight.T + bias
    assert scores.shape == (3,) and torch.allclose(scores.double(), expected.reshape(-1), atol=1e-6)


def test_aesthetic_ignores_the_prompt(aesthetic):
    assert aesthetic.tokenize(["a", "b"]).shape == (2, 0)
    pixels, _ = pixels_and_ids(aesthetic, n=2)
    with torch.no_grad():
        assert torch.equal(aesthetic.score(pixels, aesthetic.tokenize(["a", "b"])), aesthetic.score(pixels, None))


def test_zero_norm_embeddings_stay_zero_instead_of_nan():
    x = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 4.0]])
    assert torch.equal(l2_normalize_keep_zero(x), torch.tensor([[0.0, 0.0, 0.0], [0.6, 0.0, 0.8]]))


def test_aesthetic_of_a_zero_image_embedding_is_the_heads_bias(tiny_files, head_file, tmp_path):
    state = read_openai_state_dict(tiny_files["state_dict"])
    state["visual.proj"] = torch.zeros_like(state["visual.proj"])  # every image embedding is 0
    torch.save(state, tmp_path / "zero_proj.pth")
    model = reward.load_reward("aesthetic", weights=head_file, clip_weights=tmp_path / "zero_proj.pth")
    scores = model.score_images([random_image(300, 240)], [""])
    _, bias = collapsed_affine(model.head)
    assert torch.isfinite(scores).all() and torch.allclose(scores.double(), bias, atol=1e-6)


# --------------------------------------------------------------------------- checkpoint formats


@pytest.mark.parametrize("fmt", ["wrapped", "safetensors", "torchscript"])
def test_every_checkpoint_format_loads_the_same_model(tiny_files, clip, fmt):
    model = reward.load_reward("clip", weights=str(tiny_files[fmt]), share_backbone=False)
    assert next(model.parameters()).dtype == torch.float32  # fp16 archives are cast up, as clip.load(..., "cpu")
    pixels, ids = pixels_and_ids(clip)
    with torch.no_grad():
        assert torch.equal(model.score(pixels, ids), clip.score(pixels, ids))


def test_torchscript_archive_holds_fp16_weights_and_openai_metadata(tiny_files):
    path = tiny_files["torchscript"]
    assert is_torchscript_archive(path) and not is_torchscript_archive(tiny_files["state_dict"])
    raw = torch.jit.load(str(path), map_location="cpu").state_dict()
    assert {"input_resolution", "context_length", "vocab_size"} <= set(raw) and "attn_mask" not in raw  # as OpenAI's archives
    assert raw["visual.proj"].dtype == torch.float16
    state = read_openai_state_dict(path)
    assert "input_resolution" not in state and state.keys() == read_openai_state_dict(tiny_files["state_dict"]).keys()


def test_tiny_state_dict_has_the_openai_key_layout(tiny_files):
    state = read_openai_state_dict(tiny_files["state_dict"])
    for key in ("visual.transformer.resblocks.1.attn.in_proj_weight", "transformer.resblocks.1.mlp.c_fc.weight", "ln_final.weight", "text_projection", "visual.proj", "logit_scale"):
        assert key in state
    assert state["token_embedding.weight"].shape[0] == 49408 and state["positional_embedding"].shape[0] == 77
    assert state["visual.positional_embedding"].shape[0] == (224 // TINY_OPENAI_CLIP["patch_size"]) ** 2 + 1


def test_loading_equals_open_clips_own_openai_loader(tiny_files, clip):
    """open_clip's ``load_openai_model`` (the path of the real ``ViT-L-14.pt``) on the archive gives
    the same model: the tiny weights are fp16-representable, so its fp16 detour is lossless."""
    import open_clip

    theirs = open_clip.load_openai_model(str(tiny_files["torchscript"]), precision="fp32", device="cpu").eval()
    pixels, ids = pixels_and_ids(clip)
    with torch.no_grad():
        # Two separately built modules may take different CPU kernels (attention mask, fused or
        # not) and so different fp32 reduction orders: equal to fp32 rounding, not bit for bit
        # (encode_text 1.8e-6 apart on an AMD EPYC). A wrong weight would be off by ~1e-1.
        torch.testing.assert_close(theirs.encode_image(pixels), clip.backbone.model.encode_image(pixels), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.encode_text(ids), clip.backbone.model.encode_text(ids), rtol=1e-5, atol=1e-5)


def test_real_vit_l_14_architecture_is_read_back_from_its_state_dict_shapes():
    from open_clip.factory import get_model_config
    from open_clip.model import CLIP

    from reward.openai_clip import build_openai_clip, openai_clip_config

    with torch.device("meta"):  # shapes only, no memory
        state = CLIP(**get_model_config("ViT-L-14"), quick_gelu=True).state_dict()
        config = openai_clip_config(state)
        ours = build_openai_clip(config)
    assert config == {"embed_dim": 768, "image_size": 224, "patch_size": 14, "vision_width": 1024, "vision_layers": 24, "context_length": 77, "vocab_size": 49408, "text_width": 768, "text_layers": 12}
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in state.items()}
    assert ours.visual.transformer.resblocks[0].attn.num_heads == 16 and ours.transformer.resblocks[0].attn.num_heads == 12
    assert type(ours.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def test_ddp_module_prefix_is_stripped(tiny_files, clip, tmp_path):
    state = read_openai_state_dict(tiny_files["state_dict"])
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")
    model = reward.load_reward("social_reward", weights=tmp_path / "ddp.pth")
    pixels, ids = pixels_and_ids(clip, n=1)
    with torch.no_grad():
        assert torch.equal(model.score(pixels, ids), clip.score(pixels, ids))


def test_social_reward_without_weights_is_a_one_line_error():
    with pytest.raises(UserError, match="social_reward needs weights") as info:
        reward.load_reward("social_reward")
    assert "\n" not in str(info.value)


def test_files_that_are_not_clip_checkpoints_are_user_errors(head_file, tiny_files, tmp_path):
    with pytest.raises(UserError, match="not an OpenAI-layout CLIP"):
        reward.load_reward("clip", weights=head_file)
    with pytest.raises(UserError, match="neither a file nor a hub spec"):
        reward.load_reward("clip", weights=tmp_path / "missing.pt")
    with pytest.raises(UserError, match="improved-aesthetic-predictor head"):
        reward.load_reward("aesthetic", weights=tiny_files["state_dict"], clip_weights=tiny_files["state_dict"])
    with pytest.raises(UserError, match="expects 16-d embeddings"):
        reward.load_reward("aesthetic", weights=make_tiny_aesthetic_head(tmp_path / "h16.pth", embed_dim=16), clip_weights=tiny_files["state_dict"])


def test_default_weights_are_openai_vit_l_14_and_the_aesthetic_hub_mirror(tiny_files, head_file, monkeypatch, caplog):
    import huggingface_hub
    from open_clip import pretrained

    asked = {}

    def fake_open_clip_download(cfg, **kwargs):
        asked["clip"] = cfg
        return str(tiny_files["torchscript"])

    def fake_hub_download(repo, filename, **kwargs):
        asked["head"] = (repo, filename)
        return str(head_file)

    monkeypatch.setattr(pretrained, "download_pretrained", fake_open_clip_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hub_download)
    with caplog.at_level(logging.WARNING, logger="reward.clip_scorers"):
        model = reward.load_reward("aesthetic", share_backbone=False)
    assert asked["clip"] == pretrained.get_pretrained_cfg("ViT-L-14", "openai") and asked["clip"]["quick_gelu"]
    assert asked["head"] == AESTHETIC_HUB_FILE
    assert "sha256" in caplog.text  # the tiny head is not the published file
    assert model.score_images([random_image(240, 240)], [""]).shape == (1,)


def test_low_precision_keeps_layernorms_in_fp32_like_clip_load_on_cuda(tiny_files, clip):
    model = reward.load_reward("clip", weights=tiny_files["state_dict"], dtype="bf16", share_backbone=False)
    net = model.backbone.model
    assert net.visual.conv1.weight.dtype == torch.bfloat16 and net.text_projection.dtype == torch.bfloat16
    assert net.ln_final.weight.dtype == torch.float32 and net.token_embedding.weight.dtype == torch.float32
    pixels, ids = pixels_and_ids(clip)
    with torch.no_grad():
        assert torch.allclose(model.score(pixels, ids), clip.score(pixels, ids), atol=2e-2)


# --------------------------------------------------------------------------- shared backbone


def count_image_tower_calls(backbone, monkeypatch) -> list:
    calls = []
    original = backbone.model.encode_image
    monkeypatch.setattr(backbone.model, "encode_image", lambda x, **kw: calls.append(len(x)) or original(x, **kw))
    return calls


def test_clip_and_aesthetic_on_the_same_weights_share_one_backbone_and_one_image_pass(clip, aesthetic, monkeypatch):
    assert aesthetic.backbone is clip.backbone
    clip.backbone.clear_cache()
    calls = count_image_tower_calls(clip.backbone, monkeypatch)
    pixels, ids = pixels_and_ids(clip)
    with torch.inference_mode():
        clip.score(pixels, ids)
        aesthetic.score(pixels.clone(), None)  # an equal batch (as preprocessed separately): cached
        assert calls == [3]
        aesthetic.score(pixels[:2], None)  # a different batch: recomputed
        assert calls == [3, 2]
    clip.backbone.clear_cache()
    with torch.enable_grad():  # training never sees cached features
        clip.score(pixels[:1], ids[:1])
        clip.score(pixels[:1], ids[:1])
    assert calls == [3, 2, 1, 1]


def test_the_scoring_run_computes_image_features_once_for_clip_and_aesthetic(clip, aesthetic, real_images, tmp_path, monkeypatch):
    from reward.scoring import score_rows

    paths = []
    for i, image in enumerate(real_images[:3]):
        paths.append(tmp_path / f"{i}.png")
        image.convert("RGB").save(paths[-1])
    rows = pd.DataFrame({"image_id": ["a", "b", "c"], "prompt": ["a cat", "a dog", "a castle"], "path": [str(p) for p in paths]})
    clip.backbone.clear_cache()
    calls = count_image_tower_calls(clip.backbone, monkeypatch)
    scores, errors = score_rows(rows, {"clip": clip, "aesthetic": aesthetic}, batch_size=2, num_workers=0, device=torch.device("cpu"))
    assert calls == [2, 1] and errors.empty
    assert np.allclose(scores.aesthetic, aesthetic.score_images([Image.open(p) for p in paths], [""] * 3).numpy(), atol=1e-6)


# --------------------------------------------------------------------------- real images end to end


@pytest.mark.parametrize("name", ["social_reward", "clip", "aesthetic"])
def test_real_images_score_end_to_end_and_batch_equals_one_by_one(name, tiny_files, head_file, real_images, long_prompt):
    kwargs = {"weights": head_file, "clip_weights": tiny_files["torchscript"]} if name == "aesthetic" else {"weights": tiny_files["torchscript"]}
    model = reward.load_reward(name, device="cpu", dtype="fp32", **kwargs)
    prompts = [long_prompt, "a castle", "a dog on a beach at sunset", "portrait of an astronaut", "fruit"]
    batch = model.score_images(real_images, prompts)
    single = torch.cat([model.score_images([im], [p]) for im, p in zip(real_images, prompts)])
    assert batch.shape == (5,) and batch.dtype == torch.float32 and torch.isfinite(batch).all()
    assert torch.allclose(batch, single, atol=1e-5)
    if name != "aesthetic":
        assert (batch.abs() <= 1).all()  # a raw cosine, no logit scale
