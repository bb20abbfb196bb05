"""train.fp8 (torchao float8) and train.liger (Liger-Kernel).

On CPU: fp8 runs through torchao's emulated matmuls (MINIGPT4QWEN_FP8_EMULATE=1: the real conversion and casts),
Liger through a stand-in kernel (liger_kernel needs CUDA + triton) that checks what our forward hands it. The GPU
tests (marked gpu) run the real kernels; fp8 needs compute capability >= 8.9, Liger `pip install liger-kernel==0.8.5`.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from torch import nn

from minigpt4qwen import bench
from minigpt4qwen.bench.common import collate_samples, make_samples, random_images
from minigpt4qwen.bench.train import TrainMode, parse_train_variant
from minigpt4qwen.config import ConfigError, ModelConfig, load_config
from minigpt4qwen.models.minigpt4qwen import build_model
from minigpt4qwen.runs import latest_checkpoint, load_weights
from minigpt4qwen.train import fp8, liger
from minigpt4qwen.train.loop import train

CPU = torch.device("cpu")
N_PROJECTIONS = 2 * 7  # tiny-qwen2: 2 decoder layers x q/k/v/o/gate/up/down, every dim a multiple of 16


def _model_config(*overrides: str) -> ModelConfig:
    base = ["model.vision=tiny", "model.qformer=tiny", "model.num_query_tokens=4", "model.llm=random:tiny-qwen2"]
    return load_config(None, [*base, *overrides]).model


TINY_MODEL = _model_config()
@pytest.fixture
def emulate(monkeypatch):
    monkeypatch.setenv(fp8.EMULATE_ENV, "1")


def losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]


def _float8_linear():
    from torchao.float8.float8_linear import Float8Linear

    return Float8Linear


def _tiny_batch(model, n: int = 3) -> dict:
    samples = make_samples(n, 0, model.llm.config.vocab_size, model.image_token_id, model.num_query_tokens, 16, 40, 0.3)
    return collate_samples(samples, 0, random_images(n, 32, torch.float32, CPU, 0))


# --------------------------------------------------------------------------------------------- fp8


def test_conversion_swaps_exactly_the_decoder_projections_and_reverts(emulate):
    Float8Linear = _float8_linear()
    model = build_model(TINY_MODEL, CPU).model
    before = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert fp8.convert_fp8(model, "tensorwise") == N_PROJECTIONS
    converted = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert len(converted) == N_PROJECTIONS
    assert all(n.startswith("llm.model.layers.") and n.rsplit(".", 1)[1] in fp8.PROJECTIONS for n in converted)
    for name, m in model.named_modules():  # lm_head, projector, ViT and Q-Former Linears stay plain
        if isinstance(m, nn.Linear) and name not in converted:
            assert type(m) is nn.Linear, name
    # the same Parameter objects: the optimizer, checkpoints and counts see no change
    assert all(dict(model.named_modules())[n].weight is w for n, w in before.items())
    assert fp8.convert_fp8(model, "tensorwise") == N_PROJECTIONS  # idempotent: nothing converted twice
    assert fp8.revert_fp8(model) == N_PROJECTIONS
    assert not any(isinstance(m, Float8Linear) for m in model.modules())
    assert all(dict(model.named_modules())[n].weight is w for n, w in before.items())


def test_frozen_once_and_lora_and_the_dims_filter(emulate):
    frozen_cls = fp8.frozen_float8_linear()
    model = build_model(TINY_MODEL, CPU).model  # stage 1: LLM frozen -> every converted layer is cast once
    assert fp8.convert_fp8(model, "rowwise", frozen="once") == N_PROJECTIONS
    assert sum(isinstance(m, frozen_cls) for m in model.modules()) == N_PROJECTIONS
    full = build_model(_model_config("model.trainable.llm=full"), CPU).model
    fp8.convert_fp8(full, "tensorwise", frozen="once")
    assert not any(isinstance(m, frozen_cls) for m in full.modules())  # trainable weights are re-cast every step
    lora = build_model(_model_config("model.trainable.llm=lora"), CPU).model
    assert fp8.convert_fp8(lora, "tensorwise") == N_PROJECTIONS  # q/k/v/o's frozen base_layer, not LoRA's A/B
    names = [n for n, m in lora.named_modules() if isinstance(m, _float8_linear())]
    assert sum(n.endswith(".base_layer") for n in names) == 2 * 4 and not any("lora_" in n for n in names)
    assert not fp8._decoder_projection(nn.Linear(40, 64), "layers.0.self_attn.q_proj")  # fp8 GEMMs need % 16


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_frozen_once_equals_torchao_bitwise(emulate, recipe):
    """Cast once and skip the weight gradient: the same output and input gradient as torchao's Float8Linear."""
    from torchao.float8 import convert_to_float8_training

    lin = nn.Linear(64, 96).requires_grad_(False)
    ref = convert_to_float8_training(nn.Sequential(lin), config=fp8.float8_config(recipe))[0]
    once = fp8.frozen_float8_linear().from_float8(ref)
    x = torch.randn(3, 5, 64, requires_grad=True)
    outs = []
    for m in (ref, once):
        y = m(x)
        outs.append((y, torch.autograd.grad(y.square().sum(), x)[0]))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert (outs[0][0] - lin(x)).abs().max() > 0  # fp8, not a silent bf16/fp32 path


