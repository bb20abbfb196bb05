"""LAVIS BLIP-2 (EVA ViT-g + Q-Former .pth files) -> transformers Blip2 names, checked against the target."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .common import (
    CheckpointKeyError,
    StateDict,
    _check_against,
    _meta_shapes,
    _Source,
    _torch_load,
    read_state_dir,
)

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

    from ..qformer import QFORMER_PRESETS
    from ..vision import VISION_PRESETS

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
