#!/usr/bin/env bash
# Stage 2 on 4 GPUs (FSDP2, 7B dims, ~1k-token conversations): the checkpoint wait, then the MFU levers one at a
# time (batch 8/16 with activation checkpointing, batch 2 without, padding to a multiple of 64, fused AdamW, bf16
# gradient reduction, fp8, LoRA), each a
# `minigpt4qwen train` run under torchrun through scripts/gpu_scale.py. One JSON line per run in OUT_DIR/*.txt; the
# batch-4 run also writes a torch.profiler table and trace (OUT_DIR/profile-base-b4/).
# Usage: bash scripts/gpu_stage2.sh [OUT_DIR]        (about 22-25 minutes on a 4x H100/H200 host)
set -uo pipefail
OUT=${1:-/tmp/minigpt4qwen-stage2}
mkdir -p "$OUT"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
S2=(--gpus 4 --engines fsdp --samples 2000 --seq-min 768 --seq-max 1280 --steps 20 --mfu --out "$OUT/runs")
FULL=(--set model.trainable.llm=full)
CKPT=(--recompute --set train.grad_checkpointing_llm=true)
run() {  # run NAME ARGS...: one gpu_scale.py invocation, its summary lines kept
  local name=$1; shift
  "$PY" scripts/gpu_scale.py "${S2[@]}" --tag="-$name" "$@" 2>&1 | grep -v '^{"partial' | tee "$OUT/$name.txt"
  [ -d "$OUT/runs/fsdp-4gpu-$name/profile" ] && cp -r "$OUT/runs/fsdp-4gpu-$name/profile" "$OUT/profile-$name"
  rm -rf "$OUT/runs/fsdp-4gpu-$name"  # 87 GB per full-LLM checkpoint: the disk holds about two
}
PAD1=(--set data.pad_to_multiple_of=1)  # padding to the batch's longest row: the behaviour before 2026-11-28
# DCP's pinned cache (engine.async_stager=dcp; the default before 2026-11-28)
run save-dcp-b4 --batch-size 4 "${FULL[@]}" "${CKPT[@]}" --stop-after-saves 2 --set train.save_every_steps=5 \
  --set train.keep_last=1 --set engine.async_stager=dcp
# the same saves with the first save's pinned buffers allocated empty and filled by one copy (engine.async_stager)
run save-direct-b4 --batch-size 4 "${FULL[@]}" "${CKPT[@]}" --stop-after-saves 2 --set train.save_every_steps=5 \
  --set train.keep_last=1 --set engine.async_stager=direct
# pageable buffers made after the first step and mapped in the background, never pinned (the default); the first
# save 20 steps in, as in a run with a realistic interval (at step 5 the mapping is not done yet)
run save-prefault-b4 --batch-size 4 "${FULL[@]}" "${CKPT[@]}" --stop-after-saves 2 --set train.save_every_steps=20 \
  --set train.keep_last=1 --steps 45
run base-b4 --batch-size 4 "${FULL[@]}" "${CKPT[@]}" "${PAD1[@]}" --no-final-save --set "train.profile_steps=[8,2]"
run nockpt-b2 --batch-size 2 "${FULL[@]}" "${PAD1[@]}" --no-final-save
run ckpt-b8 --batch-size 8 "${FULL[@]}" "${CKPT[@]}" "${PAD1[@]}" --no-final-save
run ckpt-b8-pad64 --batch-size 8 "${FULL[@]}" "${CKPT[@]}" --no-final-save
run ckpt-b16-pad64 --batch-size 16 "${FULL[@]}" "${CKPT[@]}" --no-final-save
run ckpt-b8-fused --batch-size 8 "${FULL[@]}" "${CKPT[@]}" --no-final-save --set train.optimizer_impl=fused
run ckpt-b8-bf16reduce --batch-size 8 "${FULL[@]}" "${CKPT[@]}" --no-final-save --set engine.fsdp_reduce_dtype=bf16
run ckpt-b8-fp8 --batch-size 8 "${FULL[@]}" "${CKPT[@]}" --no-final-save --set train.fp8=tensorwise
run lora-b8 --batch-size 8 --set model.trainable.llm=lora --no-final-save
