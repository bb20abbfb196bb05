#!/usr/bin/env bash
# `minigpt4qwen train` itself (DataLoader, sampler, engine, logging) at real size on one GPU: EVA ViT-g + Q-Former +
# random Qwen-7B-dims LLM, projector only, bf16, batch 32, cached image features, with and without train.compile.
# Prints one JSON line per run: steady-state samples/s over the last half of the steps (from log.jsonl elapsed_s).
# Usage: bash scripts/gpu_train_speed.sh [OUT_DIR] [STEPS]        (about 3 minutes on one H100)
#        EXTRA="train.fp8=tensorwise" bash scripts/gpu_train_speed.sh /tmp/fp8-speed   # overrides added to both runs
set -uo pipefail
OUT=${1:-/tmp/minigpt4qwen-train-speed}
STEPS=${2:-40}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
mkdir -p "$OUT"
"$PY" -m minigpt4qwen make-data --out "$OUT/data" --n-train 2400 --n-heldout 4 >/dev/null || exit 1
cat > "$OUT/speed.yaml" <<YAML
# bash scripts/gpu_train_speed.sh  (generated)
model: {vision: eva-vit-g, qformer: blip2-qformer, llm: "random:qwen-7b"}
data: {train: [{path: "$OUT/data/train_seed.json"}, {path: "$OUT/data/train_llava.json"}], max_txt_len: 256,
       random_resized_crop: false, hflip: false, cache_features: true, num_workers: 2}
train: {max_steps: $STEPS, batch_size: 32, lr: 1.0e-4, warmup_steps: 0, precision: bf16, log_every: 10,
        save_every_steps: 0}
YAML
for compile in false true; do
  name=compile-$compile
  rm -rf "$OUT/$name"
  # shellcheck disable=SC2086  # EXTRA: space-separated overrides, split on purpose
  "$PY" -m minigpt4qwen train --config "$OUT/speed.yaml" "train.output_dir=$OUT/$name" "train.compile=$compile" \
    ${EXTRA:-} >"$OUT/$name.log" 2>&1
  rc=$?
  "$PY" - "$OUT/$name" "$name" "$rc" <<'PYEOF'
import json, sys
from pathlib import Path
run, name, rc = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()] \
    if (run / "log.jsonl").is_file() else []
half = rows[len(rows) // 2:]
rate = None
if len(half) > 1:
    rate = sum(r["samples"] for r in half[1:]) / (half[-1]["elapsed_s"] - half[0]["elapsed_s"])
print(json.dumps({"run": name, "rc": rc, "steps": len(rows), "samples_per_s_steady": rate,
                  "supervised_tokens_per_step": sum(r["tokens"] for r in rows) / max(len(rows), 1),
                  "peak_mem_gib": rows[-1].get("mem_gib") if rows else None,
                  "first_step_s": rows[0]["elapsed_s"] if rows else None}))
PYEOF
  [ "$rc" = 0 ] || tail -5 "$OUT/$name.log"
done
