"""`--quantize`: weight-only int8/fp8/int4 of the LLM's decoder layers (serve/quantize.py) for answering.

CPU: int8 on the tiny models (what it replaces, what it leaves alone, the bytes, FastDecoder's fused groups, chat /
predict / eval end to end) and the one-line refusals. GPU (marked, skipped without CUDA): int8/fp8 greedy answers
through FastDecoder with CUDA graphs (eager and compiled) against bf16, and int4 where the GPU supports it.

Run: python -m pytest tests/test_quantize.py
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_to_transformers import chat, make_run
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from minigpt4qwen.__main__ import build_parser, main
from minigpt4qwen.data.conversation import IMAGE_PROMPT, Turn
from minigpt4qwen.models.llm import LLM_PRESETS
from minigpt4qwen.serve import generate
from minigpt4qwen.serve.fastdecode import FastDecoder
from minigpt4qwen.serve.generate import Assistant, GenerationSettings
from minigpt4qwen.serve.quantize import QuantizeError, quantize_for_inference, quantize_llm, tensor_bytes

QUESTIONS = ("What color is the shape?", "How many shapes are there?", "Where is the shape?", "What shape is it?")


def tiny_llm(dtype: torch.dtype = torch.float32, device: str = "cpu", **changes) -> nn.Module:
    kw = dict(LLM_PRESETS["tiny-qwen2"], **changes)
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).to(device, dtype).eval().requires_grad_(False)


def decoder_linears(llm: nn.Module) -> list[nn.Linear]:
    return [m for layer in llm.model.layers for m in layer.modules() if isinstance(m, nn.Linear)]


def is_quantized(t: torch.Tensor) -> bool:
    from torchao.utils import TorchAOBaseTensor

    return isinstance(t, TorchAOBaseTensor)


# --------------------------------------------------------------------------------------------- CPU


def vision_linears(model: nn.Module) -> list[nn.Linear]:
    return [m for layer in model.vision_model.encoder.layers for m in layer.modules() if isinstance(m, nn.Linear)]


def test_int8_quantizes_the_decoder_and_vision_linears_and_nothing_else(tiny_run):
    from torchao.quantization import Int8Tensor

    plain = Assistant.from_run(tiny_run, device="cpu").model
    model = Assistant.from_run(tiny_run, device="cpu", quantize="int8").model
    llm = model.llm
    linears = decoder_linears(llm)
    assert len(linears) == 2 * 7  # q/k/v/o + gate/up/down in each of the 2 layers
    assert all(type(m.weight) is Int8Tensor and not m.weight.requires_grad for m in linears)
    vision = vision_linears(model)
    assert len(vision) == 2 * 4  # qkv, projection, fc1, fc2 in each of the 2 blocks
    assert all(type(m.weight) is Int8Tensor for m in vision)
    # q/k/v (and gate/up) are row slices of one quantized weight: one matmul for FastDecoder, one copy in memory
    attn = llm.model.layers[0].self_attn
    assert attn.k_proj.weight.qdata.untyped_storage().data_ptr() == attn.q_proj.weight.qdata.untyped_storage().data_ptr()
    # the Q-Former, the projector, biases, norms, the patch embedding, the embedding table and lm_head (tied to it):
    # the loaded tensors, unquantized
    before = {**plain.state_dict(keep_vars=True)}
    quantized = {n for n, m in model.named_modules() if m in [*linears, *vision]}
    for name, value in model.state_dict(keep_vars=True).items():
        if name.removesuffix(".weight") in quantized:
            continue
        assert not is_quantized(value), name
        assert torch.equal(value, before[name]), name
    assert llm.get_output_embeddings().weight is llm.get_input_embeddings().weight
    # each quantized weight dequantizes to (nearly) the loaded one: the right rows went to the right Linear
    for q, ref in zip([*linears, *vision], [*decoder_linears(plain.llm), *vision_linears(plain)], strict=True):
        err = (q.weight.dequantize() - ref.weight).abs().max()
        assert err <= ref.weight.abs().amax() / 127 + 1e-6
    # and the image features move by int8 rounding only
    pixels = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        ref, out = plain.qformer_features(pixels), model.qformer_features(pixels)
    err = ((out - ref).norm() / ref.norm()).item()
    assert 0 < err < 0.05, err


def test_untied_embedding_becomes_int8_rows(tmp_path):
    """An embedding of its own (Qwen-7B-Chat, Qwen2.5-7B) is stored as int8 rows + one scale each: half of bf16's
    bytes, lookups within a row's max / 254 of the loaded values, and HF generate / FastDecoder read it as before."""
    from minigpt4qwen.serve.quantize import Int8Embedding

    llm = tiny_llm(torch.bfloat16, tie_word_embeddings=False, initializer_range=0.2)
    table = llm.get_input_embeddings().weight.detach().clone()
    head = llm.get_output_embeddings().weight
    report = quantize_llm(llm, "int8")
    embed = llm.get_input_embeddings()
    assert type(embed) is Int8Embedding and llm.get_output_embeddings().weight is head  # lm_head as loaded
    assert embed.qweight.dtype == torch.int8 and tensor_bytes(embed.buffers()) == table.numel() + 4 * table.shape[0]
    ids = torch.tensor([[0, 5, 511, 5]])
    got = embed(ids)
    assert got.dtype == torch.bfloat16 and got.shape == (1, 4, 64)
    ref = table[ids].float()
    bound = ref.abs().amax(-1, keepdim=True) / 254 + ref.abs() * 2**-8  # int8 rounding + the bf16 result's
    assert ((got.float() - ref).abs() <= bound).all()
    assert torch.equal(embed.dequantize()[ids], got)
    # the report counts the int8 rows: the LLM shrank by the decoder linears and half the table
    saved_linears = report.linear_bytes_before - report.linear_bytes_after
    assert report.llm_bytes_before - report.llm_bytes_after == saved_linears + table.numel() * 2 - tensor_bytes(
        embed.buffers())
    torch.manual_seed(1)
    embeds = torch.randn(2, 12, 64, dtype=torch.bfloat16)
    mask = torch.ones(2, 12, dtype=torch.long)
    with torch.inference_mode():
        ref = llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
        out = FastDecoder(llm, max_batch=2, max_len=32, fuse=True, cuda_graph=False).generate(embeds, mask, 8)
    assert torch.equal(out, ref)  # tokens after the first are looked up in the int8 table on both paths


