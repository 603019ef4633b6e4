"""SD 2.1 at its real size on whatever device there is: generation and fine-tuning steps, timed, with peak memory against the plan.

For each variant (``2-1-base``: 512 px, epsilon; ``2-1``: 768 px, v-prediction) a seeded
random-weight pipeline folder is written by ``sr-finetune real-size-model`` (or reused from
``--models``), then, each configuration in its own process:

- generation: one image at the native size, 2 DDIM steps, without guidance (scale 1) and with
  (scale 7.5), through ``load_pipeline`` and ``generate_images``, as ``sr-finetune generate`` runs;
- fine-tuning: batch 1 (``--batch``), native size, gradient checkpointing, for the UNet, UNet + text encoder,
  LoRA rank 4 on the UNet (alone; with the text encoder trained in full), ``objective=dpo`` on
  the UNet with its frozen reference copy, and dpo with LoRA (the reference: adapters off, no copy); AdamW in fp32 and under each ``--precisions`` autocast
  (bf16 where torch supports it on the device; fp16 with gradient scaling on a GPU); 8-bit AdamW
  for UNet + text encoder where the installed bitsandbytes supports the device, else one skip line.
  The steps are the trainer's (``sr_finetune.training.measured_step``: ``prepare_models``,
  ``compute_loss`` / ``compute_dpo_loss``, backward, clipping, optimizer) on one synthetic cached
  batch. Each run asserts that the loss is finite and that a trained parameter changed.

Memory: on the CPU the peak resident set of the process (``ru_maxrss``) less its *baseline* (the
resident set after the libraries are imported, before any model loads); on a GPU
``torch.cuda.max_memory_allocated``. Every training configuration prints the memory plan's predicted
peak (``sr-finetune plan``) and measured / predicted. Before a configuration starts, its predicted
peak (+ the baseline on the CPU) is compared with the memory available (MemAvailable, or the GPU's
free memory) less ``--margin-gib``: one that would not fit is not started, and its row says so with
the prediction. s/step is that of the last of ``--steps`` steps (the first one also allocates the
optimizer state).

    python benchmarks/bench_real_size.py [--variants 2-1-base 2-1] [--only unet dpo-unet generate] [--precisions no bf16]
        [--optimizers adamw adamw8bit] [--batch 1] [--steps 2] [--models DIR] [--device auto|cpu] [--attention sdpa|xformers] [--budget-s S] [--out table.md] [--dry-run]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

GIB = 2**30
NATIVE = {"2-1-base": 512, "2-1": 768}
LORA = {"rank": 4}
TRAINING = {  # name -> FinetuneConfig settings
    "unet": {"train_text_encoder": False},
    "unet+te": {"train_text_encoder": True},
    "lora-unet": {"train_text_encoder": False, "lora": LORA},
    "lora-unet+te": {"train_text_encoder": True, "lora": LORA},
    "dpo-unet": {"train_text_encoder": False, "objective": "dpo"},
    "dpo-lora-unet": {"train_text_encoder": False, "objective": "dpo", "lora": LORA},  # the reference is the UNet with its adapters off
}
EIGHT_BIT = ("unet+te",)  # configurations also run with optimizer=adamw8bit
GUIDANCE = {"generate": 1.0, "generate-cfg": 7.5}  # name -> guidance scale (1: no classifier-free guidance)
PROMPT = "a photo of a cat on a sofa"


@dataclass
class Row:
    variant: str
    name: str
    precision: str = "fp32"
    optimizer: str = ""
    seconds: float | None = None  # per step (training) or per image (generation)
    measured: int | None = None  # bytes: peak RSS - baseline (CPU) or max_memory_allocated (GPU)
    predicted: int | None = None  # bytes: the memory plan's peak (training only)
    loss: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    def ratio(self) -> float | None:
        return self.measured / self.predicted if self.measured and self.predicted else None


# ---------------------------------------------------------------------------------------------
# the machine


def device_kind(requested: str) -> str:
    import torch

    return "cuda" if requested == "auto" and torch.cuda.is_available() else "cpu"


def device_line(kind: str) -> str:
    """The device model, with the CPU model and threads either way."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor() or "unknown CPU")
    threads = os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))
    line = f"CPU {cpu}, {os.cpu_count()} cores, OMP_NUM_THREADS={threads}, load average {os.getloadavg()[0]:.2f}"
    if kind == "cuda":
        line = f"GPU {_nvidia_smi('name')} ({_nvidia_smi('memory.total')} MiB); " + line
    return line


