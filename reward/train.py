"""Social Reward training: fine-tune an OpenAI-layout CLIP on (prompt, preferred, other) triplets.

The anchor is the L2-normalised prompt embedding, positive and negative the L2-normalised image
embeddings; the score is their cosine, exactly what the ``social_reward`` scorer computes.

Supported:
- the authors' training modes as depth-relative presets (``trainable``, ``reward/trainable.py``),
  with real freezing; the trainable parameter count is logged;
- the five losses of the paper's ablation (``loss``, ``reward/losses.py``; triplet with margin 0.3
  by default) and ``ablation: true``, one run per loss and a table of val / test accuracy;
- AdamW (torch defaults, weight decay 0.01), learning rate 3e-5 as the authors' code
  (``learning_rate=3e-4`` is the paper's stated value), batch 32 per process, no LR schedule and
  no gradient clipping, as the authors';
- any number of processes from ``accelerate launch`` (DDP, gradients averaged); fp16 / bf16
  autocast on a GPU (weights, optimizer and validation stay fp32); gradient checkpointing;
- images decoded and preprocessed in DataLoader workers by the social_reward scorer's own
  ``preprocess_image`` / ``tokenize``; both images of a triplet batch go through one image
  forward, and the text tower runs only up to the batch's last end-of-text token;
- checkpoints every ``checkpointing_steps`` and at the end, with exact resume
  (``resume_from_checkpoint: latest``: model, optimizer, RNG states, data position, validation
  history), so an interrupted run ends with the weights of an uninterrupted one;
- pairwise accuracy on the val split before training, after every epoch and at the end of the
  run (ties count as correct, as the authors' ``validate.py``; their number is reported), computed
  with the scorer's ``score``; the best epoch's weights are kept, then scored on the test split.

Refused (config errors, before any model loads): an unknown preset or loss, equal split names,
``ablation`` with a ``resume_from_checkpoint`` other than ``latest``. Bad data: a missing file or
column, repeated triplet ids, an empty split are one-line errors; bad rows are skipped and counted
(``reward/triplet_data.py``). Untested: FSDP and DeepSpeed.

Output in ``output_dir``: ``social_reward.safetensors`` (the best weights: a plain fp32 state dict
in the OpenAI CLIP key layout, for ``load_reward("social_reward", weights=...)`` or
``model.load_state_dict`` on an OpenAI ``clip`` model), ``val_scores.parquet`` (that epoch's
per-triplet scores), ``training_summary.json``, ``README.md`` (model card), ``config.yaml``, and
``checkpoint-<step>/`` folders.

Where the authors' ``train_pair_pos_neg.py`` differs: it passes ``model.encode_text`` /
``model.encode_image`` (methods, not modules) to ``accelerator.prepare``, so on several GPUs no
gradients are synchronised (each process trains its own copy on its shard of the data and the
main process's copy is saved) and no autocast is applied (it trains in fp32 whatever accelerate
is configured with). Here the model is a prepared module: DDP and autocast apply.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import pandas as pd
import torch

from sr_finetune.config import to_yaml
from sr_finetune.distributed import warn_if_single_cpu_launch
from sr_finetune.errors import ConfigError, UserError
from sr_finetune.progress import progress as progress_bar
from sr_finetune.training.checkpoint import TrainingProgress, resume_training_state, save_checkpoint
from sr_finetune.training.data import EpochSampler
from sr_finetune.training.trainer import checked_loss, fused_adamw_available, use_cpu

from .causal_text import encode_text_up_to_eot
from .clip_scorers import SocialReward, resolve_clip_weights
from .losses import LOSS_TITLES, preference_loss
from .openai_clip import OpenAICLIPBackbone, openai_clip_from_state_dict, read_openai_state_dict
from .scoring import yield_cpu_to_forward
from .train_config import TrainRewardConfig
from .train_outputs import REWARD_WEIGHTS, AblationSummary, RewardTrainingSummary, ablation_table, save_reward_weights, write_model_card, write_summary
from .trainable import apply_preset, describe_trainable
from .triplets import read_triplets, triplets_file
from .triplet_data import (
    SKIP_UNREADABLE,
    SkipCounter,
    TripletDataset,
    collate_triplets,
    prompt_weights,
    usable_triplets,
    warn_on_prompts_in_several_splits,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# the model


class TripletEncoder(torch.nn.Module):
    """CLIP -> L2-normalised (prompt, positive, negative) embeddings of a triplet batch."""

    def __init__(self, clip: torch.nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        text = encode_text_up_to_eot(self.clip, tokens)
        images = self.clip.encode_image(torch.cat([pos, neg]))  # one forward for both images: same result, fewer kernel launches
        text = text / text.norm(dim=-1, keepdim=True)
        images = images / images.norm(dim=-1, keepdim=True)
        return text, images[: len(pos)], images[len(pos) :]


def load_clip_for_training(base_model: str | None) -> tuple[torch.nn.Module, SocialReward]:
    """The fp32 CLIP to train and a social_reward scorer on the same module (its preprocessing,
    tokenisation and score are the ones training uses)."""
    model = openai_clip_from_state_dict(read_openai_state_dict(resolve_clip_weights(base_model)), "fp32")
    return model, SocialReward(OpenAICLIPBackbone(model))


def cpu_worker_init(device: torch.device):
    """On a CPU the DataLoader workers run at the lowest priority, as in scoring runs: the forward's
    OpenMP threads then never wait for a descheduled peer (``reward.scoring.yield_cpu_to_forward``)."""
    return yield_cpu_to_forward if device.type == "cpu" else None


# ---------------------------------------------------------------------------------------------
# state kept in checkpoints


class RunState:
    """Checkpointed besides model and optimizer: the data position and every validation so far."""

    def __init__(self) -> None:
        self.reset("")

    def reset(self, data_layout: str) -> None:
        self.progress = TrainingProgress(data_layout=data_layout)
        self.validations: list[dict] = []

    def state_dict(self) -> dict:
        return {"progress": self.progress.state_dict(), "validations": [dict(v) for v in self.validations]}

    def load_state_dict(self, state: dict) -> None:
        self.progress.load_state_dict(state["progress"])
        self.validations = [dict(v) for v in state["validations"]]

    def best(self) -> dict | None:
        """The first validation with the highest accuracy after training began (step > 0)."""
        trained = [v for v in self.validations if v["step"] > 0]
        return max(trained, key=lambda v: v["val_accuracy"]) if trained else None


# ---------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def pairwise_scores(scorer: SocialReward, rows: pd.DataFrame, accelerator, batch_size: int, num_workers: int, unreadable: dict) -> pd.DataFrame:
    """``triplet_id, pos_score, neg_score`` of every readable triplet of ``rows`` (each process
    scores its share, the frames are gathered), with the scorer's own ``score``, in fp32."""
    from accelerate.utils import gather_object

    share = rows.iloc[accelerator.process_index :: accelerator.num_processes]
    device = accelerator.device
    loader = torch.utils.data.DataLoader(
        TripletDataset(share, scorer), batch_size=batch_size, collate_fn=collate_triplets, num_workers=num_workers, worker_init_fn=cpu_worker_init(device),
    )
    scorer.backbone.clear_cache()  # the cache keys on pixels only: features of older weights must not be reused
    was_training = scorer.training
    scorer.eval()
    parts = []
    for batch in loader:
        unreadable.update({t: (p, r) for t, p, r in batch["unreadable"]})
        if batch["size"]:
            tokens = batch["tokens"].to(device)
            pos = scorer.score(batch["pos"].to(device), tokens)
            neg = scorer.score(batch["neg"].to(device), tokens)
            parts.append(pd.DataFrame({"triplet_id": batch["triplet_id"].numpy(), "pos_score": pos.double().cpu().numpy(), "neg_score": neg.double().cpu().numpy()}))
    scorer.backbone.clear_cache()
    scorer.train(was_training)
    frames = [f for f in gather_object(parts) if len(f)]
    columns = ["triplet_id", "pos_score", "neg_score"]
    return pd.concat(frames, ignore_index=True).sort_values("triplet_id", ignore_index=True) if frames else pd.DataFrame(columns=columns)