def test_staged_quantization_moves_and_quantizes_one_block_at_a_time(tiny_run, monkeypatch):
    """`quantize_for_inference(..., device=)` (what `--quantize` does on a GPU, after `load_run(stage=True)` built the
    model on the CPU): everything but the vision tower's and the decoder's blocks moves first, then each block is moved
    only after the ones before it are quantized, and the weights come out as quantizing in place makes them."""
    from minigpt4qwen.runs import load_run

    in_place = Assistant.from_run(tiny_run, device="cpu", quantize="int8").model
    model = load_run(tiny_run, "cpu", stage=True).model.eval()
    blocks = list(model.vision_model.encoder.layers) + list(model.llm.model.layers)
    moves = []
    original = nn.Module.to

    def quantized() -> list[bool]:
        return [all(is_quantized(m.weight) for m in b.modules() if isinstance(m, nn.Linear)) for b in blocks]

    def to(self, *args, **kwargs):
        if self is model:
            moves.append(("model", len(model.vision_model.encoder.layers) + len(model.llm.model.layers)))
        elif any(self is b for b in blocks):
            moves.append((blocks.index(self), quantized()))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", to)
    quantize_for_inference(model, "int8", device="cpu")
    n = len(blocks)
    assert n == 4
    assert moves[0] == ("model", 0)  # the rest of the model went first, without the blocks
    assert moves[1:] == [(i, [j < i for j in range(n)]) for i in range(n)]
    assert list(model.vision_model.encoder.layers) + list(model.llm.model.layers) == blocks  # put back, in order
    for staged, ref in zip([*vision_linears(model), *decoder_linears(model.llm)],
                           [*vision_linears(in_place), *decoder_linears(in_place.llm)], strict=True):
        assert torch.equal(staged.weight.dequantize(), ref.weight.dequantize())


