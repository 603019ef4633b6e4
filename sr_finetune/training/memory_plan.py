"""A memory plan of a fine-tune run, per process, printed before any weights load.

Every model is built on the meta device from its config (a local pipeline folder, or the shipped
configs of the two SD 2.1 hub ids, see ``sr_finetune.real_size``), so the plan costs no memory.
Weights, gradients, optimizer state, EMA and the DPO reference follow from the parameter counts and
the trainer's dtypes (trained modules fp32; frozen ones in the mixed-precision dtype). The
activations are an estimate: the bytes of the tensors autograd saves for backward in one training
forward, traced with fake tensors (shapes and dtypes, no memory; see :func:`saved_activation_bytes`).

The peak is taken by phase: what is held throughout (weights, optimizer state, EMA, the DPO
reference), plus the larger of the forward-backward phase (activations, autocast's half copies of
the trained weights) and the optimizer step (gradients, and on the CPU 8-bit AdamW's temporaries).
The backward frees activations as it writes gradients, and the step runs after it has freed them.
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..models import resolve_device, set_attention_backend
from ..real_size import CONFIG_FILES, VARIANTS, build_model, real_size_configs
from .config import ONLINE_OBJECTIVES, FinetuneConfig

GIB = 2**30
CARDS_GB = (24, 40, 80)
USABLE_SHARE = 0.9  # of a card's memory, leaving the rest to the CUDA context and allocator fragmentation (an assumption)
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2}  # per trained parameter: two moments in fp32, or in 8 bits
# bitsandbytes' 8-bit AdamW on the CPU (its torch backend, 0.50) dequantizes one tensor's two moments
# to fp32 and updates them with temporaries: measured 20 B per element of the tensor it steps,
# freed after it (a GPU runs the update in one fused kernel, without them).
CPU_8BIT_STEP_BYTES = 20
HALF = {"no": 4, "fp16": 2, "bf16": 2}  # bytes of a frozen module's parameter under each mixed_precision


def architecture_configs(model: str) -> dict[str, dict]:
    """The unet / vae / text_encoder configs of ``model``: a local pipeline folder, or a hub id
    whose configuration ships with the package."""
    folder = Path(model)
    if folder.is_dir():
        return {name: json.loads((folder / CONFIG_FILES[name]).read_text()) for name in ("unet", "vae", "text_encoder")}
    for variant, hub_id in VARIANTS.items():
        if model == hub_id:
            return real_size_configs(variant)
    raise UserError(f"plan: no architecture known for model {model!r}: give a local pipeline folder or one of {', '.join(VARIANTS.values())}")


def lora_targets(unet: torch.nn.Module, targets: list[str]) -> list[torch.nn.Linear]:
    """The linear layers LoRA adapts: those whose name is, or ends in, one of ``targets``."""
    return [m for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)]


def lora_parameter_count(unet: torch.nn.Module, rank: int, targets: list[str]) -> int:
    """Parameters of rank-``rank`` LoRA adapters (A: r x in, B: out x r) on the targeted linear layers."""
    return sum(rank * (m.in_features + m.out_features) for m in lora_targets(unet, targets))


class _FusedAttention(torch.autograd.Function):
    """Stands in for ``scaled_dot_product_attention`` while tracing: on fake or meta tensors torch runs
    the math kernel, which keeps the n x n attention matrix, while sdpa (flash / memory-efficient)
    and xformers on a GPU keep only q, k, v, the output and a log-sum-exp per query."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out


@contextmanager
def fused_attention():
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, *args, **kwargs: _FusedAttention.apply(q, k, v)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _is_weight(t: torch.Tensor) -> bool:
    return isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)


