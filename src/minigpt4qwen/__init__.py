"""minigpt4qwen: MiniGPT-4-style image chat on a frozen BLIP-2 vision side and a Qwen chat LLM."""

import logging as _logging

__version__ = "0.1.0"

# peft and transformers import torchao when it is installed (a dependency: fp8 training, quantized decoding). On a
# CPU build of torch its import logs "Failed to load .../_C_cutlass_90a.abi3.so" (CUDA kernels) and torch logs a
# deprecation note for torchao's enum registration: two warnings on every command that mean nothing to a user.
_logging.getLogger("torchao").setLevel(_logging.ERROR)
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)
