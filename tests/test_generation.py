import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sr_finetune.commands.cli import main
from sr_finetune.errors import UserError
from sr_finetune.generation import GenerateConfig, generate_images, image_seed, read_manifest, run_generation, shard_items
from sr_finetune.prompts import load_prompts

PROMPTS = ["a red apple on a table", "a lighthouse at dusk, oil painting", "a corgi wearing sunglasses", "an astronaut riding a horse"]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def tiny_cfg(model, prompts, out, **kw) -> GenerateConfig:
    base = dict(model=str(model), prompts=str(prompts), output_dir=str(out), images_per_prompt=2, steps=3, height=32, width=32, batch_size=4, prompts_per_shard=2, device="cpu", negative_prompt="t@y quality")
    base.update(kw)
    return GenerateConfig(**base)


def test_generates_every_image_and_a_complete_manifest(tiny_sd, prompt_file, tmp_path):
    cfg = tiny_cfg(tiny_sd, prompt_file, tmp_path / "gen")
    summary = run_generation(cfg)
    assert (summary.images_made, summary.shards_total) == (8, 2)
    df = read_manifest(cfg.output_dir)
    assert len(df) == 8 and df.image_id.is_unique
    assert {"image_id", "prompt_id", "prompt", "path", "seed", "model", "negative_prompt", "steps", "guidance"} <= set(df.columns)
    assert sorted(set(df.prompt)) == sorted(PROMPTS)
    assert (df.negative_prompt == "t@y quality").all() and (df.steps == 3).all() and (df.guidance == 7.5).all()
    for row in df.itertuples():
        assert row.seed == image_seed(0, row.prompt_id, row.index)
        with Image.open(row.path) as im:
            assert im.size == (32, 32)
    assert sorted(p.name for p in (tmp_path / "gen" / "manifest").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert (tmp_path / "gen" / "config.yaml").read_text().count("steps: 3") == 1


def test_rerun_regenerates_nothing(tiny_sd, prompt_file, tmp_path):
    cfg = tiny_cfg(tiny_sd, prompt_file, tmp_path / "gen")
    run_generation(cfg)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "gen" / "images").rglob("*.png")}
    again = run_generation(cfg)
    assert (again.images_made, again.shards_made, again.shards_done_before) == (0, 0, 2)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "gen" / "images").rglob("*.png")} == before


def test_crashed_shard_resumes_without_redoing_finished_images(tiny_sd, prompt_file, tmp_path):
    cfg = tiny_cfg(tiny_sd, prompt_file, tmp_path / "gen")
    run_generation(cfg)
    complete = read_manifest(cfg.output_dir)
    # Simulate a crash inside shard 1: its manifest part was never written and one image is missing.
    (tmp_path / "gen" / "manifest" / "part-00001.parquet").unlink()
    (tmp_path / "gen" / "manifest.parquet").unlink()
    lost = complete[complete.path.str.contains("/00001/")].path.iloc[0]
    os.remove(lost)
    summary = run_generation(cfg)
    assert (summary.images_made, summary.images_reused, summary.shards_made) == (1, 3, 1)
    pd.testing.assert_frame_equal(read_manifest(cfg.output_dir), complete)


def test_same_seed_same_bytes_and_images_regenerate_alone(tiny_sd, prompt_file, tmp_path):
    a = tiny_cfg(tiny_sd, prompt_file, tmp_path / "a")
    b = tiny_cfg(tiny_sd, prompt_file, tmp_path / "b")
    run_generation(a)
    run_generation(b)
    da, db = read_manifest(a.output_dir), read_manifest(b.output_dir)
    for pa, pb in zip(da.path, db.path):
        assert open(pa, "rb").read() == open(pb, "rb").read()
    # Image 1 of prompt 2, regenerated on its own (batch of one), matches the batched one.
    from sr_finetune.models import load_pipeline

    item = next(it for it in shard_items(a, load_prompts(str(prompt_file)), 1) if it.index == 1)
    alone = np.asarray(generate_images(load_pipeline(str(tiny_sd), scheduler="ddim"), a, [item])[0], dtype=np.int16)
    batched = np.asarray(Image.open(tmp_path / "a" / item.path), dtype=np.int16)
    assert np.abs(alone - batched).max() <= 1