def test_fp8_training_losses_close_to_fp32(tmp_path, shapes_data, emulate, wide_llm):
    """A few optimizer steps on the tiny model with weights large enough that fp8 rounding shows in the loss
    (std 0.02 gives near-uniform logits whose loss no matmul error can move). Measured: tensorwise/rowwise within
    0.7% of fp32 over 3 steps; the tolerance is 3%."""
    runs = {name: losses(train(tiny_config(tmp_path / name, shapes_data, wide_llm, "train.max_steps=3", *extra)))
            for name, extra in (("fp32", []), ("tensorwise", ["train.fp8=tensorwise"]),
                                ("once", ["train.fp8=tensorwise", "train.fp8_frozen=once"]),
                                ("rowwise", ["train.fp8=rowwise"]))}
    ref = runs.pop("fp32")
    for name, got in runs.items():
        assert all(torch.isfinite(torch.tensor(got))), name
        assert got == pytest.approx(ref, rel=0.03), name
        assert got != ref, f"{name}: identical to fp32, fp8 was not used"
    assert runs["once"] == runs["tensorwise"]  # frozen LLM: casting once is the same arithmetic


def test_fp8_training_batches_hold_a_token_count_divisible_by_16(tmp_path, shapes_data, emulate, monkeypatch):
    """torch._scaled_mm refuses a token count not divisible by 16 (the weight gradient's matmul runs over it; the
    H200 failed at the first backward of a 4 x 78-position batch): with train.fp8 every batch's length is padded to
    a multiple of 16, without it the lengths stay as they are."""
    from minigpt4qwen.train import loop

    widths: list[int] = []
    collate = loop.collate

    def recording(*args, **kwargs):
        batch = collate(*args, **kwargs)
        widths.append(batch["input_ids"].shape[1])
        return batch

    monkeypatch.setattr(loop, "collate", recording)
    train(tiny_config(tmp_path / "plain", shapes_data, "train.max_steps=3"))
    assert any(w % 16 for w in widths)  # the data has lengths that need the padding
    widths.clear()
    train(tiny_config(tmp_path / "fp8", shapes_data, "train.max_steps=3", "train.fp8=tensorwise"))
    assert widths and all(w % 16 == 0 for w in widths)


