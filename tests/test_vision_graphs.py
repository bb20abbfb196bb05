"""`serve --graph-vision`: admissions' vision tower + Q-Former through CUDA graphs (serve/vision_graphs.py).

CPU: the tower falls back to the model's own forward, so the option is harmless there. GPU (marked): every batch
size up to the largest bucket gives the eager features, and batches larger than it run eagerly.
"""

from __future__ import annotations

import pytest
import torch

from minigpt4qwen.config import ModelConfig
from minigpt4qwen.models.minigpt4qwen import build_model
from minigpt4qwen.serve.vision_graphs import GraphedTower


def tiny_model(device: str):
    torch.manual_seed(0)
    model = build_model(ModelConfig(vision="tiny", qformer="tiny", num_query_tokens=4, llm="random:tiny-qwen2"),
                        device).model
    return model.eval().requires_grad_(False)


def test_off_cuda_the_tower_is_the_model_forward():
    model = tiny_model("cpu")
    size = model.vision_model.config.image_size
    tower = GraphedTower(model, max_images=4, image_size=size)
    assert tower.capture_all() == 0
    pixels = torch.randn(3, 3, size, size)
    with torch.inference_mode():
        assert torch.equal(tower(pixels), model.qformer_features(pixels))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_tower_equals_eager_for_every_batch_size():
    model = tiny_model("cuda")
    size = model.vision_model.config.image_size
    tower = GraphedTower(model, max_images=4, image_size=size)
    assert tower.capture_all() == 3  # buckets 1, 2, 4
    with torch.inference_mode():
        for n in (1, 3, 4, 2, 6):  # 6: past the largest bucket, eager
            pixels = torch.randn(n, 3, size, size, device="cuda")
            got = tower(pixels)
            torch.testing.assert_close(got, model.qformer_features(pixels), rtol=1e-5, atol=1e-5)
            assert got.shape[0] == n