def test_several_guidance_scales_take_turns_within_each_prompt(tiny_sd, prompt_file, tmp_path):
    mixed = tiny_cfg(tiny_sd, prompt_file, tmp_path / "mixed", images_per_prompt=3, guidance_scales=[2.0, 9.0])
    run_generation(mixed)
    df = read_manifest(mixed.output_dir)
    assert df.sort_values(["prompt_id", "index"]).guidance.tolist() == [2.0, 9.0, 2.0] * len(PROMPTS)
    # each image is the one a single-scale run makes from the same seed
    for scale in (2.0, 9.0):
        single = tiny_cfg(tiny_sd, prompt_file, tmp_path / f"single{scale}", images_per_prompt=3, guidance_scale=scale)
        run_generation(single)
        same = read_manifest(single.output_dir).set_index("image_id").path
        for row in df[df.guidance == scale].itertuples():
            a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (row.path, same[row.image_id]))
            assert np.abs(a - b).max() <= 1
    assert "guidance_scales" in (tmp_path / "mixed" / "generation.json").read_text()
    with pytest.raises(UserError, match=r"already holds generations made with guidance_scales=\[2.0, 9.0\], not \[2.0, 8.0\]"):
        run_generation(tiny_cfg(tiny_sd, prompt_file, tmp_path / "mixed", images_per_prompt=3, guidance_scales=[2.0, 8.0]))
    with pytest.raises(UserError, match=r"already holds generations made with guidance_scales=\[2.0, 9.0\], not None"):
        run_generation(tiny_cfg(tiny_sd, prompt_file, tmp_path / "mixed", images_per_prompt=3))


def test_seeds_differ_per_prompt_and_index_and_are_stable():
    seeds = {image_seed(0, pid, i) for pid in ("000000", "000001", "x") for i in range(4)}
    assert len(seeds) == 12
    assert image_seed(0, "000000", 0) == image_seed(0, "000000", 0) != image_seed(1, "000000", 0)
    assert all(0 <= s < 2**63 for s in seeds)


def test_changed_settings_on_an_existing_folder_are_refused(tiny_sd, prompt_file, tmp_path):
    run_generation(tiny_cfg(tiny_sd, prompt_file, tmp_path / "gen"))
    with pytest.raises(UserError, match=r"already holds generations made with steps=3, not 4"):
        run_generation(tiny_cfg(tiny_sd, prompt_file, tmp_path / "gen", steps=4))


def test_blank_prompts_are_reported(tiny_sd, tmp_path, caplog):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n\n  \na dog\n")
    summary = run_generation(tiny_cfg(tiny_sd, path, tmp_path / "gen", images_per_prompt=1))
    assert summary.prompts == 2 and summary.prompts_skipped == {"blank prompts": 2}
    assert "skipped 2 blank prompts (rows 1, 2)" in caplog.text
    assert summary.line().startswith("generate: 2 prompts (skipped: 2 blank prompts), ")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["prompts=/nonexistent/prompts.txt"], "prompt file not found: /nonexistent/prompts.txt"),
        (["prompts=EMPTY"], "no usable prompts"),
        (["prompts=BLANK"], "no usable prompts (BLANK: skipped 2 blank prompts"),
        (["stepz=3"], "unknown key 'generate.stepz'"),
        (["steps=ten"], "bad value for 'generate.steps'"),
        ([], "generate.prompts is required"),
    ],
)
def test_cli_bad_input_is_one_line_naming_the_culprit(tmp_path, capsys, overrides, expected):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\n")
    overrides = [o.replace("EMPTY", str(tmp_path / "empty.txt")).replace("BLANK", str(tmp_path / "blank.txt")) for o in overrides]
    code = main(["generate", f"output_dir={tmp_path / 'out'}", "device=cpu", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert expected.replace("BLANK", str(tmp_path / "blank.txt")) in err
    assert len(err.splitlines()) == 1


def test_two_processes_write_two_parts_with_each_image_once(tiny_sd, prompt_file, tmp_path):
    from conftest import REPO, launch_two_cpu_processes

    out = tmp_path / "gen"
    result = launch_two_cpu_processes(
        [
            str(REPO / "recipes" / "generate.py"),
            f"model={tiny_sd}", f"prompts={prompt_file}", f"output_dir={out}",
            "images_per_prompt=2", "steps=2", "height=32", "width=32", "prompts_per_shard=2", "device=cpu",
        ],
        port=29517,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    parts = sorted((out / "manifest").glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet"]
    frames = [pd.read_parquet(p) for p in parts]
    assert set(frames[0].image_id).isdisjoint(frames[1].image_id)
    merged = read_manifest(out)
    assert len(merged) == 8 and merged.image_id.is_unique
    assert all(os.path.exists(p) for p in merged.path)
    assert "generate [1/2]" in result.stderr  # the second rank really ran


def test_single_process_cpu_launch_is_explained(monkeypatch, caplog):
    from sr_finetune.distributed import warn_if_single_cpu_launch

    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert warn_if_single_cpu_launch()
    assert "accelerate launch --multi_gpu --num_processes N" in caplog.text