def pairwise_accuracy(scores: pd.DataFrame) -> dict:
    """Share of triplets whose positive scores at least as high as the negative (ties count as
    correct, as the authors' ``validate.py``), with the number of triplets and of ties."""
    n = len(scores)
    correct = int((scores.pos_score >= scores.neg_score).sum())
    ties = int((scores.pos_score == scores.neg_score).sum())
    return {"accuracy": correct / n if n else float("nan"), "triplets": n, "correct": correct, "ties": ties}


# ---------------------------------------------------------------------------------------------
# the run


def make_accelerator(cfg: TrainRewardConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    return Accelerator(cpu=use_cpu(cfg.device), mixed_precision=cfg.mixed_precision, project_config=ProjectConfiguration(project_dir=cfg.output_dir))


def run_train_reward(cfg: TrainRewardConfig) -> RewardTrainingSummary | AblationSummary:
    """Train a Social Reward model on ``cfg.triplets`` (or, with ``ablation``, one per loss)."""
    from accelerate.utils import set_seed

    if not cfg.triplets:  # checked here, not in validate(): an unused section may leave it unset
        raise ConfigError("config error: train_reward.triplets: required: the triplets.parquet written by sr-finetune curate")
    file = triplets_file(cfg.triplets)
    read_triplets(file)  # a missing file or column fails here, before any model loads
    warn_if_single_cpu_launch()
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    state = RunState()
    accelerator.register_for_checkpointing(state)
    if not cfg.ablation:
        return train_reward_model(cfg, accelerator, state)
    runs = []
    for loss in cfg.ablation_losses:
        sub = dataclasses.replace(cfg, loss=loss, ablation=False, output_dir=str(Path(cfg.output_dir) / "ablation" / loss))
        runs.append(train_reward_model(sub, accelerator, state))
        accelerator.free_memory()  # the next run prepares its own model and optimizer
    summary = AblationSummary(cfg.output_dir, runs)
    if accelerator.is_main_process:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ablation.md").write_text(ablation_table(runs) + "\n")
        pd.DataFrame(
            [{"loss": r.loss, "title": LOSS_TITLES[r.loss], "val_accuracy": r.best["val_accuracy"] if r.best else None, "test_accuracy": r.test["accuracy"] if r.test else None} for r in runs]
        ).to_csv(out / "ablation.csv", index=False)
    return summary


def train_reward_model(cfg: TrainRewardConfig, accelerator, state: RunState) -> RewardTrainingSummary:
    """One training run with ``accelerator`` (on which ``state`` is registered for checkpointing)."""
    output_dir = Path(cfg.output_dir)
    file = triplets_file(cfg.triplets)
    table = read_triplets(file)
    warn_on_prompts_in_several_splits(table, file)
    train_rows, train_skips = usable_triplets(table, cfg.train_split, file)
    val_rows, val_skips = usable_triplets(table, cfg.val_split, file)
    has_test = bool(cfg.test_split) and bool((table["split"] == cfg.test_split).any())
    test_rows, test_skips = usable_triplets(table, cfg.test_split, file) if has_test else (None, SkipCounter())
    if cfg.test_split and not has_test:
        logger.info("triplets %s: no '%s' rows, so no test accuracy", file, cfg.test_split)
    device, is_main = accelerator.device, accelerator.is_main_process

    # --- model: fp32 weights; accelerate autocasts the forward under mixed precision
    model, scorer = load_clip_for_training(cfg.base_model)
    trained = apply_preset(model, cfg.trainable)
    trainable_count = sum(p.numel() for p in trained)
    if is_main:
        logger.info("%s", describe_trainable(model, cfg.trainable))
    if cfg.gradient_checkpointing:
        model.set_grad_checkpointing(True)
    scorer.to(device)
    encoder = TripletEncoder(model)

    # --- data: the order of epoch e depends only on (seed, e), so a resume lands on the same batch
    dataset = TripletDataset(train_rows, scorer, prompt_weights(train_rows) if cfg.loss == "reweighted_ce" else None)
    sampler = EpochSampler(len(dataset), cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate_triplets, num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0, pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed),
        worker_init_fn=cpu_worker_init(device),
    )
    optimizer = torch.optim.AdamW(
        trained, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
        fused=True if fused_adamw_available(device) else None,
    )
    encoder, optimizer, loader = accelerator.prepare(encoder, optimizer, loader)
    max_train_steps = cfg.max_train_steps or cfg.num_epochs * len(loader)
    num_epochs = math.ceil(max_train_steps / len(loader))

    # --- resume
    state.reset(f"{len(dataset)} triplets, batch {cfg.batch_size} x {accelerator.num_processes} processes")
    progress = state.progress
    resume_dir = resume_training_state(accelerator, cfg.resume_from_checkpoint, output_dir)
    if resume_dir is not None:
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", resume_dir, progress.global_step, progress.epoch, progress.batches_in_epoch)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(to_yaml(cfg))
        logger.info(
            "train-reward (%s): %d train / %d val triplets, %d processes x batch %d, %d steps (%d epochs), lr %g",
            cfg.loss, len(train_rows), len(val_rows), accelerator.num_processes, cfg.batch_size, max_train_steps, num_epochs, cfg.learning_rate,
        )
    unreadable_train: dict = {}
    unreadable_eval: dict = {}

    def validate(epoch: int, complete_epoch: bool) -> None:
        scores = pairwise_scores(scorer, val_rows, accelerator, cfg.eval_batch_size, cfg.num_workers, unreadable_eval)
        result = pairwise_accuracy(scores)
        record = {"step": progress.global_step, "epoch": epoch, "complete_epoch": complete_epoch, "val_accuracy": result["accuracy"], "val_triplets": result["triplets"], "val_ties": result["ties"]}
        previous_best = state.best()
        state.validations.append(record)
        improved = progress.global_step > 0 and (previous_best is None or record["val_accuracy"] > previous_best["val_accuracy"])
        if is_main:
            logger.info("step %d (epoch %d): val pairwise accuracy %.4f (%d/%d, %d ties)%s", progress.global_step, epoch + 1, result["accuracy"], result["correct"], result["triplets"], result["ties"], ", best so far" if improved else "")
            if improved:
                save_reward_weights(accelerator.unwrap_model(encoder).clip, output_dir / REWARD_WEIGHTS)
                scores.merge(val_rows[["triplet_id", "prompt_id", "pos_image_id", "neg_image_id"]], on="triplet_id").to_parquet(output_dir / "val_scores.parquet", index=False)
        accelerator.wait_for_everyone()

    if not state.validations:
        validate(epoch=0, complete_epoch=False)  # the accuracy of the base model: the reference the training must beat

    # --- train
    encoder.train()
    start_step, last_loss = progress.global_step, float("nan")
    last_saved = progress.global_step if resume_dir is not None else None
    start_epoch, skip = progress.epoch, progress.batches_in_epoch
    if skip >= len(loader):
        start_epoch, skip = start_epoch + 1, 0
    bar = progress_bar(total=max_train_steps, initial=progress.global_step, desc=f"train-reward ({cfg.loss})", unit="step", disable=not accelerator.is_local_main_process)
    start = time.perf_counter()
    for epoch in range(start_epoch, num_epochs):
        if progress.global_step >= max_train_steps:
            break
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader  # skipped batches are never loaded
        batches.set_epoch(epoch)  # accelerate re-sets the sampler's epoch from its own counter, which restarts at 0 on resume
        sampler.set_epoch(epoch)
        for batch_index, batch in enumerate(batches, start=skip):
            unreadable_train.update({t: (p, r) for t, p, r in batch["unreadable"]})
            if not batch["size"]:
                raise UserError(f"every triplet of batch {batch_index} of epoch {epoch} has an unreadable image, e.g. {batch['unreadable'][0][1]}: {batch['unreadable'][0][2]}")
            text, pos, neg = encoder(batch["tokens"], batch["pos"], batch["neg"])
            loss = preference_loss(cfg.loss, text, pos, neg, margin=cfg.margin, temperature=cfg.temperature, weights=batch["weight"]).mean()
            last_loss = checked_loss(loss, accelerator, batch["prompt_id"], progress.global_step + 1, f"epoch {epoch}, batch {batch_index}")
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            progress.global_step += 1
            progress.epoch, progress.batches_in_epoch = epoch, batch_index + 1
            bar.set_postfix(loss=f"{last_loss:.4f}", refresh=False)
            bar.update(1)
            if batch_index + 1 == len(loader):  # end of the epoch: validated before a checkpoint can be taken
                validate(epoch, complete_epoch=True)
                encoder.train()
            if cfg.checkpointing_steps and progress.global_step % cfg.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, progress.global_step, cfg.checkpoints_total_limit)
                last_saved = progress.global_step
            if progress.global_step >= max_train_steps:
                break
        skip = 0
    bar.close()
    seconds = time.perf_counter() - start
    if state.validations[-1]["step"] != progress.global_step:
        validate(progress.epoch, complete_epoch=False)  # the run ended inside an epoch

    # --- save: the final training state (so a longer run can resume), then the test accuracy of the kept weights
    accelerator.wait_for_everyone()
    if progress.global_step > 0 and last_saved != progress.global_step:
        save_checkpoint(accelerator, output_dir, progress.global_step, cfg.checkpoints_total_limit)
    unreadable_test: dict = {}
    test = evaluate_saved_weights(output_dir / REWARD_WEIGHTS, test_rows, accelerator, cfg, unreadable_test) if test_rows is not None else None
    skips = gather_skips(accelerator, {"train": (train_skips, unreadable_train), "val": (val_skips, unreadable_eval), "test": (test_skips, unreadable_test)})
    summary = RewardTrainingSummary(
        output_dir=str(output_dir), loss=cfg.loss, global_step=progress.global_step, max_train_steps=max_train_steps, steps_run=progress.global_step - start_step,
        resumed_from=str(resume_dir) if resume_dir else None, seconds=seconds, initial_val_accuracy=state.validations[0]["val_accuracy"] if state.validations[0]["step"] == 0 else None,
        best=state.best(), test=test, trainable_parameters=trainable_count, skips=skips,
    )
    if is_main:
        details = {"trainable": describe_trainable(model, cfg.trainable), "validations": state.validations, "train_triplets": len(train_rows), "val_triplets": len(val_rows), "processes": accelerator.num_processes}
        write_summary(output_dir, cfg, summary, details)
        write_model_card(output_dir, cfg, summary, details)
    accelerator.wait_for_everyone()
    return summary


