import json

import pytest

from sr_finetune.errors import PromptError
from sr_finetune.prompts import NAMED_PROMPT_SETS, load_prompts


def test_real_prompt_formats(shared_data):
    p = shared_data / "prompts"
    parti = load_prompts(str(p / "parti" / "PartiPrompts.tsv"))
    assert len(parti) == 1632 and parti.prompts[0] == "bond"
    bench = load_prompts(str(p / "imagereward_benchmark" / "benchmark-prompts.json"))
    assert bench.ids[0] == "005695-0057" and bench.prompts[0] == "a concept art of a vehicle, cyberpunk"
    geneval = load_prompts(str(p / "geneval" / "evaluation_metadata.jsonl"))
    assert len(geneval) == 553 and geneval.prompts[0] == "a photo of a bench"
    pick = load_prompts(str(p / "pickapic_subset" / "4k_training_prompts.json"))
    assert pick.prompts[0] == "a cat driving a nuke"
    tifa = load_prompts(str(p / "tifa" / "tifa_v1.0_text_inputs.json"))
    assert tifa.ids[0] == "coco_301091"
    sid = load_prompts(str(shared_data / "images" / "sid_lsg" / "manifest.csv"))
    assert sid.prompts[0].startswith("A distinguished older gentleman")


def test_blank_and_duplicate_prompts_are_reported_not_dropped_silently(shared_data):
    hpd = load_prompts(str(shared_data / "prompts" / "hpdv2_photo" / "hps_v2_all.txt"))
    assert len(hpd) == 750
    assert hpd.skipped == {"blank prompts": [205, 346]}
    assert "skipped 2 blank prompts (rows 205, 346)" in hpd.skip_summary()
    ddb = load_prompts("diffusiondb")
    assert len(ddb) + len(ddb.skipped["duplicate prompts"]) == 10000


def test_columns_are_selectable_and_ids_kept(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("key,caption,other\nk1,a red cube,x\nk2,a blue ball,y\n")
    ps = load_prompts(str(path), column="caption", id_column="key")
    assert ps.ids == ["k1", "k2"] and ps.prompts == ["a red cube", "a blue ball"]
    with pytest.raises(PromptError, match=r"p.csv: no prompt column 'prompt_text' \(columns: key, caption, other\)"):
        load_prompts(str(path), column="prompt_text")


def test_parquet_and_plain_json_list(tmp_path):
    import pandas as pd

    pd.DataFrame({"text": ["one", "two"], "prompt_id": ["a", "b"]}).to_parquet(tmp_path / "p.parquet")
    assert load_prompts(str(tmp_path / "p.parquet")).ids == ["a", "b"]
    (tmp_path / "l.json").write_text(json.dumps(["x", "y", "z"]))
    assert load_prompts(str(tmp_path / "l.json")).ids == ["000000", "000001", "000002"]


def test_empty_id_cells_are_skipped_by_row_and_integer_ids_stay_integers(tmp_path):
    import pandas as pd

    (tmp_path / "p.csv").write_text("id,prompt\n1,a cat\n,a dog\n3,a cow\n  ,a hen\n")
    records = [{"id": 1, "prompt": "a cat"}, {"id": None, "prompt": "a dog"}, {"id": 3, "prompt": "a cow"}, {"prompt": "a hen"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    pd.DataFrame(records).astype({"id": "Int64"}).to_parquet(tmp_path / "p.parquet")
    for name in ("p.csv", "p.jsonl", "p.parquet"):
        ps = load_prompts(str(tmp_path / name))
        assert ps.ids == ["1", "3"] and ps.prompts == ["a cat", "a cow"], name
        assert ps.skipped == {"missing ids": [1, 3]}, name
        assert f"{name}: skipped 2 missing ids (rows 1, 3)" in ps.skip_summary()


def test_bad_sources_give_one_line_errors(tmp_path):
    with pytest.raises(PromptError, match=r"prompt file not found: .*missing.txt"):
        load_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    with pytest.raises(PromptError, match=r"no usable prompts .*skipped 3 blank prompts"):
        load_prompts(str(tmp_path / "blank.txt"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PromptError, match=r"bad.json: cannot read prompts"):
        load_prompts(str(tmp_path / "bad.json"))
    (tmp_path / "dup.csv").write_text("id,prompt\na,x\na,y\n")
    with pytest.raises(PromptError, match="duplicate prompt id 'a' at row 1"):
        load_prompts(str(tmp_path / "dup.csv"))


def test_named_sets_all_load():
    for name in NAMED_PROMPT_SETS:
        assert len(load_prompts(name)) > 0