@pytest.fixture
def one_process_group(monkeypatch):
    """The env:// variables of a one-process group (as init_distributed sets them), undone after the test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", str(port))):
        monkeypatch.setenv(k, v)


def test_fsdp_full_llm_gathers_fp8_weights_saves_and_resumes(tmp_path, shapes_data, emulate, one_process_group,
                                                             monkeypatch):
    """FSDP2 with the LLM trained in full: tensorwise weights become torchao's fp8-all-gather wrappers, their scales
    are recomputed after every optimizer step, trainable.safetensors gets plain tensors, and a resume from the
    sharded state continues the same losses."""
    import torchao.float8

    counts: list[int] = []
    real = torchao.float8.precompute_float8_dynamic_scale_for_fsdp

    def spy(module):
        from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

        counts.append(sum(isinstance(getattr(p, "_local_tensor", None), WeightWithDynamicFloat8CastTensor)
                          for p in module.parameters()))
        return real(module)

    monkeypatch.setattr(torchao.float8, "precompute_float8_dynamic_scale_for_fsdp", spy)
    cfg = tiny_config(tmp_path, shapes_data, "engine.name=fsdp", "model.trainable.llm=full", "train.fp8=tensorwise",
                      "train.max_steps=4", "train.save_every_steps=2", "train.keep_last=0")
    run = train(cfg)
    whole = losses(run)
    assert counts == [N_PROJECTIONS] * 4
    weights = load_weights(latest_checkpoint(run))
    assert weights["llm.model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)  # plain tensors, readable
    ckpts = run / "checkpoints"
    shutil.rmtree(ckpts / "step-00000004")
    (ckpts / "latest").write_text("step-00000002")
    train(cfg, resume=run)
    assert losses(run) == pytest.approx(whole, rel=1e-6)


def test_fp8_config_errors_are_one_line(tmp_path, shapes_data, monkeypatch):
    monkeypatch.delenv(fp8.EMULATE_ENV, raising=False)
    for bad, key in (("train.fp8=fp4", "fp8"), ("train.fp8_frozen=never", "fp8_frozen")):
        with pytest.raises(ConfigError, match=key) as exc:
            load_config(None, [bad])
        assert "\n" not in str(exc.value)
    cfg = tiny_config(tmp_path, shapes_data, "train.fp8=tensorwise")
    with pytest.raises(ConfigError, match=r"train.fp8=tensorwise needs a CUDA GPU .* set train.fp8=off") as exc:
        train(cfg)  # refused before the model is built
    assert "\n" not in str(exc.value) and not (tmp_path / "run" / "log.jsonl").exists()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match=r"compute capability >= 8.9 .* A100-SXM4-80GB has 8.0") as exc:
        fp8.require_fp8_device(torch.device("cuda", 0), "train.fp8=rowwise")
    assert "\n" not in str(exc.value)
    ds = tiny_config(tmp_path, shapes_data, "train.fp8=rowwise", "engine.name=deepspeed")
    with pytest.raises(ConfigError, match="train.fp8=rowwise does not support engine.name=deepspeed") as exc:
        fp8.check_fp8(ds, CPU)
    assert "\n" not in str(exc.value)
    monkeypatch.setenv(fp8.EMULATE_ENV, "1")  # past the device check: the engine's turn
    once = tiny_config(tmp_path, shapes_data, "train.fp8=tensorwise", "train.fp8_frozen=once", "engine.name=fsdp")
    with pytest.raises(ConfigError, match="with engine.name=fsdp set engine.frozen=replicate"):
        fp8.check_fp8(once, CPU)
    fp8.check_fp8(tiny_config(tmp_path, shapes_data, "train.fp8=tensorwise", "train.fp8_frozen=once",
                              "engine.name=fsdp", "engine.frozen=replicate"), CPU)


# --------------------------------------------------------------------------------------------- Liger


def test_liger_config_errors_are_one_line(tmp_path, shapes_data, monkeypatch):
    cfg = tiny_config(tmp_path, shapes_data, "train.liger=true")
    with pytest.raises(ConfigError, match=r"train.liger needs CUDA and `pip install liger-kernel==0.8.5`") as exc:
        train(cfg)  # refused before the model is built
    assert "\n" not in str(exc.value)
    if importlib.util.find_spec("liger_kernel") is None:  # this machine: CUDA claimed, package missing
        with pytest.raises(ConfigError, match="not importable"):
            liger.check_liger(cfg, torch.device("cuda", 0))
    monkeypatch.setattr(liger, "require_liger", lambda device: None)  # past the install check: the engine's turn
    zero3 = tiny_config(tmp_path, shapes_data, "train.liger=true", "engine.name=deepspeed", "engine.zero_stage=3")
    with pytest.raises(ConfigError, match="ZeRO-3"):
        liger.check_liger(zero3, torch.device("cuda", 0))


@pytest.fixture
def stand_in_liger(monkeypatch):
    """liger_kernel's two entry points apply_liger uses, in plain torch, recording their calls."""
    calls: dict[str, list] = {"loss": [], "patch": [], "rope": 0}

    class FusedLinearCE:
        def __init__(self, ignore_index: int = -100, reduction: str = "mean") -> None:
            self.ignore_index, self.reduction = ignore_index, reduction

        def forward(self, weight, hidden, target, bias=None):
            calls["loss"].append(target.clone())
            logits = F.linear(hidden, weight, bias).float()
            return F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction=self.reduction)

    def apply_to_instance(model, **kwargs):
        calls["patch"].append((model, kwargs))
        modeling = sys.modules[type(model).__module__]
        original = modeling.apply_rotary_pos_emb

        def rope(*args, **kw):  # Liger swaps the module-level function, as this does
            calls["rope"] += 1
            return original(*args, **kw)

        modeling.apply_rotary_pos_emb = rope
        model.model.norm.forward = types.MethodType(type(model.model.norm).forward, model.model.norm)

    transformers_mod = types.ModuleType("liger_kernel.transformers")
    transformers_mod.LigerFusedLinearCrossEntropyLoss = FusedLinearCE
    patch_mod = types.ModuleType("liger_kernel.transformers.monkey_patch")
    patch_mod._apply_liger_kernel_to_instance = apply_to_instance
    patch_mod.MODEL_TYPE_TO_APPLY_LIGER_FN = {"qwen2": None, "qwen3": None, "llama": None}
    for name, mod in (("liger_kernel", types.ModuleType("liger_kernel")), (transformers_mod.__name__, transformers_mod),
                      (patch_mod.__name__, patch_mod)):
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def test_liger_path_keeps_the_loss_and_undoes_cleanly(stand_in_liger):
    """train.liger routes the answer loss through the fused kernel with only supervised targets (no -100 reaches it)
    and the same summed loss and gradient; the LLM gets Liger's patcher (no fused HF forward); undo restores all."""
    calls = stand_in_liger
    model = build_model(TINY_MODEL, CPU).model
    batch = _tiny_batch(model)
    modeling = sys.modules[type(model.llm).__module__]
    rope_before = modeling.apply_rotary_pos_emb

    def loss_and_grad():
        model.zero_grad()
        loss, n = model(batch["input_ids"], None, batch["labels"], batch["pixel_values"])
        loss.backward()
        return float(loss.detach()), n, model.llm_proj.weight.grad.clone()

    plain = loss_and_grad()
    undo = liger.apply_liger(model)
    fused = loss_and_grad()
    (llm, kwargs), = calls["patch"]
    assert llm is model.llm and kwargs == {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                                           "fused_linear_cross_entropy": False}
    (target,) = calls["loss"]
    assert target.numel() == fused[1] == int((batch["labels"][:, 1:] != -100).sum()) and bool((target >= 0).all())
    assert calls["rope"] > 0
    assert fused[0] == pytest.approx(plain[0], rel=1e-6) and fused[1] == plain[1]
    torch.testing.assert_close(fused[2], plain[2], rtol=1e-5, atol=1e-7)
    model.llm.model.norm.train()  # changed after the patch: an undo must leave it (the bench undoes between variants)
    undo()
    assert model.fused_linear_ce is None and modeling.apply_rotary_pos_emb is rope_before
    assert "forward" not in vars(model.llm.model.norm) and model.llm.model.norm.training
    undo = liger.apply_liger(model, layer_kernels=False)  # train.compile: the fused loss only
    assert len(calls["patch"]) == 1 and modeling.apply_rotary_pos_emb is rope_before
    assert loss_and_grad()[0] == pytest.approx(plain[0], rel=1e-6) and len(calls["loss"]) == 2
    undo()
    model.llm.config.model_type = "gpt2"
    with pytest.raises(ConfigError, match="no kernels for LLM model_type 'gpt2'"):
        liger.apply_liger(model)


