"""The HTML report on real 512 px generated images: self-contained, and rendered by headless Chromium."""

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from eval.browser_check import browser_check, find_browser, static_check
from eval.config import EvaluateConfig, FinetunedSpec, ModelSpec, PromptSetSpec
from eval.harness import compute_tables
from eval.report import Thumbnails, write_report

METRICS = ["hpsv2", "pickscore"]


@pytest.fixture(scope="module")
def report(shared_data, tmp_path_factory):
    """Prompts with two SiD-LSG images: the first plays the baseline's image, the second the fine-tuned one."""
    root = tmp_path_factory.mktemp("report")
    sid = shared_data / "images" / "sid_lsg"
    manifest = pd.read_csv(sid / "manifest.csv")
    two_images = manifest.groupby("prompt", sort=False).filter(lambda g: len(g) == 2)
    rng = np.random.default_rng(0)
    rows = []
    for k, (prompt, group) in enumerate(list(two_images.groupby("prompt", sort=False))[:4]):
        for model, image in zip(("baseline", "ft"), group.image_path):
            path = f"generations/{model}/general/images/{k:02d}.png"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(sid / image, root / path)
            rows.append({"model": model, "prompt_set": "general", "image_id": f"p{k}_0", "prompt_id": f"p{k}", "prompt": prompt, "index": 0,
                         "seed": 100 + k, "negative_prompt": None if model == "baseline" else "t@y quality", "path": path,
                         **{m: float(rng.normal(0.21 if model == "ft" else 0.2, 0.02)) for m in METRICS}})
    scores = pd.DataFrame(rows)
    cfg = EvaluateConfig(baseline=ModelSpec(path="stabilityai/stable-diffusion-2-1-base"), finetuned={"ft": FinetunedSpec(path="runs/finetune")},
                         prompt_sets={"general": PromptSetSpec(prompts="hpdv2-photo")}, output_dir=str(root), images_per_prompt=1,
                         metrics=METRICS, bootstrap_samples=300, grid_prompts=2, examples_per_metric=1, thumbnail_size=128)
    means, wins = compute_tables(cfg, scores)
    return write_report(cfg, scores, means, wins)


def test_report_is_one_self_contained_file(report):
    result = static_check(report)
    assert result.ok, result.problems
    # two plots, a grid of 2 prompts x 2 models, per metric one gain and one loss pair (at most)
    assert 2 + 4 + 2 <= result.images <= 2 + 4 + 2 * 2 * 2
    assert result.links == 8


def test_static_check_reports_a_file_image_and_a_dead_link(report, tmp_path):
    broken = tmp_path / "broken.html"
    page = report.read_text().replace('src="data:image/jpeg;base64,', 'src="images/x.jpg" data-was="', 1).replace('href="#plots"', 'href="#nowhere"')
    broken.write_text(page)
    problems = static_check(broken).problems
    assert any("not embedded: 'images/x.jpg'" in p for p in problems) and any("'#nowhere'" in p for p in problems)


needs_browser = pytest.mark.skipif(find_browser() is None, reason="headless Chromium not installed (Debian: apt-get install chromium; or set SR_CHROMIUM)")


@needs_browser
def test_report_renders_in_headless_chromium_with_every_image_loaded(report, tmp_path):
    result = browser_check(report, screenshot=tmp_path / "report.png")
    assert result.ok, result.problems
    assert result.images == static_check(report).images and result.links == 8
    with Image.open(result.screenshot) as shot:
        assert shot.width == 1280 and shot.height > 1000
        low, high = shot.convert("L").getextrema()
        assert high - low > 100  # something was drawn, not a blank page


@needs_browser
def test_browser_check_sees_an_image_that_does_not_load(report, tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text(report.read_text().replace('src="data:image/jpeg;base64,', 'src="data:image/jpeg;base64,AAAA', 1))
    problems = browser_check(broken).problems
    assert len(problems) == 1 and problems[0].startswith("image did not load in the browser")


def test_an_unreadable_image_is_shown_as_unreadable(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    figure = Thumbnails(tmp_path, 64).figure("empty.png", "ft 0.25")
    assert "unreadable image empty.png" in figure and "<img" not in figure and "ft 0.25" in figure
