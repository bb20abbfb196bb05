"""`minigpt4qwen convert ...` and `minigpt4qwen info`: the seed's original files in, one movable directory out.

    minigpt4qwen convert lavis --eva cache/ckpt/eva/eva_vit_g.pth \
        --blip2 cache/ckpt/blip2/blip2_pretrained_flant5xxl.pth --out cache/ckpt/blip2-vision-hf
    minigpt4qwen convert qwen1 --src cache/ckpt/Qwen7B-chat --out cache/ckpt/Qwen7B-chat-hf
    minigpt4qwen convert export --checkpoint runs/minigpt4qwen-7b --out exported/minigpt4qwen-7b
    minigpt4qwen convert seed-projector --src cache/ckpt/minigpt4qwen/model.pth --out projector.safetensors
    minigpt4qwen convert to-seed --checkpoint runs/minigpt4qwen-7b --out model.pth
    minigpt4qwen convert to-transformers --checkpoint runs/minigpt4qwen-7b --out exported/minigpt4qwen-7b-hf
    minigpt4qwen info --config configs/minigpt4qwen-7b.yaml model.llm=random:qwen-7b

The format conversions themselves are pure functions in models/convert.py; this module only reads arguments, writes
directories and reports what was left out, so nothing a user passes is dropped without a line saying so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import Tensor

from .config import ModelConfig, load_config
from .models.convert import blip2_configs_from_state
from .models.minigpt4qwen import DTYPES, CheckpointMismatchError, MiniGPT4Qwen, build_model, read_weights

__all__ = [
    "add_convert_args",
    "add_info_args",
    "blip2_configs_from_state",
    "export_run",
    "format_counts",
    "import_seed_projector",
    "meta_model",
    "to_seed",
    "to_transformers",
    "write_hf_blip2_dir",
]

#: Top-level names of the vision side, shared by the composite model and transformers' Blip2Model.
VISION_SIDE = ("vision_model", "qformer", "query_tokens")
#: Config keys that point at files; an export replaces them by its own relative paths or clears them.
_SOURCE_KEYS = ("eva_checkpoint", "blip2_checkpoint", "qformer_init", "projector_checkpoint", "llm_gguf_file")


def _show(names: list[str], limit: int = 5) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# --------------------------------------------------------------------------------------------- HF BLIP-2 directories


def write_hf_blip2_dir(state: dict[str, Tensor], vision_config, qformer_config, out_dir: str | Path) -> Path:
    """An HF BLIP-2 directory holding only the vision side, which several readers load without custom code:

    * ``Blip2Model.from_pretrained(DIR)`` (only ``language_model.*`` / ``language_projection.*`` reported missing);
    * ``Blip2VisionModel.from_pretrained(DIR, key_mapping={"^vision_model\\.": ""})``, same for Blip2QFormerModel;
    * ``model.vision_checkpoint: DIR`` here.

    The text config is a minimal OPT placeholder: this side is paired with a Qwen elsewhere, and the default OPT
    config would make ``Blip2Model.from_pretrained`` build a 125M-parameter random language model for nothing.
    """
    from huggingface_hub import save_torch_state_dict
    from transformers import Blip2Config, OPTConfig

    placeholder = OPTConfig(vocab_size=4, hidden_size=8, num_hidden_layers=1, ffn_dim=8, num_attention_heads=1,
                            word_embed_proj_dim=8, max_position_embeddings=8)
    config = Blip2Config(vision_config=vision_config.to_dict(), qformer_config=qformer_config.to_dict(),
                         text_config=placeholder.to_dict(), num_query_tokens=state["query_tokens"].shape[1])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_torch_state_dict(tensors, out, max_shard_size="5GB", metadata={"format": "pt"})
    return out


def _convert_lavis(args) -> int:
    from .models.convert import load_blip2_vision_side

    # every name and shape is checked here, before --out is created: a wrong file stops with one line, no folder
    state, ignored = load_blip2_vision_side(args.eva, args.blip2, args.num_vision_layers,
                                            args.cross_attention_frequency)
    vision, qformer = blip2_configs_from_state(state, args.cross_attention_frequency, args.vision_heads,
                                               args.qformer_heads)
    out = write_hf_blip2_dir(state, vision, qformer, args.out)
    print(f"wrote {out}: {len(state)} tensors (vision {vision.num_hidden_layers} layers x {vision.hidden_size}, "
          f"Q-Former {qformer.num_hidden_layers} layers x {qformer.hidden_size}, "
          f"{state['query_tokens'].shape[1]} queries)")
    for label in ("eva", "blip2"):
        names = [k.split(":", 1)[1] for k in ignored if k.startswith(f"{label}:")]
        if names:
            print(f"ignored {len(names)} {label} tensors (not part of Blip2VisionModel / Blip2QFormerModel): {_show(names)}")
    print(f"use it with model.vision_checkpoint={out}")
    return 0


# --------------------------------------------------------------------------------------------- Qwen-1


def _convert_qwen1(args) -> int:
    from .models.convert import convert_qwen1_dir

    out = convert_qwen1_dir(args.src, args.out, max_shard_size=args.max_shard_size)
    cfg = json.loads((out / "config.json").read_text())
    print(f"wrote {out}: native {cfg['model_type']} ({cfg['num_hidden_layers']} layers x {cfg['hidden_size']}), "
          f"fast tokenizer with ChatML; use it with model.llm={out}")
    return 0


# --------------------------------------------------------------------------------------------- the seed's projector


def _projector_of(state: dict[str, Tensor], source: str) -> tuple[dict[str, Tensor], list[str]]:
    """``llm_proj.weight``/``.bias`` of a state dict (under any wrapper prefix, e.g. DeepSpeed's ``module.``)."""
    proj = {f"llm_proj.{k.rsplit('.', 1)[1]}": v for k, v in state.items()
            if k.endswith(("llm_proj.weight", "llm_proj.bias")) and k.split(".")[-2] == "llm_proj"}
    if set(proj) != {"llm_proj.weight", "llm_proj.bias"}:
        raise CheckpointMismatchError(
            f"{source}: no llm_proj.weight + llm_proj.bias (holds {_show(sorted(state), 4) or 'nothing'})"
        )
    w, b = proj["llm_proj.weight"], proj["llm_proj.bias"]
    if w.ndim != 2 or b.shape != (w.shape[0],):
        raise CheckpointMismatchError(f"{source}: llm_proj.weight {list(w.shape)} and bias {list(b.shape)} do not "
                                      "form one Linear")
    return proj, sorted(k for k in state if not k.endswith(("llm_proj.weight", "llm_proj.bias")))


def import_seed_projector(src: str | Path, out: str | Path, expect: ModelConfig | None = None) -> dict[str, Tensor]:
    """The seed's released projector (LAVIS ``{"model": ...}``, DeepSpeed ``{"module": ...}`` or a plain state dict)
    as our safetensors; with ``expect``, a shape that would not fit that model config fails here, not mid-run."""
    from safetensors.torch import save_file

    proj, other = _projector_of(read_weights(src), str(src))
    if expect is not None:
        model, _ = meta_model(expect)
        model.load_partial(proj, str(src))  # a meta model: checks names and shapes, copies nothing
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in proj.items()}, str(out))
    w = proj["llm_proj.weight"]
    print(f"wrote {out}: llm_proj {w.shape[1]} -> {w.shape[0]} ({w.dtype}); use it with model.projector_checkpoint")
    if other:
        print(f"ignored {len(other)} other tensors: {_show(other)}")
    return proj


