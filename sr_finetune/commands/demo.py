"""``sr-finetune demo``: the whole Social Reward loop as an experiment in the demo world.

The world's simulated community leaves engagement logs; ``curate`` turns them into triplets,
``train-reward`` fine-tunes the world CLIP into a Social Reward model, ``accuracy`` compares it
with the untrained CLIP and the world's judge, ``generate`` samples a pool from the world's base
model, ``score`` ranks it, ``build-pairs`` + ``finetune`` run once per *arm* (the paper's recipe,
or a variant such as swapped pairs), and ``evaluate`` compares every arm with the base model on
held-out prompts with the judge, Social Reward and prompt fidelity. Every stage is the library's
own, run on its section of ``recipes/configs/demo.yaml``; this module only writes the world's
inputs, wires the paths and keeps track of finished stages (command layer: stages import lazily).

A stage that finished with the same resolved settings is skipped on a rerun; the one that was
interrupted resumes through its own mechanism (shards, checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

from ..config import load_config, to_yaml
from ..errors import ConfigError
from .demo_config import DemoConfig

logger = logging.getLogger("sr_finetune")

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "demo.yaml"
STATE_FILE = "demo_state.json"


class DemoState:
    """``demo_state.json``: the stages that finished, a fingerprint of the settings they ran with
    and the seconds they took."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict] = json.loads(path.read_text()) if path.is_file() else {}

    def finished(self, key: str, fingerprint: str) -> bool:
        return self.done.get(key, {}).get("fingerprint") == fingerprint

    def mark(self, key: str, fingerprint: str, seconds: float) -> None:
        self.done[key] = {"fingerprint": fingerprint, "seconds": round(seconds, 1)}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.done, indent=2))
        os.replace(tmp, self.path)


def _digest(*files: Path) -> str:
    """The bytes of shipped files, as the settings of what is written from them."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _fingerprint(settings: object, upstream: Sequence[str] = ()) -> str:
    """A stage's identity: its resolved settings and the fingerprints of the stages it reads."""
    return hashlib.sha256("\n".join([to_yaml(settings), *upstream]).encode()).hexdigest()[:16]


