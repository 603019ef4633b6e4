"""The world's evaluation-only scorers, the eval-only mark, and the world CLIP as a scorer backbone."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from reward import load_reward
from reward.world_clip import ClipTrainConfig, WORLD_CLIP, caption_matches, materialize_world_clip, pack_world_clip, train_world_clip
from sr_finetune.errors import UserError
from sr_finetune.eval_only import eval_only_metrics, mark_table
from sr_finetune.pairs import PairsConfig, PairsError, read_scores_table, select_pairs
from sr_finetune.world.pixels import fidelity
from sr_finetune.world.scenes import render_prompt, split_prompts
from sr_finetune.world.taste import resolve_taste

taste = resolve_taste("large-centred")  # the shipped taste

CAPTIONS = ["two small red triangles on a blue background", "a large white circle on a black striped background", "three large cyan squares on a purple checkered background"]


def _world_record(folder, taste_name: str = "large-centred"):
    (folder / "community.json").write_text(json.dumps({"taste": taste_name}))
    return folder


def test_world_judge_is_the_recorded_taste_from_pixels(tmp_path):
    images = [render_prompt(c, s) for c in CAPTIONS for s in range(3)]
    scores = load_reward("world_judge", weights=_world_record(tmp_path)).score_images(images, ["ignored"] * len(images))
    torch.testing.assert_close(scores, torch.tensor([taste(im) for im in images]), rtol=0, atol=1e-6)


def test_world_fidelity_is_one_for_the_true_caption_zero_for_another_and_nan_outside_the_world():
    images = [render_prompt(c, 1) for c in CAPTIONS]
    scorer = load_reward("world_fidelity")
    assert scorer.score_images(images, CAPTIONS).tolist() == [1.0, 1.0, 1.0]
    assert scorer.score_images(images, CAPTIONS[1:] + CAPTIONS[:1]).tolist() == [0.0, 0.0, 0.0]
    assert math.isnan(scorer.score_images(images[:1], ["a photo of a cat"]).item())
    assert [fidelity(im, c) for im, c in zip(images, CAPTIONS)] == [1.0, 1.0, 1.0]


def test_world_fidelity_takes_no_weights():
    with pytest.raises(UserError, match="takes no weights"):
        load_reward("world_fidelity", weights="some/file.pt")


def test_the_world_scorers_are_marked_eval_only_and_the_others_are_not():
    load_reward("world_fidelity")  # imports the registry
    assert {"world_judge", "world_fidelity"} <= eval_only_metrics()
    assert not {"clip", "social_reward", "hpsv2"} & eval_only_metrics()


def test_build_pairs_refuses_an_eval_only_reward_column_even_from_a_file(tmp_path):
    load_reward("world_fidelity")
    manifest = pd.DataFrame([{"image_id": f"i{k}", "prompt_id": "p", "prompt": CAPTIONS[0], "path": f"/nowhere/{k}.png"} for k in range(2)])
    scores = mark_table(pd.DataFrame({"image_id": ["i0", "i1"], "world_judge": [0.2, 0.7], "clip": [0.1, 0.3]}), ["world_judge", "clip"])
    scores.to_parquet(tmp_path / "scores.parquet", index=False)
    with pytest.raises(PairsError, match="'world_judge' is an evaluation-only metric"):
        select_pairs(manifest, scores, PairsConfig(reward_column="world_judge"), check_files=False)
    from_file = read_scores_table(tmp_path / "scores.parquet", "world_judge")
    assert from_file.attrs["eval_only_metrics"] == ["world_judge"]
    import sr_finetune.eval_only as marks

    registered = set(marks._EVAL_ONLY)
    marks._EVAL_ONLY.clear()  # a process that never imported the scorers still refuses, from the file's mark
    try:
        with pytest.raises(PairsError, match="evaluation-only"):
            select_pairs(manifest, from_file, PairsConfig(reward_column="world_judge"), check_files=False)
    finally:
        marks._EVAL_ONLY.update(registered)
    pairs, _ = select_pairs(manifest, scores, PairsConfig(reward_column="clip"), check_files=False)
    assert len(pairs) == 2


def test_caption_matches_counts_repeated_captions_as_matches():
    targets = caption_matches(["a", "b", "a"])
    torch.testing.assert_close(targets, torch.tensor([[0.5, 0, 0.5], [0, 1, 0], [0.5, 0, 0.5]]))


@pytest.fixture(scope="module")
def world_clip(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip")
    return out, train_world_clip(ClipTrainConfig(str(out), steps=2, batch_size=4, checkpoint_every=1, threads=1))


def test_the_world_clip_loads_as_the_clip_and_social_reward_scorers(world_clip):
    _, weights = world_clip
    images = [render_prompt(c, 0) for c in CAPTIONS]
    for name in ("clip", "social_reward"):
        scorer = load_reward(name, weights=str(weights))
        assert scorer.backbone.image_size == WORLD_CLIP["image_size"] and scorer.backbone.context_length == WORLD_CLIP["context_length"]
        scores = scorer.score_images(images, CAPTIONS)
        assert scores.shape == (3,) and torch.isfinite(scores).all() and scores.abs().max() <= 1


def test_world_clip_training_resumes_and_refuses_a_fresh_run_over_a_checkpoint(world_clip):
    out, weights = world_clip
    with pytest.raises(UserError, match="pass --resume"):
        train_world_clip(ClipTrainConfig(str(out), steps=2, batch_size=4, threads=1))
    before = weights.read_bytes()
    train_world_clip(ClipTrainConfig(str(out), steps=2, batch_size=4, checkpoint_every=1, threads=1), resume=True)  # nothing left to do
    assert weights.read_bytes() == before


def test_packed_world_clip_materializes_to_the_same_scores(world_clip, tmp_path):
    _, weights = world_clip
    pack_world_clip(weights, tmp_path / "assets")
    restored = materialize_world_clip(tmp_path / "clip.safetensors", tmp_path / "assets")
    images = [render_prompt(p, 0) for p in split_prompts("test")[:4]]
    prompts = [p.text for p in split_prompts("test")[:4]]
    a = load_reward("clip", weights=str(weights), share_backbone=False).score_images(images, prompts)
    b = load_reward("clip", weights=str(restored), share_backbone=False).score_images(images, prompts)
    torch.testing.assert_close(a, b, atol=2e-3, rtol=0)  # fp16 storage


def test_the_shipped_world_weights_materialize_and_load(tmp_path):
    from diffusers import StableDiffusionPipeline

    from sr_finetune.world.assets import ASSETS_DIR, materialize_pipeline

    pipe = StableDiffusionPipeline.from_pretrained(materialize_pipeline(tmp_path / "model", ASSETS_DIR))
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert list(pipe.unet.config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]  # plain at 16x16
    assert list(pipe.unet.config.up_block_types) == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    clip = load_reward("social_reward", weights=str(materialize_world_clip(tmp_path / "clip.safetensors", ASSETS_DIR)))
    images = [render_prompt(c, 0) for c in CAPTIONS]
    scores = clip.score_images(images * 3, [c for c in CAPTIONS for _ in range(3)]).reshape(3, 3)  # [caption, image]
    assert (scores.argmax(0) == torch.arange(3)).all()  # the trained CLIP prefers each render's own caption