@contextmanager
def _counting_saved_tensors(total: list[int]):
    kept = {}  # id -> tensor: a tensor saved by two operations is counted once

    def pack(t: torch.Tensor):
        # weights (and their transposed views, which a linear layer saves) are not activations
        if not _is_weight(t) and id(t) not in kept:
            kept[id(t)] = t
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def saved_activation_bytes(model: torch.nn.Module, inputs: dict, checkpointing: bool) -> int:
    """Bytes autograd keeps for backward in one forward of ``model`` (fake or meta tensors).

    With gradient checkpointing, what is kept outside the checkpointed blocks plus the largest
    block's own activations, which its recomputation in backward holds at once. An estimate: it
    leaves out temporaries that live only inside one operation and allocator overhead."""
    total = [0]
    if not checkpointing:
        with _counting_saved_tensors(total):
            model(**inputs)
        return total[0]
    # the largest checkpointed block, measured without checkpointing
    inner, blocks = [0], []
    blocks_types = ("ResnetBlock2D", "Transformer2DModel", "CLIPEncoderLayer")
    hooks = []
    for m in model.modules():
        if type(m).__name__ in blocks_types:
            hooks.append(m.register_forward_pre_hook(lambda mod, args: blocks.append(-inner[0])))
            hooks.append(m.register_forward_hook(lambda mod, args, out: blocks.append(blocks.pop() + inner[0])))
    try:
        with _counting_saved_tensors(inner):
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    _set_checkpointing(model, True)
    try:
        with _counting_saved_tensors(total):
            model(**inputs)
    finally:
        _set_checkpointing(model, False)
    return total[0] + max(blocks, default=0)


def _set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    if hasattr(model, "enable_gradient_checkpointing"):  # diffusers
        (model.enable_gradient_checkpointing if on else model.disable_gradient_checkpointing)()
    else:  # transformers
        (model.gradient_checkpointing_enable if on else model.gradient_checkpointing_disable)()


FORWARD, STEP = "forward and backward", "optimizer step"


@dataclass
class MemoryPlan:
    model: str
    parameters: dict[str, tuple[int, int]]  # module -> (total, trainable)
    items: dict[str, int]  # what -> bytes, per process
    notes: list[str] = field(default_factory=list)
    phases: dict[str, str] = field(default_factory=dict)  # item -> FORWARD or STEP; the others are held throughout

    def phase_bytes(self, phase: str | None) -> int:
        """Bytes of the items of ``phase`` (None: those held throughout)."""
        return sum(size for name, size in self.items.items() if self.phases.get(name) == phase)

    @property
    def peak_phase(self) -> str:
        return FORWARD if self.phase_bytes(FORWARD) > self.phase_bytes(STEP) else STEP

    @property
    def peak(self) -> int:
        return self.phase_bytes(None) + max(self.phase_bytes(FORWARD), self.phase_bytes(STEP))

    @property
    def largest(self) -> str:
        return max(self.items, key=self.items.get)

    def fits(self) -> dict[int, bool]:
        return {gb: self.peak <= gb * 1e9 * USABLE_SHARE for gb in CARDS_GB}

    def lines(self) -> list[str]:
        out = [f"memory plan of {self.model}, per process (GiB = 2^30 bytes)", "parameters:"]
        for name, (total, trainable) in self.parameters.items():
            out.append(f"  {name:<14} {total:>13,} total  {trainable:>13,} trainable")
        for phase, title in ((None, "held throughout"), (FORWARD, f"{FORWARD} (freed before the step)"), (STEP, STEP)):
            out.append(f"memory, {title}:")
            for name, size in self.items.items():
                if self.phases.get(name) == phase:
                    out.append(f"  {name:<44} {size / GIB:8.2f} GiB")
        out.append(f"  {'predicted peak':<44} {self.peak / GIB:8.2f} GiB  (at the {self.peak_phase}; largest item: {self.largest})")
        fits = self.fits()
        out.append("fits: " + ", ".join(f"{gb} GB {'yes' if ok else 'no'}" for gb, ok in fits.items()) + f"  (using {USABLE_SHARE:.0%} of a card)")
        out += [f"note: {n}" for n in self.notes]
        return out


