"""A few training steps of a fine-tune config, timed and measured for peak memory in a fresh process.

The steps are the trainer's own: :func:`~sr_finetune.training.trainer.prepare_models` loads the
model as ``run_finetune`` does (trained modules fp32, frozen ones in the mixed-precision dtype,
LoRA, gradient checkpointing, the DPO reference copies), then ``compute_loss`` /
``compute_dpo_loss``, ``accelerator.backward``, clipping and the optimizer run on one synthetic
batch (a cached latent distribution and a prompt, as the trainer's caches hold them; its data
loader is left out). Each measurement runs in its own process so that its peak is its own:

- on the CPU, the peak resident set of the process (``ru_maxrss`` from ``wait4``), and the
  *baseline*: the resident set after the libraries are imported, before any model loads. What the
  plan predicts is compared with ``peak - baseline`` (the interpreter, torch and the other
  libraries are no part of a GPU's memory);
- on a GPU, ``torch.cuda.max_memory_allocated`` (the baseline is 0; the CUDA context is not in it).

The process writes its result file after every stage, so a process the kernel kills for memory
still says where it stopped.

    python -m sr_finetune.training.measured_step --spec JSON --steps N --result PATH
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# glibc returns every freed block above 128 KiB to the kernel: the resident set then follows the live
# bytes, as torch.cuda.max_memory_allocated does on a GPU. By default glibc keeps freed blocks in its
# heap: LoRA in fp32 at 768 px held 1.6-4.2 GiB of them above its live peak, and 8-bit AdamW's
# per-tensor temporaries 13-16% of a medium model's peak. Slower (page faults).
RETURN_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def resident_bytes(field: str = "VmRSS") -> int:
    """This process's resident set now (``VmRSS``; ``RssAnon``, ``RssFile``: its anonymous and
    file-backed parts, such as memory-mapped weights), in bytes; 0 where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def config_from_spec(spec: dict):
    """A validated ``FinetuneConfig`` from a JSON-able dict (``lora`` as a dict)."""
    from .config import FinetuneConfig, LoraSettings

    settings = dict(spec)
    settings["lora"] = LoraSettings(**settings.get("lora", {}))
    cfg = FinetuneConfig(**settings)
    cfg.validate()
    return cfg


def synthetic_batch(cfg, models, device, prompt: str = "a photo of a cat on a sofa") -> dict:
    """One row as the trainer's caches give it: a latent distribution at the config's resolution and
    the prompt's token ids (text encoder trained) or its cached embedding (text encoder frozen);
    for dpo a pair of such rows."""
    import torch

    from ..models import vae_scale_factor
    from .data import tokenize

    side = cfg.resolution // vae_scale_factor(models.vae)
    generator = torch.Generator().manual_seed(cfg.seed)

    def row() -> dict:
        shape = (cfg.train_batch_size, models.vae.config.latent_channels, side, side)
        part = {"latent_mean": torch.randn(shape, generator=generator).to(device), "latent_logvar": torch.full(shape, -4.0, device=device)}
        ids = tokenize(models.tokenizer, [prompt] * cfg.train_batch_size).to(device)
        if cfg.train_text_encoder:
            part["input_ids"] = ids
        else:
            with torch.no_grad():
                part["prompt_embeds"] = models.text_encoder(ids)[0].float()
        part["prompt_id"] = ["p0"] * cfg.train_batch_size
        return part

    if cfg.objective == "dpo":
        return {"chosen": row(), "rejected": row(), "prompt_id": ["p0"] * cfg.train_batch_size}
    return row()


def _watched(trained: dict) -> dict:
    """The last trainable parameter of each trained module (under LoRA an adapter's B, which the first step moves)."""
    watched = {}
    for name, module in trained.items():
        last = [(n, p) for n, p in module.named_parameters() if p.requires_grad][-1]
        watched[f"{name}.{last[0]}"] = last[1]
    return watched


def _import_model_libraries(lora: bool) -> None:
    """Import what loading the models imports, so that the baseline holds the libraries and not the models."""
    import accelerate  # noqa: F401
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    if lora:
        import peft  # noqa: F401