def evaluate_saved_weights(weights: Path, rows: pd.DataFrame, accelerator, cfg: TrainRewardConfig, unreadable: dict) -> dict:
    """Pairwise accuracy of the saved weights on ``rows``, loaded as any user would load them."""
    from .base import load_reward

    scorer = load_reward("social_reward", weights=str(weights), device=accelerator.device, share_backbone=False)
    result = pairwise_accuracy(pairwise_scores(scorer, rows, accelerator, cfg.eval_batch_size, cfg.num_workers, unreadable))
    if accelerator.is_main_process:
        logger.info("test pairwise accuracy of %s: %.4f (%d/%d, %d ties)", weights, result["accuracy"], result["correct"], result["triplets"], result["ties"])
    return result


def gather_skips(accelerator, per_split: dict[str, tuple[SkipCounter, dict]]) -> dict[str, dict[str, int]]:
    """Skips by split and reason: those found up front plus the unreadable images all processes met."""
    from accelerate.utils import gather_object

    out = {}
    for split, (skips, unreadable) in per_split.items():
        merged = SkipCounter()
        merged.merge(skips)
        found = {}
        for part in gather_object([unreadable]):
            found.update(part)
        for triplet_id, (path, reason) in sorted(found.items()):
            merged.add(SKIP_UNREADABLE, f"triplet {triplet_id}, {path}: {reason}")
        if merged.total and accelerator.is_main_process and found:
            logger.warning("train-reward: %s triplets skipped: %s", split, merged.line())
        out[split] = merged.as_dict()
    return out


__all__ = ["AblationSummary", "RewardTrainingSummary", "RunState", "TripletEncoder", "pairwise_accuracy", "pairwise_scores", "run_train_reward", "train_reward_model"]
