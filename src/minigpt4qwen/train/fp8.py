"""fp8 training of the LLM decoder's Linears with torchao.float8 (`train.fp8`).

    minigpt4qwen train --config configs/minigpt4qwen-7b.yaml train.fp8=tensorwise      # H100 / H200 / L4 / RTX 40xx
    minigpt4qwen train --config configs/minigpt4qwen-7b.yaml train.fp8=rowwise train.fp8_frozen=once

Only the decoder's projections (q/k/v/o, gate/up/down) become torchao `Float8Linear`s; they hold ~all of a step's
FLOPs. Left in bf16, on purpose: lm_head (the loss is its log-softmax over 150k classes, where fp8's 3-bit mantissa
moves the loss itself, and it runs only on answer positions), the vision tower and Q-Former (frozen, run without
autograd or not at all with cached features: fp8 *training* casts buy nothing there, and the image features every
answer depends on would change), and the projector (one 768 x 4096 GEMM: no speed to win, and in stage 1 it is the
whole trained model, so its gradients keep full precision). Layers with a dimension that is not a multiple of 16
stay bf16 too (fp8 GEMMs need it).

`train.fp8_frozen=once` swaps frozen converted layers for `FrozenFloat8Linear`: the weight is cast once, and backward
computes only the input's gradient. torchao's autograd function computes the weight-gradient GEMM even for a frozen
weight (autograd drops it afterwards; only torch.compile removes the dead GEMM) and keeps the layer's input for it.

Testing: with MINIGPT4QWEN_FP8_EMULATE=1 the same conversion uses torchao's emulated fp8 matmuls (`emulate=True`:
real fp8 casts, matmuls in high precision), on any device including the CPU. For tests only: it is slow.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import Config, ConfigError

if TYPE_CHECKING:
    from torchao.float8 import Float8LinearConfig

EMULATE_ENV = "MINIGPT4QWEN_FP8_EMULATE"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MIN_CAPABILITY = (8, 9)
FP8_TOKEN_MULTIPLE = 16
"""torch._scaled_mm needs every inner dimension divisible by 16, the token count too (the weight gradient's matmul
runs over it): training batches with train.fp8 are padded to a sequence length divisible by this (padding is
masked). Found on the H200: a 4-row batch of 78 positions (312 tokens) failed in the first backward."""


def emulated() -> bool:
    return os.environ.get(EMULATE_ENV, "") not in ("", "0")


def check_fp8(cfg: Config, device: torch.device) -> None:
    """Refuse train.fp8 where it cannot run, with one line, before anything is built."""
    tc = cfg.train
    if tc.fp8 == "off":
        return
    if cfg.engine.name == "deepspeed":
        # DeepSpeed keeps its own flat bf16 copies (ZeRO-3 swaps param.data for empty shards): torchao supports
        # plain modules, DDP and FSDP2 only
        raise ConfigError(f"train.fp8={tc.fp8} does not support engine.name=deepspeed; use engine.name=ddp or fsdp, "
                          "or train.fp8=off")
    require_fp8_device(device, f"train.fp8={tc.fp8}")
    if tc.fp8_frozen == "once" and cfg.engine.name == "fsdp" and cfg.engine.frozen != "replicate":
        # the cast-once copy is a plain attribute outside FSDP: every rank would hold all of it (1-2 bytes per frozen
        # weight) while FSDP still gathers the unused bf16 shards
        raise ConfigError("train.fp8_frozen=once keeps a whole fp8 copy of every frozen weight on each GPU: with "
                          "engine.name=fsdp set engine.frozen=replicate, or use train.fp8_frozen=recast")
    if tc.fp8 == "rowwise" and tc.precision in ("fp32", "fp16") and not emulated():
        raise ConfigError(f"train.fp8=rowwise needs train.precision=bf16 (the rowwise fp8 GEMM writes bf16), not "
                          f"{tc.precision}; or use train.fp8=tensorwise")


def require_fp8_device(device: torch.device, what: str) -> None:
    """fp8 GEMMs (torch._scaled_mm) exist from compute capability 8.9 (Ada, Hopper) on."""
    if emulated():
        return
    if device.type != "cuda":
        raise ConfigError(f"{what} needs a CUDA GPU of compute capability >= 8.9 (H100, H200, L4, RTX 40xx); this "
                          f"run's device is {device}: set train.fp8=off")
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        raise ConfigError(f"{what} needs compute capability >= 8.9 (H100, H200, L4, RTX 40xx); "
                          f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}: set train.fp8=off")


def fsdp_float8_all_gather(cfg: Config) -> bool:
    """FSDP2 gathers fp8 weights (half the bytes of bf16) when the LLM trains in full with tensorwise scales: the
    weights are then sharded and re-scaled every step (torchao supports it for tensorwise only; a frozen LLM is
    replicated by default, so there is nothing to gather)."""
    return cfg.engine.name == "fsdp" and cfg.train.fp8 == "tensorwise" and cfg.model.trainable.llm == "full"


def plain_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with torchao's fp8-all-gather weight wrappers (FSDP2 + tensorwise; whole or as a DTensor's shard)
    replaced by views of the weights inside them. The wrapper has no storage of its own: safetensors cannot read
    it, and a DCP save + load of it gave NaN weights (torch 2.13, gloo). A view shares the storage, so DCP's
    in-place load still lands in the model's weights."""
    from torch.distributed.tensor import DTensor
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor as Wrapper

    def plain(v: torch.Tensor) -> torch.Tensor:
        if isinstance(v, DTensor) and isinstance(v._local_tensor, Wrapper):
            return DTensor.from_local(v._local_tensor._tensor.detach(), v.device_mesh, v.placements,
                                      run_check=False, shape=v.shape, stride=v.stride())
        return v._tensor.detach() if isinstance(v, Wrapper) else v

    return {k: plain(v) for k, v in state.items()}