def plan_memory(cfg: FinetuneConfig, device: str | None = None) -> MemoryPlan:
    """What one training process of ``cfg`` holds, from the model's configs on the meta device, on
    ``device`` (``cpu`` or ``cuda``; default: where ``cfg`` would train on this machine)."""
    device = device or resolve_device(cfg.device).type
    configs = architecture_configs(cfg.model)
    models = {name: build_model(name, configs[name], empty=True) for name in ("unet", "text_encoder", "vae")}
    totals = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    lora = lora_parameter_count(models["unet"], cfg.lora.rank, list(cfg.lora.target_modules)) if cfg.lora.rank else 0
    trained = {
        "unet": (lora or totals["unet"]) if cfg.train_unet else 0,
        "text_encoder": totals["text_encoder"] if cfg.train_text_encoder else 0,
        "vae": 0,
    }
    parameters = {name: (totals[name] + (lora if name == "unet" else 0), trained[name]) for name in models}
    half = HALF[cfg.mixed_precision]
    # the trainer keeps a trained module (and the UNet under LoRA) in fp32, a frozen one in the mixed-precision dtype
    weight_bytes = {
        "unet": totals["unet"] * (4 if cfg.train_unet else half) + lora * 4,
        "text_encoder": totals["text_encoder"] * (4 if cfg.train_text_encoder else half),
        "vae": totals["vae"] * half,
    }
    n_trained = sum(trained.values())
    items = {f"weights {name}": size for name, size in weight_bytes.items()}
    phases = {}
    items[f"optimizer state ({cfg.optimizer}, {OPTIMIZER_BYTES[cfg.optimizer]} B/param)"] = n_trained * OPTIMIZER_BYTES[cfg.optimizer]
    if cfg.use_ema:
        items["EMA (fp32 copy of the trained parameters)"] = n_trained * 4
    notes = []
    if cfg.anchored:
        reference = (totals["unet"] if cfg.train_unet and not cfg.lora.rank else 0) + (totals["text_encoder"] if cfg.train_text_encoder else 0)
        items["reference copy (frozen starting model)"] = reference * half
        if cfg.lora.rank:
            notes.append("with LoRA the reference is the trained UNet with its adapters off: no copy")
    forward = _activation_items(cfg, configs, device, notes)
    if cfg.mixed_precision != "no" and cfg.gradient_checkpointing and forward:
        # autocast caches its half copy of every trained fp32 weight until the forward returns; without
        # checkpointing the copies are saved for backward and the trace counts them
        forward["autocast's half copies of the trained weights"] = n_trained * 2
    items.update(forward)
    phases.update(dict.fromkeys(forward, FORWARD))
    step = {"gradients (fp32)": n_trained * 4}
    if cfg.optimizer == "adamw8bit" and device == "cpu":
        largest = _largest_trained_tensor(models, cfg)
        step[f"8-bit AdamW step on the CPU ({CPU_8BIT_STEP_BYTES} B x {largest:,}, the largest trained tensor)"] = CPU_8BIT_STEP_BYTES * largest
    items.update(step)
    phases.update(dict.fromkeys(step, STEP))
    notes.append(
        "activations are an estimate: the tensors autograd saves for backward in one training forward, traced with fake tensors "
        "(with gradient checkpointing: those kept between checkpointed blocks plus the largest block, recomputed in backward; "
        "attention as a fused kernel keeps it for sdpa and xformers, the n x n matrix only for attention=eager); "
        "one operation's temporaries, the CUDA context and allocator overhead are not in it"
    )
    notes.append(f"peak: what is held throughout plus the larger of the {FORWARD} (activations) and the {STEP} (gradients): the backward frees activations as it writes gradients")
    return MemoryPlan(cfg.model, parameters, items, notes, phases)


def _largest_trained_tensor(models: dict, cfg: FinetuneConfig) -> int:
    """Elements of the largest tensor the optimizer steps (under LoRA: its largest adapter matrix)."""
    sizes = []
    if cfg.train_unet and cfg.lora.rank:
        sizes += [cfg.lora.rank * max(m.in_features, m.out_features) for m in lora_targets(models["unet"], list(cfg.lora.target_modules))]  # A: r x in, B: out x r
    elif cfg.train_unet:
        sizes += [p.numel() for p in models["unet"].parameters()]
    if cfg.train_text_encoder:
        sizes += [p.numel() for p in models["text_encoder"].parameters()]
    return max(sizes, default=0)


