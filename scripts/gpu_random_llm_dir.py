"""Write an HF-format LLM directory with the Qwen-7B architecture and random bf16 weights (safetensors + the tiny
tokenizer), built on the GPU, so that a GPU measurement takes the path of an LLM read from files (`--quantize`
loads those on the CPU and moves them layer by layer; `random:qwen-7b` presets are built in place instead).

    python scripts/gpu_random_llm_dir.py /tmp/q7          # ~15 GB, ~30 s on an H200
    # then a run with model.llm=/tmp/q7 (2 training steps are enough) and: minigpt4qwen chat ... --quantize int8
"""

import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from minigpt4qwen.models.llm import LLM_PRESETS, make_tiny_tokenizer


def main(out: str) -> None:
    kw = dict(LLM_PRESETS["qwen-7b"])
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    make_tiny_tokenizer(out)
    print("wrote", out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/gpu_random_llm_dir.py OUT_DIR")
    main(sys.argv[1])