def float8_config(recipe: str, fsdp_all_gather: bool = False) -> Float8LinearConfig:
    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(config, emulate=emulated(), enable_fsdp_float8_all_gather=fsdp_all_gather)


def _decoder_projection(module: nn.Module, fqn: str) -> bool:
    """q/k/v/o/gate/up/down of a decoder layer (or the frozen base_layer of a LoRA-wrapped one), dims % 16 == 0.
    LoRA's own A/B matrices (rank 8...) are left alone, as is anything already converted."""
    from torchao.float8.float8_linear import Float8Linear

    if not isinstance(module, nn.Linear) or isinstance(module, Float8Linear):
        return False
    parts = fqn.split(".")
    name = parts[-2] if parts[-1] == "base_layer" and len(parts) > 1 else parts[-1]
    return name in PROJECTIONS and module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_fp8(model: nn.Module, recipe: str, frozen: str = "recast", fsdp_all_gather: bool = False) -> int:
    """Swap the LLM decoder's projections of a MiniGPT4Qwen for fp8 ones, in place; returns how many.

    Call after `apply_trainable` (a frozen layer may become FrozenFloat8Linear) and before torch.compile and the
    engine's wrapping (FSDP2's fully_shard must see Float8Linear to gather fp8 weights)."""
    from torchao.float8 import convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    layers = model.decoder().layers
    convert_to_float8_training(layers, module_filter_fn=_decoder_projection,
                               config=float8_config(recipe, fsdp_all_gather))
    converted = [(name, m) for name, m in layers.named_modules() if isinstance(m, Float8Linear)]
    if frozen == "once":
        for name, m in converted:
            if not m.weight.requires_grad:
                _set_submodule(layers, name, frozen_float8_linear().from_float8(m))
    return len(converted)


def revert_fp8(model: nn.Module) -> int:
    """Put plain nn.Linear back (same weight and bias tensors) wherever convert_fp8 put an fp8 layer; returns how
    many. The bench converts one shared model per variant and needs it back afterwards."""
    from torchao.float8.float8_linear import Float8Linear

    layers = model.decoder().layers
    found = [(name, m) for name, m in layers.named_modules() if isinstance(m, Float8Linear)]
    for name, m in found:
        with torch.device("meta"):
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        plain.weight, plain.bias = m.weight, m.bias
        _set_submodule(layers, name, plain)
    return len(found)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


