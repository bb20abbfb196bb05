"""Model components: vision (EVA ViT-g), Q-Former, projector, LLM, the composite model and checkpoint conversions."""
