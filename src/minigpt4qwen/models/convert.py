"""Format conversions for real checkpoints, written as pure functions over state dicts.

Two published formats are not what transformers' modules load, and we use the library's modules rather than vendored
copies (ARCHITECTURE rule 7), so their weights are renamed here once:

* LAVIS BLIP-2, the vision side MiniGPT-4 used: EVA ViT-g in ``eva_vit_g.pth`` and the Q-Former in
  ``blip2_pretrained_flant5xxl.pth``. ``lavis_to_hf_blip2`` gives them ``Blip2Model`` names, so the frozen vision side
  is ``Blip2VisionModel`` + ``Blip2QFormerModel``. An HF-format BLIP-2 directory is read with ``load_hf_blip2_dir``.
* Qwen-1 (Qwen-7B-Chat, Qwen-14B-Chat) ships remote code and a tiktoken vocabulary. ``convert_qwen1_dir`` writes a
  native Qwen2 directory (weights, config, fast tokenizer, ChatML template) that loads without ``trust_remote_code``.

Usage:
    python -c "from minigpt4qwen.models.convert import convert_qwen1_dir as c; c('Qwen-7B-Chat', 'qwen7b-chat-hf')"
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "CHATML_TEMPLATE",
    "CheckpointKeyError",
    "QWEN1_PATTERN",
    "QWEN1_SPECIAL_START_ID",
    "QWEN1_SPECIAL_TOKENS",
    "convert_qwen1_dir",
    "lavis_to_hf_blip2",
    "load_blip2_vision_side",
    "load_hf_blip2_dir",
    "load_qwen1_dir",
    "qwen1_config_to_qwen2",
    "qwen1_to_qwen2_state",
    "qwen_tiktoken_to_fast",
    "read_state_dir",
    "split_blip2_state",
]

StateDict = dict[str, Tensor]


class CheckpointKeyError(ValueError):
    """A checkpoint lacks weights a module needs, or holds weights that have no place in the target module."""


class _Source:
    """One input state dict that records which keys were used, so the rest can be reported instead of lost silently.

    ``prefix`` lets the same code read EVA weights from ``eva_vit_g.pth`` (no prefix) or from a BLIP-2 checkpoint that
    embeds them (``visual_encoder.``); ``where`` names the file the user should look in when something is missing.
    """

    def __init__(self, state: StateDict, label: str, where: str, prefix: str = "") -> None:
        self.state, self.label, self.where, self.prefix = state, label, where, prefix
        self.used: set[str] = set()
        self.missing: list[str] = []

    def take(self, key: str) -> Tensor | None:
        full = self.prefix + key
        if full not in self.state:
            self.missing.append(full)
            return None
        self.used.add(full)
        return self.state[full]

    def raise_if_missing(self, what: str) -> None:
        if self.missing:
            more = f", ... ({len(self.missing)} in all)" if len(self.missing) > 12 else ""
            raise CheckpointKeyError(
                f"{what} needs keys that are missing: {', '.join(self.missing[:12])}{more}. "
                f"They should come from {self.where}."
            )

    def unused(self) -> list[str]:
        return [f"{self.label}:{k}" for k in self.state if k not in self.used]


def _torch_load(path: str | Path) -> dict:
    """Load a pickled checkpoint safely (tensors and plain containers only) onto the CPU, memory-mapped if possible."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files written before torch's zip format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dir(path: str | Path) -> StateDict:
    """All tensors of an HF-style weight directory: one or sharded safetensors, or one or sharded ``.bin`` files.

    Safetensors win when both are present because they load without unpickling.
    """
    from safetensors.torch import load_file

    root = Path(path)
    layouts = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
    for name in layouts:
        if not (root / name).is_file():
            continue
        files = (
            sorted(set(json.loads((root / name).read_text())["weight_map"].values()))
            if name.endswith(".index.json")
            else [name]
        )
        state: StateDict = {}
        for file in files:
            state.update(load_file(root / file) if file.endswith(".safetensors") else _torch_load(root / file))
        return state
    raise FileNotFoundError(f"no weights in {root}: looked for {', '.join(layouts)}")


# --------------------------------------------------------------------------------------------------------------------
# LAVIS BLIP-2 -> transformers Blip2 names
# --------------------------------------------------------------------------------------------------------------------

_EVA_WHERE = "eva_vit_g.pth (EVA ViT-g weights), or the BLIP-2 checkpoint's visual_encoder.* keys"
_BLIP2_WHERE = "the LAVIS BLIP-2 checkpoint (e.g. blip2_pretrained_flant5xxl.pth, under its 'model' entry)"
_EVA_EMBEDDINGS = {
    "cls_token": "class_embedding",
    "pos_embed": "position_embedding",
    "patch_embed.proj.weight": "patch_embedding.weight",
    "patch_embed.proj.bias": "patch_embedding.bias",
}
# EVA block module -> Blip2EncoderLayer module; qkv is handled apart because its bias is rebuilt from q_bias/v_bias.
_EVA_BLOCK = {
    "norm1": "layer_norm1",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_QFORMER_LAYER = "Qformer.bert.encoder.layer."
# The query path of a LAVIS BertLayer; the text path (intermediate, output) and text embeddings are unused by
# Blip2QFormerModel, which only ever sees the learned queries.
_QFORMER_QUERY_MODULES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "attention.output.LayerNorm",
    "intermediate_query.dense",
    "output_query.dense",
    "output_query.LayerNorm",
)
_QFORMER_CROSS_MODULES = tuple("cross" + m for m in _QFORMER_QUERY_MODULES[:5])


