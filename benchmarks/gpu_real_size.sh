#!/usr/bin/env bash
# The real-size run for a GPU, as one command: every figure into one file for benchmarks/RESULTS.md.
#
#   benchmarks/gpu_real_size.sh OUT.md            # on a machine with one GPU (about 9 minutes on an H100)
#   benchmarks/gpu_real_size.sh --cpu-smoke OUT.md  # here: the same stages on the CPU, cut down (see below)
#
# Stages, in order of worth, each under a share of the time budget (GPU_BUDGET_S, default 480 s;
# a stage past its share records "not run" rows instead of starting more processes):
#  1. the two random-weight SD 2.1 pipelines (sr-finetune real-size-model; nothing is downloaded);
#  2. bench_real_size.py in bf16 on both variants (generation in fp16, the five fine-tuning
#     configurations, 8-bit AdamW if bitsandbytes is installed), attention xformers when installed;
#  3. the six scorers at real size in fp16 (bench_score.py --real-size; the shared images when
#     ../shared/data/images is there, else 24 random 512 px images: speed and memory only);
#  4. bench_real_size.py in fp16 with gradient scaling (accelerate's), the same configurations.
# --cpu-smoke runs stage 1 for 2-1-base only, stage 2 as a dry run (the plan of every
# configuration, nothing started) plus the generation of one image on the CPU, and skips 3 and 4,
# so that the script itself is proven here.
set -euo pipefail

smoke=0
if [[ "${1:-}" == "--cpu-smoke" ]]; then smoke=1; shift; fi
out=$(realpath -m "${1:?usage: benchmarks/gpu_real_size.sh [--cpu-smoke] OUT.md}")
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
work=${GPU_WORK:-$(mktemp -d)}
budget=${GPU_BUDGET_S:-480}
start=$SECONDS
left() { echo $(( budget - (SECONDS - start) )); }

attention=sdpa
if python -c "import xformers" 2>/dev/null; then attention=xformers; fi
{
  echo "# gpu_real_size.sh, $(date -u '+%Y-%m-%d %H:%M') UTC"
  echo
  if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/GPU: /'; fi
  python -c "import torch, diffusers; print(f'torch {torch.__version__}, diffusers {diffusers.__version__}, CUDA {torch.version.cuda}')"
  echo "attention: $attention; bitsandbytes: $(python -c 'import bitsandbytes as b; print(b.__version__)' 2>/dev/null || echo 'not installed')"
  echo
} > "$out"

variants=(2-1-base 2-1)
if (( smoke )); then variants=(2-1-base); fi
for v in "${variants[@]}"; do
  if [[ ! -f "$work/models/$v/model_index.json" ]]; then
    t=$SECONDS
    python -m sr_finetune.commands.cli real-size-model "$work/models/$v" --variant "$v" >> "$work/make.log" 2>&1
    echo "real-size-model $v: $(( SECONDS - t )) s" >> "$out"
  fi
done

bench() {  # bench_real_size.py with a time share; its table is appended to $out
  python benchmarks/bench_real_size.py --models "$work/models" --attention "$attention" --out "$work/table.md" "$@" || echo "bench_real_size $* exited with $?" >> "$out"
  if [[ -f "$work/table.md" ]]; then { echo; cat "$work/table.md"; } >> "$out"; rm "$work/table.md"; fi
}

if (( smoke )); then
  bench --device cpu --variants 2-1-base --precisions bf16 --dry-run
  bench --device cpu --variants 2-1-base --only generate
  echo "smoke: stages 3 (scorers, fp16) and 4 (fp16 training) need a GPU; not run" >> "$out"
else
  bench --variants "${variants[@]}" --precisions bf16 --steps 3 --budget-s $(( $(left) * 50 / 100 ))
  {
    echo
    echo "## six scorers at real size, fp16"
    python benchmarks/bench_score.py --real-size --device cuda --dtype fp16 --cache "$work/scorers" 2>&1 | grep -E '^(built|real-size)' || echo "bench_score exited with $?"
  } >> "$out"
  bench --variants "${variants[@]}" --precisions fp16 --only unet unet+te lora-unet dpo-unet --steps 3 --budget-s "$(left)"
fi
echo >> "$out"
echo "total: $(( SECONDS - start )) s" >> "$out"
echo "written: $out"
