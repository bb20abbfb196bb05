"""minigpt4qwen."""
