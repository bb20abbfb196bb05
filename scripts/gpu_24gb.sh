#!/usr/bin/env bash
# The 24 GB presets (configs/minigpt4qwen-7b-24gb.yaml, -24gb-lora.yaml) checked on a larger card with the process
# capped at 24 GiB (train.max_memory_gib=24: an allocation past it fails as on an RTX 3090/4090): the 7B architecture
# with random weights (EVA ViT-g + Q-Former + Qwen-7B dims), the presets' batch, checkpointing, compile and
# augmentation (no feature cache), through `minigpt4qwen train` itself via scripts/gpu_scale.py. One JSON line per run
# (samples/s, peak_mem_gib: the pass bar is <= 22 GiB): the preset batch, a doubled one, and LoRA stage 2.
# Usage: bash scripts/gpu_24gb.sh [OUT_DIR]          (one GPU; about 6 minutes)
set -uo pipefail
OUT=${1:-/tmp/minigpt4qwen-24gb}
mkdir -p "$OUT"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
CAP=(--gpus 1 --engines ddp --steps 20 --out "$OUT/runs" --set train.max_memory_gib=24
     --set train.grad_checkpointing_llm=true --set data.cache_features=false --set data.random_resized_crop=true
     --set data.hflip=true)
run() {  # run NAME ARGS...
  local name=$1; shift
  "$PY" scripts/gpu_scale.py "${CAP[@]}" --tag="-$name" "$@" 2>&1 | grep -v '^{"partial' | tee "$OUT/$name.txt"
}
run stage1-b4 --batch-size 4 --samples 400 --seq-min 64 --seq-max 256
run stage1-b8 --batch-size 8 --samples 400 --seq-min 64 --seq-max 256
run lora-b2 --batch-size 2 --samples 200 --seq-min 256 --seq-max 480 --set model.trainable.llm=lora \
  --set "model.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]" --set model.lora.r=64
