"""Qwen-1 -> native Qwen2: a tiny directory in Qwen-1's original layout, checked against Qwen-1's block math.

The reference forward is written from Qwen-1's modeling equations (RMSNorm, fused c_attn, half-split rotary with
rotary_emb_base, causal attention, c_proj(w1(x) * silu(w2(x)))), independent of transformers' Qwen2 code.

Run: python -m pytest tests/test_convert_qwen1.py
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from minigpt4qwen.models.convert import (
    CheckpointKeyError,
    convert_qwen1_dir,
    load_qwen1_dir,
    qwen1_config_to_qwen2,
    qwen1_to_qwen2_state,
    qwen_tiktoken_to_fast,
)

QWEN1_CONFIG = {
    "architectures": ["QWenLMHeadModel"],
    "auto_map": {"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
    "model_type": "qwen",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "kv_channels": 8,
    "intermediate_size": 128,  # both SwiGLU branches: Qwen2's is 64
    "vocab_size": 640,
    "rotary_emb_base": 5000,  # not the default, so a dropped rope_theta fails the logits check
    "rotary_pct": 1.0,
    "layer_norm_epsilon": 1e-6,
    "seq_length": 64,
    "max_position_embeddings": 64,
    "no_bias": True,
    "tie_word_embeddings": False,
    "use_dynamic_ntk": True,
    "use_logn_attn": True,
    "bf16": False,
    "fp16": False,
    "fp32": True,
}
# A tiny qwen.tiktoken: all 256 bytes, then merges whose parts are ranked before them (as in a real BPE file).
TINY_MERGES = [b"he", b"ll", b"llo", b"hello", b" w", b"or", b"ld", b"orld", b" world", b"th", b"the", b" the"]


def write_tiny_tiktoken(path: Path) -> None:
    tokens = [bytes([b]) for b in range(256)] + TINY_MERGES
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))


def make_qwen1_state(cfg: dict, seed: int = 0) -> dict[str, Tensor]:
    """Random weights under Qwen-1's key names and shapes."""
    g = torch.Generator().manual_seed(seed)
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"] // 2, cfg["vocab_size"]

    def rand(*shape: int, scale: float | None = None, offset: float = 0.0) -> Tensor:
        return torch.randn(*shape, generator=g) * (scale or 1 / math.sqrt(shape[-1])) + offset

    s = {"transformer.wte.weight": rand(vocab, h, scale=1.0), "transformer.ln_f.weight": rand(h, scale=0.1, offset=1.0),
         "lm_head.weight": rand(vocab, h)}
    for i in range(cfg["num_hidden_layers"]):
        b = f"transformer.h.{i}."
        s[b + "ln_1.weight"] = rand(h, scale=0.1, offset=1.0)
        s[b + "attn.c_attn.weight"] = rand(3 * h, h)
        s[b + "attn.c_attn.bias"] = rand(3 * h, scale=0.1)
        s[b + "attn.c_proj.weight"] = rand(h, h)
        s[b + "ln_2.weight"] = rand(h, scale=0.1, offset=1.0)
        s[b + "mlp.w1.weight"] = rand(inter, h)
        s[b + "mlp.w2.weight"] = rand(inter, h)
        s[b + "mlp.c_proj.weight"] = rand(h, inter)
    return s