def to_seed(run_dir: str | Path, out: str | Path) -> dict[str, Tensor]:
    """A run's projector in the seed's checkpoint format ``{"model": {"llm_proj.weight", "llm_proj.bias"}}``."""
    from .runs import latest_checkpoint, load_weights

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint (checkpoints/step-*/trainable.safetensors)")
    proj, other = _projector_of(load_weights(ckpt), str(ckpt))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": proj}, out)
    print(f"wrote {out} from {ckpt} in the seed's format (model -> llm_proj.weight, llm_proj.bias)")
    if other:
        print(f"not in the seed's format, left out: {len(other)} other trained tensors ({_show(other)})")
    return proj


def _seed_projector(args) -> int:
    expect = load_config(args.config, args.overrides).model if args.config or args.overrides else None
    import_seed_projector(args.src, args.out, expect)
    return 0


def _to_seed(args) -> int:
    to_seed(args.checkpoint, args.out)
    return 0


# --------------------------------------------------------------------------------------------- export


def export_run(run_dir: str | Path, out_dir: str | Path, device: str = "cpu") -> Path:
    """One self-contained directory that chat, web UI and API load with nothing else present.

    ``llm/`` holds the LLM and tokenizer (a Qwen-1 or ``random:`` source becomes a plain HF directory), ``vision/`` the
    vision side as an HF BLIP-2 directory (trained weights included), and the checkpoint only what the config still
    rebuilds: the projector, and LoRA adapters when the LLM trained with LoRA (the base weights go to ``llm/``
    unmerged, so the export answers exactly as the run). Paths in config.yaml are relative to the directory (see
    runs.py), so it can be moved.
    """
    from .runs import read_meta, save_checkpoint, save_run_config
    from .serve.generate import Assistant

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; pick a new --out")
    assistant = Assistant.from_run(run_dir, device=device)  # validates the run dir and its newest checkpoint
    run, ckpt, cfg = assistant.run.run_dir, assistant.run.checkpoint, assistant.run.cfg  # cfg: paths absolute
    model = assistant.model
    lora = cfg.model.trainable.llm == "lora"
    params = dict(model.named_parameters())
    weights = {n: p.detach() for n, p in params.items()
               if n.startswith("llm_proj.") or (lora and p.requires_grad and n.startswith("llm."))}
    vision = {n: p for n, p in params.items() if n.split(".")[0] in VISION_SIDE}
    write_hf_blip2_dir(vision, model.vision_model.config, model.qformer.config, out / "vision")
    llm = model.llm.unload() if lora else model.llm  # drops the adapters (kept in `weights`) without merging them
    llm.save_pretrained(out / "llm")
    assistant.tokenizer.save_pretrained(out / "llm")
    for key in _SOURCE_KEYS:
        setattr(cfg.model, key, None)
    cfg.model.llm = cfg.model.tokenizer = str(out / "llm")
    cfg.model.vision_checkpoint = str(out / "vision")
    save_run_config(cfg, out)  # inside `out`: stored relative to it
    meta = read_meta(ckpt)
    step = int(meta.get("step", ckpt.name.removeprefix("step-") if ckpt.name.startswith("step-") else 0))
    save_checkpoint(out, step, weights, {}, {**meta, "exported_from": str(run.resolve())}, keep_last=0)
    print(f"wrote {out}: config.yaml, llm/ ({type(llm).__name__}), vision/ (HF BLIP-2), "
          f"checkpoints/step-{step:08d} ({_show(sorted(weights), 3)})")
    print(f"paths in {out / 'config.yaml'} are relative to it: move the folder freely; "
          f"minigpt4qwen chat --checkpoint {out}")
    return out


