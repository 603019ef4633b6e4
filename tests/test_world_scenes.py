"""The demo world's scenes, captions, prompt splits, pixel reader and hidden taste."""

from __future__ import annotations

import numpy as np
import pytest

from sr_finetune.errors import UserError
from sr_finetune.world.pixels import ATTRIBUTES, fidelity, read_image
from sr_finetune.world.scenes import Prompt, Scene, Shape, all_prompts, parse_caption, prompt_split, render, render_prompt, sample_scene, split_prompts
from sr_finetune.world.taste import taste


def test_the_world_has_a_few_thousand_distinct_captions_in_disjoint_splits():
    prompts = all_prompts()
    texts = [p.text for p in prompts]
    assert len(set(texts)) == len(texts) == 3024
    splits = {s: {p.text for p in split_prompts(s)} for s in ("train", "val", "test")}
    assert sum(len(v) for v in splits.values()) == 3024
    assert not (splits["train"] & splits["test"]) and not (splits["train"] & splits["val"]) and not (splits["val"] & splits["test"])
    assert 0.06 < len(splits["test"]) / 3024 < 0.14
    assert all(prompt_split(t) == "test" for t in splits["test"])


def test_captions_read_as_words_and_parse_back_to_their_attributes():
    assert Prompt(2, "small", "red", "triangle", "blue", "striped").text == "two small red triangles on a blue striped background"
    assert Prompt(1, "large", "white", "circle", "black").text == "a large white circle on a black background"
    assert all(parse_caption(p.text) == p for p in all_prompts())


@pytest.mark.parametrize("text", ["a photo of a cat", "two small red triangle on a blue background", "a small red circle on a red-ish background", ""])
def test_a_caption_outside_the_world_is_a_one_line_error(text):
    with pytest.raises(UserError, match="not a world caption"):
        parse_caption(text)


def test_renders_are_deterministic_in_the_seed_and_vary_between_seeds():
    prompt = parse_caption("three small green squares on a purple checkered background")
    a, b = np.asarray(render_prompt(prompt, 7)), np.asarray(render_prompt(prompt, 7))
    assert a.shape == (32, 32, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, np.asarray(render_prompt(prompt, 8)))
    assert len({sample_scene(prompt, s).shapes for s in range(10)}) == 10


def test_the_pixel_reader_recovers_every_attribute_of_true_renders():
    rng = np.random.default_rng(0)
    prompts = all_prompts()
    for i in range(400):
        prompt = prompts[int(rng.integers(len(prompts)))]
        reading = read_image(render_prompt(prompt, i))
        assert reading.matches(prompt) == dict.fromkeys(ATTRIBUTES, True), (prompt.text, reading)


def test_the_pixel_reader_works_at_64_px_and_fidelity_flags_a_wrong_caption():
    image = render_prompt("two large yellow circles on a blue background", 3, size=64)
    assert image.size == (64, 64)
    assert fidelity(image, "two large yellow circles on a blue background") == 1.0
    assert fidelity(image, "two large yellow squares on a blue background") == 0.0
    assert fidelity(image, "a large yellow circle on a blue background") == 0.0


def test_an_image_without_shapes_reads_as_count_zero_and_has_no_taste():
    empty = Scene(parse_caption("a small red circle on a green background"), (), 0, 0)
    reading = read_image(render(empty))
    assert (reading.count, reading.shape, reading.background) == (0, None, "green")
    assert taste(render(empty)) == 0.0


def test_the_taste_prefers_large_centred_contrasting_subjects():
    prompt = parse_caption("a large white square on a black background")
    centred = Scene(prompt, (Shape("square", 9, 9, 14),), 0, 0)
    corner = Scene(prompt, (Shape("square", 1, 1, 11),), 0, 0)
    dull = Scene(prompt, (Shape("square", 9, 9, 14),), -25, 25)  # darker white on lighter black
    assert taste(render(centred)) > taste(render(corner))
    assert taste(render(centred)) > taste(render(dull))


def test_clutter_does_not_pass_for_taste():
    """Scattered small fragments cover more of the image than one large centred square and centre
    the centroid of them all, but the largest is small and off-centre: the taste ranks them lower."""
    prompt = parse_caption("a large white square on a black background")
    subject = Scene(prompt, (Shape("square", 9, 9, 14),), 0, 0)
    spots = [(1, 1), (25, 1), (1, 25), (25, 25), (13, 1), (13, 25), (1, 13), (25, 13)]
    clutter = Scene(prompt, tuple(Shape("square", x, y, 6) for x, y in spots), 0, 0)
    one, many = read_image(render(subject)), read_image(render(clutter))
    assert many.count == 8 and many.foreground_share > one.foreground_share
    assert many.centre_offset < 0.05 and many.subject_offset > 0.5  # the union is centred, no shape is
    assert (one.subject_extent, many.subject_extent) == (14.0, 6.0)
    assert taste(render(subject)) > taste(render(clutter)) + 0.3
    second = Scene(parse_caption("two large white squares on a black background"), (Shape("square", 9, 9, 14), Shape("square", 1, 25, 6)), 0, 0)
    assert taste(render(second)) == pytest.approx(taste(render(subject)), abs=1e-6)  # a second shape costs nothing


def test_the_taste_varies_within_every_prompt():
    for prompt in split_prompts("train")[:20]:
        values = [taste(render_prompt(prompt, s)) for s in range(8)]
        assert max(values) - min(values) > 0.02, prompt.text
