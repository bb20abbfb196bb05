"""minigpt4qwen: MiniGPT-4-style image chat on a frozen BLIP-2 vision side and a Qwen chat LLM."""

__version__ = "0.1.0"