def _hf_qformer_module(lavis_module: str) -> str:
    # transformers calls BERT's "self" attention submodule "attention"; everything else keeps LAVIS's name.
    return lavis_module.replace(".self.", ".attention.")


def _vision_state(src: _Source, blip2: _Source, num_layers: int) -> StateDict:
    """EVA ViT-g blocks [0, num_layers) + ``ln_vision`` as ``Blip2VisionModel`` weights (prefixed ``vision_model.``)."""
    out: dict[str, Tensor | None] = {
        f"vision_model.embeddings.{dst}": src.take(key) for key, dst in _EVA_EMBEDDINGS.items()
    }
    for i in range(num_layers):
        block, layer = f"blocks.{i}.", f"vision_model.encoder.layers.{i}."
        for module, dst in _EVA_BLOCK.items():
            for p in ("weight", "bias"):
                out[f"{layer}{dst}.{p}"] = src.take(f"{block}{module}.{p}")
        out[f"{layer}self_attn.qkv.weight"] = src.take(f"{block}attn.qkv.weight")
        q_bias, v_bias = src.take(f"{block}attn.q_bias"), src.take(f"{block}attn.v_bias")
        if q_bias is not None and v_bias is not None:
            # EVA has no key bias; transformers stores one fused bias, so the key third is zeros.
            out[f"{layer}self_attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    for p in ("weight", "bias"):
        # BLIP-2's ln_vision sits between EVA and the Q-Former; transformers folds it into the vision model.
        out[f"vision_model.post_layernorm.{p}"] = blip2.take(f"ln_vision.{p}")
    return out  # type: ignore[return-value]  # None only where a key is missing, which raises before use


def _qformer_state(blip2: _Source, cross_attention_frequency: int) -> StateDict:
    """LAVIS Q-Former query path + query tokens as ``Blip2Model`` weights (``qformer.*``, ``query_tokens``)."""
    layer_ids = {int(k[len(_QFORMER_LAYER) :].split(".")[0]) for k in blip2.state if k.startswith(_QFORMER_LAYER)}
    num_layers = max(layer_ids) + 1 if layer_ids else 0
    if num_layers == 0:
        blip2.missing.append(f"{_QFORMER_LAYER}0.*")
    cross = {i for i in layer_ids if f"{_QFORMER_LAYER}{i}.crossattention.self.query.weight" in blip2.state}
    unexpected = sorted(i for i in cross if i % cross_attention_frequency)
    if unexpected:
        raise CheckpointKeyError(
            f"Q-Former layers {unexpected} have cross-attention, which cross_attention_frequency="
            f"{cross_attention_frequency} does not place there; pass the frequency the checkpoint was trained with"
        )
    out: dict[str, Tensor | None] = {"query_tokens": blip2.take("query_tokens")}
    for p in ("weight", "bias"):
        out[f"qformer.layernorm.{p}"] = blip2.take(f"Qformer.bert.embeddings.LayerNorm.{p}")
    for i in range(num_layers):
        modules = _QFORMER_QUERY_MODULES + (_QFORMER_CROSS_MODULES if i % cross_attention_frequency == 0 else ())
        for module in modules:
            for p in ("weight", "bias"):
                out[f"qformer.encoder.layer.{i}.{_hf_qformer_module(module)}.{p}"] = blip2.take(
                    f"{_QFORMER_LAYER}{i}.{module}.{p}"
                )
    return out  # type: ignore[return-value]


def lavis_to_hf_blip2(
    eva_state: StateDict | None,
    blip2_state: StateDict,
    num_vision_layers: int = 39,
    cross_attention_frequency: int = 2,
) -> tuple[StateDict, list[str]]:
    """Rename a LAVIS BLIP-2 vision side (EVA ViT-g + ln_vision + Q-Former + queries) to transformers' Blip2 names.

    Returns ``(state, ignored)``: ``state`` holds ``vision_model.*``, ``qformer.*`` and ``query_tokens`` exactly as
    ``Blip2Model`` names them; ``ignored`` lists every input key left out, as ``"eva:<key>"`` / ``"blip2:<key>"`` (the
    40th EVA block, the Q-Former's text path, ITC/ITM heads, the T5/OPT side), so nothing is dropped unseen.

    BLIP-2 ran EVA without its last block (39 of 40), hence the default. When ``blip2_state`` embeds the vision
    encoder (``visual_encoder.*``) those weights are the ones BLIP-2 actually used and win over ``eva_state``.
    """
    blip2 = _Source(blip2_state, "blip2", _BLIP2_WHERE)
    if any(k.startswith("visual_encoder.") for k in blip2_state):
        eva = _Source(blip2_state, "blip2", _EVA_WHERE, prefix="visual_encoder.")
        sources = [blip2, eva] + ([_Source(eva_state, "eva", _EVA_WHERE)] if eva_state is not None else [])
    elif eva_state is not None:
        eva = _Source(eva_state, "eva", _EVA_WHERE)
        sources = [blip2, eva]
    else:
        raise CheckpointKeyError(f"no EVA ViT-g weights: pass {_EVA_WHERE}")
    state = _vision_state(eva, blip2, num_vision_layers) | _qformer_state(blip2, cross_attention_frequency)
    eva.raise_if_missing("Blip2VisionModel")
    blip2.raise_if_missing("Blip2QFormerModel / query_tokens / post_layernorm")
    if eva.state is blip2.state:  # one dict read through two views: a key is ignored only if neither used it
        blip2.used |= eva.used
        sources.remove(eva)
    ignored = sorted(k for s in sources for k in s.unused())
    return state, ignored


def split_blip2_state(state: StateDict) -> tuple[StateDict, StateDict, Tensor]:
    """Split ``Blip2Model``-named weights into what ``Blip2VisionModel`` and ``Blip2QFormerModel`` load, and queries.

    The composite model keeps the query tokens itself (``Blip2QFormerModel`` takes them as ``query_embeds``).
    """
    vision = {k.removeprefix("vision_model."): v for k, v in state.items() if k.startswith("vision_model.")}
    qformer = {k.removeprefix("qformer."): v for k, v in state.items() if k.startswith("qformer.")}
    return vision, qformer, state["query_tokens"]


def load_blip2_vision_side(
    eva_path: str | Path | None,
    blip2_path: str | Path,
    num_vision_layers: int = 39,
    cross_attention_frequency: int = 2,
) -> tuple[StateDict, list[str]]:
    """Read LAVIS ``eva_vit_g.pth`` and a BLIP-2 ``.pth`` (``{"model": ...}``) and convert them (see lavis_to_hf_blip2).

    ``eva_path`` may be None when the BLIP-2 file embeds ``visual_encoder.*``.
    """
    blip2_file = _torch_load(blip2_path)
    blip2_state = blip2_file.get("model", blip2_file)
    eva_state = _torch_load(eva_path) if eva_path is not None else None
    return lavis_to_hf_blip2(eva_state, blip2_state, num_vision_layers, cross_attention_frequency)


def load_hf_blip2_dir(path: str | Path) -> tuple[StateDict, list[str]]:
    """The vision side (``vision_model.*``, ``qformer.*``, ``query_tokens``) of an HF-format BLIP-2 directory.

    The language model and projection of that checkpoint are reported in ``ignored``; so are ``qformer.embeddings.*``,
    which only the text-input (ITM / retrieval) variants use and ``Blip2QFormerModel`` without text input lacks.
    """
    state = read_state_dir(path)
    wanted = ("vision_model.", "qformer.", "query_tokens")
    keep = {k: v for k, v in state.items() if k.startswith(wanted) and not k.startswith("qformer.embeddings.")}
    if "query_tokens" not in keep or not any(k.startswith("vision_model.") for k in keep):
        raise CheckpointKeyError(f"{path} holds no BLIP-2 vision side (vision_model.* and query_tokens)")
    return keep, sorted(k for k in state if k not in keep)


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

    ``cfg`` is the Qwen-1 config dict or the Qwen2Config from ``qwen1_config_to_qwen2``. Missing weights and
    weights with no place in Qwen2 both raise, since either means the config and the shards disagree.
    """
    if isinstance(cfg, dict):
        cfg = qwen1_config_to_qwen2(cfg)
    src = _Source(state, "qwen1", _QWEN1_WHERE)
    hidden = cfg.hidden_size
    out: dict[str, Tensor | None] = {
        "model.embed_tokens.weight": src.take("transformer.wte.weight"),
        "model.norm.weight": src.take("transformer.ln_f.weight"),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = src.take("lm_head.weight")
    for i in range(cfg.num_hidden_layers):
        block, layer = f"transformer.h.{i}.", f"model.layers.{i}."
        for module, dst in _QWEN1_LAYER.items():
            out[f"{layer}{dst}.weight"] = src.take(f"{block}{module}.weight")
        for p in ("weight", "bias"):
            fused = src.take(f"{block}attn.c_attn.{p}")
            if fused is None:
                continue
            if fused.shape[0] != 3 * hidden:
                raise CheckpointKeyError(f"{block}attn.c_attn.{p} has {fused.shape[0]} rows, expected 3 x {hidden}")
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                # clone: views of one buffer would be saved as shared tensors (or dropped) by safetensors
                out[f"{layer}self_attn.{name}.{p}"] = fused[j * hidden : (j + 1) * hidden].clone()
    src.raise_if_missing("Qwen2ForCausalLM")
    unknown = [k for k in src.unused() if not _QWEN1_BUFFERS.search(k)]
    if unknown:
        raise CheckpointKeyError(
            f"Qwen-1 weights with no place in Qwen2: {', '.join(unknown[:12])} - does config.json match the shards?"
        )
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
