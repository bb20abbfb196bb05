#!/usr/bin/env bash
# Losses and peak GPU memory of every engine on the REAL-SIZE 7B architecture (EVA ViT-g + BLIP-2 Q-Former +
# Qwen-7B dims, random weights, stage 1 = projector only), 6 steps of batch 2 each, under torchrun on one GPU.
# Prints one JSON line per engine: {"engine", "losses", "peak_mem_gib", "seconds", "ok"}. Runs offline.
# Usage: bash scripts/gpu_engines.sh [OUT_DIR]        (about 5 minutes on one H100)
set -uo pipefail
OUT=${1:-/tmp/minigpt4qwen-gpu-engines}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
mkdir -p "$OUT"
"$PY" -m minigpt4qwen make-data --out "$OUT/data" --n-train 64 --n-heldout 4 >/dev/null || exit 1
cat > "$OUT/engines.yaml" <<EOF
# bash scripts/gpu_engines.sh  (generated)
model: {vision: eva-vit-g, qformer: blip2-qformer, llm: "random:qwen-7b"}
data: {train: [{path: "$OUT/data/train_seed.json"}], max_txt_len: 128}
train: {max_steps: 6, batch_size: 2, grad_accum: 1, lr: 1.0e-4, warmup_steps: 0, precision: bf16, log_every: 1}
EOF

run() {  # run NAME OVERRIDES...: one engine, then its JSON line
  local name=$1; shift
  local start=$SECONDS rc
  rm -rf "$OUT/$name"
  "$PY" -m torch.distributed.run --nproc_per_node=1 --master_port=$((29500 + RANDOM % 1000)) \
    -m minigpt4qwen train --config "$OUT/engines.yaml" "train.output_dir=$OUT/$name" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  "$PY" - "$OUT/$name" "$name" "$((SECONDS - start))" "$rc" <<'EOF'
import json, sys
from pathlib import Path
run, name, seconds, rc = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()] \
    if (run / "log.jsonl").is_file() else []
print(json.dumps({"engine": name, "losses": [round(r["loss"], 5) for r in rows],
                  "peak_mem_gib": max((r.get("mem_gib", 0) for r in rows), default=None), "seconds": seconds,
                  "ok": rc == 0 and len(rows) == 6}), flush=True)
if rc:
    print((run.parent / f"{name}.log").read_text()[-2000:], file=sys.stderr)
EOF
}

run plain
run zero0 engine.name=deepspeed engine.zero_stage=0
run zero2 engine.name=deepspeed engine.zero_stage=2
run zero3 engine.name=deepspeed engine.zero_stage=3
run fsdp2 engine.name=fsdp