def run_steps(cfg, steps: int, result_path: Path) -> dict:
    """Load ``cfg.model`` as the trainer does and run ``steps`` training steps; write and return the result."""
    import torch

    from .trainer import build_optimizer, compute_dpo_loss, compute_loss, make_accelerator, prepare_models, trained_param_groups

    _import_model_libraries(bool(cfg.lora.rank))
    result: dict = {"stage": "imported", "baseline_bytes": resident_bytes()}

    def stage(name: str, **values) -> None:
        result.update(stage=name, **values)
        result.setdefault("resident_at", {})[name] = resident_bytes()
        result.setdefault("file_backed_at", {})[name] = resident_bytes("RssFile")
        result_path.write_text(json.dumps(result))

    stage("imported")
    accelerator = make_accelerator(cfg, result_path.parent / "accelerate")
    device = accelerator.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    stage("loading the model")
    models = prepare_models(cfg, device)
    trained, param_groups = trained_param_groups(cfg, models.unet, models.text_encoder)
    optimizer = build_optimizer(cfg, param_groups, device)
    *prepared, optimizer = accelerator.prepare(*trained.values(), optimizer)
    trained = dict(zip(trained, prepared))
    params = [p for group in param_groups for p in group["params"]]
    watched = _watched({name: accelerator.unwrap_model(m) for name, m in trained.items()})
    before = {name: p.detach().clone() for name, p in watched.items()}
    unet, text_encoder = trained.get("unet", models.unet), trained.get("text_encoder", models.text_encoder)
    reference = models.reference(accelerator.unwrap_model(unet)) if cfg.anchored else None
    batch = synthetic_batch(cfg, models, device)
    step_args = dict(
        unet=unet, text_encoder=text_encoder, vae=models.vae, noise_scheduler=models.noise_scheduler, prediction_type=models.prediction_type, cfg=cfg,
        weight_dtype=models.weight_dtype, unet_dtype=models.unet_dtype,
    )
    stage("loaded", loaded_peak_bytes=torch.cuda.max_memory_allocated() if cuda else None, prediction_type=models.prediction_type)
    for module in trained.values():
        module.train()
    seconds, losses, skipped = [], [], 0
    for step in range(steps):
        start = time.perf_counter()
        generator = torch.Generator(device).manual_seed(cfg.seed + step)
        with accelerator.accumulate(*trained.values()):
            if cfg.objective == "dpo":
                loss, _ = compute_dpo_loss(batch, generator=generator, reference=reference, **step_args)
            else:
                loss = compute_loss(batch, generator=generator, **step_args)
            accelerator.backward(loss)
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        skipped += accelerator.optimizer_step_was_skipped  # fp16: the gradient scaler skips a step with inf/NaN gradients
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        stage(f"step {step + 1} of {steps}", seconds=seconds, losses=losses, skipped_steps=skipped)
    changed = {name: not torch.equal(before[name], p.detach()) for name, p in watched.items()}
    stage("done", changed=changed, peak_bytes=torch.cuda.max_memory_allocated() if cuda else None)
    return result


def measure(spec: dict, steps: int, work_dir: Path, env: dict | None = None, tag: str = "measure") -> dict:
    """Run :func:`run_steps` in a fresh process; its result plus ``peak_rss_bytes`` (the process's
    ``ru_maxrss``), ``exit_code`` and ``log`` (the path of its output)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    result_path, log = work_dir / f"{tag}.json", work_dir / f"{tag}.log"
    cmd = [sys.executable, "-m", "sr_finetune.training.measured_step", "--spec", json.dumps(spec), "--steps", str(steps), "--result", str(result_path)]
    return run_child(cmd, result_path, log, env)


def run_child(cmd: list[str], result_path: Path, log: Path, env: dict | None = None) -> dict:
    """Run ``cmd``, which writes a JSON result to ``result_path``; add its peak resident set and exit code."""
    result_path.unlink(missing_ok=True)
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, **OFFLINE_ENV, **(env or {})))
        _, status, usage = os.wait4(process.pid, 0)
    result = json.loads(result_path.read_text()) if result_path.exists() else {"stage": "starting"}
    result.update(peak_rss_bytes=usage.ru_maxrss * 1024, exit_code=os.waitstatus_to_exitcode(status), log=str(log))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="FinetuneConfig settings as JSON")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    run_steps(config_from_spec(json.loads(args.spec)), args.steps, args.result)


if __name__ == "__main__":
    main()


__all__ = ["RETURN_FREED_MEMORY", "config_from_spec", "measure", "resident_bytes", "run_child", "run_steps", "synthetic_batch"]
