"""Format conversions for real checkpoints, written as pure functions over state dicts.

Two published formats are not what transformers' modules load, and we use the library's modules rather than vendored
copies (ARCHITECTURE rule 7), so their weights are renamed here once:

* LAVIS BLIP-2, the vision side MiniGPT-4 used: EVA ViT-g in ``eva_vit_g.pth`` and the Q-Former in
  ``blip2_pretrained_flant5xxl.pth``. ``lavis_to_hf_blip2`` gives them ``Blip2Model`` names, so the frozen vision side
  is ``Blip2VisionModel`` + ``Blip2QFormerModel``. An HF-format BLIP-2 directory is read with ``load_hf_blip2_dir``.
* Qwen-1 (Qwen-7B-Chat, Qwen-14B-Chat) ships remote code and a tiktoken vocabulary. ``convert_qwen1_dir`` writes a
  native Qwen2 directory (weights, config, fast tokenizer, ChatML template) that loads without ``trust_remote_code``.

Every converter checks names and shapes against the module it feeds (built on the meta device) before it returns, so
a file of another size fails here, in one line naming the source key, our key and both shapes, and not later inside
transformers or after a half-written output folder.

Usage:
    python -c "from minigpt4qwen.models.convert import convert_qwen1_dir as c; c('Qwen-7B-Chat', 'qwen7b-chat-hf')"
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "CHATML_TEMPLATE",
    "CheckpointKeyError",
    "QWEN1_PATTERN",
    "QWEN1_SPECIAL_START_ID",
    "QWEN1_SPECIAL_TOKENS",
    "blip2_configs_from_state",
    "blip2_param_shapes",
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
    """A checkpoint lacks weights a module needs, holds weights with no place in it, or holds them in another shape."""


class _Source:
    """One input state dict that records which keys were used, so the rest can be reported instead of lost silently.

    ``prefix`` lets the same code read EVA weights from ``eva_vit_g.pth`` (no prefix) or from a BLIP-2 checkpoint that
    embeds them (``visual_encoder.``); ``where`` names the file the user should look in when something is missing.
    ``origin`` maps each output name to the source key(s) it came from, for error messages in the source's terms.
    """

    def __init__(self, state: StateDict, label: str, where: str, prefix: str = "") -> None:
        self.state, self.label, self.where, self.prefix = state, label, where, prefix
        self.used: set[str] = set()
        self.missing: list[tuple[str, str]] = []  # (source key, our name)
        self.origin: dict[str, str] = {}

    def take(self, key: str, dst: str) -> Tensor | None:
        """The tensor under ``key`` (None if absent: raise_if_missing reports it), recorded as a source of ``dst``."""
        full = self.prefix + key
        self.origin[dst] = f"{self.origin[dst]} + {full}" if dst in self.origin else f"{self.label}:{full}"
        if full not in self.state:
            self.missing.append((full, dst))
            return None
        self.used.add(full)
        return self.state[full]

    def move(self, out: dict[str, Tensor | None], key: str, dst: str) -> None:
        out[dst] = self.take(key, dst)

    def raise_if_missing(self, what: str) -> None:
        if self.missing:
            (key, dst), n = self.missing[0], len(self.missing)
            raise CheckpointKeyError(
                f"{what} needs {n} key(s) the checkpoint lacks, the first {self.label}:{key} (ours: {dst}); "
                f"they should come from {self.where}"
            )

    def unused(self) -> list[str]:
        return [f"{self.label}:{k}" for k in self.state if k not in self.used]


def _check_against(
    state: StateDict, expected: Mapping[str, torch.Size], origin: Mapping[str, str], basis: str,
    fix: Callable[[str], str],
) -> None:
    """Converted weights against the parameters ``basis`` (a phrase: where ``expected`` comes from) gives. The first
    problem raises, in one line naming the source key, our key, both shapes and ``fix(our_key)``, what to do."""
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointKeyError(f"{len(missing)} weight(s) of {basis} have no key in the checkpoint, the first "
                                 f"{missing[0]}; {fix(missing[0])}")
    extra = [k for k in state if k not in expected]
    if extra:
        k = extra[0]
        raise CheckpointKeyError(f"{origin.get(k, k)} (ours: {k}) and {len(extra) - 1} more weight(s) have no place "
                                 f"in {basis}; {fix(k)}")
    for k, t in state.items():
        if tuple(t.shape) != tuple(expected[k]):
            raise CheckpointKeyError(f"{origin.get(k, k)} (ours: {k}) has shape {list(t.shape)}, expected "
                                     f"{list(expected[k])} ({basis}); {fix(k)}")


def _meta_shapes(module_cls, config, prefix: str = "") -> dict[str, torch.Size]:
    """Parameter shapes of ``module_cls(config)``, built on the meta device: no memory, no initialisation."""
    with torch.device("meta"):
        module = module_cls(config)
    return {prefix + k: p.shape for k, p in module.named_parameters()}


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
_VISION_SIDE = ("vision_model.", "qformer.", "query_tokens")
# What to do when the LAVIS files do not fit the model a config builds, by the part the weight is for.
_FIX_FOR_MODEL = {
    "vision_model": "the LAVIS files' ViT is not the one model.vision builds (eva-vit-g for eva_vit_g.pth): "
    "check model.vision",
    "qformer": "the BLIP-2 file's Q-Former is not the one model.qformer builds (blip2-qformer for BLIP-2): "
    "check model.qformer",
    "query_tokens": "the BLIP-2 file's queries are not what model.num_query_tokens and model.qformer give "
    "(32 x 768 for BLIP-2): check them",
}
# ... and when one tensor disagrees with the sizes the rest of the files have.
_FIX_SELF = (
    "the file is damaged, or the EVA and BLIP-2 files do not belong together: re-download them, or pass the EVA "
    "file this BLIP-2 checkpoint was trained with"
)


def _hf_qformer_module(lavis_module: str) -> str:
    # transformers calls BERT's "self" attention submodule "attention"; everything else keeps LAVIS's name.
    return lavis_module.replace(".self.", ".attention.")


def _vision_state(src: _Source, blip2: _Source, num_layers: int) -> StateDict:
    """EVA ViT-g blocks [0, num_layers) + ``ln_vision`` as ``Blip2VisionModel`` weights (prefixed ``vision_model.``)."""
    out: dict[str, Tensor | None] = {}
    for key, dst in _EVA_EMBEDDINGS.items():
        src.move(out, key, f"vision_model.embeddings.{dst}")
    for i in range(num_layers):
        block, layer = f"blocks.{i}.", f"vision_model.encoder.layers.{i}."
        for module, dst in _EVA_BLOCK.items():
            for p in ("weight", "bias"):
                src.move(out, f"{block}{module}.{p}", f"{layer}{dst}.{p}")
        src.move(out, f"{block}attn.qkv.weight", f"{layer}self_attn.qkv.weight")
        bias = f"{layer}self_attn.qkv.bias"
        q_bias, v_bias = src.take(f"{block}attn.q_bias", bias), src.take(f"{block}attn.v_bias", bias)
        if q_bias is not None and v_bias is not None:
            if q_bias.ndim != 1 or q_bias.shape != v_bias.shape:  # torch.cat would fail, or hide which one is off
                raise CheckpointKeyError(
                    f"{src.origin[bias]} (ours: {bias}) have shapes {list(q_bias.shape)} and {list(v_bias.shape)}, "
                    f"EVA's are both [width]; the file is damaged or not an EVA ViT: re-download it"
                )
            # EVA has no key bias; transformers stores one fused bias, so the key third is zeros.
            out[bias] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    for p in ("weight", "bias"):
        # BLIP-2's ln_vision sits between EVA and the Q-Former; transformers folds it into the vision model.
        blip2.move(out, f"ln_vision.{p}", f"vision_model.post_layernorm.{p}")
    return out  # type: ignore[return-value]  # None only where a key is missing, which raises before use


def _qformer_state(blip2: _Source, cross_attention_frequency: int) -> StateDict:
    """LAVIS Q-Former query path + query tokens as ``Blip2Model`` weights (``qformer.*``, ``query_tokens``)."""
    layer_ids = {int(k[len(_QFORMER_LAYER) :].split(".")[0]) for k in blip2.state if k.startswith(_QFORMER_LAYER)}
    num_layers = max(layer_ids) + 1 if layer_ids else 0
    if num_layers == 0:
        blip2.missing.append((f"{_QFORMER_LAYER}0.*", "qformer.encoder.layer.0.*"))
    cross = {i for i in layer_ids if f"{_QFORMER_LAYER}{i}.crossattention.self.query.weight" in blip2.state}
    unexpected = sorted(i for i in cross if i % cross_attention_frequency)
    if unexpected:
        raise CheckpointKeyError(
            f"Q-Former layers {unexpected} have cross-attention, which cross_attention_frequency="
            f"{cross_attention_frequency} does not place there; pass the frequency the checkpoint was trained with"
        )
    out: dict[str, Tensor | None] = {}
    blip2.move(out, "query_tokens", "query_tokens")
    for p in ("weight", "bias"):
        blip2.move(out, f"Qformer.bert.embeddings.LayerNorm.{p}", f"qformer.layernorm.{p}")
    for i in range(num_layers):
        modules = _QFORMER_QUERY_MODULES + (_QFORMER_CROSS_MODULES if i % cross_attention_frequency == 0 else ())
        for module in modules:
            for p in ("weight", "bias"):
                blip2.move(out, f"{_QFORMER_LAYER}{i}.{module}.{p}",
                           f"qformer.encoder.layer.{i}.{_hf_qformer_module(module)}.{p}")
    return out  # type: ignore[return-value]


def _most_common(state: StateDict, pattern: str, dim: int) -> int:
    """The size along ``dim`` that most weights named like ``pattern`` agree on. One odd tensor then cannot set the
    architecture it is checked against, and the shape error names it rather than its healthy neighbours."""
    sizes = Counter(t.shape[dim] for k, t in state.items() if re.fullmatch(pattern, k) and t.ndim > dim)
    if not sizes:
        raise CheckpointKeyError(f"no weight named like {pattern!r} has a dimension {dim}: not a BLIP-2 vision side")
    return sizes.most_common(1)[0][0]


def _count_layers(state: StateDict, pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _preset_heads(kind: str, presets: dict[str, dict], hidden: int, given: int | None) -> int:
    """Head count for a width: LAVIS files store no head count, and the known presets are the only safe guess."""
    if given:
        return given
    for preset in presets.values():
        if preset["hidden_size"] == hidden:
            return preset["num_attention_heads"]
    raise CheckpointKeyError(
        f"{kind} width {hidden} matches no preset, so its head count is unknown: pass --{kind}-heads"
    )


def blip2_configs_from_state(
    state: StateDict, cross_attention_frequency: int = 2, vision_heads: int | None = None,
    qformer_heads: int | None = None,
):
    """(Blip2VisionConfig, Blip2QFormerConfig) read off the shapes of ``Blip2Model``-named weights.

    Sizes come from the tensors so that any EVA/Q-Former variant converts, each from the size most tensors agree on;
    only head counts (absent from the files, and without effect on any shape) come from the presets or the
    arguments. ``layer_norm_eps`` is EVA's block eps; models/vision.build_vision gives ``post_layernorm`` LAVIS's
    ``ln_vision`` eps. Dropouts are 0 because this side is used frozen.
    """
    from transformers import Blip2QFormerConfig, Blip2VisionConfig

    from .qformer import QFORMER_PRESETS
    from .vision import VISION_PRESETS

    v, q = r"vision_model\.", r"qformer\."
    hidden = _most_common(state, rf"{v}(encoder\.layers\.\d+\.layer_norm[12]|post_layernorm)\.weight", 0)
    patch = _most_common(state, rf"{v}embeddings\.patch_embedding\.weight", 2)
    grid = math.isqrt(max(_most_common(state, rf"{v}embeddings\.position_embedding", 1) - 1, 0))
    vision = Blip2VisionConfig(
        hidden_size=hidden, intermediate_size=_most_common(state, rf"{v}encoder\.layers\.\d+\.mlp\.fc1\.weight", 0),
        num_hidden_layers=_count_layers(state, rf"{v}encoder\.layers\.(\d+)\."),
        num_attention_heads=_preset_heads("vision", VISION_PRESETS, hidden, vision_heads),
        image_size=grid * patch, patch_size=patch, layer_norm_eps=1e-6, qkv_bias=True, attention_dropout=0.0,
    )
    width = _most_common(state, rf"{q}(layernorm|.*\.LayerNorm)\.weight", 0)
    qformer = Blip2QFormerConfig(
        hidden_size=width,
        intermediate_size=_most_common(state, rf"{q}encoder\.layer\.\d+\.intermediate_query\.dense\.weight", 0),
        num_hidden_layers=_count_layers(state, rf"{q}encoder\.layer\.(\d+)\."),
        num_attention_heads=_preset_heads("qformer", QFORMER_PRESETS, width, qformer_heads),
        cross_attention_frequency=cross_attention_frequency, encoder_hidden_size=hidden, layer_norm_eps=1e-12,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return vision, qformer


def blip2_param_shapes(vision_config, qformer_config, num_query_tokens: int) -> dict[str, torch.Size]:
    """Shapes of every ``Blip2Model``-named vision-side weight of these configs, from the transformers modules."""
    from transformers import Blip2QFormerModel, Blip2VisionModel

    return (
        _meta_shapes(Blip2VisionModel, vision_config, "vision_model.")
        | _meta_shapes(Blip2QFormerModel, qformer_config, "qformer.")
        | {"query_tokens": torch.Size([1, num_query_tokens, qformer_config.hidden_size])}
    )


def lavis_to_hf_blip2(
    eva_state: StateDict | None,
    blip2_state: StateDict,
    num_vision_layers: int = 39,
    cross_attention_frequency: int = 2,
    target: Mapping[str, Tensor | torch.Size] | None = None,
) -> tuple[StateDict, list[str]]:
    """Rename a LAVIS BLIP-2 vision side (EVA ViT-g + ln_vision + Q-Former + queries) to transformers' Blip2 names.

    Returns ``(state, ignored)``: ``state`` holds ``vision_model.*``, ``qformer.*`` and ``query_tokens`` exactly as
    ``Blip2Model`` names them; ``ignored`` lists every input key left out, as ``"eva:<key>"`` / ``"blip2:<key>"`` (the
    40th EVA block, the Q-Former's text path, ITC/ITM heads, the T5/OPT side), so nothing is dropped unseen.

    BLIP-2 ran EVA without its last block (39 of 40), hence the default. When ``blip2_state`` embeds the vision
    encoder (``visual_encoder.*``) those weights are the ones BLIP-2 actually used and win over ``eva_state``.

    Names and shapes are checked against ``target``, the parameters (or shapes) of the model the weights are for
    (e.g. ``dict(model.named_parameters())``; its other names are left aside), or without one against the
    architecture the files' own shapes give, which catches a single odd tensor. The first problem raises
    CheckpointKeyError in one line naming the LAVIS key, ours, both shapes and what to check.
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
    if target is None:
        vision, qformer = blip2_configs_from_state(state, cross_attention_frequency, vision_heads=1, qformer_heads=1)
        expected = blip2_param_shapes(vision, qformer, _most_common(state, "query_tokens", 1))
        _check_against(state, expected, eva.origin | blip2.origin, "the size the files' other weights give",
                       lambda k: _FIX_SELF)
    else:
        expected = {k: torch.Size(v.shape if isinstance(v, Tensor) else v) for k, v in target.items()
                    if k.startswith(_VISION_SIDE)}
        _check_against(state, expected, eva.origin | blip2.origin, "the model the config builds",
                       lambda k: _FIX_FOR_MODEL[k.split(".")[0]])
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


def _lavis_state(path: str | Path) -> StateDict:
    """The state dict of a LAVIS file: under ``"model"`` in BLIP-2 checkpoints, the whole file in eva_vit_g.pth."""
    obj = _torch_load(path)
    state = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise CheckpointKeyError(f"{path} holds a {type(state).__name__}, not a state dict: not a LAVIS checkpoint")
    return state


def load_blip2_vision_side(
    eva_path: str | Path | None,
    blip2_path: str | Path,
    num_vision_layers: int = 39,
    cross_attention_frequency: int = 2,
    target: Mapping[str, Tensor | torch.Size] | None = None,
) -> tuple[StateDict, list[str]]:
    """Read LAVIS ``eva_vit_g.pth`` and a BLIP-2 ``.pth`` (``{"model": ...}``) and convert and check them (see
    lavis_to_hf_blip2; ``target``: the model's parameters, so that a file of another size names its key).

    ``eva_path`` may be None when the BLIP-2 file embeds ``visual_encoder.*``.
    """
    blip2_state = _lavis_state(blip2_path)
    eva_state = _lavis_state(eva_path) if eva_path is not None else None
    return lavis_to_hf_blip2(eva_state, blip2_state, num_vision_layers, cross_attention_frequency, target)


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