# --------------------------------------------------------------------------------------------- frozen, cast once


def _cast(x: torch.Tensor, cast_config, mm_config, role, axis: int, round_pow2: bool):
    """torchao's dynamic cast of `x` with one of a Float8LinearConfig's cast configs (the same call it makes)."""
    from torchao.float8.float8_scaling_utils import get_maybe_axiswise_dim, hp_tensor_to_float8_dynamic

    return hp_tensor_to_float8_dynamic(x, cast_config.target_dtype, mm_config, gemm_input_role=role,
                                       scaling_granularity=cast_config.scaling_granularity,
                                       axiswise_dim=get_maybe_axiswise_dim(axis, cast_config.scaling_granularity),
                                       round_scales_to_power_of_2=round_pow2)


@torch._dynamo.allow_in_graph
class _FrozenFloat8Matmul(torch.autograd.Function):
    """input @ weight_t with weight_t already fp8: the forward and grad-input halves of torchao's
    matmul_with_hp_or_float8_args, with the same casts, and no weight gradient (so the input is not saved)."""

    @staticmethod
    def forward(ctx, x, weight_t, weight_t_for_grad_input, mm_config, config):
        from torchao.float8.float8_training_tensor import GemmInputRole

        ctx.save_for_backward(weight_t_for_grad_input)
        ctx.mm_config, ctx.config = mm_config, config
        x8 = _cast(x, config.cast_config_input, mm_config, GemmInputRole.INPUT, -1, config.round_scales_to_power_of_2)
        out = torch.mm(x8.reshape(-1, x8.shape[-1]), weight_t)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_output):
        from torchao.float8.float8_training_tensor import GemmInputRole

        (weight_t,) = ctx.saved_tensors
        c = ctx.config
        g = grad_output.reshape(-1, grad_output.shape[-1])
        g8 = _cast(g, c.cast_config_grad_output, ctx.mm_config, GemmInputRole.GRAD_OUTPUT, -1,
                   c.round_scales_to_power_of_2)
        grad_input = torch.mm(g8, weight_t.t())
        return grad_input.reshape(*grad_output.shape[:-1], grad_input.shape[-1]), None, None, None, None


@functools.cache
def frozen_float8_linear() -> type:
    """The FrozenFloat8Linear class, made on first use: torchao takes seconds to import, so only fp8 runs pay."""
    from torchao.float8.float8_linear import Float8Linear

    class FrozenFloat8Linear(Float8Linear):
        """A Float8Linear whose frozen weight was cast to fp8 once (train.fp8_frozen=once). The bf16 weight stays
        (checkpoints, export and `revert_fp8` use it); the fp8 copies are plain attributes, outside state_dict."""

        @classmethod
        def from_float8(cls, mod: Float8Linear) -> Float8Linear:
            new = cls.from_float(mod, config=mod.config)
            new.cast_weight()
            return new

        @torch.no_grad()
        def cast_weight(self) -> None:
            from torchao.float8.float8_training_tensor import GemmInputRole

            c, w_t = self.config, self.weight.t()
            pow2 = c.round_scales_to_power_of_2
            self.weight_fp8_t = _cast(w_t, c.cast_config_weight, self.linear_mm_config, GemmInputRole.WEIGHT, 0, pow2)
            same = c.cast_config_weight_for_grad_input == c.cast_config_weight and \
                c.cast_config_weight.scaling_granularity.value == "tensorwise"  # one scale: no axis to differ
            self.weight_fp8_t_for_grad_input = self.weight_fp8_t if same else _cast(
                w_t, c.cast_config_weight_for_grad_input, self.linear_mm_config, GemmInputRole.WEIGHT, -1, pow2)

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            if torch.is_autocast_enabled():  # as Float8Linear: compute in the autocast dtype
                input = input.to(torch.get_autocast_dtype("cuda"))
            out = _FrozenFloat8Matmul.apply(input, self.weight_fp8_t, self.weight_fp8_t_for_grad_input,
                                            self.linear_mm_config, self.config)
            return out if self.bias is None else out + self.bias.to(out.dtype)

    return FrozenFloat8Linear