def _nvidia_smi(query: str) -> str:
    """One value of the first GPU from nvidia-smi (the parent never initialises CUDA, which would hold memory)."""
    out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0].strip()


def available_bytes(kind: str) -> int:
    """Memory a new process can have now: MemAvailable, or the GPU's free memory."""
    if kind == "cuda":
        return int(_nvidia_smi("memory.free")) * 2**20
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def eight_bit_skip(kind: str) -> str | None:
    """Why 8-bit AdamW cannot run here (None: it can): bitsandbytes missing, or one step on the device fails."""
    code = (
        "import torch, bitsandbytes as bnb; p = torch.nn.Parameter(torch.ones(4096, device='%s')); "
        "o = bnb.optim.AdamW8bit([p]); p.grad = torch.ones_like(p); o.step()" % kind
    )
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if probe.returncode == 0:
        return None
    last = (probe.stderr.strip().splitlines() or ["failed"])[-1]
    return "bitsandbytes is not installed" if "No module named 'bitsandbytes'" in last else f"bitsandbytes cannot step on {kind}: {last[:160]}"


# ---------------------------------------------------------------------------------------------
# generation (child process)


def child_generate(spec: dict, result_path: Path) -> None:
    """One image at the native size, 2 DDIM steps, as ``sr-finetune generate`` makes it."""
    import torch

    from sr_finetune.generation import GenerateConfig, WorkItem, generate_images
    from sr_finetune.models import load_pipeline
    from sr_finetune.training.measured_step import resident_bytes

    result = {"stage": "loading the pipeline", "baseline_bytes": resident_bytes()}
    result_path.write_text(json.dumps(result))
    device = "cuda" if spec["device"] == "cuda" else "cpu"
    pipe = load_pipeline(spec["model"], dtype=spec["dtype"], device=device, scheduler="ddim", attention=spec["attention"])
    size = spec["size"]
    cfg = GenerateConfig(model=spec["model"], steps=2, guidance_scale=spec["guidance"], height=size, width=size)
    item = WorkItem(prompt_id="p0", prompt=PROMPT, index=0, seed=0, image_id="p0_0", path="p0_0.png")
    result["stage"] = "generating"
    result_path.write_text(json.dumps(result))
    start = time.perf_counter()
    image = generate_images(pipe, cfg, [item])[0]
    if device == "cuda":
        torch.cuda.synchronize()
    result.update(stage="done", seconds=time.perf_counter() - start, image_size=list(image.size), peak_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None)
    result_path.write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# the parent


def ensure_model(models: Path, variant: str) -> Path:
    """The random-weight pipeline of ``variant`` under ``models``, written by real-size-model if absent."""
    folder = models / variant
    if (folder / "model_index.json").exists():
        return folder
    print(f"{variant}: writing a random-weight pipeline with sr-finetune real-size-model -> {folder}", flush=True)
    subprocess.run([sys.executable, "-m", "sr_finetune.commands.cli", "real-size-model", str(folder), "--variant", variant], check=True)
    return folder


def training_spec(model: Path, variant: str, settings: dict, precision: str, optimizer: str, kind: str, attention: str, batch: int = 1) -> dict:
    return dict(
        model=str(model), resolution=NATIVE[variant], train_batch_size=batch, gradient_checkpointing=True, mixed_precision=precision, optimizer=optimizer,
        device="auto" if kind == "cuda" else "cpu", report_to="none", attention=attention, dataloader_num_workers=0, **settings,
    )


def plan_peak(spec: dict) -> int:
    from sr_finetune.training.measured_step import config_from_spec
    from sr_finetune.training.memory_plan import plan_memory

    return plan_memory(config_from_spec(spec)).peak


def weight_bytes(model: Path, dtype_bytes: int) -> int:
    """Bytes of the pipeline's weights in a dtype (generation's prediction: weights only)."""
    from sr_finetune.real_size import parameter_counts
    from sr_finetune.training.memory_plan import architecture_configs

    return sum(parameter_counts(architecture_configs(str(model))).values()) * dtype_bytes