# --------------------------------------------------------------------------------------------- bench


def test_bench_variant_names():
    mode = parse_train_variant("fast-cached-compile-fp8-tensorwise")
    assert mode == TrainMode(cached=True, compile=True, fp8="tensorwise")
    assert parse_train_variant("fast-cached-compile-fp8-rowwise-once-b48") == TrainMode(
        cached=True, compile=True, fp8="rowwise", fp8_once=True, batch_size=48)
    assert parse_train_variant("fast-cached-compile-liger").liger
    for bad in ("fast-fp8", "fast-fp8-fp4", "fast-once"):
        with pytest.raises(ValueError, match="fp8"):
            parse_train_variant(bad)


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is faster (as in test_bench)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_bench_fp8_variants_and_gate_on_cpu(tmp_path, monkeypatch, one_thread):
    """Emulated on CPU: the fp8 variants train through micro_step, the gate prints both numbers; without emulation
    the variants report the device error instead of crashing the run."""
    monkeypatch.setenv(fp8.EMULATE_ENV, "1")
    tiny = ["--device", "cpu", "--seq-min", "16", "--seq-max", "48", "--batch-size", "2", "--steps", "2", "--warmup",
            "1", "--eval-batch", "4"]
    out = tmp_path / "bench.jsonl"
    assert bench.main(["train", *tiny, "--variants", "fast-fp8-tensorwise,fast-cached-fp8-rowwise-once",
                       "--out", str(out)]) == 0
    assert bench.main(["fp8-gate", *tiny, "--gate-steps", "3", "--gate-questions", "4", "--gate-recipes",
                       "tensorwise", "--out", str(out)]) == 0
    monkeypatch.delenv(fp8.EMULATE_ENV)
    assert bench.main(["train", *tiny, "--variants", "fast-fp8-tensorwise", "--out", str(tmp_path / "x.jsonl")]) == 1
    recs = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    for name in ("fast-fp8-tensorwise", "fast-cached-fp8-rowwise-once"):
        assert recs[name]["samples_per_s"] > 0 and torch.isfinite(torch.tensor(recs[name]["loss"])), name
    gate = recs["fp8-gate-tensorwise"]
    assert gate["steps"] == 3 and gate["questions"] == 4 and 0 <= gate["answers_agree"] <= 1
    assert 0 < gate["loss_rel_diff"] < 0.05 and gate["loss_ok"] == (gate["loss_rel_diff"] <= 0.01)
    err = json.loads((tmp_path / "x.jsonl").read_text().splitlines()[-1])
    assert "needs a CUDA GPU" in err["error"]


