"""Useful FLOPs of a training sample and of a generation (formulas and their reasons: docs/BENCH_NOTES.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.minigpt4qwen import MiniGPT4Qwen


@dataclass
class FlopModel:
    """Useful FLOPs: real (unpadded) tokens only, no recompute, matmuls only."""

    dense: int
    """Weights of the Linear layers inside the LLM decoder layers."""
    head: int
    """lm_head weights (vocab x width)."""
    layers: int
    attn_width: int
    """Query heads x head_dim."""
    tower: float
    """Forward FLOPs of ViT + Q-Former + projector for one image (counted by torch's FlopCounterMode)."""

    @classmethod
    def of(cls, model: MiniGPT4Qwen, image: torch.Tensor) -> FlopModel:
        from torch.utils.flop_counter import FlopCounterMode

        cfg = model.llm.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dense = sum(m.weight.numel() for m in model.decoder().layers.modules() if isinstance(m, torch.nn.Linear))
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model.project(model.qformer_features(image))
        return cls(dense, model.llm.get_output_embeddings().weight.numel(), cfg.num_hidden_layers,
                   cfg.num_attention_heads * head_dim, float(counter.get_total_flops()))

    def train(self, tokens: int, supervised: int, vision: bool) -> float:
        """Forward + input-gradient backward through the frozen LLM (+ the frozen towers' forward when not cached).

        Frozen Linear: forward 2NT, backward only dX = another 2NT (no weight gradient). Causal attention: forward
        2*L*T^2*width (QK^T and AV, half the square), backward 2x forward (dQ, dK, dV, dP).
        """
        linear = 4 * self.dense * tokens + 4 * self.head * supervised
        attention = 6 * self.layers * tokens**2 * self.attn_width
        return float(linear + attention) + (self.tower if vision else 0.0)

    def generate(self, prompt: int, new_tokens: int, vision: bool = False) -> float:
        """Prefill (lm_head on the last position only) + one forward per new token over its growing context."""
        prefill = 2 * self.dense * prompt + 2 * self.head + 2 * self.layers * prompt**2 * self.attn_width
        decode = sum(2 * (self.dense + self.head) + 4 * self.layers * (prompt + i) * self.attn_width
                     for i in range(1, new_tokens))
        return float(prefill + decode) + (self.tower if vision else 0.0)