class Bench:
    """Runs configurations one at a time, each in its own process, after checking that it fits; keeps the rows."""

    def __init__(self, args, kind: str, work: Path):
        self.args, self.kind, self.work = args, kind, work
        self.baseline = int(0.9 * GIB) if kind == "cpu" else 0  # until a child has measured it
        self.rows: list[Row] = []
        self.failed = False  # a run with a non-finite loss or no changed parameter

    def fits(self, row: Row, predicted: int) -> bool:
        """Whether ``predicted`` (+ the baseline) fits the available memory less the margin; else the row says why not."""
        available, margin = available_bytes(self.kind), int(self.args.margin_gib * GIB)
        need = predicted + self.baseline
        if need <= available - margin:
            return True
        row.note = (
            f"not run: does not fit: predicted {predicted / GIB:.2f} GiB + baseline {self.baseline / GIB:.2f} GiB > available {available / GIB:.2f} GiB "
            f"- margin {margin / GIB:.0f} GiB; stopped before starting the process"
        )
        return False

    def record(self, row: Row) -> None:
        self.rows.append(row)
        print(format_row(row), flush=True)

    def finish(self, row: Row, result: dict) -> dict | None:
        """The child's result if it finished; else the row says where it stopped."""
        if result["exit_code"] != 0 or result.get("stage") != "done":
            row.note = f"stopped at '{result.get('stage')}' (exit code {result['exit_code']}; log {result['log']})"
            return None
        if self.kind == "cpu":
            self.baseline = result["baseline_bytes"]
            row.measured = result["peak_rss_bytes"] - result["baseline_bytes"]
            row.extra.update(peak_rss=result["peak_rss_bytes"], baseline=result["baseline_bytes"])
        else:
            row.measured = result["peak_bytes"]
        return result

    def generate(self, variant: str, model: Path, name: str, skip: str | None = None) -> None:
        from sr_finetune.training.measured_step import run_child

        dtype = "fp32" if self.kind == "cpu" else "fp16"
        row = Row(variant, name, precision=dtype)
        weights = weight_bytes(model, 4 if dtype == "fp32" else 2)
        row.extra["weights"] = weights
        if skip or self.args.dry_run:
            row.note = f"{skip or 'dry run'} (weights {weights / GIB:.2f} GiB)"
        elif self.fits(row, 2 * weights):  # the weights and, while they load, their file pages
            spec = dict(model=str(model), size=NATIVE[variant], guidance=GUIDANCE[name], dtype=dtype, device=self.kind, attention=self.args.attention)
            result_path = self.work / f"{variant}-{name}.json"
            cmd = [sys.executable, __file__, "--child", "generate", "--spec", json.dumps(spec), "--result", str(result_path)]
            result = self.finish(row, run_child(cmd, result_path, self.work / f"{variant}-{name}.log", self.env()))
            if result is not None:
                row.seconds = result["seconds"]
                row.note = f"{result['image_size'][0]} px, guidance {GUIDANCE[name]:g}, weights {weights / GIB:.2f} GiB"
        self.record(row)

    def train(self, variant: str, model: Path, name: str, precision: str, optimizer: str, skip: str | None = None) -> None:
        from sr_finetune.training.measured_step import measure

        spec = training_spec(model, variant, TRAINING[name], precision, optimizer, self.kind, self.args.attention, self.args.batch)
        row = Row(variant, name, precision=label(precision), optimizer=optimizer, predicted=plan_peak(spec))
        if skip or self.args.dry_run:
            row.note = skip or "dry run"
        elif self.fits(row, row.predicted):
            tag = f"{variant}-{name}-{precision}-{optimizer}"
            result = self.finish(row, measure(spec, self.args.steps, self.work, self.env(), tag=tag))
            if result is not None:
                losses, changed = result["losses"], result["changed"]
                row.seconds, row.loss = result["seconds"][-1], losses[-1]
                ok = all(map(_finite, losses)) and all(changed.values())
                row.note = ("ok" if ok else "FAILED") + f": losses {', '.join(f'{x:.4f}' for x in losses)}; changed {', '.join(k for k, v in changed.items() if v) or 'nothing'}"
                if result["skipped_steps"]:
                    row.note += f"; {result['skipped_steps']} step(s) skipped by the fp16 gradient scaler"
                if not ok:
                    self.failed = True
        self.record(row)

    def env(self) -> dict:
        if self.kind != "cpu":
            return {}
        from sr_finetune.training.measured_step import RETURN_FREED_MEMORY

        return {"CUDA_VISIBLE_DEVICES": "", **(RETURN_FREED_MEMORY if self.args.return_freed_memory else {})}


