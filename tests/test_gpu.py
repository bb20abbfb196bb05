"""CUDA paths (skipped without a GPU): bf16 frozen towers + autocast training, and generation, on the tiny model."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from minigpt4qwen.train.loop import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_train_bf16_on_cuda_and_answer(tmp_path, shapes_data):
    from minigpt4qwen.data.conversation import IMAGE_PROMPT, Turn
    from minigpt4qwen.models.minigpt4qwen import build_model
    from minigpt4qwen.serve.generate import Assistant, GenerationSettings

    cfg = tiny_config(tmp_path, shapes_data, "train.device=cuda", "train.precision=bf16", "model.frozen_dtype=bf16",
                      "train.max_steps=4")
    run = train(cfg)
    built = build_model(cfg.model, "cuda")
    assert built.model.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert built.model.llm_proj.weight.dtype == torch.float32  # trainable stays fp32 (autocast computes in bf16)
    a = Assistant.from_run(run, device="cuda")
    out = a.generate([[Turn("user", f"{IMAGE_PROMPT} What color?")]], [[shapes_data / "images/heldout_00000.png"]],
                     GenerationSettings(max_new_tokens=4))
    assert len(out) == 1 and isinstance(out[0], str)


@pytest.mark.parametrize("batch,fuse,compile", [(1, False, False), (3, False, False), (1, True, True), (3, True, False)])
def test_fast_decoder_with_cuda_graphs_equals_hf_greedy_in_fp32(batch, fuse, compile):
    """fp32 on CUDA: the graph-replayed decode (also fused / compiled) must give HF's greedy tokens exactly."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from minigpt4qwen.models.llm import LLM_PRESETS
    from minigpt4qwen.serve.fastdecode import FastDecoder

    kw = dict(LLM_PRESETS["tiny-qwen2"])
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(cfg).cuda().eval().requires_grad_(False)
    embeds = torch.randn(batch, 20, cfg.hidden_size, device="cuda")
    mask = torch.ones(batch, 20, dtype=torch.long, device="cuda")
    mask[1:, :5] = 0  # left padding on the other rows
    with torch.inference_mode():
        ref = llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=24, min_new_tokens=24,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
        dec = FastDecoder(llm, max_batch=4, max_len=48, cuda_graph=True, fuse=fuse, compile=compile)
        out = dec.generate(embeds, mask, 24)
        again = dec.generate(embeds, mask, 24)  # replay of the captured graph
    assert torch.equal(out.cpu(), ref.cpu()) and torch.equal(again.cpu(), ref.cpu())
