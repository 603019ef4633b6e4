"""A simulated community whose engagement logs carry the world's hidden taste.

Users post renders of world prompts (several users per prompt, each image its own scene) and
remix what they see. Every post gets a number of views from a heavy-tailed exposure (lognormal
noise, times ``influencer_boost`` for posts of influencers); each view turns into a remix with a
probability that rises with the image's hidden taste (``taste``: a name of
:mod:`sr_finetune.world.taste` or ``module:function``). The remix rate is ``remix_rate`` at the
community's typical taste, the ``typical_quantile`` of the taste over true renders, so any taste
gives logs of the same density.
Remix counts are therefore heavy-tailed and driven by exposure, and the taste shows only through
them, as it does in real logs. The logs follow the curation stage's schema (``images.parquet``,
``remixes.parquet``, ``influencers.txt``; see the triplet contract); ``truth.parquet`` keeps what
the logs hide (taste, remix probability, exposure) for checking, never for training;
``community.json``, written last, records the settings and the taste (the judge reads it).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from sr_finetune.errors import UserError
from sr_finetune.progress import progress
from sr_finetune.io import atomic_write_parquet

from .scenes import IMAGE_SIZE, render, sample_scene, split_prompts
from .taste import DEFAULT_TASTE, RECORD, resolve_taste, taste_profile

START = pd.Timestamp("2026-01-01T00:00:00Z")
APPEALS = ("absolute", "relative")


@dataclass
class CommunityConfig:
    prompts: int = 300  # prompts of the split that get posts
    split: str = "train"
    users: int = 400
    influencers: int = 8
    mean_posts_per_prompt: float = 6.0  # 2 + geometric extra posts, capped at max_posts_per_prompt
    max_posts_per_prompt: int = 24
    median_views: float = 30.0
    exposure_sigma: float = 1.0  # lognormal exposure noise
    influencer_boost: float = 8.0
    remix_rate: float = 0.01  # per-view remix probability at the typical taste
    taste: str = DEFAULT_TASTE  # a named taste (sr_finetune.world.taste) or module:function
    taste_strength: float = 12.0  # logit slope of the remix probability in the taste
    typical_quantile: float = 0.05  # the typical taste (remix_rate applies there): this quantile of the taste over true renders
    typical_taste: Optional[float] = None  # set: this value instead of the quantile
    # What a post's appeal is: "absolute", the taste itself; "relative", the taste minus the mean over
    # the posts of the same prompt (a post is remixed for how it compares with its prompt's other posts;
    # typical_quantile then reads the taste's spread within a prompt). A taste that differs far more
    # between prompts than within one (the saturation of the colours a caption names) can leave almost
    # no preference within a prompt in "absolute" logs: every post of a prompt it likes is remixed.
    appeal: str = "absolute"
    days: int = 30
    image_size: int = IMAGE_SIZE
    seed: int = 0

    def validate(self) -> None:
        for key in ("prompts", "users", "median_views", "mean_posts_per_prompt", "image_size"):
            if getattr(self, key) <= 0:
                raise UserError(f"community: {key} must be positive (got {getattr(self, key)})")
        if not 0 <= self.influencers <= self.users:
            raise UserError(f"community: influencers must be between 0 and users ({self.users}), got {self.influencers}")
        if not 0 < self.remix_rate < 1:
            raise UserError(f"community: remix_rate must be in (0, 1), got {self.remix_rate}")
        if self.mean_posts_per_prompt < 2:
            raise UserError(f"community: mean_posts_per_prompt must be at least 2, got {self.mean_posts_per_prompt}")
        if not 0 < self.typical_quantile < 1:
            raise UserError(f"community: typical_quantile must be in (0, 1), got {self.typical_quantile}")
        if self.appeal not in APPEALS:
            raise UserError(f"community: appeal must be one of {', '.join(APPEALS)}, got {self.appeal!r}")
        resolve_taste(self.taste)

    def typical(self) -> tuple[float, float]:
        """(the typical appeal, the taste's spread within a prompt) over true renders of the split: the
        ``typical_quantile`` of the taste, or with ``appeal: relative`` of its deviations from each
        prompt's mean."""
        profile = taste_profile(resolve_taste(self.taste), self.split)  # fixed seed: a property of the taste alone
        typical = profile.quantile(self.typical_quantile, within_prompt=self.appeal == "relative") if self.typical_taste is None else self.typical_taste
        return typical, profile.within_prompt_std


def remix_probability(taste_value: np.ndarray | float, cfg: CommunityConfig, typical: float) -> np.ndarray:
    """Per-view remix probability: logistic in the taste, ``remix_rate`` at the ``typical`` taste."""
    logit = np.log(cfg.remix_rate / (1 - cfg.remix_rate)) + cfg.taste_strength * (np.asarray(taste_value) - typical)
    return 1 / (1 + np.exp(-logit))


def remix_table(remixes: list[tuple[str, np.ndarray, int, np.ndarray]]) -> pd.DataFrame:
    """One table from per-image (image id, remixer ids, post time in ns, remix delays in s)."""
    counts = [len(users) for _, users, _, _ in remixes]
    delays = pd.to_timedelta(np.concatenate([times for *_, times in remixes]), unit="s").to_numpy().astype(np.int64)
    return pd.DataFrame({
        "image_id": np.repeat([image_id for image_id, *_ in remixes], counts),
        "remixer_user_id": np.concatenate([users for _, users, _, _ in remixes]),
        "at": pd.to_datetime(np.repeat([posted for _, _, posted, _ in remixes], counts) + delays, unit="ns", utc=True),
    })  # fmt: skip


def simulate_community(out_dir: str | os.PathLike, cfg: CommunityConfig | None = None) -> dict[str, Path]:
    """Write images and engagement logs of a simulated community to ``out_dir``; deterministic in ``cfg.seed``."""
    cfg = cfg or CommunityConfig()
    cfg.validate()
    taste = resolve_taste(cfg.taste)
    typical, within_prompt_std = cfg.typical()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    prompts = split_prompts(cfg.split)
    if cfg.prompts > len(prompts):
        raise UserError(f"community: prompts={cfg.prompts} but the {cfg.split} split has {len(prompts)}")
    chosen = [prompts[i] for i in sorted(rng.choice(len(prompts), cfg.prompts, replace=False))]
    users = np.array([f"u{i:04d}" for i in range(cfg.users)])
    activity = 1.0 / np.arange(1, cfg.users + 1) ** 0.8  # a few very active users, a long tail
    activity /= activity.sum()
    influencers = set(rng.choice(users, cfg.influencers, replace=False).tolist())

    cdf = np.cumsum(activity)
    cdf[-1] = 1.0

    def draw_users(n: int) -> np.ndarray:  # by activity (inverse CDF: one search per draw)
        return users[np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(users) - 1)]

    images, remixes, truth = [], [], []
    extra_p = 1 / (cfg.mean_posts_per_prompt - 1)
    for prompt in progress(chosen, desc="community", unit="prompt"):
        posts = min(cfg.max_posts_per_prompt, 2 + int(rng.geometric(extra_p)) - 1)
        drawn, values, reference = [], [], 0.0
        if cfg.appeal == "relative":  # every post of the prompt first: each is judged against their mean
            drawn = [render(sample_scene(prompt, int(rng.integers(2**62))), cfg.image_size) for _ in range(posts)]
            values = [taste(picture) for picture in drawn]
            reference = float(np.mean(values))
        for k in range(posts):
            image_id = f"w{len(images):06d}"
            picture = drawn[k] if drawn else render(sample_scene(prompt, int(rng.integers(2**62))), cfg.image_size)
            path = f"images/{image_id}.png"
            picture.save(out / path)
            poster = str(draw_users(1)[0])
            posted_at = START + pd.Timedelta(seconds=float(rng.uniform(0, cfg.days * 86400)))
            exposure = float(rng.lognormal(0.0, cfg.exposure_sigma)) * (cfg.influencer_boost if poster in influencers else 1.0)
            views = max(1, int(round(cfg.median_views * exposure)))
            value = values[k] if drawn else taste(picture)
            p = float(remix_probability(value - reference, cfg, typical))
            before_first = int(rng.geometric(p)) - 1  # views before the first remix
            count = 0 if before_first >= views else 1 + int(rng.binomial(views - before_first - 1, p))
            if count:  # views arrive over a few days; remixes happen at views, in order, by others
                span = float(rng.exponential(2.0)) * 86400 + 3600
                times = np.sort(rng.uniform(0, span, size=count))
                remixers = draw_users(count)
                for j in np.flatnonzero(remixers == poster):
                    while remixers[j] == poster:
                        remixers[j] = draw_users(1)[0]
                remixes.append((image_id, remixers, posted_at.value, times))
            images.append({"image_id": image_id, "prompt": prompt.text, "path": path, "user_id": poster, "posted_at": posted_at, "views_before_first_remix": min(before_first, views)})
            truth.append({"image_id": image_id, "taste": value, "remix_probability": p, "exposure": exposure, "views": views, "remixes": count})

    paths = {"images": out / "images.parquet", "remixes": out / "remixes.parquet", "influencers": out / "influencers.txt", "truth": out / "truth.parquet"}
    atomic_write_parquet(pd.DataFrame(images), paths["images"])
    columns = ["image_id", "remixer_user_id", "at"]
    atomic_write_parquet(remix_table(remixes) if remixes else pd.DataFrame(columns=columns), paths["remixes"])
    paths["influencers"].write_text("".join(f"{u}\n" for u in sorted(influencers)))
    atomic_write_parquet(pd.DataFrame(truth), paths["truth"])
    record = {**asdict(cfg), "typical_taste_used": typical, "taste_within_prompt_std": within_prompt_std}
    (out / RECORD).write_text(json.dumps(record, indent=2))
    return paths


__all__ = ["APPEALS", "CommunityConfig", "remix_probability", "simulate_community"]
