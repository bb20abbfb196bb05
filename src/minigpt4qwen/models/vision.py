"""EVA ViT-g as transformers' Blip2VisionModel; `post_layernorm` plays BLIP-2's `ln_vision`."""

from __future__ import annotations

from transformers import Blip2VisionConfig, Blip2VisionModel

from ..config import ConfigError

VISION_PRESETS: dict[str, dict] = {
    # BLIP-2's EVA ViT-g/14: the first 39 of EVA's 40 blocks, 224 px
    "eva-vit-g": dict(
        hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
        image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True,
    ),
    # the offline demo's small ViT (trained by the demo itself: no pretrained ViT is available offline)
    "demo": dict(
        hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        image_size=64, patch_size=16, layer_norm_eps=1e-6, qkv_bias=True,
    ),
    "tiny": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, layer_norm_eps=1e-6, qkv_bias=True,
    ),
}
#: eps of BLIP-2's `ln_vision`, a plain nn.LayerNorm, while EVA's block norms use 1e-6 (the presets' layer_norm_eps).
#: Blip2VisionConfig has one eps for all its norms, so build_vision sets this one on `post_layernorm` itself.
LN_VISION_EPS = 1e-5


def vision_config(preset: str) -> Blip2VisionConfig:
    if preset not in VISION_PRESETS:
        raise ConfigError(f"model.vision: unknown preset {preset!r}; choose one of "
                          + ", ".join(VISION_PRESETS))
    # initializer_range: transformers defaults to 1e-10 (it expects pretrained weights); trainable from scratch needs 0.02
    return Blip2VisionConfig(**VISION_PRESETS[preset], attention_dropout=0.0, initializer_range=0.02)


def build_vision(preset: str | Blip2VisionConfig) -> Blip2VisionModel:
    """The vision tower of a preset (or a config read off a checkpoint) with LAVIS's eps in `post_layernorm`.

    The eps is an attribute, not a weight: it is not saved, so every model we load goes through here to get it.
    """
    model = Blip2VisionModel(preset if isinstance(preset, Blip2VisionConfig) else vision_config(preset))
    model.post_layernorm.eps = LN_VISION_EPS
    return model
