"""BLIP-2 Q-Former as transformers' Blip2QFormerModel plus the learned query tokens."""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from ..config import ConfigError

QFORMER_PRESETS: dict[str, dict] = {
    # BERT-base sized, cross-attention to the image every 2nd layer
    "blip2-qformer": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        cross_attention_frequency=2,
    ),
    "demo": dict(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
        cross_attention_frequency=1,
    ),
    "tiny": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        cross_attention_frequency=2,
    ),
}


def qformer_config(preset: str, encoder_hidden_size: int) -> Blip2QFormerConfig:
    if preset not in QFORMER_PRESETS:
        raise ConfigError(f"model.qformer: unknown preset {preset!r}; choose one of "
                          + ", ".join(QFORMER_PRESETS))
    return Blip2QFormerConfig(
        **QFORMER_PRESETS[preset], encoder_hidden_size=encoder_hidden_size, layer_norm_eps=1e-12,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def build_qformer(preset: str, encoder_hidden_size: int, num_query_tokens: int) -> tuple[Blip2QFormerModel, nn.Parameter]:
    cfg = qformer_config(preset, encoder_hidden_size)
    qformer = Blip2QFormerModel(cfg)
    query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, cfg.hidden_size))
    nn.init.normal_(query_tokens, std=cfg.initializer_range)  # as BLIP-2 initialises them
    return qformer, query_tokens