class Demo:
    """Loads the demo config (with ``--quick`` sizes and the user's overrides) and runs its stages."""

    def __init__(self, config: str | os.PathLike | None, overrides: Sequence[str] = (), quick: bool = False, arms: Sequence[str] | None = None):
        unprefixed = [o for o in overrides if "." not in o.partition("=")[0]]
        if unprefixed:
            raise ConfigError(f"demo: overrides need their section, e.g. demo.out_dir=... or finetune.max_train_steps=... (got {unprefixed[0]!r})")
        self.config_path = Path(config) if config else DEFAULT_CONFIG
        if not self.config_path.is_file():
            raise ConfigError(f"config error: demo config not found: {self.config_path} (pass --config recipes/configs/demo.yaml from the repository)")
        self.overrides = list(overrides) + ([f"demo.arms=[{','.join(arms)}]"] if arms else [])
        self.cfg: DemoConfig = self.section_config("demo")
        if quick:  # the quick sizes first, so that the user's overrides still win
            self.overrides = list(self.cfg.quick) + self.overrides
            self.cfg = self.section_config("demo")
        self.out = Path(self.cfg.out_dir)
        from .stages import stage_runners

        self.runners = stage_runners()
        self.state: DemoState | None = None
        self.fingerprints: dict[str, str] = {}  # this run's stage fingerprints, by key

    # -- the world's inputs ------------------------------------------------------------------
    def write_world(self) -> None:
        """Shipped weights, community logs, prompt lists and the regularisation set. Each part is
        written once, and again (from scratch) when the settings or shipped weights that decide
        it changed; its fingerprint is what the stages reading it depend on (``world:<part>``)."""
        from reward.world_clip import materialize_world_clip

        from ..world.assets import ASSETS_DIR, materialize_pipeline
        from ..world.community import simulate_community
        from ..world.files import write_prompt_file, write_regularization_set

        world, cfg = self.out / "world", self.cfg

        def write_community(path: Path) -> None:
            if not (path / "community.json").is_file():  # written last by the simulator
                simulate_community(path, cfg.community)

        parts = {  # name -> (where it is written, the settings that decide it, the writer)
            "model": (world / "model", _digest(ASSETS_DIR / "base.json", ASSETS_DIR / "base.safetensors"), materialize_pipeline),
            "clip": (world / "world_clip.safetensors", _digest(ASSETS_DIR / "world_clip.safetensors"), lambda path: materialize_world_clip(path, ASSETS_DIR)),
            "community": (world / "community", cfg.community, write_community),
            "pool": (world / "prompts" / "pool.txt", [cfg.pool_prompts, cfg.seed], lambda path: write_prompt_file(path, "train", cfg.pool_prompts, cfg.seed)),
            "held_out": (world / "prompts" / "held_out.txt", [cfg.eval_prompts, cfg.seed], lambda path: write_prompt_file(path, "test", cfg.eval_prompts, cfg.seed)),
            "regularization": (world / "regularization", [cfg.regularization_images, cfg.seed], lambda path: write_regularization_set(path, cfg.regularization_images, seed=cfg.seed)),
        }  # fmt: skip
        for name, (path, settings, write) in parts.items():
            key, start = f"world:{name}", time.perf_counter()
            self.fingerprints[key] = _fingerprint(settings)
            if self.state.finished(key, self.fingerprints[key]):
                continue
            if key in self.state.done:
                logger.info("demo: the world's %s changed; %s is written again", name, path)
            if key in self.state.done or name in ("model", "clip"):  # shipped weights: always whole
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            write(path)  # the other writers keep what they finished before an interruption
            self.state.mark(key, self.fingerprints[key], time.perf_counter() - start)

    # -- stages ------------------------------------------------------------------------------
    def section_config(self, section: str, extra: Sequence[str] = ()):
        """One stage's validated section, with the demo's overrides and ``extra``."""
        from .experiment import ExperimentConfig

        return getattr(load_config(ExperimentConfig, self.config_path, [*self.overrides, *extra], section=section), section)

    def run_stage(self, command: str, extra: Sequence[str] = (), key: str | None = None, after: Sequence[str] = ()) -> None:
        """Run one library stage on its section (with ``extra`` overrides), unless it already
        finished with the same settings after the same upstream stages (``after``). A stage that
        finished with other settings or inputs starts over in an emptied output folder."""
        section, run = self.runners[command]
        key = key or command
        cfg = self.section_config(section, extra)
        fingerprint = _fingerprint(cfg, [self.fingerprints[k] for k in after])
        self.fingerprints[key] = fingerprint
        if self.state.finished(key, fingerprint):
            logger.info("demo: %s finished earlier, skipped", key)
            return
        output = Path(cfg.output_dir).resolve()
        if key in self.state.done and output.is_relative_to(self.out.resolve()):
            logger.info("demo: %s: settings or inputs changed since it finished; %s starts over", key, cfg.output_dir)
            shutil.rmtree(output, ignore_errors=True)
        logger.info("demo: %s", key)
        start = time.perf_counter()
        logger.info(run(cfg).line())
        self.state.mark(key, fingerprint, time.perf_counter() - start)

    def arm_dir(self, arm: str) -> Path:
        return self.out / "arms" / arm

    def arm_overrides(self, arm: str) -> list[str]:
        root = self.arm_dir(arm)
        return [f"pairs.output_dir={root / 'pairs'}", f"finetune.output_dir={root / 'finetune'}", *self.cfg.preset_overrides(arm)]

    def is_online(self, arm: str) -> bool:
        """Whether an arm fine-tunes with an online objective (no pairs: it samples from the model)."""
        from ..training.config import ONLINE_OBJECTIVES

        return self.section_config("finetune", self.arm_overrides(arm)).objective in ONLINE_OBJECTIVES

    def evaluate_overrides(self) -> list[str]:
        """Each arm as a fine-tuned model, sampled with the negative prompt its fine-tune recorded; with
        ``without_negative_token`` an arm sampled with one is also evaluated without it (``<arm>-no-neg``)."""
        from eval.config import FinetunedSpec

        entries = []
        for arm in self.cfg.arms:
            path = self.arm_dir(arm) / "finetune"
            entries.append(f"evaluate.finetuned.{arm}.path={path}")
            if self.cfg.without_negative_token and FinetunedSpec(path=str(path)).sampling_negative_prompt():
                entries += [f"evaluate.finetuned.{arm}-no-neg.path={path}", f"evaluate.finetuned.{arm}-no-neg.negative_prompt=null"]
        return entries

    def output_dir(self, section: str) -> Path:
        """Where a stage's section writes (``score``, ``accuracy``, ``evaluate``, ...)."""
        return Path(self.section_config(section).output_dir)

    def run(self) -> Path:
        """Every stage in order; returns the summary file."""
        from .demo_summary import write_summary

        self.out.mkdir(parents=True, exist_ok=True)
        self.state = DemoState(self.out / STATE_FILE)
        self.fingerprints = {}
        logger.info("demo: writing the world's inputs to %s", self.out / "world")
        self.write_world()
        self.run_stage("curate", after=["world:community"])
        self.run_stage("train-reward", after=["curate", "world:clip"])
        self.run_stage("accuracy", after=["train-reward", "world:clip"])
        self.run_stage("generate", after=["world:pool", "world:model"])
        self.run_stage("score", after=["generate", "train-reward"])
        for arm in self.cfg.arms:
            extra = self.arm_overrides(arm)
            if self.is_online(arm):  # samples its own images from the pool prompts, scored by the reward
                self.run_stage("finetune", extra, key=f"finetune:{arm}", after=["world:pool", "world:model", "train-reward"])
                continue
            self.run_stage("build-pairs", extra, key=f"build-pairs:{arm}", after=["world:regularization", "score"])
            self.run_stage("finetune", extra, key=f"finetune:{arm}", after=[f"build-pairs:{arm}"])
        self.run_stage("evaluate", self.evaluate_overrides(), after=["world:held_out", "train-reward", *(f"finetune:{arm}" for arm in self.cfg.arms)])
        return write_summary(self)


