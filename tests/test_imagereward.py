"""ImageReward scorer: tokenisation, preprocessing, checkpoint layout and score formula pinned
against the reference (THUDM/ImageReward, SCORERS.md section 5), on a tiny BLIP written in the
real ``ImageReward.pt`` + ``med_config.json`` format."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import reward
from reward.imagereward import (
    REWARD_MEAN,
    REWARD_STD,
    TINY_MED_CONFIG,
    TINY_VISION_CONFIG,
    ImageRewardModel,
    load_imagereward,
    make_tiny_imagereward,
)
from sr_finetune.errors import UserError

from conftest import IMAGE_MODES, image_in_mode, openai_clip_reference_transform

DEMO_PROMPT = "a painting of an ocean with clouds and birds, day time, low depth field effect"
CLS, SEP, PAD = 101, 102, 0


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_imagereward(tmp_path_factory.mktemp("imagereward"), seed=0)


@pytest.fixture(scope="module")
def model(tiny_dir) -> ImageRewardModel:
    return reward.load_reward("imagereward", weights=tiny_dir)


@pytest.fixture(scope="module")
def demo_images(shared_data) -> list[Image.Image]:
    paths = sorted((shared_data / "images" / "imagereward_demo").glob("*.webp"))
    assert len(paths) == 4
    return [Image.open(p) for p in paths]


@pytest.fixture(scope="module")
def long_prompt(shared_data, model) -> str:
    """A real DiffusionDB prompt of more than 35 WordPiece tokens."""
    rows = json.loads((shared_data / "prompts" / "diffusiondb_sample" / "refl_data.json").read_text())
    return next(r["text"] for r in rows if len(model.tokenizer.tokenize(r["text"])) > 50)


def copy_tiny(tiny_dir: Path, dest: Path, edit=None) -> Path:
    """A copy of the tiny folder, its state dict passed through ``edit`` first."""
    dest.mkdir()
    shutil.copy(tiny_dir / "med_config.json", dest / "med_config.json")
    state = torch.load(tiny_dir / "ImageReward.pt", weights_only=True)
    torch.save(edit(state) if edit else state, dest / "ImageReward.pt")
    return dest


# ---------------------------------------------------------------------------------- text


def test_tokenize_gives_bert_uncased_ids_with_cls_first_and_pads_to_35(model):
    enc = model.tokenize([DEMO_PROMPT])
    ids, mask = enc["input_ids"][0].tolist(), enc["attention_mask"][0].tolist()
    words = [1037, 4169, 1997, 2019, 4153, 2007, 8044, 1998, 5055, 1010, 2154, 2051, 1010, 2659, 5995, 2492, 3466]
    assert ids[0] == CLS and ids[1:2] == [1037] and ids[2] == 4169  # "a", "painting"
    assert ids == [CLS, *words, SEP] + [PAD] * (35 - len(words) - 2)
    assert mask == [1] * (len(words) + 2) + [0] * (35 - len(words) - 2)


def test_tokenize_truncates_a_long_real_prompt_to_35_ending_with_sep(model, long_prompt):
    ids = model.tokenize([long_prompt, "a cat"])["input_ids"]
    assert ids.shape == (2, 35) and ids.dtype == torch.long
    full = model.tokenizer(long_prompt)["input_ids"]
    assert len(full) > 35
    assert ids[0].tolist() == full[:34] + [SEP]
    assert ids[1, :4].tolist() == [CLS, 1037, 4937, SEP] and (ids[1, 4:] == PAD).all()


def test_tokenizer_is_bert_uncased_plus_dec_bos_and_enc(model):
    tok = model.tokenizer
    assert len(tok) == 30524 == TINY_MED_CONFIG["vocab_size"]
    assert tok.bos_token == "[DEC]" and tok.bos_token_id == 30522
    assert tok.convert_tokens_to_ids("[ENC]") == 30523
    assert tok.tokenize("Photo of an ÉLÉPHANT") == ["photo", "of", "an", "elephant"]  # lower-cased, accents stripped


# ------------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("mode", IMAGE_MODES)
def test_preprocess_is_bit_identical_to_the_openai_clip_transform_in_every_image_mode(model, mode):
    """ImageReward copies openai/CLIP's ``_transform``; exact by construction (PIL integer ops,
    ToTensor + Normalize as tables of their own values)."""
    for i, size in enumerate([(517, 300), (300, 301), (640, 480)]):
        image = image_in_mode(mode, *size, seed=i)
        pixels = model.preprocess_image(image)
        assert pixels.shape == (3, 224, 224)
        assert torch.equal(pixels, openai_clip_reference_transform(224)(image)), size


# ------------------------------------------------------------------------ checkpoint layout

# Names as the reference's modules create them (ImageReward.py, BLIP/blip_pretrain.py, vit.py,
# med.py), with the tiny sizes: ViT width 128 at 224 px / patch 16, text hidden 64, MLP 64 -> ... -> 1.
REFERENCE_KEYS = {
    "blip.visual_encoder.cls_token": (1, 1, 128),
    "blip.visual_encoder.pos_embed": (1, 197, 128),
    "blip.visual_encoder.patch_embed.proj.weight": (128, 3, 16, 16),
    "blip.visual_encoder.blocks.0.norm1.weight": (128,),
    "blip.visual_encoder.blocks.0.attn.qkv.weight": (384, 128),
    "blip.visual_encoder.blocks.0.attn.qkv.bias": (384,),
    "blip.visual_encoder.blocks.0.attn.proj.weight": (128, 128),
    "blip.visual_encoder.blocks.1.mlp.fc1.weight": (512, 128),
    "blip.visual_encoder.blocks.1.mlp.fc2.bias": (128,),
    "blip.visual_encoder.blocks.1.norm2.bias": (128,),
    "blip.visual_encoder.norm.weight": (128,),
    "blip.text_encoder.embeddings.word_embeddings.weight": (30524, 64),
    "blip.text_encoder.embeddings.position_embeddings.weight": (512, 64),
    "blip.text_encoder.embeddings.LayerNorm.bias": (64,),
    "blip.text_encoder.embeddings.position_ids": (1, 512),
    "blip.text_encoder.encoder.layer.0.attention.self.query.weight": (64, 64),
    "blip.text_encoder.encoder.layer.0.attention.self.key.bias": (64,),
    "blip.text_encoder.encoder.layer.0.attention.output.dense.weight": (64, 64),
    "blip.text_encoder.encoder.layer.0.attention.output.LayerNorm.weight": (64,),
    "blip.text_encoder.encoder.layer.1.crossattention.self.query.weight": (64, 64),
    "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight": (64, 128),  # encoder_width = ViT width
    "blip.text_encoder.encoder.layer.1.crossattention.self.value.weight": (64, 128),
    "blip.text_encoder.encoder.layer.1.crossattention.output.LayerNorm.bias": (64,),
    "blip.text_encoder.encoder.layer.1.intermediate.dense.weight": (128, 64),
    "blip.text_encoder.encoder.layer.1.output.dense.weight": (64, 128),
    "blip.text_encoder.encoder.layer.1.output.LayerNorm.weight": (64,),
    "blip.vision_proj.weight": (256, 128),
    "blip.text_proj.weight": (256, 64),
    "mlp.layers.0.weight": (1024, 64),
    "mlp.layers.2.weight": (128, 1024),
    "mlp.layers.4.weight": (64, 128),
    "mlp.layers.6.weight": (16, 64),
    "mlp.layers.7.weight": (1, 16),
    "mlp.layers.7.bias": (1,),
}


def test_tiny_checkpoint_has_the_reference_key_names_and_shapes(tiny_dir, model):
    state = torch.load(tiny_dir / "ImageReward.pt", map_location="cpu", weights_only=True)
    assert {k: tuple(state[k].shape) for k in REFERENCE_KEYS if k in state} == REFERENCE_KEYS
    assert not any(k.startswith("blip.text_encoder.pooler") or "token_type" in k for k in state)
    # the scorer's own state dict is the file minus BLIP's parts the score does not use
    unused = {k for k in state if k.startswith(("blip.vision_proj", "blip.text_proj")) or k.endswith("position_ids")}
    assert set(model.state_dict()) == set(state) - unused
    assert json.loads((tiny_dir / "med_config.json").read_text())["encoder_width"] == 768  # as published


def test_vision_sizes_are_read_from_the_checkpoint_and_encoder_width_follows_the_vit(model):
    assert model.blip.vision_config == TINY_VISION_CONFIG  # 64-dim heads: 128 wide -> 2 heads
    assert model.blip.text_config.encoder_width == 128  # med_config says 768; BLIP overwrites it
    with torch.no_grad():
        tokens = model.blip.visual_encoder(torch.zeros(2, 3, 224, 224))
    assert tokens.shape == (2, 197, 128)  # class token + 14 x 14 patches, all kept


def test_missing_essential_weights_are_a_clear_error(tiny_dir, tmp_path):
    def drop(state):
        gone = ("mlp.", "blip.visual_encoder.blocks.0.attn.", "blip.text_encoder.encoder.layer.1.crossattention.")
        return {k: v for k, v in state.items() if not k.startswith(gone)}

    folder = copy_tiny(tiny_dir, tmp_path / "broken", drop)
    with pytest.raises(UserError, match=r"lacks 24 ImageReward weights.*vision encoder: 4 .*text encoder: 10 .*MLP head: 10 "):
        load_imagereward(folder)


def test_unused_reference_keys_load_quietly_and_unknown_keys_are_reported(tiny_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="reward.imagereward"):
        load_imagereward(tiny_dir)
    assert not caplog.records  # vision_proj / text_proj / position_ids are known to be unused
    folder = copy_tiny(tiny_dir, tmp_path / "extra", lambda s: {**s, "blip.itm_head.weight": torch.zeros(2, 64)})
    with caplog.at_level(logging.WARNING, logger="reward.imagereward"):
        load_imagereward(folder)
    assert "blip.itm_head.weight" in caplog.text


def test_a_med_config_that_does_not_fit_the_weights_is_a_user_error(tiny_dir, tmp_path):
    folder = copy_tiny(tiny_dir, tmp_path / "misfit")
    (folder / "med_config.json").write_text(json.dumps({**TINY_MED_CONFIG, "hidden_size": 32, "num_attention_heads": 1}))
    with pytest.raises(UserError, match="does not fit"):
        load_imagereward(folder)
    (folder / "med_config.json").unlink()
    with pytest.raises(UserError, match="med config"):
        load_imagereward(folder)


def test_a_weights_path_that_does_not_exist_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a file, a folder or a hub repo id"):
        load_imagereward(tmp_path / "nowhere" / "ImageReward.pt")


def test_a_checkpoint_file_path_loads_with_its_sibling_med_config(tiny_dir, model):
    other = load_imagereward(tiny_dir / "ImageReward.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(value, other.state_dict()[key])


# ------------------------------------------------------------------------------ the model


def test_text_encoder_without_image_equals_transformers_bert(model):
    """med's text mode is plain BERT: transformers' BertModel (token-type embeddings zeroed, the
    cross-attention weights dropped) with our weights gives the same states."""
    from transformers import BertConfig, BertModel

    text = model.blip.text_encoder
    config = BertConfig(**{k: v for k, v in TINY_MED_CONFIG.items() if k not in ("add_cross_attention", "encoder_width")})
    bert = BertModel(config, add_pooling_layer=False).eval()
    weights = {k: v for k, v in text.state_dict().items() if ".crossattention." not in k}
    missing, unexpected = bert.load_state_dict(weights, strict=False)
    assert [k for k in missing if "position_ids" not in k] == ["embeddings.token_type_embeddings.weight"] and not unexpected
    torch.nn.init.zeros_(bert.embeddings.token_type_embeddings.weight)
    enc = model.tokenize([DEMO_PROMPT, "a cat"])
    with torch.no_grad():
        ours = text(enc["input_ids"], enc["attention_mask"])
        theirs = bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    valid = enc["attention_mask"].bool()
    assert torch.allclose(ours[valid], theirs[valid], atol=1e-5)


def test_cross_attention_is_softmax_over_all_image_tokens_of_the_row(model):
    """One med layer written out by hand: self-attention, cross-attention (keys/values from the
    image tokens' full width), feed-forward, each with a post-LayerNorm residual."""
    layer = model.blip.text_encoder.encoder.layer[0]
    gen = torch.Generator().manual_seed(0)
    hidden, image = torch.randn(2, 35, 64, generator=gen), torch.randn(2, 197, 128, generator=gen)
    mask = torch.ones(2, 35)
    mask[1, 10:] = 0

    def attend(attention, x, context, additive):
        heads = 2
        q, k, v = (f(c).view(2, c.shape[1], heads, 32).transpose(1, 2) for f, c in
                   ((attention.self.query, x), (attention.self.key, context), (attention.self.value, context)))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(32) + additive, dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(2, x.shape[1], 64)
        return attention.output.LayerNorm(attention.output.dense(out) + x)

    with torch.no_grad():
        x = attend(layer.attention, hidden, hidden, (1 - mask[:, None, None, :]) * -10000.0)
        x = attend(layer.crossattention, x, image, 0.0)
        expected = layer.output.LayerNorm(layer.output.dense(torch.nn.functional.gelu(layer.intermediate.dense(x))) + x)
        got = layer(hidden, (1 - mask[:, None, None, :]) * -10000.0, image, None)
    assert torch.allclose(got, expected, atol=1e-5)


def test_score_is_the_normalised_affine_mlp_of_the_cls_state(model, demo_images):
    pixels = torch.stack([model.preprocess_image(im) for im in demo_images[:2]])
    text = model.tokenize([DEMO_PROMPT, "a cat"])
    with torch.no_grad():
        image_tokens = model.blip.visual_encoder(pixels)
        states = model.blip.text_encoder(text["input_ids"], text["attention_mask"], image_tokens, torch.ones(2, 197, dtype=torch.long))
        cls = states[:, 0, :].float()
        # no activations in the head: in eval it is one affine map, 64 -> 1
        weight, bias = torch.eye(64), torch.zeros(64)
        for linear in [m for m in model.mlp.layers if isinstance(m, torch.nn.Linear)]:
            weight, bias = weight @ linear.weight.T, bias @ linear.weight.T + linear.bias
        expected = ((cls @ weight + bias).squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
        scores = model.score(pixels, text)
    assert (REWARD_MEAN, REWARD_STD) == (0.16717362830052426, 1.0333394966054072)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    assert torch.allclose(scores, expected, atol=1e-5)


def test_a_batch_scores_the_same_as_one_image_at_a_time(model, demo_images):
    prompts = [DEMO_PROMPT, DEMO_PROMPT, "a cat", "portrait of an astronaut in a garden, oil painting"]
    batched = model.score_images(demo_images, prompts)
    single = torch.cat([model.score_images([im], [p]) for im, p in zip(demo_images, prompts)])
    assert torch.allclose(batched, single, atol=1e-5)
    assert batched.unique().numel() == 4


def test_bf16_backbone_keeps_the_mlp_head_in_fp32(tiny_dir, model, demo_images):
    half = load_imagereward(tiny_dir, dtype="bf16")
    assert half.blip.visual_encoder.patch_embed.proj.weight.dtype == torch.bfloat16
    assert half.mlp.layers[0].weight.dtype == torch.float32
    scores = half.score_images(demo_images[:2], [DEMO_PROMPT] * 2)
    assert torch.allclose(scores, model.score_images(demo_images[:2], [DEMO_PROMPT] * 2), atol=0.1)


def test_load_reward_scores_the_four_demo_images_end_to_end(tiny_dir, demo_images):
    scorer = reward.load_reward("imagereward", weights=str(tiny_dir))
    assert "imagereward" in reward.available_rewards() and not scorer.training
    scores = scorer.score_images(demo_images, [DEMO_PROMPT] * 4)
    assert scores.shape == (4,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()


def test_a_tokenizer_that_is_not_bert_uncased_is_refused(tmp_path):
    from reward.imagereward import load_blip_tokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat"]) + "\n")
    with pytest.raises(UserError, match="not the bert-base-uncased vocabulary"):
        load_blip_tokenizer(vocab)
