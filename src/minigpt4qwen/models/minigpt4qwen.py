"""The composite model, top to bottom: image -> EVA ViT (+ln_vision) -> Q-Former -> Linear -> LLM prompt.

Attribute names follow transformers' Blip2 checkpoints (`vision_model`, `qformer`, `query_tokens`) and the seed
(`llm_proj`), so HF BLIP-2 weights and the seed's projector checkpoints load by name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..data.conversation import IGNORE_INDEX
from .llm import load_llm, meta_llm, resolve_image_token
from .projector import build_projector
from .qformer import build_qformer
from .vision import build_vision

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CheckpointMismatchError(ValueError):
    """Weights whose names or shapes do not fit the model built from the config."""


class MiniGPT4Qwen(nn.Module):
    def __init__(self, vision_model, qformer, query_tokens: nn.Parameter, llm, image_token_id: int) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.qformer = qformer
        self.query_tokens = query_tokens
        self.llm_proj = build_projector("linear", qformer.config.hidden_size, llm.config.hidden_size)
        self.llm = llm
        self.image_token_id = image_token_id
        self.num_query_tokens = query_tokens.shape[1]
        self.loss_chunk = 4096
        self.fused_linear_ce: Callable | None = None
        """(lm_head weight, hidden rows, targets, bias) -> summed loss in one kernel (train.liger sets Liger's);
        None = lm_head + cross-entropy in chunks of loss_chunk rows."""

    # ------------------------------------------------------------------ parts

    @property
    def device(self) -> torch.device:
        return self.llm_proj.weight.device

    def _frozen(self, module: nn.Module) -> bool:
        return not any(p.requires_grad for p in module.parameters())

    def train(self, mode: bool = True):
        """Frozen towers stay in eval mode (no dropout, as BLIP-2 keeps its frozen ViT)."""
        super().train(mode)
        for module in (self.vision_model, self.qformer, self.llm):
            # transformers recomputes activations only in training mode: a checkpointed frozen tower stays in it
            checkpointed = mode and any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules())
            if self._frozen(module) and not checkpointed:
                module.eval()
        return self

    def qformer_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images -> (N, Q, qformer width). No autograd through towers that are frozen."""
        vision_frozen = self._frozen(self.vision_model)
        qformer_frozen = self._frozen(self.qformer) and not self.query_tokens.requires_grad
        vdtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not vision_frozen):
            image_embeds = self.vision_model(pixel_values=pixel_values.to(self.device, vdtype)).last_hidden_state
        with torch.set_grad_enabled(torch.is_grad_enabled() and not (vision_frozen and qformer_frozen)):
            query = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
            mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
            out = self.qformer(query_embeds=query, encoder_hidden_states=image_embeds, encoder_attention_mask=mask)
        return out.last_hidden_state

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.llm_proj(features.to(self.llm_proj.weight.dtype))

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None,
              image_tokens: int | None = None) -> torch.Tensor:
        """Token embeddings with every placeholder run replaced, in order, by one image's projected queries.
        `image_tokens`: the placeholders in `input_ids` when the caller counted them on the host (reading the count
        from a GPU tensor waits for everything queued before it, the vision tower included)."""
        is_image = input_ids == self.image_token_id
        table = self.llm.get_input_embeddings()
        embeds = table(input_ids.masked_fill(is_image, 0))
        n_slots = int(is_image.sum()) if image_tokens is None else image_tokens
        n_given = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        if n_slots != n_given:
            raise ValueError(
                f"prompt has {n_slots // self.num_query_tokens} image placeholders but "
                f"{n_given // self.num_query_tokens} images were given"
            )
        if n_slots:
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))
        return embeds

    def inputs_embeds(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
        features: torch.Tensor | None = None, image_tokens: int | None = None,
    ) -> torch.Tensor:
        if features is None and pixel_values is not None:
            features = self.qformer_features(pixel_values)
        return self.embed(input_ids, None if features is None else self.project(features), image_tokens)

    def decoder(self) -> nn.Module:
        llm = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        return llm.get_decoder()

    def compile_decoder_layers(self, backend: str = "inductor", dynamic: bool = True) -> int:
        """`torch.compile` every LLM decoder layer in place (one compiled graph serves all layers: their code and
        shapes are the same); returns the number of layers. `uncompile_layers` undoes it."""
        layers = list(self.decoder().layers)
        for layer in layers:
            layer.compile(backend=backend, dynamic=dynamic)
        return len(layers)

    def compile_vision_layers(self, backend: str = "inductor") -> int:
        """`torch.compile` every block of a frozen vision tower in place (forward only, under no_grad: inductor fuses
        its LayerNorms, GELU, bias adds and layer scales between the matmuls); returns the number of blocks, 0 when the
        tower trains. `uncompile_layers` undoes it too."""
        if not self._frozen(self.vision_model):
            return 0
        layers = list(self.vision_model.encoder.layers)
        for layer in layers:
            layer.compile(backend=backend)
        return len(layers)

    def uncompile_layers(self) -> None:
        for layer in [*self.decoder().layers, *self.vision_model.encoder.layers]:
            layer._compiled_call_impl = None  # what nn.Module.compile() set

    # ------------------------------------------------------------------ training forward

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
        pixel_values: torch.Tensor | None = None, features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, int]:
        """(sum of token losses, number of supervised tokens).

        lm_head and cross-entropy run only on supervised positions, in chunks: the full-vocabulary logits of
        every position are never materialised. `attention_mask=None` is right for right-padded rows (what `collate`
        builds; callers check with `collate.right_padded` on the CPU copy): the causal mask alone keeps real tokens
        from seeing the padding after them and positions count from 0 either way, and SDPA can then run its flash
        kernel instead of the masked one. Outputs at padded positions change, but they carry no label.
        """
        embeds = self.inputs_embeds(input_ids, pixel_values, features)
        # use_cache=False: transformers otherwise fills a KV cache during training too (a copy of every layer's K/V,
        # and a per-layer object that makes torch.compile recompile layer after layer)
        hidden = self.decoder()(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        h = hidden[:, :-1][keep]
        t = targets[keep]
        head = self.llm.get_output_embeddings()
        if self.fused_linear_ce is not None and t.numel():
            return self.fused_linear_ce(head.weight, h, t, head.bias).float(), int(t.numel())
        total = hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, t.numel(), self.loss_chunk):
            logits = head(h[i : i + self.loss_chunk]).float()
            total = total + F.cross_entropy(logits, t[i : i + self.loss_chunk], reduction="sum")
        return total, int(t.numel())

    # ------------------------------------------------------------------ weights

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_partial(self, state: dict[str, torch.Tensor], source: str, strict_keys: bool = True) -> list[str]:
        """Load `state` into the matching parameters; names or shapes that do not fit raise with the fix."""
        own = dict(self.named_parameters())
        unknown = [k for k in state if k not in own]
        if unknown and strict_keys:
            raise CheckpointMismatchError(
                f"{source}: {len(unknown)} key(s) not in the model, first {unknown[0]!r}; the checkpoint was made "
                "for another model config (check model.* in the run's config.yaml)"
            )
        for k, v in state.items():
            if k in own and own[k].shape != v.shape:
                raise CheckpointMismatchError(
                    f"{source}: {k} has shape {list(v.shape)} but the model expects {list(own[k].shape)}; it was "
                    "trained with a different model config (model.vision/qformer/llm)"
                )
        with torch.no_grad():
            for k, v in state.items():
                if k in own:
                    own[k].copy_(v.to(own[k].dtype))
        return unknown