def label(precision: str) -> str:
    """A mixed_precision setting as the table shows it."""
    return {"no": "fp32"}.get(precision, precision)


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def format_row(row: Row) -> str:
    seconds = "" if row.seconds is None else f"{row.seconds:.2f} s/{'image' if row.name.startswith('generate') else 'step'}"
    measured = "" if row.measured is None else f"measured {row.measured / GIB:.2f} GiB"
    predicted = "" if row.predicted is None else f"plan {row.predicted / GIB:.2f} GiB"
    ratio = "" if row.ratio() is None else f"measured/plan {row.ratio():.3f}"
    parts = [p for p in (seconds, measured, predicted, ratio, row.note) if p]
    return f"{row.variant} {row.name} {row.precision}{' ' + row.optimizer if row.optimizer else ''}: " + "; ".join(parts)


def markdown(rows: list[Row], header: list[str]) -> str:
    gib = lambda b: "" if b is None else f"{b / GIB:.2f}"  # noqa: E731
    lines = [*header, "", "| variant | configuration | precision | optimizer | s/step (s/image) | measured peak GiB | plan GiB | measured/plan | last loss | note |", "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r.variant} | {r.name} | {r.precision} | {r.optimizer} | {'' if r.seconds is None else f'{r.seconds:.2f}'} | {gib(r.measured)} | {gib(r.predicted)} | "
            f"{'' if r.ratio() is None else f'{r.ratio():.3f}'} | {'' if r.loss is None else f'{r.loss:.4f}'} | {r.note} |"
        )
    return "\n".join(lines) + "\n"


