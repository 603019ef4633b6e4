"""The demo world's scenes, captions, prompt splits, pixel reader and hidden taste."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from sr_finetune.errors import UserError
from sr_finetune.world.pixels import ATTRIBUTES, PALETTE, fidelity, palette_labels, read_image
from sr_finetune.world.scenes import GAP, IMAGE_SIZE, MARGIN, SIZE_RANGES, Prompt, Scene, Shape, _rng, all_prompts, parse_caption, prompt_split, render, render_prompt, sample_scene, split_prompts
from sr_finetune.world.taste import resolve_taste

taste = resolve_taste("large-centred")  # the shipped taste


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


def _scene_one_pair_at_a_time(prompt: Prompt, seed: int) -> Scene:
    """The placement loop written plainly: one candidate position drawn and checked at a time."""
    rng = _rng(seed, prompt.text)
    lo, hi = SIZE_RANGES[prompt.size]
    extents = [int(rng.integers(lo, hi + 1)) for _ in range(prompt.count)]
    boxes = []
    while len(boxes) < prompt.count:
        e = extents[len(boxes)]
        for _ in range(200):
            x0, y0 = (int(v) for v in rng.integers(MARGIN, IMAGE_SIZE - MARGIN - e + 1, size=2))
            if all(x0 + e + GAP <= bx or bx + be + GAP <= x0 or y0 + e + GAP <= by or by + be + GAP <= y0 for bx, by, be in boxes):
                boxes.append((x0, y0, e))
                break
        else:
            extents, boxes = [max(lo, e - 1) for e in extents], []
    fg_shift, bg_shift = (int(v) for v in rng.integers(-25, 26, size=2))
    return Scene(prompt, tuple(Shape(prompt.shape, x0, y0, e) for x0, y0, e in boxes), fg_shift, bg_shift)


def test_scenes_are_those_of_the_plain_one_position_at_a_time_loop():
    prompts = all_prompts()
    crowded = [p for p in prompts if p.count == 3 and p.size == "large"]  # where placements get rejected and shrink
    rng = np.random.default_rng(1)
    cases = [(prompts[int(i)], int(s)) for i, s in zip(rng.integers(len(prompts), size=300), rng.integers(2**62, size=300))]
    cases += [(p, s) for p in crowded[::4] for s in range(3)]
    shrunk = 0
    for prompt, seed in cases:
        scene = sample_scene(prompt, seed)
        assert scene == _scene_one_pair_at_a_time(prompt, seed), (prompt.text, seed)
        boxes = [(s.x0, s.y0, s.extent) for s in scene.shapes]
        assert all(MARGIN <= x and x + e <= IMAGE_SIZE - MARGIN and MARGIN <= y and y + e <= IMAGE_SIZE - MARGIN for x, y, e in boxes)
        for i, (ax, ay, ae) in enumerate(boxes):
            assert all(ax + ae + GAP <= bx or bx + be + GAP <= ax or ay + ae + GAP <= by or by + be + GAP <= ay for bx, by, be in boxes[:i])
        first_draw = _rng(seed, prompt.text)
        shrunk += sum(s.extent for s in scene.shapes) < sum(int(first_draw.integers(SIZE_RANGES[prompt.size][0], SIZE_RANGES[prompt.size][1] + 1)) for _ in scene.shapes)
    assert shrunk > 0  # the no-room branch (shrink and start over) ran too


def test_palette_labels_are_the_nearest_palette_colour_of_every_pixel():
    pixels = np.random.default_rng(0).integers(0, 256, size=(24, 20, 3), dtype=np.uint8)
    direct = ((pixels[:, :, None, :].astype(np.float32) - PALETTE[None, None]) ** 2).sum(-1).argmin(-1)
    assert np.array_equal(palette_labels(pixels), direct)


def test_the_subject_offset_is_the_largest_shapes_centre_of_mass():
    image = render_prompt("three small green squares on a purple checkered background", 5)
    reading = read_image(image)
    labels = palette_labels(np.asarray(image))
    foreground = labels != labels[0, 0]
    components, n = ndimage.label(foreground)
    largest = 1 + int(np.argmax(ndimage.sum_labels(foreground, components, np.arange(1, n + 1))))
    sy, sx = ndimage.center_of_mass(foreground, components, largest)
    assert reading.subject_offset == pytest.approx(np.hypot(sy - 15.5, sx - 15.5) / np.hypot(15.5, 15.5), abs=1e-12)


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
