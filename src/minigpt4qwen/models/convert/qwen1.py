"""Qwen-1 (remote-code Qwen-7B/14B-Chat + qwen.tiktoken) -> a native transformers Qwen2 directory."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from torch import Tensor

from .common import (
    CheckpointKeyError,
    StateDict,
    _check_against,
    _meta_shapes,
    _Source,
    read_state_dir,
)

# --------------------------------------------------------------------------------------------------------------------
# Qwen-1 -> native transformers Qwen2
# --------------------------------------------------------------------------------------------------------------------

#: Qwen-1's pre-tokenizer split (tiktoken ``pat_str``); digits are split one by one, unlike GPT-4's 1-3.
QWEN1_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
#: Qwen-1's special tokens in id order, right after the BPE ranks (151643 for the real ``qwen.tiktoken``).
QWEN1_SPECIAL_START_ID = 151643
QWEN1_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205)))
DEFAULT_SYSTEM = "You are a helpful assistant."
#: ChatML as Qwen-1's make_context builds it: turns joined by "\n", a default system turn, and a generation prompt.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_QWEN1_WHERE = "the Qwen-1 weight shards (model-*.safetensors or pytorch_model-*.bin)"
_QWEN1_FIX = (
    "config.json and the weight shards disagree (hidden_size, intermediate_size, vocab_size, num_hidden_layers): "
    "use the config.json that came with these shards"
)
# Buffers some Qwen-1 checkpoints carry; Qwen2 recomputes them.
_QWEN1_BUFFERS = re.compile(r"(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")
_QWEN1_LAYER = {
    "ln_1": "input_layernorm",
    "attn.c_proj": "self_attn.o_proj",
    "ln_2": "post_attention_layernorm",
    "mlp.w2": "mlp.gate_proj",  # Qwen-1 computes c_proj(w1(x) * silu(w2(x))): w2 is the gated branch
    "mlp.w1": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}


def qwen1_config_to_qwen2(cfg: dict):
    """Qwen2Config equivalent to a Qwen-1 ``config.json`` dict.

    Qwen-1's ``intermediate_size`` counts both SwiGLU branches, so Qwen2's is half of it. Dynamic NTK and logn
    attention only act past ``seq_length`` tokens; up to there the converted model computes the same function, and
    ``max_position_embeddings`` is set to that length.
    """
    from transformers import Qwen2Config

    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("kv_channels", hidden // heads) * heads != hidden:
        raise ValueError(f"kv_channels={cfg['kv_channels']} x {heads} heads != hidden_size={hidden}: not a Qwen2 shape")
    if cfg.get("rotary_pct", 1.0) != 1.0:
        raise ValueError(f"rotary_pct={cfg['rotary_pct']}: Qwen2 rotates the whole head")
    if not cfg.get("no_bias", True):
        raise ValueError("no_bias=false: Qwen2 has no bias on o_proj and the MLP")
    if cfg["intermediate_size"] % 2:
        raise ValueError(f"intermediate_size={cfg['intermediate_size']} is odd; Qwen-1's counts two equal branches")
    max_positions = cfg.get("seq_length") or cfg.get("max_position_embeddings", 8192)
    for flag in ("use_dynamic_ntk", "use_logn_attn"):
        if cfg.get(flag):
            warnings.warn(
                f"Qwen-1 {flag}=true is not reproduced; it only acts beyond seq_length={max_positions} tokens, "
                "so the converted model matches Qwen-1 up to that length",
                stacklevel=2,
            )
    qcfg = Qwen2Config(
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"] // 2,
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=heads,
        hidden_act="silu",
        max_position_embeddings=max_positions,
        initializer_range=cfg.get("initializer_range", 0.02),
        rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-6),
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.get("rotary_emb_base", 10000))},
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        use_sliding_window=False,
    )
    qcfg.architectures = ["Qwen2ForCausalLM"]
    return qcfg



def qwen1_to_qwen2_state(state: StateDict, cfg) -> StateDict:
    """Rename (and split the fused qkv of) Qwen-1 weights to Qwen2ForCausalLM names.

    ``cfg`` is the Qwen-1 config dict or the Qwen2Config from ``qwen1_config_to_qwen2``. Missing weights, weights
    with no place in Qwen2 and weights of another shape than that config gives all raise, in one line naming the
    Qwen-1 key and ours, since each means the config and the shards disagree.
    """
    from transformers import Qwen2ForCausalLM

    if isinstance(cfg, dict):
        cfg = qwen1_config_to_qwen2(cfg)
    expected = _meta_shapes(Qwen2ForCausalLM, cfg)
    basis = "the Qwen2ForCausalLM config.json gives"
    src = _Source(state, "qwen1", _QWEN1_WHERE)
    out: dict[str, Tensor | None] = {}
    src.move(out, "transformer.wte.weight", "model.embed_tokens.weight")
    src.move(out, "transformer.ln_f.weight", "model.norm.weight")
    if not cfg.tie_word_embeddings:
        src.move(out, "lm_head.weight", "lm_head.weight")
    for i in range(cfg.num_hidden_layers):
        block, layer = f"transformer.h.{i}.", f"model.layers.{i}."
        for module, dst in _QWEN1_LAYER.items():
            src.move(out, f"{block}{module}.weight", f"{layer}{dst}.weight")
        for p in ("weight", "bias"):
            q_proj = f"{layer}self_attn.q_proj.{p}"
            fused = src.take(f"{block}attn.c_attn.{p}", q_proj)
            if fused is None:
                continue
            rows, *rest = expected[q_proj]
            if list(fused.shape) != [3 * rows, *rest]:  # checked before the split, which would hide the real shape
                raise CheckpointKeyError(
                    f"{src.origin[q_proj]} (ours: {layer}self_attn.q_proj/k_proj/v_proj.{p}) has shape "
                    f"{list(fused.shape)}, expected {[3 * rows, *rest]} ({basis}); {_QWEN1_FIX}"
                )
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                # clone: views of one buffer would be saved as shared tensors (or dropped) by safetensors
                out[f"{layer}self_attn.{name}.{p}"] = fused[j * rows : (j + 1) * rows].clone()
    src.raise_if_missing("Qwen2ForCausalLM")
    unknown = [k for k in src.unused() if not _QWEN1_BUFFERS.search(k)]
    if unknown:
        raise CheckpointKeyError(
            f"{unknown[0]} and {len(unknown) - 1} more Qwen-1 weight(s) have no place in {basis}; {_QWEN1_FIX}"
        )
    _check_against(out, expected, src.origin, basis, lambda k: _QWEN1_FIX)  # type: ignore[arg-type]
    return out  # type: ignore[return-value]


def qwen_tiktoken_to_fast(tiktoken_path: str | Path, chat_template: str = CHATML_TEMPLATE):
    """A fast byte-level BPE tokenizer equal to Qwen-1's tiktoken tokenizer, with ChatML as its chat template.

    Like QWenTokenizer it NFC-normalizes, splits with Qwen-1's regex and treats every special token as special. The
    special tokens are added one by one after the ranks, and their ids are checked, because converting them as one
    map is the known way to get them all on one id.
    """
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(tiktoken_path), pattern=QWEN1_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    start = backend.get_vocab_size(with_added_tokens=False)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN1_SPECIAL_TOKENS])
    ids = [backend.token_to_id(t) for t in QWEN1_SPECIAL_TOKENS]
    if ids != list(range(start, start + len(QWEN1_SPECIAL_TOKENS))):
        raise ValueError(f"special tokens of {tiktoken_path} got ids {ids[:4]}..., expected {start}, {start + 1}, ...")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=chat_template,
        model_max_length=32768,
    )


def _read_qwen1_dir(src_dir: str | Path):
    """Config, converted weights, tokenizer and generation defaults of an original Qwen-1 directory."""
    from transformers import GenerationConfig

    root = Path(src_dir)
    cfg = json.loads((root / "config.json").read_text())
    if cfg.get("model_type") != "qwen" and "QWenLMHeadModel" not in cfg.get("architectures", []):
        raise ValueError(f"{root}/config.json is not a Qwen-1 config (model_type={cfg.get('model_type')!r})")
    qcfg = qwen1_config_to_qwen2(cfg)
    state = qwen1_to_qwen2_state(read_state_dir(root), qcfg)
    qcfg.dtype = state["model.embed_tokens.weight"].dtype
    vocab = sorted(root.glob("*.tiktoken"))
    if not vocab:
        raise FileNotFoundError(f"no qwen.tiktoken in {root}")
    tokenizer = qwen_tiktoken_to_fast(vocab[0])
    im_end, eos = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    qcfg.eos_token_id = eos
    # Qwen-1's chat() stops on both; keep its sampling defaults where it ships them.
    gen_file = root / "generation_config.json"
    src_gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    sampling = ("do_sample", "top_p", "top_k", "temperature", "repetition_penalty", "max_new_tokens")
    gen = GenerationConfig(**{k: src_gen[k] for k in sampling if k in src_gen}, eos_token_id=[im_end, eos])
    gen.pad_token_id = eos
    return qcfg, state, tokenizer, gen


def load_qwen1_dir(src_dir: str | Path):
    """``(Qwen2ForCausalLM, tokenizer)`` from an original Qwen-1 directory, converted in memory (no remote code)."""
    from transformers import Qwen2ForCausalLM

    qcfg, state, tokenizer, gen = _read_qwen1_dir(src_dir)
    model = Qwen2ForCausalLM.from_pretrained(None, config=qcfg, state_dict=state, dtype=qcfg.dtype)
    model.generation_config = gen
    return model, tokenizer


def convert_qwen1_dir(src_dir: str | Path, out_dir: str | Path, max_shard_size: str | int = "5GB") -> Path:
    """Write a native Qwen2 directory (config, sharded safetensors, tokenizer + ChatML) from an original Qwen-1 one.

    No model is instantiated, so a 14B checkpoint converts with about one copy of its weights in memory.
    """
    from huggingface_hub import save_torch_state_dict

    qcfg, state, tokenizer, gen = _read_qwen1_dir(src_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(state, out, max_shard_size=max_shard_size, metadata={"format": "pt"})
    qcfg.save_pretrained(out)
    gen.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
