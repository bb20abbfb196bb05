"""Engines: how the one training loop in loop.py is distributed. Each uses its library's own machinery.

    minigpt4qwen train --config cfg.yaml                                        # one GPU or the CPU, no wrapper
    torchrun --nproc_per_node=8 -m minigpt4qwen train --config cfg.yaml         # PyTorch DDP (engine.name=ddp)
    torchrun --nproc_per_node=8 -m minigpt4qwen train --config cfg.yaml engine.name=deepspeed engine.zero_stage=3
    deepspeed --num_gpus=8 --no_local_rank --module minigpt4qwen train --config cfg.yaml engine.name=deepspeed
    torchrun --nproc_per_node=8 -m minigpt4qwen train --config cfg.yaml engine.name=fsdp   # FSDP2 fully_shard

The loop talks to an engine through a handful of calls, so accumulation, clipping, the LR schedule, logging and
checkpoints behave the same everywhere:

    engine.model(...)                 forward (the wrapped module)
    with engine.accumulate(is_last):  one micro-batch; gradients are reduced across ranks only on the last
        engine.backward(loss)
    engine.lr, engine.step()          current LR, then clip + optimizer + scheduler step (returns the grad norm)
    engine.save(tmp_dir) / engine.load(ckpt, state)     collective checkpoint of the engine's own state
    engine.full_state_dict()          gathered trainable weights (rank 0) for our trainable.safetensors

The loop divides each micro-batch's loss sum by the step's GLOBAL supervised-token count and multiplies by the
world size, because DDP, ZeRO and FSDP all average gradients over ranks: the update then equals the single-process
update on the same global batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config, ConfigError, TrainConfig
from ..runs import DS_TAG, FSDP_DIR, load_weights
from .fp8 import fsdp_float8_all_gather, plain_weights

log = logging.getLogger("minigpt4qwen.train")
SHIPPED_DS_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "deepspeed"


# --------------------------------------------------------------------------------------------- processes


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name in ("auto", "cuda"):
        if name == "cuda" or torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    return torch.device(name)


@dataclass
class Dist:
    """This process's place in the job; the few collectives the loop needs are no-ops in a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """All-reduce SUM of a few numbers (float64: token counts stay exact)."""
        if self.world_size == 1:
            return list(values)
        comm = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=comm)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def gather(self, obj) -> list:
        """Every rank's `obj` (e.g. RNG states, so each rank resumes with its own)."""
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: Config) -> Dist:
    """Join the launcher's process group (gloo on CPU, nccl on CUDA); without a launcher, one process.

    DDP alone needs no group at all (plain loop, no overhead). DeepSpeed and FSDP always need one, so a lone
    process gets a group of one through the env:// variables torchrun would have set.
    """
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not launched and cfg.engine.name == "ddp":
        return Dist(device=resolve_device(cfg.train.device))
    if not launched:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = resolve_device(cfg.train.device, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == 1 and cfg.engine.name == "ddp":
        return Dist(device=device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local, device)


# --------------------------------------------------------------------------------------------- optimisation


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup from warmup_start_lr, then cosine from lr down to min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.warmup_start_lr + (cfg.lr - cfg.warmup_start_lr) * step / max(cfg.warmup_steps, 1)
    progress = (step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model: nn.Module, weight_decay: float, llm_lr: float = 0.0) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms and other 1-D parameters (as LAVIS does).

    With llm_lr > 0 the LLM's parameters (`llm.*`, full or LoRA) get groups of their own at that peak rate, the
    way MPP-LLaVA trains the unfrozen LLM slower than the projector.
    """
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower() or ".ln" in name
        is_llm = llm_lr > 0 and name.startswith("llm.")
        groups.setdefault((is_llm, no_decay), []).append(p)
    out = [{"params": groups.get((False, False), []), "weight_decay": weight_decay},
           {"params": groups.get((False, True), []), "weight_decay": 0.0}]
    for no_decay in (False, True):
        if (True, no_decay) in groups:
            out.append({"params": groups[(True, no_decay)], "weight_decay": 0.0 if no_decay else weight_decay,
                        "lr": llm_lr})
    return out


def make_optimizer(
    model: nn.Module, total: int, tc: TrainConfig, fused_ok: bool = True
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW + warmup/cosine as a LambdaLR factor, so a group with its own peak LR follows the same shape.
    `fused_ok`: the engine steps this optimizer itself (train.optimizer_impl=fused applies)."""
    groups = [g for g in param_groups(model, tc.weight_decay, tc.llm_lr) if g["params"]]
    kw = {"fused": True} if fused_ok and tc.optimizer_impl == "fused" else {}
    optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas), **kw)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total, tc) / tc.lr)