def _export(args) -> int:
    export_run(args.checkpoint, args.out, args.device)
    return 0


# --------------------------------------------------------------------------------------------- to-transformers


def to_transformers(run_dir: str | Path, out_dir: str | Path, device: str = "cpu", dtype: str | None = None) -> Path:
    """A run as a plain transformers ``Blip2ForConditionalGeneration`` directory (models/convert/hf_blip2.py says how
    the parts map): weights + config, the tokenizer with our prompt as its chat template and the image token named,
    the BLIP image processor set to our preprocessing; ``AutoProcessor`` makes a ``Blip2Processor`` of the two."""
    from transformers import AutoProcessor

    from .models.convert.hf_blip2 import blip2_chat_template, blip2_image_processor, check_chat_template, to_blip2
    from .runs import image_size, load_run

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; pick a new --out")
    run = load_run(run_dir, device)
    model, tokenizer, template = run.model, run.tokenizer, run.template
    image_token = tokenizer.convert_ids_to_tokens(model.image_token_id)
    tokenizer.chat_template = blip2_chat_template(template, image_token)
    check_chat_template(tokenizer, template)  # before anything is written
    stop = template.stop_token_ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    hf, added = to_blip2(model, stop, pad, tokenizer.bos_token_id)
    hf.to(DTYPES[dtype] if dtype else model.llm.dtype)
    hf.save_pretrained(out)
    tokenizer.save_pretrained(out)
    settings = json.loads((out / "tokenizer_config.json").read_text())
    # `image_token` named: Blip2Processor uses it instead of adding an "<image>" token of its own; left padding:
    # batched generate continues every row right after its prompt
    settings.update(image_token=image_token, padding_side="left", processor_class="Blip2Processor")
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    size = image_size(run.cfg, model)
    blip2_image_processor(size).save_pretrained(out)
    # no processor_config.json: Blip2Processor's num_query_tokens stays unset, so it prepends no image tokens of its
    # own (the chat template places them)
    processor = AutoProcessor.from_pretrained(out)
    if type(processor).__name__ != "Blip2Processor" or len(processor.tokenizer) != len(tokenizer):
        raise RuntimeError(f"{out}: AutoProcessor gave {type(processor).__name__} with {len(processor.tokenizer)} "
                           f"tokens, expected Blip2Processor with {len(tokenizer)}")
    print(f"wrote {out}: Blip2ForConditionalGeneration ({type(hf.language_model).__name__}, {hf.dtype}), "
          f"image token {image_token!r} = id {model.image_token_id} x {model.num_query_tokens}, stop ids {stop}, "
          f"{size}px BLIP image processor, chat template checked against the run's prompt")
    if run.cfg.model.trainable.llm == "lora":
        print("LoRA adapters merged into language_model's weights")
    if added:
        print(f"the image token lay past the LLM's embedding table: added zero rows {added}; pass "
              f"suppress_tokens={added} to generate so that they are never chosen")
    eps = model.vision_model.post_layernorm.eps
    if eps != model.vision_model.config.layer_norm_eps:
        print(f"note: vision post_layernorm (ln_vision) runs with eps {eps:g} here, {hf.config.vision_config.layer_norm_eps:g}"
              " in transformers (one eps for all vision norms): image features differ at rounding level")
    return out