@pytest.mark.parametrize("dtype,ratio", [(torch.bfloat16, 2.0), (torch.float32, 4.0)])
def test_int8_weight_bytes(dtype, ratio):
    """One byte per weight (+ a scale and zero point per row): ~2x less than bf16, ~4x less than fp32. At width 64
    the per-row extras (5 bytes) are 7% of a row; a 4096-wide model's are 0.1%."""
    llm = tiny_llm(dtype)
    linears = decoder_linears(llm)
    before = tensor_bytes(m.weight for m in linears)
    assert before == sum(m.weight.numel() for m in linears) * dtype.itemsize
    report = quantize_llm(llm, "int8")
    after = tensor_bytes(m.weight for m in linears)
    assert (report.linear_bytes_before, report.linear_bytes_after) == (before, after)
    assert after == sum(m.weight.numel() + 5 * m.out_features for m in linears)
    assert 0.9 * ratio < before / after <= ratio
    assert report.llm_bytes_before - report.llm_bytes_after == before - after  # embeddings/lm_head/norms unchanged
    assert report.layers == 14 and report.skipped == 0


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_int8_fast_decoder_runs_the_quantized_groups_fused(arch):
    """FastDecoder (fuse=True, as chat/serve build it) multiplies by the quantized fused weights the modules point
    into, and its greedy tokens equal HF generate's on the same quantized model."""
    from torchao.quantization import Int8Tensor

    extra = {"model_type": "qwen3", "head_dim": 16} if arch == "qwen3" else {}
    llm = tiny_llm(initializer_range=0.2, **extra)
    quantize_llm(llm, "int8")
    dec = FastDecoder(llm, max_batch=3, max_len=48, fuse=True)
    assert all("qkv" in f and "gate_up" in f for f in dec.fused)
    w, _, sizes = dec.fused[0]["qkv"]
    attn = llm.model.layers[0].self_attn
    assert type(w) is Int8Tensor and sizes == [64, 32, 32]
    assert attn.v_proj.weight.qdata.data_ptr() == w.qdata[96:].data_ptr()  # a view into it, no second copy
    assert FastDecoder(llm, max_batch=1, max_len=16, fuse=True).fused[1]["gate_up"][0] is dec.fused[1]["gate_up"][0]
    torch.manual_seed(1)
    embeds = torch.randn(3, 20, 64)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1:, :4] = 0
    with torch.inference_mode():
        ref = llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=12, min_new_tokens=12,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
        out = dec.generate(embeds, mask, 12)
    assert torch.equal(out, ref)