# --------------------------------------------------------------------------------------------- GPU


def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= fp8.MIN_CAPABILITY


def _liger_gpu() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


GPU = ["train.device=cuda", "train.precision=bf16", "model.frozen_dtype=bf16", "train.max_steps=6"]


@pytest.mark.gpu
@pytest.mark.skipif(not _fp8_gpu(), reason="needs CUDA capability >= 8.9")
@pytest.mark.parametrize("extra", [["train.fp8=tensorwise"], ["train.fp8=rowwise"],
                                   ["train.fp8=tensorwise", "train.fp8_frozen=once", "train.compile=true"],
                                   ["train.fp8=rowwise", "train.fp8_frozen=once", "train.compile=true"]])
def test_gpu_fp8_trains_close_to_bf16(tmp_path, shapes_data, wide_llm, extra):
    ref = losses(train(tiny_config(tmp_path / "bf16", shapes_data, wide_llm, *GPU)))
    got = losses(train(tiny_config(tmp_path / "fp8", shapes_data, wide_llm, *GPU, *extra)))
    assert all(torch.isfinite(torch.tensor(got))) and got != ref
    assert got == pytest.approx(ref, rel=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not _fp8_gpu(), reason="needs CUDA capability >= 8.9")
def test_gpu_fp8_fsdp_full_llm_gathers_fp8_weights(tmp_path, shapes_data, one_process_group):
    """One-process FSDP2, the LLM trained in full: fp8 all-gather + the scale precompute after each optimizer step."""
    common = [*GPU, "engine.name=fsdp", "model.trainable.llm=full", "train.lr=1e-4"]
    ref = losses(train(tiny_config(tmp_path / "bf16", shapes_data, *common)))
    got = losses(train(tiny_config(tmp_path / "fp8", shapes_data, *common, "train.fp8=tensorwise")))
    assert all(torch.isfinite(torch.tensor(got))) and got == pytest.approx(ref, rel=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not _liger_gpu(), reason="needs CUDA and liger-kernel")