def _norm(value) -> float:
    if value is None:
        return float("nan")
    if hasattr(value, "full_tensor"):  # FSDP2: a DTensor
        value = value.full_tensor()
    return float(value)


def replicate_frozen(cfg: Config, module: nn.Module, device: torch.device) -> bool:
    """engine.frozen resolved: True keeps frozen weights whole on every process, outside ZeRO's / FSDP's sets.

    Stage 1 trains a 3M-parameter projector beside 8.8B frozen ones: sharding those means gathering the whole
    frozen LLM and towers for every micro-batch (ZeRO-3 ran at 30% of DDP's speed on 4 GPUs that way).
    """
    if cfg.engine.frozen != "auto":
        return cfg.engine.frozen == "replicate"
    if device.type != "cuda":
        return True
    frozen = sum(p.numel() * p.element_size() for p in module.parameters() if not p.requires_grad)
    return frozen <= 0.5 * torch.cuda.get_device_properties(device).total_memory


def hide_frozen_parts(module: nn.Module) -> list[str]:
    """Take wholly frozen children and frozen direct parameters out of `module`'s registry (they stay reachable as
    plain attributes), so an engine that partitions every registered parameter (ZeRO-3) leaves them alone.
    Returns the hidden names. The model's code reaches them by attribute as before."""
    hidden = []
    for name, child in list(module._modules.items()):
        params = list(child.parameters()) if child is not None else []
        if params and not any(p.requires_grad for p in params):
            del module._modules[name]
            object.__setattr__(module, name, child)
            hidden.append(name)
    for name, p in list(module._parameters.items()):
        if p is not None and not p.requires_grad:
            del module._parameters[name]
            object.__setattr__(module, name, p)
            hidden.append(name)
    return hidden


# --------------------------------------------------------------------------------------------- engines