# --------------------------------------------------------------------------------------------- building


@dataclass
class Built:
    model: MiniGPT4Qwen
    tokenizer: object
    counts: dict[str, tuple[int, int]]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def apply_trainable(model: MiniGPT4Qwen, cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """The one place that decides requires_grad; returns {part: (trainable, total)} parameter counts."""
    t = cfg.trainable
    parts = {
        "vision": ([model.vision_model], t.vision),
        "qformer": ([model.qformer, model.query_tokens], t.qformer),
        "projector": ([model.llm_proj], t.projector),
        "llm": ([model.llm], t.llm),
    }
    counts = {}
    for name, (mods, mode) in parts.items():
        params = [p for m in mods for p in ([m] if isinstance(m, nn.Parameter) else m.parameters())]
        if name == "llm" and mode == "lora":
            from peft import LoraConfig, get_peft_model

            for p in params:
                p.requires_grad_(False)
            lcfg = cfg.lora
            model.llm = get_peft_model(
                model.llm, LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                                      target_modules=list(lcfg.target_modules), task_type="CAUSAL_LM"),
            )
            params = list(model.llm.parameters())
        else:
            for p in params:
                p.requires_grad_(mode == "full")
        counts[name] = (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
    return counts


def log_counts(counts: dict[str, tuple[int, int]]) -> str:
    lines = [f"  {k:<10} {tr:>14,} / {tot:>14,} trainable" for k, (tr, tot) in counts.items()]
    tr = sum(v[0] for v in counts.values())
    tot = sum(v[1] for v in counts.values())
    lines.append(f"  {'total':<10} {tr:>14,} / {tot:>14,} trainable ({100 * tr / max(tot, 1):.3f}%)")
    return "parameters:\n" + "\n".join(lines)


def load_vision_side(model: MiniGPT4Qwen, cfg: ModelConfig) -> None:
    """Pretrained ViT + Q-Former + queries from an HF BLIP-2 directory/file or LAVIS .pth files."""
    if cfg.eva_checkpoint or cfg.blip2_checkpoint:
        from .convert import load_blip2_vision_side

        if not (cfg.eva_checkpoint and cfg.blip2_checkpoint):
            raise ValueError("LAVIS weights need both model.eva_checkpoint and model.blip2_checkpoint")
        state, ignored = load_blip2_vision_side(
            cfg.eva_checkpoint, cfg.blip2_checkpoint, model.vision_model.config.num_hidden_layers,
            model.qformer.config.cross_attention_frequency,
            target=dict(model.named_parameters()),  # names the LAVIS key and the model.* setting on a mismatch
        )
        log.info("LAVIS checkpoints: %d tensors loaded, %d ignored (text branch / ITC / ITM heads)",
                 len(state), len(ignored))
        model.load_partial(state, f"{cfg.eva_checkpoint} + {cfg.blip2_checkpoint}")
    if cfg.vision_checkpoint:
        state = read_weights(cfg.vision_checkpoint)
        wanted = {k: v for k, v in state.items() if k.split(".")[0] in ("vision_model", "qformer", "query_tokens")}
        if not wanted:
            raise CheckpointMismatchError(f"{cfg.vision_checkpoint}: no vision_model.*/qformer.*/query_tokens keys")
        model.load_partial(wanted, cfg.vision_checkpoint)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, a directory of them, or a torch .pth/.bin (LAVIS {"model": ...} too)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")) or sorted(path.glob("*.pth"))
        if not files:
            raise FileNotFoundError(f"{path}: no .safetensors/.bin/.pth weights inside")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(read_weights(f))
        return state
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if isinstance(obj, dict) and isinstance(obj.get("module"), dict):  # DeepSpeed model states
        obj = obj["module"]
    if not isinstance(obj, dict):
        raise CheckpointMismatchError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu",
                dtype_device: str | torch.device | None = None) -> Built:
    """Construct vision + Q-Former + projector + LLM on `device`, load pretrained parts, decide what trains.

    On the meta device: shapes only, nothing allocated or read (no tokenizer: `Built.tokenizer` is None), for
    parameter counts and checks of files against the architecture (`info`, `convert`). `dtype_device`: the device
    whose dtypes `frozen_dtype: auto` picks (a model built on the CPU to be moved to a GPU later); default `device`."""
    device = torch.device(device)
    if device.type == "meta":
        with torch.device("meta"):
            vision = build_vision(cfg.vision)
            qformer, query_tokens = build_qformer(cfg.qformer, vision.config.hidden_size, cfg.num_query_tokens)
            model = MiniGPT4Qwen(vision, qformer, query_tokens, meta_llm(cfg.llm, cfg.llm_gguf_file, cfg.tokenizer),
                                 image_token_id=0)
            return Built(model, None, apply_trainable(model, cfg))
    frozen_dtype = resolve_dtype(cfg.frozen_dtype, torch.device(dtype_device or device))
    vision = build_vision(cfg.vision)
    qformer, query_tokens = build_qformer(cfg.qformer, vision.config.hidden_size, cfg.num_query_tokens)
    llm_dtype = frozen_dtype if cfg.trainable.llm != "full" else torch.float32
    llm, tokenizer = load_llm(cfg.llm, llm_dtype, device, cfg.llm_gguf_file, cfg.tokenizer, cfg.attn_implementation)
    image_token_id = resolve_image_token(tokenizer, cfg.image_token)
    model = MiniGPT4Qwen(vision, qformer, query_tokens, llm, image_token_id).to(device)
    load_vision_side(model, cfg)
    if cfg.projector_checkpoint:
        state = read_weights(cfg.projector_checkpoint)
        model.load_partial({k: v for k, v in state.items() if k.startswith("llm_proj.")}, cfg.projector_checkpoint)
    counts = apply_trainable(model, cfg)
    # frozen towers in the compact dtype; trainable parameters stay fp32 (autocast handles compute)
    for module in (model.vision_model, model.qformer):
        if not any(p.requires_grad for p in module.parameters()):
            module.to(frozen_dtype)
    return Built(model, tokenizer, counts)
