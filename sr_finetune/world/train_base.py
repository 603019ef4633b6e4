"""Training the world's base model from scratch: the VAE first, then UNet + text encoder.

One readable loop per phase (nanoGPT style). Every batch is rendered fresh from the *train*
prompts (held-out prompts never train), with the scene seeds, the empty captions (the
classifier-free-guidance share), the timesteps and the noise all derived from
``(seed, phase, step)``. A checkpoint every ``checkpoint_every`` steps stores the weights, the
optimizer and the step, so ``resume=True`` continues exactly where the run stopped and ends with
the weights an uninterrupted run would have. The result is a ``StableDiffusionPipeline`` folder
(``out_dir/model``) of the SD-2.1 classes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sr_finetune.errors import UserError
from sr_finetune.progress import progress

from .base_model import WorldModelSpec, build_text_encoder, build_unet, build_vae, scheduler_config
from .scenes import Prompt, render, sample_scene, split_prompts

logger = logging.getLogger(__name__)

CONTEXT_LENGTH = 24  # tokens: the longest caption (14) plus a negative token such as "t@y quality"


@dataclass
class BaseTrainConfig:
    out_dir: str
    vae_steps: int = 1000
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    steps: int = 1800  # UNet + text encoder
    batch_size: int = 64
    lr: float = 6e-4
    warmup_steps: int = 50
    empty_caption_share: float = 0.1
    checkpoint_every: int = 50
    seed: int = 0
    threads: int = 0  # torch threads; 0 = leave torch's default
    spec: WorldModelSpec = field(default_factory=WorldModelSpec)

    def validate(self) -> None:
        for key in ("vae_steps", "vae_batch_size", "steps", "batch_size", "checkpoint_every"):
            if getattr(self, key) < (0 if key.endswith("steps") else 1):
                raise UserError(f"train-base: {key} must be {'>= 0' if key.endswith('steps') else 'positive'} (got {getattr(self, key)})")
        if not 0 <= self.empty_caption_share < 1:
            raise UserError(f"train-base: empty_caption_share must be in [0, 1), got {self.empty_caption_share}")


def seed_of(*keys: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, keys)).encode()).digest()[:8], "big") >> 1


def sample_renders(prompts: list[Prompt], n: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    """``n`` fresh renders of prompts drawn from ``prompts``, and their captions; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    picks = [prompts[i] for i in rng.integers(len(prompts), size=n)]
    return [render(sample_scene(p, int(rng.integers(2**62)))) for p in picks], [p.text for p in picks]


