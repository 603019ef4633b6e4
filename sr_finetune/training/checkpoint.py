"""Training checkpoints: ``output_dir/checkpoint-<step>`` folders written by ``accelerator.save_state``.

A checkpoint holds the trained models, optimizer, LR scheduler, RNG states, EMA weights and
the data position (:class:`TrainingProgress`). It is written to a temporary folder and renamed
when complete, so ``resume_from_checkpoint: latest`` never picks a half-written one.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainingProgress:
    """Where training stands: optimizer steps done and the data position (epoch, batches consumed in it)."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    data_layout: str = ""  # what a batch index means: rows, batch size, processes, accumulation
    images_sampled: int = 0  # online objectives: images sampled by all processes since step 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        saved = str(state.get("data_layout", ""))
        if saved and self.data_layout and saved != self.data_layout:
            raise UserError(
                f"resume_from_checkpoint: the checkpoint was written with {saved}, this run has {self.data_layout}; "
                "an exact resume needs the same data, batch size, number of processes and accumulation (or start a new output_dir)"
            )
        self.global_step, self.epoch, self.batches_in_epoch = (int(state[k]) for k in ("global_step", "epoch", "batches_in_epoch"))
        self.images_sampled = int(state.get("images_sampled", 0))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(resume_from_checkpoint: str | None, output_dir: Path) -> Path | None:
    """The checkpoint folder to resume from: ``latest`` (None if there is none yet) or an explicit path."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.info("resume_from_checkpoint=latest: no checkpoint in %s yet, starting from step 0", output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise UserError(f"resume_from_checkpoint: {path} is not a checkpoint folder (use 'latest' or a path to checkpoint-<step>)")
    return path


def resume_training_state(accelerator, resume_from_checkpoint: str | None, output_dir: Path) -> Path | None:
    """Remove half-written checkpoints (main process), then load the checkpoint to resume from, if
    any (:func:`resolve_resume`); returns its folder."""
    if accelerator.is_main_process:
        for stale in output_dir.glob(".tmp-checkpoint-*"):
            shutil.rmtree(stale)
    resume_dir = resolve_resume(resume_from_checkpoint, output_dir)
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
    return resume_dir


def save_checkpoint(accelerator, output_dir: Path, global_step: int, total_limit: int | None) -> Path:
    """Save the full training state (all processes call this), then keep only the newest ``total_limit``."""
    final = output_dir / f"checkpoint-{global_step}"
    tmp = output_dir / f".tmp-checkpoint-{global_step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final