def _to_transformers(args) -> int:
    from .models.convert.hf_blip2 import ChatTemplateMismatch

    try:
        to_transformers(args.checkpoint, args.out, args.device, args.dtype)
    except ChatTemplateMismatch as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------------------------- info


def meta_model(cfg: ModelConfig) -> tuple[MiniGPT4Qwen, dict[str, tuple[int, int]]]:
    """The composite model on the meta device (shapes only, no memory, no checkpoint read) and its
    ``{part: (trainable, total)}`` counts under the config's trainable flags, LoRA included."""
    built = build_model(cfg, "meta")
    return built.model, built.counts


def format_counts(counts: dict[str, tuple[int, int]]) -> str:
    """A table of parameters per part, with billions for comparing against published model sizes."""
    rows = [*counts.items(), ("total", tuple(sum(v[i] for v in counts.values()) for i in (0, 1)))]
    lines = [f"{'part':<10} {'parameters':>15} {'billions':>9} {'trainable':>15}"]
    lines += [f"{name:<10} {total:>15,} {total / 1e9:>9.3f} {trainable:>15,}" for name, (trainable, total) in rows]
    return "\n".join(lines)


def _info(args) -> int:
    cfg = load_config(args.config, args.overrides).model
    _, counts = meta_model(cfg)
    print(f"vision={cfg.vision} qformer={cfg.qformer} (incl. {cfg.num_query_tokens} queries) llm={cfg.llm}; "
          "built on the meta device: no weights allocated or read")
    print(format_counts(counts))
    return 0


# --------------------------------------------------------------------------------------------- argument parsing