def render_batch(prompts: list[Prompt], n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """:func:`sample_renders` as pixels in [-1, 1], [n, 3, 32, 32]."""
    images, captions = sample_renders(prompts, n, seed)
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, captions


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to a tenth of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Checkpoint:
    """``out_dir/checkpoint``: weights (safetensors), optimizer state and ``state.json``."""

    def __init__(self, out_dir: Path):
        self.dir = out_dir / "checkpoint"

    def exists(self) -> bool:
        return (self.dir / "state.json").is_file()

    def state(self) -> dict:
        return json.loads((self.dir / "state.json").read_text())

    def save(self, state: dict, models: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> None:
        from safetensors.torch import save_file

        tmp = self.dir.with_name("checkpoint.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for name, model in models.items():
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / f"{name}.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        if self.dir.exists():
            old = self.dir.with_name("checkpoint.old")
            os.replace(self.dir, old)
            os.replace(tmp, self.dir)
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        else:
            os.replace(tmp, self.dir)

    def load_models(self, models: dict[str, torch.nn.Module]) -> None:
        from safetensors.torch import load_file

        for name, model in models.items():
            path = self.dir / f"{name}.safetensors"
            if path.is_file():
                model.load_state_dict(load_file(str(path)))

    def load_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.load_state_dict(torch.load(self.dir / "optimizer.pt", weights_only=True))


@dataclass
class Phase:
    """What every step of a world training loop shares: the learning rate of the step (warmup,
    then cosine), the optimizer update, and a checkpoint every ``checkpoint_every`` steps and
    after the last. A loop reads ``for step in phase.steps(start): ...; phase.update(step, loss)``."""

    desc: str  # the progress bar's and the log's name
    optimizer: torch.optim.Optimizer
    ckpt: Checkpoint
    models: dict[str, torch.nn.Module]  # what each checkpoint saves
    state: dict  # what each checkpoint's state.json holds besides the step ({"phase": ...})
    lr: float
    warmup_steps: int
    total: int
    checkpoint_every: int
    max_grad_norm: float | None = None  # clip the gradients' norm before the step
    metric: str = "loss"  # the name and decimals of the value shown and logged
    digits: int = 4
    images_per_step: int | None = None  # show the images per second

    def steps(self, start: int):
        """The steps from ``start``, each with its learning rate set, under a progress bar."""
        self._bar = progress(range(start, self.total), initial=start, total=self.total, desc=self.desc, unit="step")
        self._started, self._done = time.time(), 0
        for step in self._bar:
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(step, self.lr, self.warmup_steps, self.total)
            yield step

    def update(self, step: int, loss: torch.Tensor, shown: torch.Tensor | None = None) -> None:
        """One optimizer step on ``loss``; ``shown`` (default: the loss) goes on the bar and log."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], self.max_grad_norm)
        self.optimizer.step()
        self._done += 1
        value = f"{(loss if shown is None else shown).item():.{self.digits}f}"
        rate = {"img_s": f"{self._done * self.images_per_step / (time.time() - self._started):.1f}"} if self.images_per_step else {}
        self._bar.set_postfix(**{self.metric: value}, **rate)
        if (step + 1) % self.checkpoint_every == 0 or step + 1 == self.total:
            self.ckpt.save({"phase": self.state["phase"], "step": step + 1, **self.state}, self.models, self.optimizer)
            logger.info("%s step %d/%d %s %s", self.desc, step + 1, self.total, self.metric, value)


def open_run(out: Path, settings: dict, settings_name: str, resume: bool, command: str) -> Checkpoint:
    """The checkpoint of run folder ``out`` after checking it: a fresh run refuses an existing
    checkpoint, a resumed one refuses settings that differ from the saved ones (named)."""
    ckpt = Checkpoint(out)
    settings = json.loads(json.dumps(settings, default=list))  # tuples as lists, as saved
    settings_file = out / settings_name
    if ckpt.exists() and not resume:
        raise UserError(f"{out} already holds a training checkpoint; pass --resume to continue it or pick another folder")
    if resume and ckpt.exists():
        saved = json.loads(settings_file.read_text())
        changed = [k for k in settings if saved.get(k) != settings[k]]
        if changed:
            raise UserError(f"{command} --resume: settings differ from the checkpoint's ({', '.join(changed)}); see {settings_file}")
    out.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(settings, indent=2))
    return ckpt


def _tokenizer(out: Path):
    from transformers import CLIPTokenizer

    from sr_finetune.clip_vocab import write_clip_tokenizer

    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(out / "tokenizer", pad_token="!", model_max_length=CONTEXT_LENGTH))


def train_vae(vae, cfg: BaseTrainConfig, prompts: list[Prompt], ckpt: Checkpoint, start: int, optimizer) -> None:
    """Reconstruction (MSE) plus a small KL term, as SD's VAE but without the GAN/perceptual losses."""
    vae.train()
    phase = Phase("vae", optimizer, ckpt, {"vae": vae}, {"phase": "vae"}, cfg.vae_lr, cfg.warmup_steps, cfg.vae_steps, cfg.checkpoint_every, metric="mse")
    for step in phase.steps(start):
        pixels, _ = render_batch(prompts, cfg.vae_batch_size, seed_of(cfg.seed, "vae", step))
        generator = torch.Generator().manual_seed(seed_of(cfg.seed, "vae-noise", step))
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(latents).sample
        mse = torch.nn.functional.mse_loss(recon, pixels)
        phase.update(step, mse + 1e-6 * posterior.kl().mean(), shown=mse)


@torch.no_grad()
def latent_scaling_factor(vae, prompts: list[Prompt], seed: int, n: int = 512) -> float:
    """1 / std of the latents of ``n`` train renders (SD's recipe for its 0.18215)."""
    vae.eval()
    pixels, _ = render_batch(prompts, n, seed_of(seed, "scale"))
    return float(1.0 / vae.encode(pixels).latent_dist.mean.std())


def train_unet(unet, text_encoder, vae, tokenizer, cfg: BaseTrainConfig, prompts: list[Prompt], ckpt: Checkpoint, start: int, optimizer, scaling: float) -> None:
    """Epsilon-prediction diffusion loss on SD-2.1's noise schedule; UNet and text encoder train together."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(scheduler_config())
    unet.train()
    text_encoder.train()
    vae.eval()
    models = {"vae": vae, "unet": unet, "text_encoder": text_encoder}
    state = {"phase": "unet", "scaling_factor": scaling}
    phase = Phase("unet", optimizer, ckpt, models, state, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.checkpoint_every, max_grad_norm=1.0, images_per_step=cfg.batch_size)
    for step in phase.steps(start):
        pixels, captions = render_batch(prompts, cfg.batch_size, seed_of(cfg.seed, "unet", step))
        generator = torch.Generator().manual_seed(seed_of(cfg.seed, "unet-noise", step))
        drop = torch.rand(len(captions), generator=generator) < cfg.empty_caption_share
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        with torch.no_grad():
            posterior = vae.encode(pixels).latent_dist
            latents = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)) * scaling
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        ids = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt").input_ids
        prediction = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        if not torch.isfinite(loss):
            raise UserError(f"train-base: loss is {loss.item()} at UNet step {step}")
        phase.update(step, loss)


def train_base(cfg: BaseTrainConfig, resume: bool = False) -> Path:
    """Train (or resume) the world's base model; returns the pipeline folder ``out_dir/model``."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out_dir", "threads", "checkpoint_every")}
    ckpt = open_run(out, settings, "train_base.json", resume, "train-base")

    torch.manual_seed(cfg.seed)
    spec = cfg.spec
    vae, unet, text_encoder = build_vae(spec), build_unet(spec), build_text_encoder(spec)
    tokenizer = _tokenizer(out)
    prompts = split_prompts("train")
    state = ckpt.state() if ckpt.exists() else {"phase": "vae", "step": 0}
    started = time.time()

    vae_opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    if state["phase"] == "vae":
        if state["step"]:
            ckpt.load_models({"vae": vae})
            ckpt.load_optimizer(vae_opt)
        train_vae(vae, cfg, prompts, ckpt, state["step"], vae_opt)
        scaling = latent_scaling_factor(vae, prompts, cfg.seed)
        start = 0
    else:
        ckpt.load_models({"vae": vae, "unet": unet, "text_encoder": text_encoder})
        scaling, start = state["scaling_factor"], state["step"]
    vae.requires_grad_(False)

    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    if state["phase"] == "unet":
        ckpt.load_optimizer(optimizer)
    train_unet(unet, text_encoder, vae, tokenizer, cfg, prompts, ckpt, start, optimizer, scaling)

    model = write_pipeline(out / "model", vae, unet, text_encoder, tokenizer, scaling)
    logger.info("world base model written to %s (%.1f min this session)", model, (time.time() - started) / 60)
    return model


def write_pipeline(model_dir: Path, vae, unet, text_encoder, tokenizer, scaling: float) -> Path:
    """Save the three models as a ``StableDiffusionPipeline`` folder (DDIM, SD-2.1's schedule)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    vae.register_to_config(scaling_factor=scaling)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=DDIMScheduler.from_config(scheduler_config()), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(model_dir, safe_serialization=True)
    return model_dir


def export_checkpoint(out_dir: str | os.PathLike) -> Path:
    """The pipeline folder ``out_dir/model`` from the run's latest checkpoint (UNet phase), e.g.
    to evaluate a run that is still training or was stopped early."""
    out = Path(out_dir)
    ckpt = Checkpoint(out)
    if not ckpt.exists() or ckpt.state()["phase"] != "unet":
        raise UserError(f"{out} has no checkpoint of the UNet phase to export yet")
    spec = WorldModelSpec.from_dict(json.loads((out / "train_base.json").read_text())["spec"])
    vae, unet, text_encoder = build_vae(spec), build_unet(spec), build_text_encoder(spec)
    ckpt.load_models({"vae": vae, "unet": unet, "text_encoder": text_encoder})
    state = ckpt.state()
    logger.info("exporting %s at UNet step %d", out, state["step"])
    return write_pipeline(out / "model", vae, unet, text_encoder, _tokenizer(out), state["scaling_factor"])


__all__ = ["BaseTrainConfig", "CONTEXT_LENGTH", "Checkpoint", "Phase", "export_checkpoint", "open_run", "lr_at", "render_batch", "sample_renders", "seed_of", "train_base"]