def fit_table(batches: tuple[int, ...] = (1, 8)) -> str:
    """The plan of every configuration (gradient checkpointing, native size) at each batch size: the
    predicted peak and the smallest card it fits (README "Will it fit?")."""
    from sr_finetune.real_size import VARIANTS
    from sr_finetune.training.measured_step import config_from_spec
    from sr_finetune.training.memory_plan import CARDS_GB, plan_memory

    columns = [(variant, batch) for variant in NATIVE for batch in batches]
    lines = [
        "| configuration | optimizer | precision | " + " | ".join(f"{v} ({NATIVE[v]} px), batch {b}" for v, b in columns) + " |",
        "|---|---|---|" + "---:|" * len(columns),
    ]
    for name in TRAINING:
        for optimizer in ("adamw", "adamw8bit"):
            for precision in ("no", "bf16"):
                cells = []
                for variant, batch in columns:
                    spec = training_spec(Path(VARIANTS[variant]), variant, TRAINING[name], precision, optimizer, "cuda", "sdpa", batch)
                    plan = plan_memory(config_from_spec(spec), device="cuda")
                    card = next((f"{gb} GB" for gb, ok in plan.fits().items() if ok), f"> {CARDS_GB[-1]} GB")
                    cells.append(f"{plan.peak / GIB:.1f}: {card}")
                lines.append(f"| {name} | {optimizer} | {label(precision)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plan_of_runs(args, kind: str) -> list[tuple]:
    """(variant, what, name, precision, optimizer) in the order they run."""
    runs = []
    for variant in args.variants:
        for name in GUIDANCE:
            if not args.only or name in args.only:
                runs.append((variant, "generate", name, None, None))
        for precision in args.precisions:
            for name in TRAINING:
                if (not args.only or name in args.only) and "adamw" in args.optimizers:
                    runs.append((variant, "train", name, precision, "adamw"))
            for name in EIGHT_BIT:
                if (not args.only or name in args.only) and "adamw8bit" in args.optimizers:
                    runs.append((variant, "train", name, precision, "adamw8bit"))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(NATIVE), choices=list(NATIVE))
    parser.add_argument("--only", nargs="+", choices=[*GUIDANCE, *TRAINING], help="run only these configurations")
    parser.add_argument("--precisions", nargs="+", default=None, choices=["no", "bf16", "fp16"], help="mixed_precision settings (default: no bf16; fp16 only on a GPU)")
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "adamw8bit"], choices=["adamw", "adamw8bit"], help="AdamW for every configuration, 8-bit AdamW (bitsandbytes) for those of EIGHT_BIT")
    parser.add_argument("--batch", type=int, default=1, help="train_batch_size of the fine-tuning steps")
    parser.add_argument("--steps", type=int, default=2, help="training steps per configuration; the last one's time is reported")
    parser.add_argument("--models", type=Path, help="folder of the pipelines (<variant>/), written there if absent (default: a temporary folder)")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto")
    parser.add_argument("--attention", choices=["sdpa", "xformers", "eager"], default="sdpa")
    parser.add_argument("--margin-gib", type=float, default=2.0, help="memory left free: a configuration whose prediction leaves less is not started")
    parser.add_argument("--budget-s", type=float, help="start no configuration after this many seconds (the rest get 'not run' rows)")
    parser.add_argument("--return-freed-memory", action="store_true", help="CPU: have glibc return freed blocks, so that the peak RSS follows the live bytes (see RETURN_FREED_MEMORY)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--fit-table", action="store_true", help="print the plan's peak (GiB) and smallest fitting card (24/40/80 GB) of every configuration at batch 1 and 8; start nothing")
    parser.add_argument("--dry-run", action="store_true", help="print the plan of every configuration; start nothing")
    parser.add_argument("--child", choices=["generate"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_generate(json.loads(args.spec), args.result)
    if args.fit_table:
        return print(fit_table())

    import torch

    from sr_finetune.real_size import VARIANTS

    kind = device_kind(args.device)
    args.precisions = args.precisions or ["no", "bf16"]
    if kind == "cpu" and "fp16" in args.precisions:
        sys.exit("bench_real_size: fp16 autocast with gradient scaling needs a GPU; use --precisions no bf16 on the CPU")
    if kind == "cuda" and "bf16" in args.precisions and not torch.cuda.is_bf16_supported():
        print("bf16: skipped, this GPU does not support bf16")
        args.precisions.remove("bf16")
    header = [
        f"bench_real_size: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, device {kind}",
        device_line(kind),
        f"batch {args.batch}, native size, gradient checkpointing, {args.steps} steps (s/step of the last), attention {args.attention}; "
        + ("memory: peak RSS of the process less its baseline (RSS after imports)" if kind == "cpu" else "memory: torch.cuda.max_memory_allocated")
        + ("; glibc returns freed blocks (--return-freed-memory)" if kind == "cpu" and args.return_freed_memory else ""),
    ]
    print("\n".join(header), flush=True)
    eight_bit = eight_bit_skip(kind) if any(run[4] == "adamw8bit" for run in plan_of_runs(args, kind)) else None
    with tempfile.TemporaryDirectory(prefix="bench_real_size-") as tmp:
        bench = Bench(args, kind, Path(tmp) / "runs")
        bench.work.mkdir()
        models = args.models or Path(tmp) / "models"
        made = {}
        started = time.monotonic()
        for variant, what, name, precision, optimizer in plan_of_runs(args, kind):
            spent = args.budget_s and time.monotonic() - started > args.budget_s
            skip = f"not run: --budget-s {args.budget_s:.0f} spent" if spent else None
            if variant not in made:  # without running, the plan comes from the shipped configs of the hub id
                made[variant] = Path(VARIANTS[variant]) if args.dry_run or spent else ensure_model(models, variant)
            if what == "generate":
                bench.generate(variant, made[variant], name, skip)
            elif optimizer == "adamw8bit" and eight_bit:
                bench.record(Row(variant, name, precision=label(precision), optimizer=optimizer, note=f"skipped: {eight_bit}"))
            else:
                bench.train(variant, made[variant], name, precision, optimizer, skip)
        if args.models is None:
            shutil.rmtree(models, ignore_errors=True)
    table = markdown(bench.rows, header)
    print("\n" + table)
    if args.out:
        args.out.write_text(table)
        print(f"table written to {args.out}")
    if bench.failed:
        sys.exit("bench_real_size: a configuration's loss was not finite or no trained parameter changed")


if __name__ == "__main__":
    main()
