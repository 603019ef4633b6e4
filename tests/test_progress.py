"""Progress output: one bar per stage, log lines through it on a terminal, whole lines in logs,
no library loading bars; and the real stages run with stderr on a pipe."""

import contextlib
import io
import logging
import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from sr_finetune.progress import progress, progress_output, quiet_library_bars

PLAIN_LINE = re.compile(r"^[\w\- \[\]/]+: +\d+% \d+/\d+ \w+ \[")
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) [\w.]+: \S")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def screen(text: str) -> list[str]:
    """What a terminal shows after ``text``: carriage return, newline and cursor-up applied."""
    lines, row, col, i = [""], 0, 0, 0
    while i < len(text):
        if text.startswith("\x1b[A", i):
            row, i = max(0, row - 1), i + 3
            continue
        char, i = text[i], i + 1
        if char == "\r":
            col = 0
        elif char == "\n":
            row, col = row + 1, 0
            lines += [""] * (row + 1 - len(lines))
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + char + line[col + 1 :]
            col += 1
    return [line.rstrip() for line in lines if line.strip()]


@contextlib.contextmanager
def on_a_terminal():
    """stderr is a terminal and the root logger writes to it, as after the CLI's logging setup.
    (Inside the test body: pytest sets its own sys.stderr before each test phase.)"""
    fake = FakeTerminal()
    handler = logging.StreamHandler(fake)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.getLogger("sr_finetune.test").setLevel(logging.INFO)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "stderr", fake)
        logging.getLogger().addHandler(handler)
        try:
            yield fake
        finally:
            logging.getLogger().removeHandler(handler)


def test_on_a_terminal_log_lines_go_through_the_bar():
    log = logging.getLogger("sr_finetune.test")
    with on_a_terminal() as terminal, progress_output():
        with progress(desc="stage", total=3, unit="img") as bar:
            bar.update()
            log.info("first shard written")
            bar.update(2)
    shown = screen(terminal.getvalue())
    assert shown[0] == "INFO first shard written"  # a whole line, not appended to the bar
    assert len(shown) == 2 and shown[1].startswith("stage: 100%|") and "3/3" in shown[1]


def test_without_the_redirect_the_same_log_line_lands_inside_the_bar():
    with on_a_terminal() as terminal, progress(desc="stage", total=3, unit="img") as bar:
        bar.update()
        logging.getLogger("sr_finetune.test").info("first shard written")
        bar.update(2)
    assert not any(line == "INFO first shard written" for line in screen(terminal.getvalue()))


def test_on_a_terminal_a_bar_inside_a_stage_is_a_detail_line_cleared_when_done():
    with on_a_terminal() as terminal, progress_output():
        with progress(desc="evaluate", total=2, unit="stage") as outer:
            for step in range(2):
                with progress(desc=f"score {step}", total=4, unit="img") as inner:
                    inner.update(4)
                    logging.getLogger("sr_finetune.test").info(f"scored {step}")
                outer.update()
    shown = screen(terminal.getvalue())
    assert shown[:2] == ["INFO scored 0", "INFO scored 1"]
    assert len(shown) == 3 and shown[2].startswith("evaluate: 100%|")  # the detail bars are gone


def test_in_a_log_file_a_stage_writes_whole_lines_and_its_details_nothing():
    log = io.StringIO()
    with progress(desc="evaluate", total=2, unit="stage", file=log) as outer:
        for _ in range(2):
            for _ in progress(range(50), desc="generate", unit="img", file=log):
                pass
            outer.set_postfix_str("score clip")
            outer.update()
    for _ in progress(range(3), desc="next stage", file=log):  # the iteration above closed its bar: not nested
        pass
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert text.splitlines() == [line for line in text.splitlines() if PLAIN_LINE.match(line)]
    assert [line.split(":")[0] for line in text.splitlines()] == ["evaluate", "next stage"]
    assert text.startswith("evaluate: 100% 2/2 stage [") and "score clip]" in text


def test_in_a_log_file_lines_come_at_most_every_interval():
    log = io.StringIO()
    with progress(desc="score", total=5, unit="img", file=log, interval=0) as bar:
        for _ in range(5):
            bar.update()
    lines = log.getvalue().splitlines()
    assert [line.split(" [")[0] for line in lines] == [f"score: {100 * k // 5:3d}% {k}/5 img" for k in range(6)]  # at the start, then per update
    quiet = io.StringIO()
    with progress(desc="score", total=5, unit="img", file=quiet, interval=3600) as bar:
        for _ in range(5):
            bar.update()
    assert len(quiet.getvalue().splitlines()) == 1  # only the last line


def test_library_bars_are_off_inside_and_restored_after():
    import datasets
    import huggingface_hub.utils as hub
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    def states():
        return (transformers_logging.is_progress_bar_enabled(), diffusers_logging.is_progress_bar_enabled(),
                not datasets.are_progress_bars_disabled(), not hub.are_progress_bars_disabled())

    before = states()
    diffusers_logging.disable_progress_bar()  # one switched off by the user stays off
    try:
        with quiet_library_bars():
            assert states() == (False, False, False, False)
            with quiet_library_bars():
                pass
            assert states() == (False, False, False, False)
        assert states() == (before[0], False, *before[2:])
    finally:
        if before[1]:
            diffusers_logging.enable_progress_bar()


def test_stages_on_a_pipe_write_whole_log_lines_and_no_library_bars(tmp_path, tiny_sd, tiny_rewards):
    """generate and evaluate (which runs generate and score inside) through the CLI with stderr on a
    pipe. The scorer is PickScore, loaded by transformers ("Loading weights"), the model by diffusers."""
    metrics = {"metrics": ["pickscore"], "weights": {"pickscore": tiny_rewards["weights"]["pickscore"]}}
    small = {"steps": 2, "height": 32, "width": 32, "device": "cpu"}
    config = {
        "generate": {"model": str(tiny_sd), "prompts": "ddpo-animals", "max_prompts": 2, "images_per_prompt": 2, "prompts_per_shard": 1,
                     "output_dir": "generations", **small},
        "evaluate": {"baseline": {"path": str(tiny_sd)}, "finetuned": {"ft": {"path": str(tiny_sd)}},
                     "prompt_sets": {"animals": {"prompts": "ddpo-animals", "max_prompts": 2}}, "output_dir": "eval",
                     "images_per_prompt": 1, "num_workers": 0, "bootstrap_samples": 50, **small, **metrics},
    }
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "sr_finetune.commands.cli", "run", "--config", "small.yaml", "--stages", "generate,evaluate"]
    done = subprocess.run(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    err = done.stderr
    assert done.returncode == 0, err[-3000:]
    assert "\r" not in err and "\x1b" not in err
    for library_bar in ("Loading weights", "Loading pipeline components", "Writing model shards", "Saving the dataset", "it/s]"):
        assert library_bar not in err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(" ")]  # a warning's source line is indented
    assert [line for line in lines if not (LOG_LINE.match(line) or PLAIN_LINE.match(line))] == []
    for expected in ("INFO sr_finetune: stage generate", "INFO sr_finetune: generate: 2 prompts, 2 shards (0 already done), 4 images made",
                     "INFO eval.harness: generate: 2 prompts, 1 shards", "INFO eval.harness: score: 2/2 images scored",
                     "INFO sr_finetune: evaluate: 2 models x 1 prompt sets x 1 metrics"):
        assert any(expected in line for line in lines), expected
    bars = [line.split(":")[0] for line in lines if PLAIN_LINE.match(line)]
    assert bars == ["generate [0/1]", "evaluate"]  # one line per stage here; the evaluation's inner bars are silent
