"""minigpt4qwen: MiniGPT-4-style image chat on a frozen BLIP-2 vision side and a Qwen chat LLM."""

import logging as _logging
import sys as _sys

__version__ = "0.1.0"


class _CpuBuildNoise(_logging.Filter):
    """peft and transformers import torchao when it is installed (a dependency: fp8 training, quantized decoding).
    On a CPU build of torch that import logs "Failed to load .../_C_cutlass_90a.abi3.so" (CUDA kernels a CPU build
    cannot load), and torch logs a deprecation note for torchao's enum registration: warnings on every command that
    mean nothing to a user. Only those two, and the first only on a CPU build (on a GPU host it is a real problem)."""

    def filter(self, record: _logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "is an Enum subclass and is now natively supported" in msg:
            return False
        if msg.startswith("Failed to load") and ".so" in msg:
            torch = _sys.modules.get("torch")
            return not (torch is not None and getattr(torch.version, "cuda", None) is None)
        return True


_logging.getLogger("torchao").addFilter(_CpuBuildNoise())
_logging.getLogger("torch.utils._pytree").addFilter(_CpuBuildNoise())