def test_gpu_liger_matches_plain_loss_and_grads():
    """fp32 on CUDA: Liger's fused linear CE + RMSNorm/RoPE/SwiGLU give the plain path's loss and gradients."""
    model = build_model(_model_config("model.frozen_dtype=fp32"), "cuda").model
    with torch.no_grad():  # sharper than std 0.02, so the comparison sees real differences
        for p in model.llm.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    model.train()
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in _tiny_batch(model, 4).items()}

    def loss_and_grad():
        model.zero_grad()
        loss, _ = model(batch["input_ids"], None, batch["labels"], batch["pixel_values"])
        loss.backward()
        return loss.detach(), model.llm_proj.weight.grad.clone()

    plain = loss_and_grad()
    undo = liger.apply_liger(model)
    try:
        fused = loss_and_grad()
        assert model.fused_linear_ce is not None
    finally:
        undo()
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-4, atol=1e-4)
    assert float((fused[1] - plain[1]).norm() / plain[1].norm()) < 1e-3  # fp32 kernels summing in another order


@pytest.mark.gpu
@pytest.mark.skipif(not _liger_gpu(), reason="needs CUDA and liger-kernel")
def test_gpu_liger_trains_close_to_plain(tmp_path, shapes_data, wide_llm):
    ref = losses(train(tiny_config(tmp_path / "plain", shapes_data, wide_llm, *GPU)))
    got = losses(train(tiny_config(tmp_path / "liger", shapes_data, wide_llm, *GPU, "train.liger=true",
                                   "train.compile=true")))
    assert got == pytest.approx(ref, rel=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not _fp8_gpu(), reason="needs CUDA capability >= 8.9")
def test_gpu_fp8_gate_short(tmp_path):
    """The bench's gate at tiny size (random weights: only the loss half is asserted, see fp8_gate)."""
    out = tmp_path / "gate.jsonl"
    assert bench.main(["fp8-gate", "--device", "cuda", "--preset", "tiny", "--batch-size", "8", "--gate-steps", "50",
                       "--gate-questions", "64", "--out", str(out)]) == 0
    recs = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    for recipe in ("tensorwise", "rowwise"):
        assert recs[f"fp8-gate-{recipe}"]["loss_ok"], recs[f"fp8-gate-{recipe}"]
