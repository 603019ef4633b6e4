"""The preference losses and the trainable-parameter presets of Social Reward training (no training here)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reward.losses import LOSSES, preference_loss
from reward.trainable import PRESETS, apply_preset, describe_trainable, scaled_block_count, trainable_parameter_names


def unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_triplet_loss_is_the_authors_squared_distance_form_and_equals_the_cosine_form():
    torch.manual_seed(0)
    text, pos, neg = (F.normalize(torch.randn(6, 8), dim=1) for _ in range(3))
    got = preference_loss("triplet", text, pos, neg, margin=0.3)
    authors = torch.relu((text - pos).pow(2).sum(1) - (text - neg).pow(2).sum(1) + 0.3)
    cosine_form = torch.relu(2 * ((text * neg).sum(1) - (text * pos).sum(1)) + 0.3)
    torch.testing.assert_close(got, authors)
    torch.testing.assert_close(got, cosine_form, rtol=1e-5, atol=1e-6)


def test_hand_computed_values_of_the_other_losses():
    # one triplet, 2-d: s(t, p) = 1, s(t, n) = 0
    text, pos, neg = unit([1.0, 0.0]), unit([1.0, 0.0]), unit([0.0, 1.0])
    tau = 0.5
    torch.testing.assert_close(preference_loss("infonce", text, pos, neg, temperature=tau), torch.tensor([-math.log(math.exp(2) / (math.exp(2) + 1))]))
    torch.testing.assert_close(preference_loss("supcon", text, pos, neg, temperature=tau), torch.tensor([-math.log(math.exp(2) / (math.exp(2) + 1))]))
    bce = (math.log1p(math.exp(-2)) + math.log1p(math.exp(0))) / 2  # BCE(2, 1) and BCE(0, 0)
    torch.testing.assert_close(preference_loss("bce", text, pos, neg, temperature=tau), torch.tensor([bce]))
    torch.testing.assert_close(preference_loss("reweighted_ce", text, pos, neg, temperature=tau, weights=torch.tensor([3.0])), torch.tensor([3 * math.log1p(math.exp(-2))]))


def test_infonce_and_supcon_differ_by_the_other_prompts_positives():
    # two triplets: prompt 0's positive is also close to prompt 1, which InfoNCE counts against prompt 1 and supcon for it
    text, pos, neg = unit([1.0, 0.0], [0.8, 0.6]), unit([1.0, 0.0], [0.0, 1.0]), unit([-1.0, 0.0], [0.0, -1.0])
    info, sup = preference_loss("infonce", text, pos, neg, temperature=0.1), preference_loss("supcon", text, pos, neg, temperature=0.1)
    assert info[1] > sup[1]


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_is_lower_when_the_positive_scores_higher(name):
    text = unit([1.0, 0.0, 0.0], [0.0, 1.0, 0.0])
    right = preference_loss(name, text, unit([1.0, 0.2, 0.0], [0.2, 1.0, 0.0]), unit([0.0, 0.0, 1.0], [0.0, 0.0, 1.0]), margin=0.3, temperature=0.1)
    wrong = preference_loss(name, text, unit([0.0, 0.0, 1.0], [0.0, 0.0, 1.0]), unit([1.0, 0.2, 0.0], [0.2, 1.0, 0.0]), margin=0.3, temperature=0.1)
    assert right.shape == (2,) and torch.isfinite(right).all() and (right < wrong).all()


def vit_l_14_on_meta():
    from reward.loading import build_on_meta
    from reward.openai_clip import OPENAI_VIT_L_14_CONFIG, build_openai_clip

    return build_on_meta(lambda: build_openai_clip(OPENAI_VIT_L_14_CONFIG))


def test_paper_preset_on_vit_l_14_is_the_authors_parameter_list():
    model = vit_l_14_on_meta()
    names = trainable_parameter_names(model, "visual_upper_layers_textual_upper_layers")
    # train_pair_pos_neg.py: visual.transformer.resblocks[21:], visual.ln_post, transformer.resblocks[10:], ln_final, text_projection
    expected = [n for n, _ in model.named_parameters() if n.startswith(("visual.transformer.resblocks.21.", "visual.transformer.resblocks.22.", "visual.transformer.resblocks.23.", "visual.ln_post.", "transformer.resblocks.10.", "transformer.resblocks.11.", "ln_final.")) or n == "text_projection"]
    assert names == expected and "visual.proj" not in names
    assert describe_trainable(model, "visual_upper_layers_textual_upper_layers").startswith("trainable parameters: 52,")
    deeper = trainable_parameter_names(model, "visual_upper_layers_textual_upper_layers_deeper")
    assert {n.split(".")[3] for n in deeper if n.startswith("visual.transformer.")} == {"20", "21", "22", "23"}
    assert {n.split(".")[2] for n in deeper if n.startswith("transformer.")} == {"9", "10", "11"}
    assert {n.split(".")[3] for n in trainable_parameter_names(model, "visual_last_layer") if n.startswith("visual.transformer.")} == {"23"}
    assert all(n.startswith("visual.") for n in trainable_parameter_names(model, "visual")) and "visual.proj" in trainable_parameter_names(model, "visual")
    assert trainable_parameter_names(model, "all") == [n for n, _ in model.named_parameters() if n != "logit_scale"]


@pytest.mark.parametrize("depth, reference, blocks, expected", [(24, 24, 3, 3), (12, 24, 3, 2), (2, 24, 3, 1), (2, 12, 2, 1), (48, 24, 3, 6), (1, 24, 4, 1)])
def test_block_counts_scale_with_depth(depth, reference, blocks, expected):
    assert scaled_block_count(blocks, reference, depth) == expected


def test_apply_preset_freezes_everything_else():
    from reward.openai_clip import TINY_OPENAI_CLIP, build_openai_clip

    model = build_openai_clip(TINY_OPENAI_CLIP)
    trained = apply_preset(model, "visual_upper_layers")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in model.named_parameters() if n.startswith(("visual.transformer.resblocks.1.", "visual.ln_post."))}
    assert len(trained) == sum(p.requires_grad for p in model.parameters())
    assert set(PRESETS) == {"all", "visual", "visual_upper_layers", "visual_upper_layers_textual_upper_layers", "visual_upper_layers_textual_upper_layers_deeper", "visual_last_layer"}