def run_demo(config: str | os.PathLike | None = None, overrides: Sequence[str] = (), quick: bool = False, arms: Sequence[str] | None = None) -> Path:
    """Run (or resume) the demo; returns the path of its summary."""
    return Demo(config, overrides, quick=quick, arms=arms).run()


def taste_folder(taste: str) -> str:
    """A taste's sub-folder name (``module:function`` -> ``module.function``)."""
    return taste.replace(":", ".").replace("/", "_")


def pool_model(root: Path, tastes: Sequence[str]) -> str:
    """The base model copy that samples the shared pool ``<root>/pool``: the one its generations
    were made with, while that copy exists (a later run may start with another taste), else the
    first taste's."""
    from ..generation import generation_record

    recorded = (generation_record(root / "pool") or {}).get("model")
    if isinstance(recorded, str) and Path(recorded).is_dir():
        return recorded
    return str(root / taste_folder(tastes[0]) / "world" / "model")


def run_tastes(tastes: Sequence[str], config: str | os.PathLike | None = None, overrides: Sequence[str] = (), quick: bool = False, arms: Sequence[str] | None = None) -> Path:
    """The demo once per taste, each in ``<out_dir>/<taste>`` with its own community, reward and
    arms; the pool (the base model's samples, which no taste changes) is sampled once, in
    ``<out_dir>/pool`` by the first taste's copy of the shipped base model (a later run, whatever its
    tastes, by the copy the pool was made with), which every taste then fine-tunes and evaluates
    (the copies are the same files). Writes ``<out_dir>/tastes.md`` and
    ``tastes.json`` (a row per taste and arm)."""
    from .demo_summary import write_tastes_summary

    if not tastes or len(set(tastes)) != len(tastes):
        raise ConfigError(f"demo --tastes: give distinct tastes, comma-separated (got {list(tastes)})")
    probe = Demo(config, overrides, quick=quick, arms=arms)
    root = probe.out
    shares_pool = not any(o.startswith(("generate.output_dir=", "generate.model=")) for o in overrides)
    pool = [f"generate.output_dir={root / 'pool'}", f"generate.model={pool_model(root, tastes)}"] if shares_pool else []
    runs = {}
    for taste in tastes:
        logger.info("demo --tastes: %s", taste)
        extra = [f"demo.community.taste={taste}", f"demo.out_dir={root / taste_folder(taste)}", *pool]
        demo = Demo(config, [*overrides, *extra], quick=quick, arms=arms)
        demo.run()
        runs[taste] = demo.out
    return write_tastes_summary(root, runs, list(probe.cfg.arms))


__all__ = ["DEFAULT_CONFIG", "Demo", "run_demo", "run_tastes", "taste_folder"]