def test_chat_quantize_int8_answers_end_to_end(tmp_path, shapes_data, wide_llm, capsys):
    """`chat --quantize int8` on CPU answers, as the int8 Assistant does through HF generate and through FastDecoder;
    against the unquantized model the next-token logits move a little and the first answer tokens agree."""
    run = make_run(tmp_path / "run", wide_llm)
    image = shapes_data / "images" / "heldout_00000.png"
    said = chat(capsys, run, image, QUESTIONS[0], 6)  # without --quantize: the baseline process
    capsys.readouterr()
    argv = ["chat", "--checkpoint", run, "--image", image, "--query", QUESTIONS[0], "--max-new-tokens", 6,
            "--quantize", "int8", "--device", "cpu"]
    assert main([str(a) for a in argv]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer
    convs = [[Turn("user", f"{IMAGE_PROMPT} {q}")] for q in QUESTIONS for _ in range(3)]
    images = [[shapes_data / "images" / f"heldout_{i:05d}.png"] for _ in QUESTIONS for i in range(3)]
    int8 = Assistant.from_run(run, device="cpu", quantize="int8")
    assert int8.generate(convs[:1], images[:1], GenerationSettings(6)) == [answer]
    hf_answers = int8.generate(convs, images, GenerationSettings(6))
    int8.fast_decode = True
    assert int8.generate(convs, images, GenerationSettings(6)) == hf_answers
    none = Assistant.from_run(run, device="cpu")
    assert none.generate(convs[:1], images[:1], GenerationSettings(6)) == [said]
    logits = {}
    for name, a in (("none", none), ("int8", int8)):
        embeds, mask = a.prepare(convs, images)
        with torch.inference_mode():
            logits[name] = a.model.llm(inputs_embeds=embeds, attention_mask=mask).logits[:, -1].float()
    err = (logits["int8"] - logits["none"]).abs().max() / logits["none"].std()
    assert 0 < err < 0.3  # measured 0.11: int8 rounding, not a different model
    agree = (logits["int8"].argmax(-1) == logits["none"].argmax(-1)).float().mean()
    assert agree >= 0.75  # measured 1.0 (12 prompts)


def test_predict_and_eval_take_quantize(tmp_path, shapes_data, tiny_run, capsys, monkeypatch):
    """predict and eval load through the same helper: --quantize reaches the model they answer with."""
    seen = []

    def spy(model, mode, device=None):
        seen.append(mode)
        return quantize_for_inference(model, mode, device)

    monkeypatch.setattr(generate, "quantize_for_inference", spy)
    src = tmp_path / "q.jsonl"
    src.write_text(json.dumps({"id": 1, "image": str(shapes_data / "images/heldout_00000.png"), "question": "Hi?"}))
    out = tmp_path / "a.jsonl"
    assert main(["predict", "--checkpoint", str(tiny_run), "--input", str(src), "--out", str(out),
                 "--max-new-tokens", "3", "--quantize", "int8", "--device", "cpu"]) == 0
    assert "answer" in json.loads(out.read_text())
    assert main(["eval", "mme", "--checkpoint", str(tiny_run), "--mme-root", str(shapes_data / "mme"),
                 "--out", str(tmp_path / "mme"), "--max-new-tokens", "2", "--quantize", "int8"]) == 0
    assert seen == ["int8", "int8"]


def test_every_answering_command_has_the_option():
    parser = build_parser()
    commands = [["chat"], ["webui"], ["serve"], ["predict", "--input", "i", "--out", "o"],
                ["eval", "mme", "--mme-root", "m"], ["eval", "pope", "--pope-root", "p", "--images", "i"],
                ["eval", "mmbench", "--tsv", "t"], ["eval", "all"]]
    for cmd in commands:
        assert parser.parse_args([*cmd, "--checkpoint", "RUN"]).quantize == "none"
        assert parser.parse_args([*cmd, "--checkpoint", "RUN", "--quantize", "int4"]).quantize == "int4"
        with pytest.raises(SystemExit):
            parser.parse_args([*cmd, "--checkpoint", "RUN", "--quantize", "int3"])


@pytest.mark.parametrize("mode,message", [
    ("fp8", ("error: --quantize fp8 needs a CUDA GPU with compute capability >= 8.9 (float8 weights: Ada or Hopper); "
             "this run is on cpu: use --quantize int8 (CPU or GPU) or none")),
    ("int4", ("error: --quantize int4 needs a CUDA GPU with compute capability >= 8.0 (torch's tinygemm int4 kernel); "
              "this run is on cpu: use --quantize int8 (CPU or GPU) or none")),
])
def test_gpu_modes_on_cpu_fail_in_one_line_before_loading(tiny_run, shapes_data, capsys, monkeypatch, mode, message):
    monkeypatch.setattr(generate, "load_run", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    argv = ["chat", "--checkpoint", str(tiny_run), "--image", str(shapes_data / "images/heldout_00000.png"),
            "--query", "hi", "--device", "cpu", "--quantize", mode]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == message


def test_quantize_refuses_training_lora_and_twice(tmp_path, wide_llm):
    llm = tiny_llm()
    with pytest.raises(QuantizeError, match="for answering only"):
        quantize_llm(tiny_llm().requires_grad_(True), "int8")
    with pytest.raises(QuantizeError, match="for answering only"):
        quantize_llm(tiny_llm().train(), "int8")
    quantize_llm(llm, "int8")
    with pytest.raises(QuantizeError, match="quantized already"):
        quantize_llm(llm, "int8")
    with pytest.raises(QuantizeError, match="--quantize takes none, int8, fp8, int4"):
        quantize_llm(tiny_llm(), "int3")
    assert quantize_llm(tiny_llm(), "none") is None
    # a LoRA run: the loader folds the adapters in (which quantize_llm alone refuses), freezes, then quantizes
    run = make_run(tmp_path / "lora", wide_llm, "model.trainable.llm=lora", lora_std=0.3)
    assistant = Assistant.from_run(run, device="cpu")
    with pytest.raises(QuantizeError, match="LoRA"):
        quantize_llm(assistant.model, "int8")
    merged = copy.deepcopy(assistant.model)
    merged.llm = merged.llm.merge_and_unload()
    quantize_for_inference(assistant.model, "int8")
    llm = assistant.model.llm
    assert not hasattr(llm, "peft_config") and all(is_quantized(m.weight) for m in decoder_linears(llm))
    q = llm.model.layers[0].self_attn.q_proj.weight.dequantize()
    ref = merged.llm.model.layers[0].self_attn.q_proj.weight
    assert (q - ref).abs().max() <= ref.abs().amax() / 127 + 1e-6  # the merged weights were quantized


def test_bench_quantized_decode_variants(tmp_path):
    """`bench generate --variants ...-int8`: timed like the others, plus the weight memory and the share of greedy
    answers equal to bf16's; a mode the device lacks is an error record, and the run goes on."""
    from minigpt4qwen import bench

    out = tmp_path / "bench.jsonl"
    argv = ["generate", "--device", "cpu", "--gen-tokens", "4", "--out", str(out),
            "--variants", "fast-decode-fused,fast-decode-int8,fast-decode-fp8"]
    assert bench.main(argv) == 1  # the fp8 variant failed
    recs = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    fused, int8 = recs["fast-decode-fused"], recs["fast-decode-int8"]
    assert int8["tokens_per_s"] > 0 and int8["quantized_layers"] == 14 and int8["answers"] == 2
    assert 0.0 <= int8["answers_match_bf16"] <= 1.0 and "answers_match_bf16" not in fused
    assert int8["llm_weight_gib_unquantized"] == fused["llm_weight_gib"]
    assert int8["llm_weight_gib"] < 0.6 * fused["llm_weight_gib"]  # fp32 linears -> int8; embeddings stay
    assert recs["fast-decode-fp8"]["error"].startswith("QuantizeError: --quantize fp8 needs a CUDA GPU")


# --------------------------------------------------------------------------------------------- GPU


WIDE = {"hidden_size": 1024, "intermediate_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 4,
        "initializer_range": 0.01}
"""A tiny-qwen2 wide enough for int4 (2 layers, head_dim 64). Init 0.01: each prompt decides its own answer (31-32
distinct of 32) and a random network stays calm enough that rounding rarely flips it (at 0.02 this width is chaotic:
fp8 then keeps 20/32 answers on CPU, which says more about random weights than about fp8)."""


def _greedy(llm: nn.Module, embeds: torch.Tensor, compile: bool, n: int = 8) -> list[list[int]]:
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    dec = FastDecoder(llm, max_batch=embeds.shape[0], max_len=embeds.shape[1] + n, cuda_graph=True, fuse=True,
                      compile=compile)
    with torch.inference_mode():
        dec.generate(embeds, mask, n)
        return dec.generate(embeds, mask, n).tolist()  # the second call replays the captured graph


def _skip_unless_supported(mode: str) -> None:
    """fp8 needs sm89+, int4 sm80+ (asked inside the test: CUDA is not initialised while tests are collected)."""
    need = {"fp8": (8, 9), "int4": (8, 0)}.get(mode)
    if need and torch.cuda.get_device_capability() < need:
        pytest.skip(f"--quantize {mode} needs compute capability {need}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode,compile", [("int8", False), ("int8", True), ("fp8", False), ("fp8", True),
                                          ("int4", False)])
def test_quantized_fast_decoder_with_cuda_graphs_matches_bf16(mode, compile):
    """bf16 on CUDA, 32 prompts, 8 greedy tokens: the quantized LLM decoded as chat/serve decode it (fused groups,
    CUDA graph, optionally compiled) gives bf16's answer on most prompts (the same check on CPU, bf16: int8 31-32/32,
    fp8 32/32). Widths are multiples of 1024: int4's tinygemm layout pads the input width to one, which would eat the
    saving."""
    _skip_unless_supported(mode)
    llm = tiny_llm(torch.bfloat16, "cuda", **WIDE)
    torch.manual_seed(1)
    embeds = torch.randn(32, 24, WIDE["hidden_size"], device="cuda", dtype=torch.bfloat16)
    ref = _greedy(llm, embeds, compile=False)
    assert len({tuple(r) for r in ref}) >= 16  # the prompts decide the answers: agreement is not trivial
    quantized = copy.deepcopy(llm)
    report = quantize_llm(quantized, mode)
    assert report.layers == 14 and all(is_quantized(m.weight) for m in decoder_linears(quantized))
    assert report.linear_bytes_after < report.linear_bytes_before / (3.0 if mode == "int4" else 1.9)
    out = _greedy(quantized, embeds, compile=compile)
    same = sum(o == r for o, r in zip(out, ref, strict=True)) / len(ref)
    first = sum(o[0] == r[0] for o, r in zip(out, ref, strict=True)) / len(ref)
    if mode == "int4":  # 4 bits: coarser; it must still follow the prompts
        assert first >= 0.5, (same, first)
    else:
        assert same >= 0.75, (same, first)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quantized_assistant_answers_on_cuda(tiny_run, shapes_data):
    """The whole loader on CUDA (bf16 run, --quantize int8 and, where supported, fp8/int4): greedy answers through
    FastDecoder come back as text."""
    cap = torch.cuda.get_device_capability()
    modes = ["int8"] + (["fp8"] if cap >= (8, 9) else []) + (["int4"] if cap >= (8, 0) else [])
    conv = [[Turn("user", f"{IMAGE_PROMPT} {q}")] for q in QUESTIONS]
    images = [[shapes_data / "images/heldout_00000.png"]] * len(QUESTIONS)
    for mode in modes:
        a = Assistant.from_run(tiny_run, device="cuda", quantize=mode)
        out = a.generate(conv, images, GenerationSettings(max_new_tokens=4))
        assert len(out) == len(QUESTIONS) and all(isinstance(t, str) for t in out), mode


def test_only_the_cpu_build_noise_of_torchao_is_filtered(caplog):
    """Importing the package hides torchao's "Failed to load ...so" (CPU build of torch) and torch's enum note,
    nothing else torchao logs."""
    import logging

    import minigpt4qwen  # noqa: F401  (installs the filters)

    log = logging.getLogger("torchao")
    with caplog.at_level(logging.WARNING, logger="torchao"):
        log.warning("Failed to load /x/torchao/_C_cutlass_90a.abi3.so: Could not load this library")
        log.warning("something else went wrong")
        logging.getLogger("torch.utils._pytree").warning("<enum 'X'> is an Enum subclass and is now natively "
                                                         "supported by torch.compile")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["something else went wrong"] if torch.version.cuda is None else len(messages) == 2
