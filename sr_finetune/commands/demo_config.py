"""The demo's own section of the experiment config (``demo:``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..errors import ConfigError
from ..world.community import CommunityConfig


@dataclass
class DemoConfig:
    """The demo's own settings (``demo:``); the stages' sizes are in their own sections."""

    out_dir: str = "runs/demo"
    community: CommunityConfig = field(default_factory=CommunityConfig)
    pool_prompts: Optional[int] = 400  # train-split prompts the base model samples the pool for (None: all 2,391)
    eval_prompts: Optional[int] = 100  # held-out (test-split) prompts of the comparison (None: all 292)
    regularization_images: int = 1000  # captioned true renders, the LAION share of the paper
    arms: list[str] = field(default_factory=lambda: ["sft"])  # which arm_presets to fine-tune and evaluate
    # name -> pairs./finetune. overrides; an entry that names another preset stands for its overrides
    arm_presets: dict[str, list[str]] = field(default_factory=lambda: {"sft": []})
    # arm -> its control: the same preset with random roles (fine-tuning on the pool without the reward's direction)
    controls: dict[str, str] = field(default_factory=dict)
    # control -> its mirror: the same draw of roles reversed. A draw has a direction of its own that a
    # pairwise objective learns; the mean of the two is what fine-tuning on the pool does (parity check)
    mirrors: dict[str, str] = field(default_factory=dict)
    without_negative_token: bool = False  # true: also evaluate each arm without the negative prompt at inference
    quick: list[str] = field(default_factory=list)  # overrides that --quick applies (smaller sizes)
    seed: int = 0

    def validate(self) -> None:
        missing = [a for a in self.arms if a not in self.arm_presets]
        if not self.arms or missing:
            raise ConfigError(f"config error: demo.arms {self.arms} must name arm_presets ({', '.join(self.arm_presets)})")
        for name in self.arm_presets:
            overrides = self.preset_overrides(name)
            bad = [o for o in overrides if o.partition("=")[0].split(".")[0] not in ("pairs", "finetune") or "=" not in o]
            if bad:
                raise ConfigError(f"config error: demo.arm_presets.{name}: {bad[0]!r} is not a pairs.KEY=VALUE or finetune.KEY=VALUE override")
        for key, mapping in (("controls", self.controls), ("mirrors", self.mirrors)):
            for arm, other in mapping.items():
                if arm not in self.arm_presets or other not in self.arm_presets:
                    raise ConfigError(f"config error: demo.{key}.{arm}: {arm} -> {other} must name two arm_presets ({', '.join(self.arm_presets)})")
        for key in ("pool_prompts", "eval_prompts"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"config error: demo.{key} must be positive or null (got {getattr(self, key)})")
        if self.regularization_images < 0:
            raise ConfigError(f"config error: demo.regularization_images must be >= 0 (got {self.regularization_images})")
        self.community.validate()

    def preset_overrides(self, arm: str, within: tuple[str, ...] = ()) -> list[str]:
        """An arm's overrides, each entry that names another preset replaced by that preset's own
        (``dpo-random: [dpo, pairs.random_roles=true]``: dpo's settings with random roles)."""
        if arm in within:
            raise ConfigError(f"config error: demo.arm_presets: {' -> '.join([*within, arm])} names itself")
        return [o for entry in self.arm_presets[arm] for o in (self.preset_overrides(entry, (*within, arm)) if entry in self.arm_presets else [entry])]


__all__ = ["DemoConfig"]