def _activation_items(cfg: FinetuneConfig, configs: dict[str, dict], device: str, notes: list[str]) -> dict[str, int]:
    if cfg.objective in ONLINE_OBJECTIVES:
        notes.append(f"objective={cfg.objective}: activations of sampling through the denoising steps are not estimated (not in the peak)")
        return {}
    rows = cfg.train_batch_size * (2 if cfg.objective == "dpo" else 1)  # dpo: chosen and rejected in one forward
    if cfg.objective == "dpo" and cfg.dpo_sft_weight:
        notes.append("dpo: the regularization rows added to the UNet forward (dpo_sft_weight > 0) are not counted")
    # Mixed precision is traced under the CPU's autocast (convolutions and matmuls in the half dtype,
    # their inputs saved in it). Without a GPU the CUDA autocast cannot be traced, and it keeps norms
    # and softmax in fp32: a GPU plan traces in fp32, an upper bound of what autocast saves.
    autocast = cfg.mixed_precision != "no" and device == "cpu"
    if cfg.mixed_precision != "no" and not autocast:
        notes.append(f"{cfg.mixed_precision} on {device}: activations traced in fp32 (CUDA's autocast cannot be traced without a GPU; an upper bound)")
    with _fake_models(configs) as models, fused_attention() if cfg.attention != "eager" else nullcontext(), _quiet_casts():
        if cfg.attention == "eager":  # the attention matrix computed and kept, as the trainer runs it
            set_attention_backend(models["unet"], "eager")
        with torch.autocast("cpu", dtype=torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16) if autocast else nullcontext():
            return _traced_activations(cfg, models, rows, side=cfg.resolution // 2 ** (len(configs["vae"]["block_out_channels"]) - 1))  # the VAE's latent (SD: 1/8)


@contextmanager
def _fake_models(configs: dict[str, dict]):
    """The UNet and text encoder built from ``configs`` as fake CPU tensors: real shapes, dtypes and
    dispatch (autocast included), no memory."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        yield {name: build_model(name, configs[name]) for name in ("unet", "text_encoder")}


@contextmanager
def _quiet_casts():
    """No diffusers or transformers warnings (casts, deprecations) while tracing."""
    import warnings

    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        diffusers_logging.set_verbosity(level)


def _traced_activations(cfg: FinetuneConfig, models: dict, rows: int, side: int) -> dict[str, int]:
    items = {}
    unet, text_encoder = models["unet"], models["text_encoder"]
    hidden = text_encoder.config.hidden_size
    if cfg.train_unet:
        unet.train().requires_grad_(not cfg.lora.rank)
        if cfg.lora.rank:  # the adapted layers' inputs are saved for the adapters' gradients; frozen layers save none of theirs
            for layer in lora_targets(unet, list(cfg.lora.target_modules)):
                layer.weight.requires_grad_(True)
        inputs = {
            "sample": torch.empty(rows, unet.config.in_channels, side, side),
            "timestep": torch.zeros(rows, dtype=torch.long),
            "encoder_hidden_states": torch.empty(rows, text_encoder.config.max_position_embeddings, hidden, requires_grad=cfg.train_text_encoder),
        }
        items[f"activations unet (estimate: {rows} rows at {cfg.resolution} px)"] = saved_activation_bytes(unet, inputs, cfg.gradient_checkpointing)
    if cfg.train_text_encoder:
        text_encoder.train().requires_grad_(True)
        ids = {"input_ids": torch.zeros(rows, text_encoder.config.max_position_embeddings, dtype=torch.long)}
        items[f"activations text encoder (estimate: {rows} rows)"] = saved_activation_bytes(text_encoder, ids, cfg.gradient_checkpointing)
    return items


__all__ = ["MemoryPlan", "architecture_configs", "lora_parameter_count", "plan_memory", "saved_activation_bytes"]
