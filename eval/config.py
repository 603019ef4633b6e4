"""Settings of the evaluation stage (``evaluate:`` in a recipe config)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from reward import available_rewards
from reward.scoring import ScoreConfig
from sr_finetune.config import require
from sr_finetune.errors import ConfigError
from sr_finetune.generation import GenerateConfig

NEGATIVE_TOKEN = "t@y quality"  # the Social Reward token the fine-tuned models learned as "bad"
AUTO = "auto"  # a fine-tuned model's negative prompt: what its fine-tune recorded (FinetunedSpec)
SIX_METRICS = ["social_reward", "clip", "aesthetic", "hpsv2", "imagereward", "pickscore"]
UNITS = ("image", "prompt")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MODEL_SOURCE = "set either path (a pipeline folder or hub id) or images (an image table or a generations folder)"


@dataclass
class ModelSpec:
    """One model to evaluate: a diffusers pipeline folder or hub id (``path``) that generates every
    prompt set, or images that already exist (``images``; see ``eval/existing_images.py``)."""

    path: Optional[str] = None
    revision: Optional[str] = None
    variant: Optional[str] = None
    negative_prompt: Optional[str] = None  # the baseline is sampled without one
    # existing images instead of a pipeline: an image table (csv/tsv/parquet/json/jsonl) or a generations folder
    images: Optional[str] = None
    image_root: Optional[str] = None  # folder the table's relative paths start from (default: the table's folder)
    path_column: str = "path"
    prompt_column: str = "prompt"
    index_column: Optional[str] = None  # image index per prompt; default: "index" if present, else the order of a prompt's rows
    prompt_id_column: Optional[str] = None  # set to match by prompt id (the prompt sets' ids) instead of prompt text
    # a config layer (file, command line) that sets one of these drops the other from the layers below
    EXCLUSIVE: ClassVar[tuple[tuple[str, ...], ...]] = (("path", "images"),)

    def validate(self) -> None:
        require(bool(self.path) != bool(self.images), "path", MODEL_SOURCE)

    @property
    def generated(self) -> bool:
        """Whether this model generates its images here (a pipeline) rather than bringing them."""
        return bool(self.path)

    def sampling_negative_prompt(self) -> Optional[str]:
        """The negative prompt this model is sampled with (None: none)."""
        return self.negative_prompt or None

    def describe(self) -> str:
        if self.generated:
            return f"{self.path} (negative prompt: {self.sampling_negative_prompt() or 'none'!r})"
        return f"existing images {self.images}, matched by prompt {'id' if self.prompt_id_column else 'text'} and image index"


@dataclass
class FinetunedSpec(ModelSpec):
    """A fine-tuned model. ``negative_prompt: auto`` (the default) samples it with the negative prompt
    its fine-tune recorded (``sampling.json`` in the folder: the token for sft with tagged rejected
    rows, none for dpo and the online objectives, which never saw the token); a folder without that
    record (another tool's model, a hub id) gets the Social Reward token. Any other value is used as is."""

    negative_prompt: Optional[str] = AUTO

    def sampling_negative_prompt(self) -> Optional[str]:
        if self.negative_prompt != AUTO:
            return self.negative_prompt or None
        from sr_finetune.training.export import recorded_negative_prompt

        return recorded_negative_prompt(self.path, default=NEGATIVE_TOKEN) if self.path else None


@dataclass
class PromptSetSpec:
    """A named prompt set: a file, a shipped named set (e.g. ``parti``) or a ``datasets`` id."""

    prompts: Optional[str] = None
    max_prompts: Optional[int] = None
    prompt_column: Optional[str] = None
    id_column: Optional[str] = None
    split: str = "train"


@dataclass
class EvaluateConfig:
    """Baseline vs fine-tuned models on several prompt sets and metrics, with the same seeds."""

    baseline: ModelSpec = field(default_factory=lambda: ModelSpec(path="stabilityai/stable-diffusion-2-1-base"))
    baseline_name: str = "baseline"
    finetuned: dict[str, FinetunedSpec] = field(default_factory=dict)  # table name -> model
    prompt_sets: dict[str, PromptSetSpec] = field(default_factory=dict)  # e.g. internal, general
    output_dir: str = "runs/eval"
    # generation (the same for every model, so image k of prompt p has the same seed everywhere)
    images_per_prompt: int = 4
    seed: int = 0
    scheduler: str = "ddim"
    steps: int = 30
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    batch_size: int = 8
    prompts_per_shard: int = 256
    dtype: str = "auto"
    device: str = "auto"
    attention: str = "sdpa"
    image_format: str = "png"
    # scoring (one resumable scoring run per model x prompt set x metric)
    metrics: list[str] = field(default_factory=lambda: list(SIX_METRICS))
    weights: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    score_batch_size: int = 32
    num_workers: int = 2
    rows_per_part: int = 4096
    score_dtype: str = "fp32"
    # statistics
    bootstrap_samples: int = 2000
    confidence: float = 0.95
    bootstrap_seed: int = 0
    # report
    title: str = "Baseline vs fine-tuned"
    grid_prompts: int = 3  # prompts per set shown side by side, all their images
    examples_per_metric: int = 2  # largest fine-tuned wins and losses shown per metric
    thumbnail_size: int = 160

    def validate(self) -> None:
        require(bool(_NAME.match(self.baseline_name)), "baseline_name", f"'{self.baseline_name}' must be letters, digits, '.', '_' or '-'")
        for name, spec in self.finetuned.items():
            require(bool(_NAME.match(name)), f"finetuned.{name}", "a model name must be letters, digits, '.', '_' or '-'")
            require(name != self.baseline_name, f"finetuned.{name}", f"has the baseline's name (baseline_name={self.baseline_name})")
            require(bool(spec.path) != bool(spec.images), f"finetuned.{name}.path", MODEL_SOURCE)
        for name, spec in self.prompt_sets.items():
            require(bool(_NAME.match(name)), f"prompt_sets.{name}", "a prompt set name must be letters, digits, '.', '_' or '-'")
            require(bool(spec.prompts), f"prompt_sets.{name}.prompts", "set it to a prompt file, a named set (e.g. parti) or a datasets id")
            require(spec.max_prompts is None or spec.max_prompts > 0, f"prompt_sets.{name}.max_prompts", f"must be positive, got {spec.max_prompts}")
        for key in ("bootstrap_samples", "grid_prompts", "thumbnail_size", "score_batch_size", "rows_per_part"):
            require(getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        require(self.examples_per_metric >= 0, "examples_per_metric", f"must be >= 0, got {self.examples_per_metric}")
        require(0 < self.confidence < 1, "confidence", f"must be in (0, 1), got {self.confidence}")
        require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        require(len(self.metrics) > 0 and len(set(self.metrics)) == len(self.metrics), "metrics", f"name each metric once, got {self.metrics}")
        unknown = [m for m in self.metrics if m not in available_rewards()]
        require(not unknown, "metrics", f"unknown metric {unknown[:1]} (available: {', '.join(available_rewards())})")
        self.generate_config(self.baseline_name, self.baseline, "check").validate()

    def require_runnable(self) -> None:
        """What a run needs beyond valid values (the defaults lack it): models, prompt sets, scorer weights."""
        try:
            require(bool(self.finetuned), "finetuned", "name at least one fine-tuned model, e.g. finetuned.ft.path=runs/finetune")
            require(bool(self.prompt_sets), "prompt_sets", "name at least one prompt set, e.g. prompt_sets.general.prompts=parti")
            self._score_config(self.metrics, self.weights, self.options, "check", "check").validate()
        except ValueError as exc:
            raise ConfigError(f"config error: evaluate.{exc}") from None

    def models(self) -> dict[str, ModelSpec]:
        """Baseline first, then the fine-tuned models in config order."""
        return {self.baseline_name: self.baseline, **self.finetuned}

    def generations_dir(self, model: str, prompt_set: str) -> str:
        return f"{self.output_dir}/generations/{model}/{prompt_set}"

    def scores_dir(self, model: str, prompt_set: str, metric: str) -> str:
        return f"{self.output_dir}/scores/{model}/{prompt_set}/{metric}"

    def existing_images_file(self, model: str, prompt_set: str) -> str:
        """The matched images of an existing-images model on one prompt set: the scoring stage's input."""
        return f"{self.output_dir}/images/{model}/{prompt_set}.parquet"

    def generate_config(self, model: str, spec: ModelSpec, prompt_set: str) -> GenerateConfig:
        """The generation stage's settings for one model on one prompt set."""
        prompts = self.prompt_sets.get(prompt_set, PromptSetSpec())
        return GenerateConfig(
            model=spec.path or "", revision=spec.revision, variant=spec.variant, prompts=prompts.prompts,
            prompt_column=prompts.prompt_column, id_column=prompts.id_column, split=prompts.split, max_prompts=prompts.max_prompts,
            output_dir=self.generations_dir(model, prompt_set), images_per_prompt=self.images_per_prompt, seed=self.seed,
            scheduler=self.scheduler, steps=self.steps, guidance_scale=self.guidance_scale, height=self.height, width=self.width,
            negative_prompt=spec.sampling_negative_prompt(), batch_size=self.batch_size, prompts_per_shard=self.prompts_per_shard,
            dtype=self.dtype, device=self.device, attention=self.attention, image_format=self.image_format, model_name=model,
        )

    def score_config(self, model: str, prompt_set: str, metric: str) -> ScoreConfig:
        """The scoring stage's settings for one metric of one model on one prompt set."""
        weights = {metric: self.weights[metric]} if metric in self.weights else {}
        options = {metric: self.options[metric]} if metric in self.options else {}
        if self.models()[model].generated:
            return self._score_config([metric], weights, options, self.generations_dir(model, prompt_set), self.scores_dir(model, prompt_set, metric))
        return self._score_config([metric], weights, options, None, self.scores_dir(model, prompt_set, metric), self.existing_images_file(model, prompt_set))

    def _score_config(self, metrics: list[str], weights: dict, options: dict, generations: str | None, output_dir: str, image_table: str | None = None) -> ScoreConfig:
        return ScoreConfig(
            generations=generations, image_table=image_table, id_column="image_id" if image_table else None, output_dir=output_dir, metrics=list(metrics),
            weights=dict(weights), options=dict(options), batch_size=self.score_batch_size, num_workers=self.num_workers, rows_per_part=self.rows_per_part,
            device=self.device, dtype=self.score_dtype,
        )