class Engine:
    """One process, or one DDP replica: torch AdamW, LambdaLR, GradScaler (fp16 only), torch clipping."""

    name = "plain"

    def __init__(self, module: nn.Module, cfg: Config, dist_: Dist, total: int, precision: str) -> None:
        self.module, self.dist, self.tc = module, dist_, cfg.train
        self.model = self.wrap(module, cfg, precision)
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = make_optimizer(module, total, self.tc)
        self.scaler = torch.amp.GradScaler(dist_.device.type, enabled=precision == "fp16")

    def wrap(self, module: nn.Module, cfg: Config, precision: str) -> nn.Module:
        return module

    def accumulate(self, is_last: bool):
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self) -> float:
        """Clip, update, zero the gradients, advance the schedule; returns the gradient norm before clipping."""
        norm = float("nan")
        if self.tc.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            norm = _norm(torch.nn.utils.clip_grad_norm_(self.trainable, self.tc.max_grad_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full trainable weights on rank 0 (collective where they are sharded)."""
        return self.module.trainable_state_dict()

    def save(self, tmp: Path) -> dict:
        """Collective: write engine files into `tmp`; return what rank 0 puts in training_state.pt.
        An engine may finish writing in the background: `save_done()` / `wait_saved()` tell when it has."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def save_done(self) -> bool:
        return True

    def wait_saved(self) -> None:
        pass


    def load(self, ckpt: Path, state: dict) -> None:
        self.module.load_partial(load_weights(ckpt), str(ckpt))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


class DDPEngine(Engine):
    """torch DistributedDataParallel; replicated optimizer state, so rank 0's state is the checkpoint."""

    name = "ddp"

    def wrap(self, module: nn.Module, cfg: Config, precision: str) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        # Frozen weights are identical on every rank (same files, same seed): skip broadcasting the 7B LLM.
        frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
        ids = [self.dist.device] if self.dist.device.type == "cuda" else None
        # find_unused_parameters: a text-only micro-batch leaves the projector out of the graph.
        return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False, find_unused_parameters=True)

    def accumulate(self, is_last: bool):
        return nullcontext() if is_last else self.model.no_sync()


def deepspeed_config(cfg: Config, precision: str) -> dict:
    """The shipped (or given) JSON with everything the loop owns filled in from train.* and engine.*."""
    ec, tc = cfg.engine, cfg.train
    path = Path(ec.deepspeed_config) if ec.deepspeed_config else SHIPPED_DS_CONFIGS / f"zero{ec.zero_stage}.json"
    conf = json.loads(path.read_text())
    conf.pop("train_batch_size", None)
    conf.update(train_micro_batch_size_per_gpu=tc.batch_size, gradient_accumulation_steps=tc.grad_accum,
                gradient_clipping=max(tc.max_grad_norm, 0.0), zero_force_ds_cpu_optimizer=False,
                steps_per_print=conf.get("steps_per_print", 10**9), wall_clock_breakdown=False)
    conf["bf16"] = {"enabled": precision == "bf16"}
    conf["fp16"] = {"enabled": False}
    zero = conf.setdefault("zero_optimization", {})
    zero["stage"] = ec.zero_stage
    # DeepSpeed's default (true) replaces torch.nn.functional.linear process-wide with its own autograd Function at
    # ZeRO-3 setup; with compiled decoder layers in bf16 on an H200 the projector then barely learned (stage 1, loss
    # 12.84 -> 12.81 in 40 steps where DDP, ZeRO-2 and FSDP2 reached 9.9 on the same data, 2026-11-28)
    zero.setdefault("memory_efficient_linear", False)
    if zero["memory_efficient_linear"] and ec.zero_stage == 3 and tc.compile:
        raise ConfigError(f"{path}: zero_optimization.memory_efficient_linear=true with train.compile=true trains "
                          "wrong under ZeRO-3 (measured: the loss stayed flat); set it to false or train.compile=false")
    if ec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ec.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return conf


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO 0-3 around our torch AdamW + LambdaLR; DeepSpeed clips, steps and checkpoints."""

    name = "deepspeed"

    def __init__(self, module: nn.Module, cfg: Config, dist_: Dist, total: int, precision: str) -> None:
        import deepspeed

        if precision == "fp16":
            raise ValueError("engine deepspeed: use train.precision=bf16 (or fp32); fp16 loss scaling is not wired")
        self.module, self.dist, self.tc = module, dist_, cfg.train
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = make_optimizer(module, total, self.tc, fused_ok=False)
        self.hidden = hide_frozen_parts(module) if replicate_frozen(cfg, module, dist_.device) else []
        # only trainable parameters: ZeRO must not build optimizer partitions for the frozen towers
        self.model, _, _, _ = deepspeed.initialize(
            model=module, model_parameters=self.trainable, optimizer=self.optimizer, lr_scheduler=self.scheduler,
            config=deepspeed_config(cfg, precision))

    def accumulate(self, is_last: bool):
        # our loop decides the boundary (a step may have fewer micro-batches at the end of an epoch)
        self.model.set_gradient_accumulation_boundary(is_last)
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)  # the loop already divides by the step's tokens

    def step(self) -> float:
        self.model.step()
        return _norm(self.model.get_global_grad_norm())

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        import deepspeed

        named = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        # ZeRO-3 keeps only a shard per rank; a no-op for stages 0-2
        with deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=None):
            return {n: p.detach().float().cpu().clone() for n, p in named.items()} if self.dist.main else {}

    def save(self, tmp: Path) -> dict:
        self.model.save_checkpoint(str(tmp), tag=DS_TAG, client_state={}, save_latest=False,
                                   exclude_frozen_parameters=True)
        return {}

    def load(self, ckpt: Path, state: dict) -> None:
        path, _ = self.model.load_checkpoint(str(ckpt), tag=DS_TAG, load_module_strict=False)
        if path is None:
            raise FileNotFoundError(f"{ckpt}/{DS_TAG}: no DeepSpeed state (was the run trained with another engine?)")


def _async_stager(how: str = "dcp", pin: bool | None = None):
    """On CUDA (or `pin` given), a stager that keeps one CPU copy of this rank's shards across saves, pinned on CUDA:
    the copy at a save runs at pinned D2H speed into memory that already exists (29 s of a 7B full-LLM save on 4x H100
    went to copying into fresh pageable memory). Costs host RAM = this rank's checkpoint shard, held for the run.
    Elsewhere None = DCP's default fresh copy. `how` (engine.async_stager): dcp = DCP's BlockingAsyncStager with its
    cache, direct = `direct_stager`, prefault = unpinned `direct_stager` buffers (normally made after the first step
    by `prefaulted_stager`; this covers a save before that). DCP's DefaultStager with reused pinned buffers failed
    at its second save on torch 2.11 (KeyError: <class 'type'>, 4x H100, 2026-11-28), hence the older stager."""
    pin = torch.cuda.is_available() if pin is None else pin
    if not pin and how == "dcp":
        return None
    import warnings

    from torch.distributed.checkpoint.staging import BlockingAsyncStager

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # marked deprecated in favour of DefaultStager (see above)
        if how == "direct":
            return direct_stager(pin)
        if how == "prefault":
            return direct_stager(pin=False)
        return BlockingAsyncStager(cache_staged_state_dict=True)


def cpu_buffers_like(state, pin: bool):
    """`state`'s structure with every tensor replaced by a new, empty CPU tensor of its shape and dtype (pinned with
    `pin`), nothing copied: a DTensor keeps its mesh and placements around a new local tensor. Other values as they
    are (a save takes them from the state it stages, not from here)."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, DTensor):
        out = torch.empty_like(state, device="cpu")  # the wrapper only: its local tensor is replaced below
        out._local_tensor = cpu_buffers_like(state._local_tensor, pin)
        return out
    if isinstance(state, torch.Tensor):
        if state.dim() == 0 or state.numel() == 0:
            return torch.zeros_like(state, device="cpu")
        return torch.empty(state.shape, dtype=state.dtype, pin_memory=pin)
    if isinstance(state, dict):
        return {k: cpu_buffers_like(v, pin) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(cpu_buffers_like(v, pin) for v in state)
    return state


def direct_stager(pin: bool = True, buffers=None, ready: threading.Thread | None = None):
    """A BlockingAsyncStager whose cached CPU copy is made by `cpu_buffers_like` at the first save: one allocation and
    one copy per tensor, where DCP's own cache costs two allocations and three copies (engine.async_stager=direct).
    `buffers` made beforehand are used instead (`prefaulted_stager`); a save first waits for `ready` to end."""
    from torch.distributed._state_dict_utils import _copy_state_dict
    from torch.distributed.checkpoint.staging import BlockingAsyncStager

    class DirectStager(BlockingAsyncStager):
        def __init__(self) -> None:
            super().__init__(cache_staged_state_dict=True)
            self.buffers, self.ready = buffers, ready

        def stage(self, state_dict):
            if self.ready is not None:  # the buffers' pages are still being touched: never copy under that
                self.ready.join()
                self.ready = None
            if self.buffers is None:
                self.buffers = cpu_buffers_like(state_dict, pin)
            return _copy_state_dict(state_dict, self.buffers)

    return DirectStager()


def _local_tensors(state) -> list[torch.Tensor]:
    """Every tensor in a (nested) state dict, a DTensor as its local shard."""
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_leaves

    return [t._local_tensor if isinstance(t, DTensor) else t for t in tree_leaves(state) if isinstance(t, torch.Tensor)]


def prefaulted_stager(state):
    """engine.async_stager=prefault: pageable (unpinned) CPU buffers shaped like `state`, made now, their pages
    touched by a background thread while training goes on (the kernel maps 22 GB per rank of a 7B full-LLM state
    there, not inside the first save); every save then only copies into memory that is already there. Nothing is
    page-locked, so no save pays for pinning; the price is that every copy from the GPU runs at pageable-memory speed
    (7B full LLM, 4x H200: the first save 20 steps in cost training 2.8 s, against 52.4 s for pinning at the first
    save and ~1 s per later save into pinned buffers)."""
    buffers = cpu_buffers_like(state, pin=False)
    tensors = [t for t in _local_tensors(buffers) if t.numel()]

    def touch() -> None:
        for t in tensors:  # one element per 4 KiB page maps the page; writing all of it would only cost bandwidth
            t.view(-1)[:: max(4096 // t.element_size(), 1)].zero_()

    ready = threading.Thread(target=touch, name="prefault-checkpoint-buffers", daemon=True)
    ready.start()
    return direct_stager(pin=False, buffers=buffers, ready=ready)


def fsdp_mp_policy(precision: str, reduce_dtype: str = "fp32"):
    """FSDP2's mixed precision: with bf16 the fp32 sharded weights are gathered as bf16 for compute; gradients are
    reduce-scattered in `reduce_dtype` (engine.fsdp_reduce_dtype; fp32 = the weights' dtype, as in torchtitan)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    reduce = torch.bfloat16 if reduce_dtype == "bf16" else torch.float32
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None, reduce_dtype=reduce)


class FSDPEngine(Engine):
    """PyTorch FSDP2: every transformer block (`*.layers.N` / `*.layer.N`) and then the whole model fully_shard-ed."""

    name = "fsdp"

    def wrap(self, module: nn.Module, cfg: Config, precision: str) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        if precision == "fp16":
            raise ValueError("engine fsdp: use train.precision=bf16 (or fp32)")
        self.async_save, self._gloo, self._future, self._stager = cfg.engine.async_save, None, None, None
        self.async_stager = cfg.engine.async_stager
        self.fp8_all_gather = fsdp_float8_all_gather(cfg)
        kw = {"mp_policy": fsdp_mp_policy(precision, cfg.engine.fsdp_reduce_dtype),
              "reshard_after_forward": cfg.engine.fsdp_reshard_after_forward}
        # replicated frozen weights are FSDP's ignored_params: never sharded, gathered, cast or reduced
        frozen = {p for p in module.parameters() if not p.requires_grad} \
            if replicate_frozen(cfg, module, self.dist.device) else set()
        blocks = [b for name, sub in module.named_modules() if isinstance(sub, nn.ModuleList)
                  and name.rsplit(".", 1)[-1] in ("layers", "layer") for b in sub]
        for block in blocks:
            own = set(block.parameters())
            if own - frozen:  # a block left wholly frozen stays a plain module
                fully_shard(block, ignored_params=own & frozen, **kw)
        return fully_shard(module, ignored_params=frozen, **kw)  # root: embeddings, projector, queries, lm_head

    def accumulate(self, is_last: bool):
        self.model.set_requires_gradient_sync(is_last)
        return nullcontext()

    def step(self) -> float:
        norm = super().step()
        if self.async_save and self.async_stager == "prefault" and self._stager is None:
            # the optimizer state exists from the first step on: the checkpoint's shapes are known now
            self._stager = prefaulted_stager(self._sharded())
            size = sum(t.numel() * t.element_size() for t in _local_tensors(self._stager.buffers))
            log.info("checkpoint buffers: %.2f GB of CPU memory for this rank's shards, mapped in the background "
                     "(engine.async_stager=prefault)", size / 1e9)
        if self.fp8_all_gather:
            from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

            # the next forward gathers fp8 weights: their scales, from the updated weights, in one all-reduce for
            # all layers (otherwise each layer's gather computes its own)
            precompute_float8_dynamic_scale_for_fsdp(self.model)
        return norm

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=True, strict=False, **kw)  # frozen weights come from build

    def _trainable_only(self, state: dict) -> dict:
        # ignore_frozen_params lets a frozen lm_head through when the LLM ties it to the embeddings
        names = {n for n, p in self.module.named_parameters() if p.requires_grad}
        return {k: v for k, v in state.items() if k in names}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        opts = self._options(full_state_dict=True, cpu_offload=True)
        state = self._trainable_only(get_model_state_dict(self.model, options=opts))
        return plain_weights(state) if self.fp8_all_gather else state

    def _sharded(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options())
        model_sd = self._trainable_only(model_sd)
        return {"model": plain_weights(model_sd) if self.fp8_all_gather else model_sd, "optim": optim_sd}

    def save(self, tmp: Path) -> dict:
        """With engine.async_save, DCP copies this rank's shards to CPU memory (the only time training waits) and
        writes them from a background thread; the loop publishes the checkpoint once every rank has finished."""
        import torch.distributed.checkpoint as dcp

        self.wait_saved()
        if self.async_save:
            if self._gloo is None:  # DCP's background thread coordinates over a CPU group, not NCCL
                self._gloo = dist.new_group(backend="gloo")
            if self._stager is None:
                self._stager = _async_stager(self.async_stager)
            self._future = dcp.async_save(self._sharded(), checkpoint_id=str(tmp / FSDP_DIR), process_group=self._gloo,
                                          async_stager=self._stager)
        else:
            dcp.save(self._sharded(), checkpoint_id=str(tmp / FSDP_DIR))
        return {"scheduler": self.scheduler.state_dict()}

    def save_done(self) -> bool:
        return self._future is None or self._future.done()

    def wait_saved(self) -> None:
        if self._future is not None:
            self._future.result()  # re-raises a failed write
            self._future = None


    def load(self, ckpt: Path, state: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if not (ckpt / FSDP_DIR).is_dir():
            raise FileNotFoundError(f"{ckpt}/{FSDP_DIR}: no FSDP state (was the run trained with another engine?)")
        sd = self._sharded()
        dcp.load(sd, checkpoint_id=str(ckpt / FSDP_DIR))
        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                       options=self._options())
        self.scheduler.load_state_dict(state["scheduler"])


def build_engine(module: nn.Module, cfg: Config, dist_: Dist, total: int, precision: str) -> Engine:
    """Plain for a lone DDP process (no wrapper, no overhead), else the configured engine."""
    if cfg.engine.name == "deepspeed":
        return DeepSpeedEngine(module, cfg, dist_, total, precision)
    if cfg.engine.name == "fsdp":
        return FSDPEngine(module, cfg, dist_, total, precision)
    return DDPEngine(module, cfg, dist_, total, precision) if dist_.world_size > 1 else Engine(
        module, cfg, dist_, total, precision)


# --------------------------------------------------------------------------------------------- export helpers


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA adapters into the LLM's weights (peft merge_and_unload) for export/serving; no-op without LoRA."""
    llm = getattr(model, "llm", None)
    if llm is not None and hasattr(llm, "merge_and_unload"):
        model.llm = llm.merge_and_unload()
    return model


def oom_hint(cfg: Config) -> str:
    """The one line printed when CUDA runs out of memory: what to try next, cheapest first."""
    tc, ec = cfg.train, cfg.engine
    tips = []
    if tc.batch_size > 1:
        tips.append(f"train.batch_size={max(tc.batch_size // 2, 1)} train.grad_accum={tc.grad_accum * 2}")
    if not tc.grad_checkpointing_llm:
        tips.append("train.grad_checkpointing_llm=true")
    if ec.name != "deepspeed" or ec.zero_stage < 3:
        tips.append("engine.name=deepspeed engine.zero_stage=3 (or engine.name=fsdp)")
    if not ec.offload_optimizer:
        tips.append("engine.offload_optimizer=true")
    if not ec.offload_params:
        tips.append("engine.offload_params=true")
    return "CUDA out of memory; try, in this order: " + " | ".join(tips)
