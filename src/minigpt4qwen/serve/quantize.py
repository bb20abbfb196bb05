"""Weight-only quantization of the model's big matrices for answering (chat, predict, web UI, API, eval).

    minigpt4qwen chat --checkpoint RUN_DIR --image a.jpg --quantize int8 [--compile-decode]
    report = quantize_llm(model, "int8")   # after the checkpoint (and any LoRA merge) is loaded, before decoding

torchao's `quantize_` swaps the weight of every nn.Linear inside the LLM's decoder layers (q/k/v/o and gate/up/down
projections) and inside the vision tower's blocks (qkv, projection, fc1/fc2) for a quantized tensor subclass whose
F.linear dequantizes on the fly; the modules, their names and HF's forward stay as they are, so HF `generate`
(sampling, beams, streaming) and FastDecoder both run on the quantized weights. Activations stay in the model's dtype
(weight-only): the gain is the weight bytes read per decode step, which is what bounds batch-1 decoding. Eagerly each
matmul first dequantizes its whole weight, so int8/fp8 only get faster with `--compile-decode` (inductor fuses the
dequantization into the matmul); memory drops either way.

    mode  LLM decoder weights                               vision tower   needs
    int8  int8, one fp32 scale per output row (torchao      int8           CPU or CUDA
          Int8WeightOnlyConfig)
    fp8   float8 e4m3, one scale per output row             fp8            CUDA, compute capability >= 8.9
          (Float8WeightOnlyConfig)
    int4  int4 in groups of 128 (or 64/32) along the input  int8           CUDA, compute capability >= 8.0
          with scale + zero point per group, bf16 (torch's                 (torch's tinygemm kernel)
          tinygemm kernel, Int4WeightOnlyConfig tile-packed)

A token embedding of its own (not tied to lm_head: Qwen-7B-Chat, Qwen2.5-7B) becomes `Int8Embedding` in every mode:
int8 rows with one scale each, a lookup dequantizing only the rows it reads (1.2 -> 0.6 GiB for Qwen-7B).
Untouched: lm_head (see `quantize_llm`), the Q-Former, the projector, norms and the patch embedding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .fastdecode import forget_fused, fuse_linears, fusion_groups, replace_fused_weight

if TYPE_CHECKING:
    from collections.abc import Iterable

log = logging.getLogger(__name__)

QUANTIZE_MODES = ("none", "int8", "fp8", "int4")
"""`--quantize` values; none keeps the weights as loaded."""

_NEEDS = {"fp8": ((8, 9), "float8 weights: Ada or Hopper"), "int4": ((8, 0), "torch's tinygemm int4 kernel")}
"""Modes that need a CUDA GPU: the least compute capability and why."""

INT4_GROUP_SIZES = (128, 64, 32)
"""int4 group sizes tried in order (tinygemm's sizes); the first that divides a layer's input width is used."""


class QuantizeError(ValueError):
    """`--quantize` cannot run as asked; the message is one line naming the option and the way out."""


@dataclass
class QuantizeReport:
    """What `quantize_llm` did: bytes of the LLM's weights and of the quantized layers' weights, before and after."""

    mode: str
    layers: int
    """nn.Linear layers of the LLM's decoder quantized."""
    skipped: int
    """Decoder Linears left as they were (int4: an input width no group size divides)."""
    llm_bytes_before: int
    llm_bytes_after: int
    linear_bytes_before: int
    linear_bytes_after: int
    vision_layers: int = 0
    """nn.Linear layers of the vision tower's blocks quantized (0: no vision tower given, or none)."""
    vision_bytes_before: int = 0
    vision_bytes_after: int = 0

    def line(self) -> str:
        return (f"--quantize {self.mode}: {self.layers} decoder linear layers quantized"
                + (f" ({self.skipped} left as they were)" if self.skipped else "")
                + f"; their weights {size(self.linear_bytes_before)} -> {size(self.linear_bytes_after)}, "
                f"all LLM weights {size(self.llm_bytes_before)} -> {size(self.llm_bytes_after)}"
                + (f"; vision tower: {self.vision_layers} linear layers, {size(self.vision_bytes_before)} -> "
                   f"{size(self.vision_bytes_after)}" if self.vision_layers else ""))


class Int8Embedding(nn.Module):
    """A token embedding table kept as int8 rows with one fp32 scale per row (symmetric, round to nearest): half the
    bytes of bf16, and a lookup dequantizes only the rows it reads (torchao's quantized tensors dequantize the whole
    table per lookup: 1.2 GiB of bf16 for Qwen-7B). Error per value <= its row's max / 254."""

    CHUNK_ROWS = 8192
    """Rows quantized at a time: the float32 copy made on the way stays small."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        self.out_dtype = weight.dtype
        q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scale = torch.empty(weight.shape[0], 1, dtype=torch.float32, device=weight.device)
        for start in range(0, weight.shape[0], self.CHUNK_ROWS):
            rows = weight[start : start + self.CHUNK_ROWS].float()
            s = (rows.abs().amax(1, keepdim=True) / 127).clamp_(min=torch.finfo(torch.float32).tiny)
            q[start : start + rows.shape[0]] = (rows / s).round_().clamp_(-127, 127).to(torch.int8)
            scale[start : start + rows.shape[0]] = s
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (F.embedding(ids, self.qweight).float() * F.embedding(ids, self.scale)).to(self.out_dtype)

    def dequantize(self) -> torch.Tensor:
        """The whole table back in the loaded dtype (for tests and checks)."""
        return (self.qweight.float() * self.scale).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows, out_dtype={self.out_dtype}"


def size(n: int) -> str:
    """Bytes for people: 14.2 GiB, 310.0 KiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _plain_tensors(t: torch.Tensor) -> Iterable[torch.Tensor]:
    """The ordinary tensors holding `t`'s data: `t` itself, or a torchao subclass's inner tensors (qdata, scales,
    zero points; recursively, as `__tensor_flatten__` names them)."""
    if not hasattr(type(t), "__tensor_flatten__"):
        yield t
        return
    for name in t.__tensor_flatten__()[0]:
        inner = getattr(t, name, None)
        if inner is not None:
            yield from _plain_tensors(inner)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storage behind `tensors`, each storage counted once: tied weights, the row slices of a fused
    weight and a quantized tensor's parts are counted as the memory they take, not per name."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in tensors:
        for plain in _plain_tensors(t):
            storage = plain.untyped_storage()
            key = (str(plain.device), storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


def check_quantize(mode: str, device: str | torch.device | None) -> None:
    """Fail before anything loads if `mode` cannot run on `device` (None: cuda if available, as load_run picks)."""
    if mode not in QUANTIZE_MODES:
        raise QuantizeError(f"--quantize takes {', '.join(QUANTIZE_MODES)}; got {mode!r}")
    if mode not in _NEEDS:
        return
    need, why = _NEEDS[mode]
    from ..runs import answer_device  # here: runs imports the model stack, which --help need not load

    dev = answer_device(device)
    if dev.type == "cuda":
        cap = torch.cuda.get_device_capability(dev)
        if cap >= need:
            return
        here = f"{torch.cuda.get_device_name(dev)} has compute capability {cap[0]}.{cap[1]}"
    else:
        here = f"this run is on {dev.type}"
    raise QuantizeError(f"--quantize {mode} needs a CUDA GPU with compute capability >= {need[0]}.{need[1]} ({why}); "
                        f"{here}: use --quantize int8 (CPU or GPU) or none")


def _config(mode: str, group_size: int = 128):
    from torchao.quantization import Float8WeightOnlyConfig, Int4WeightOnlyConfig, Int8WeightOnlyConfig
    from torchao.quantization.quantize_.workflows import Int4PackingFormat

    # torchao's defaults otherwise (per-row int8 / e4m3 scales); set_inductor_config stays on as torchao recommends:
    # it switches inductor's coordinate-descent tuning on for the process (compiled code only, numerics unchanged)
    if mode == "int8":
        return Int8WeightOnlyConfig()
    if mode == "fp8":
        return Float8WeightOnlyConfig()
    # tile-packed = torch's own tinygemm kernel (`_weight_int4pack_mm`); torchao's default "plain" int4 needs the
    # separate mslk kernel package
    return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D)


def _quantized(weight: torch.Tensor, config) -> torch.Tensor:
    """`weight` as torchao's quantize_ makes it for an nn.Linear holding it: the same call, the same numerics."""
    from torchao.quantization import quantize_

    holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    holder.weight = nn.Parameter(weight, requires_grad=False)
    quantize_(holder, config)
    return holder.weight


def _is_quantized(weight: torch.Tensor) -> bool:
    return hasattr(type(weight), "__tensor_flatten__")


def _decoder(llm: nn.Module) -> nn.Module:
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    return base.get_decoder()


def _decoder_layers(llm: nn.Module) -> list[nn.Module]:
    return list(_decoder(llm).layers)


def _vision_layers(model: nn.Module) -> list[nn.Module]:
    """The vision tower's transformer blocks (Blip2VisionModel's encoder layers); [] for an LLM alone."""
    vision = getattr(model, "vision_model", None)
    return list(vision.encoder.layers) if vision is not None else []


def _linears(layers: Iterable[nn.Module]) -> list[nn.Linear]:
    return [m for layer in layers for m in layer.modules() if type(m) is nn.Linear]


def quantize_llm(model: nn.Module, mode: str, device: str | torch.device | None = None) -> QuantizeReport | None:
    """Quantize the model's big matrices in place for answering (see the module docstring for what, per mode);
    `model`: MiniGPT4Qwen (its LLM and vision tower) or an LLM alone; None for mode none.

    For answering only: a trainable or training-mode LLM is refused, and so is a LoRA-wrapped one (merge the adapters
    first: a quantized base under float adapters would run two paths per layer). int8/fp8: the q/k/v and gate/up groups
    are fused first (fastdecode's `fuse_linears`) and each group's one weight is quantized, its Linears
    pointing at row slices of it, so FastDecoder keeps its one matmul per group on a single quantized copy (the
    per-row scales make this the same numbers as quantizing each Linear alone). int4: torch's tinygemm layout pads
    and tiles the rows, so its slices are no weights of their own; each Linear is quantized alone (cast to bf16, the
    kernel's dtype) and FastDecoder runs those layers unfused.

    lm_head stays as loaded: small Qwen/SmolLM checkpoints tie it to the token embedding (then the embedding stays too),
    its logits choose the greedy token directly, where rounding flips near-ties first, and an eager quantized matmul
    would dequantize all of it (1.2 GiB for Qwen-7B) at every decode step. An embedding of its own is `Int8Embedding`.

    `device`: where the model goes, when it was loaded elsewhere (on the CPU: `load_run(..., stage=True)`). The token
    embedding is quantized where it is (on the CPU), then everything but the vision tower's and the LLM's blocks moves,
    then those blocks one at a time, each quantized as soon as it arrives, so the GPU never holds more than one block's
    unquantized weights (a 7B model in int8: ~9 GiB at any time instead of the ~18 GiB its bf16 weights take before
    quantizing) and no freed bf16 block is left between the kept ones.
    """
    target = _device(model) if device is None else torch.device(device)
    check_quantize(mode, None if mode == "none" else target)
    if mode == "none":
        return None
    llm = getattr(model, "llm", model)
    if hasattr(llm, "merge_and_unload"):
        raise QuantizeError(f"--quantize {mode}: the LLM still carries LoRA adapters; merge them first "
                            "(peft merge_and_unload, as quantize_for_inference does)")
    if llm.training or any(p.requires_grad for p in llm.parameters()):
        raise QuantizeError(f"--quantize {mode} is for answering only: the LLM is trainable or in training mode "
                            "(call .eval().requires_grad_(False) on a model loaded for inference)")
    layers, vision_layers = _decoder_layers(llm), _vision_layers(model)
    linears, vision_linears = _linears(layers), _linears(vision_layers)
    if any(_is_quantized(m.weight) for m in linears):
        raise QuantizeError(f"--quantize {mode}: the LLM's decoder is quantized already")
    llm_before = tensor_bytes([*llm.parameters(), *llm.buffers()])
    linear_before, vision_before = tensor_bytes(m.weight for m in linears), tensor_bytes(m.weight for m in vision_linears)
    with torch.inference_mode(False), torch.no_grad():  # normal tensors, as fuse_linears makes them
        _quantize_embedding(llm)
        if device is not None:  # all but the blocks to the target now; the blocks below, one by one
            owners = [_decoder(llm)] + ([model.vision_model.encoder] if vision_layers else [])
            held = [owner.layers for owner in owners]
            for owner in owners:
                owner.layers = nn.ModuleList()
            try:
                model.to(target)
            finally:
                for owner, blocks in zip(owners, held, strict=True):
                    owner.layers = blocks
        vision_config = _config("fp8" if mode == "fp8" else "int8")
        for layer in vision_layers:
            if device is not None:
                layer.to(target)
            for m in _linears([layer]):
                m.weight = nn.Parameter(_quantized(m.weight, vision_config), requires_grad=False)
        skipped = 0
        for layer in layers:
            if device is not None:
                layer.to(target)
            skipped += _quantize_layer(layer, mode)
    report = QuantizeReport(mode, len(linears) - skipped, skipped, llm_before,
                            tensor_bytes([*llm.parameters(), *llm.buffers()]),
                            linear_before, tensor_bytes(m.weight for m in linears), len(vision_linears), vision_before,
                            tensor_bytes(m.weight for m in vision_linears))
    log.info("%s", report.line())
    return report


def _quantize_embedding(llm: nn.Module) -> None:
    """The LLM's token embedding as `Int8Embedding`, unless lm_head shares its weight (see `quantize_llm`)."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    embed, head = base.get_input_embeddings(), base.get_output_embeddings()
    if type(embed) is not nn.Embedding or (head is not None and head.weight is embed.weight):
        return
    base.set_input_embeddings(Int8Embedding(embed.weight, embed.padding_idx))


def _quantize_layer(layer: nn.Module, mode: str) -> int:
    """Quantize one decoder layer's Linears (see `quantize_llm`); returns how many were left as they were."""
    if mode in ("int8", "fp8"):
        config = _config(mode)
        for mods in fusion_groups(layer).values():
            fused = fuse_linears(mods)
            if fused is not None:
                replace_fused_weight(mods, _quantized(fused[0], config))
    else:  # int4: Linears one by one (see quantize_llm); a group FastDecoder fused before is let go of
        for mods in fusion_groups(layer).values():
            forget_fused(mods)
    skipped = 0
    for m in [m for m in layer.modules() if type(m) is nn.Linear]:
        if _is_quantized(m.weight):
            continue
        if mode == "int4":
            size = next((g for g in INT4_GROUP_SIZES if m.in_features % g == 0), None)
            if size is None:
                skipped += 1
                continue
            weight = _quantized(m.weight.to(torch.bfloat16), _config(mode, size))
        else:
            weight = _quantized(m.weight, _config(mode))
        m.weight = nn.Parameter(weight, requires_grad=False)
    return skipped


def _device(model: nn.Module) -> torch.device:
    llm = getattr(model, "llm", model)
    return llm.get_output_embeddings().weight.device


def quantize_for_inference(model: nn.Module, mode: str, device: str | torch.device | None = None
                           ) -> QuantizeReport | None:
    """What `--quantize` does to a run loaded for answering (MiniGPT4Qwen): LoRA adapters folded into the weights
    they adapt, the model frozen (nothing trains here; load_run keeps the run's trainable flags), then `quantize_llm`
    (`device`: move the model there, block by block, quantizing on the way)."""
    if mode == "none":
        return None
    if hasattr(model.llm, "merge_and_unload"):  # peft
        model.llm = model.llm.merge_and_unload()
    model.eval().requires_grad_(False)
    report = quantize_llm(model, mode, device)
    device = _device(model)
    if device.type == "cuda":  # the bf16 weights' blocks go back to the driver: what the GPU shows drops with them
        torch.cuda.empty_cache()
        log.info("--quantize %s: GPU memory after quantizing: %s allocated, %s reserved", mode,
                 size(torch.cuda.memory_allocated(device)), size(torch.cuda.memory_reserved(device)))
    return report