def add_convert_args(subparsers) -> None:
    """Register ``convert`` and its sub-subcommands on the top-level parser's subparsers."""
    conv = subparsers.add_parser("convert", help="convert the seed's original checkpoints; export a run")
    sub = conv.add_subparsers(dest="convert_cmd", required=True)

    lavis = sub.add_parser("lavis", help="LAVIS eva_vit_g.pth + blip2_*.pth -> HF BLIP-2 directory (vision side)")
    lavis.add_argument("--eva", help="eva_vit_g.pth (omit when the BLIP-2 file embeds visual_encoder.*)")
    lavis.add_argument("--blip2", required=True, help="LAVIS BLIP-2 checkpoint, e.g. blip2_pretrained_flant5xxl.pth")
    lavis.add_argument("--out", required=True, help="output directory")
    lavis.add_argument("--num-vision-layers", type=int, default=39, help="EVA blocks BLIP-2 used (39 of 40)")
    lavis.add_argument("--cross-attention-frequency", type=int, default=2)
    lavis.add_argument("--vision-heads", type=int, help="default: the preset of the same width (16 for ViT-g)")
    lavis.add_argument("--qformer-heads", type=int, help="default: the preset of the same width (12 for BERT-base)")
    lavis.set_defaults(fn=_convert_lavis)

    qwen1 = sub.add_parser("qwen1", help="original Qwen-1 directory (remote code, tiktoken) -> native Qwen2 directory")
    qwen1.add_argument("--src", required=True)
    qwen1.add_argument("--out", required=True)
    qwen1.add_argument("--max-shard-size", default="5GB")
    qwen1.set_defaults(fn=_convert_qwen1)

    export = sub.add_parser("export", help="a run -> one self-contained, movable directory for chat/webui/serve")
    export.add_argument("--checkpoint", required=True, help="run directory (or one of its checkpoint directories)")
    export.add_argument("--out", required=True, help="new output directory")
    export.add_argument("--device", default="cpu", help="where the model is assembled (cpu, cuda)")
    export.set_defaults(fn=_export)

    hf = sub.add_parser("to-transformers",
                        help="a run -> a plain transformers Blip2ForConditionalGeneration directory (+ tokenizer, processor)")
    hf.add_argument("--checkpoint", required=True, help="run directory (or one of its checkpoint directories)")
    hf.add_argument("--out", required=True, help="new output directory")
    hf.add_argument("--device", default="cpu", help="where the model is assembled (cpu, cuda)")
    hf.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="dtype of the saved weights (default: the LLM's as loaded: bf16 on cuda, fp32 on cpu)")
    hf.set_defaults(fn=_to_transformers)

    seed = sub.add_parser("seed-projector", help="the seed's llm_proj (model.pth / checkpoint_*.pth) -> safetensors")
    seed.add_argument("--src", required=True, help="LAVIS checkpoint ({'model': ...}) or DeepSpeed/plain model.pth")
    seed.add_argument("--out", required=True, help="output .safetensors")
    seed.add_argument("--config", help="check the shape against this model config (YAML)")
    seed.add_argument("overrides", nargs="*", help="dotted overrides of --config, e.g. model.llm=random:qwen-7b")
    seed.set_defaults(fn=_seed_projector)

    back = sub.add_parser("to-seed", help="a run's projector -> the seed's format {'model': {llm_proj.*}}")
    back.add_argument("--checkpoint", required=True, help="run directory (or one of its checkpoint directories)")
    back.add_argument("--out", required=True, help="output .pth")
    back.set_defaults(fn=_to_seed)

    zero = sub.add_parser("zero-to-safetensors",
                          help="any engine's checkpoint (DeepSpeed ZeRO-0..3, FSDP2/DCP) -> trainable.safetensors")
    zero.add_argument("path", help="run directory, checkpoint directory, or a DeepSpeed directory with `latest`")
    zero.set_defaults(fn=_zero_to_safetensors)


def _zero_to_safetensors(args) -> int:
    from .runs import consolidate

    print(consolidate(args.path))
    return 0


def add_info_args(subparsers) -> None:
    """Register ``info``: parameter counts per part, on the meta device."""
    info = subparsers.add_parser("info", help="parameter counts per part of a config's model (meta device, no memory)")
    info.add_argument("--config", help="YAML config (default: the built-in defaults)")
    info.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.llm=random:qwen-7b")
    info.set_defaults(fn=_info)