def qwen1_reference_logits(s: dict, cfg: dict, ids: Tensor) -> Tensor:
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    hd, eps, n = h // heads, cfg["layer_norm_epsilon"], ids.shape[1]

    def rms(x: Tensor, w: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    inv_freq = 1.0 / cfg["rotary_emb_base"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.outer(torch.arange(n, dtype=torch.float64), inv_freq)
    cos, sin = (torch.cat([f(angles)] * 2, -1).float()[None, :, None, :] for f in (torch.cos, torch.sin))

    def rotary(t: Tensor) -> Tensor:  # Qwen-1 rotates the two halves of each head: (x1, x2) -> (-x2, x1)
        x1, x2 = t.chunk(2, dim=-1)
        return t * cos + torch.cat([-x2, x1], -1) * sin

    causal = torch.ones(n, n, dtype=torch.bool).tril()
    x = s["transformer.wte.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        b = f"transformer.h.{i}."
        qkv = rms(x, s[b + "ln_1.weight"]) @ s[b + "attn.c_attn.weight"].T + s[b + "attn.c_attn.bias"]
        q, k, v = (t.reshape(*ids.shape, heads, hd) for t in qkv.split(h, -1))
        q, k = rotary(q), rotary(k)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~causal, float("-inf")).softmax(-1), v)
        x = x + attn.reshape(*ids.shape, h) @ s[b + "attn.c_proj.weight"].T
        y = rms(x, s[b + "ln_2.weight"])
        a1, a2 = y @ s[b + "mlp.w1.weight"].T, y @ s[b + "mlp.w2.weight"].T
        x = x + (a1 * F.silu(a2)) @ s[b + "mlp.c_proj.weight"].T
    return rms(x, s["transformer.ln_f.weight"]) @ s["lm_head.weight"].T


def write_qwen1_dir(root: Path, state: dict, safetensors: bool) -> Path:
    """Qwen-1's original layout: config.json, generation_config.json, qwen.tiktoken, sharded weights + index."""
    from huggingface_hub import save_torch_state_dict

    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(QWEN1_CONFIG))
    (root / "generation_config.json").write_text(json.dumps(
        {"chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643, "max_window_size": 6144,
         "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1}))
    write_tiny_tiktoken(root / "qwen.tiktoken")
    save_torch_state_dict(state, root, max_shard_size="40KB", safe_serialization=safetensors)
    index = "model.safetensors.index.json" if safetensors else "pytorch_model.bin.index.json"
    assert (root / index).is_file() and len(set(json.loads((root / index).read_text())["weight_map"].values())) > 1
    return root


@pytest.fixture(scope="module")
def qwen1_state() -> dict[str, Tensor]:
    return make_qwen1_state(QWEN1_CONFIG)


@pytest.fixture(scope="module")
def ids() -> Tensor:
    return torch.randint(0, QWEN1_CONFIG["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(3))


def test_config_mapping_warns_about_ntk_and_logn() -> None:
    with pytest.warns(UserWarning, match="use_dynamic_ntk"), pytest.warns(UserWarning, match="use_logn_attn"):
        cfg = qwen1_config_to_qwen2(QWEN1_CONFIG)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (32, 2, 4, 4)
    assert cfg.intermediate_size == 64 and cfg.vocab_size == 640 and cfg.max_position_embeddings == 64
    assert cfg.rope_parameters["rope_theta"] == 5000.0 and cfg.rms_norm_eps == 1e-6 and not cfg.tie_word_embeddings
    with pytest.raises(ValueError, match="rotary_pct"):
        qwen1_config_to_qwen2(QWEN1_CONFIG | {"rotary_pct": 0.5, "use_dynamic_ntk": False, "use_logn_attn": False})


@pytest.mark.filterwarnings("ignore:Qwen-1")
@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors-shards", "bin-shards"])
def test_converted_logits_match_qwen1_reference(qwen1_state, ids, tmp_path, safetensors: bool) -> None:
    # The .bin variant also carries a rotary buffer, as some Qwen-1 shards do; it has no Qwen2 weight and is dropped.
    extra = {} if safetensors else {"transformer.rotary_emb.inv_freq": torch.ones(4)}
    src = write_qwen1_dir(tmp_path / "qwen1", qwen1_state | extra, safetensors)
    model, tokenizer = load_qwen1_dir(src)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    reference = qwen1_reference_logits(qwen1_state, QWEN1_CONFIG, ids)
    assert (logits - reference).abs().max().item() <= 1e-4
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 256 + len(TINY_MERGES) + 1
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])


@pytest.mark.filterwarnings("ignore:Qwen-1")
def test_converted_dir_loads_without_remote_code(qwen1_state, ids, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = write_qwen1_dir(tmp_path / "qwen1", qwen1_state, safetensors=True)
    out = convert_qwen1_dir(src, tmp_path / "qwen2", max_shard_size="40KB")
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert (logits - qwen1_reference_logits(qwen1_state, QWEN1_CONFIG, ids)).abs().max().item() <= 1e-4
    assert model.generation_config.top_p == 0.8 and model.generation_config.repetition_penalty == 1.1

    tokenizer = AutoTokenizer.from_pretrained(out)
    direct = qwen_tiktoken_to_fast(src / "qwen.tiktoken")
    text = "hello world, the thin heLLo\n\n  <|im_start|>x"
    assert tokenizer(text)["input_ids"] == direct(text)["input_ids"]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the world"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
        "<|im_start|>assistant\nthe world<|im_end|>\n"
    )
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"


def test_missing_and_unknown_weights_raise(qwen1_state) -> None:
    cfg = {k: v for k, v in QWEN1_CONFIG.items() if not k.startswith("use_")}
    broken = {k: v for k, v in qwen1_state.items() if k != "transformer.h.1.mlp.w2.weight"}
    with pytest.raises(CheckpointKeyError, match=r"transformer\.h\.1\.mlp\.w2\.weight.*Qwen-1 weight shards"):
        qwen1_to_qwen2_state(broken, cfg)
    with pytest.raises(CheckpointKeyError, match=r"transformer\.h\.2\.ln_1\.weight"):
        qwen1_to_qwen2_state(qwen1_state | {"transformer.h.2.ln_1.weight": torch.ones(32)}, cfg)
    converted = qwen1_to_qwen2_state(qwen1_state, cfg)
    c_attn_bias = qwen1_state["transformer.h.0.attn.c_attn.bias"]
    assert torch.equal(converted["model.layers.0.self_attn.k_proj.bias"], c_attn_bias[32:64])
    assert torch.equal(converted["model.layers.1.mlp.gate_proj.weight"], qwen1_state["transformer.h.1.mlp.w2.weight"])
