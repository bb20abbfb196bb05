"""`bench generate`: batch-1 decode, HF generate against serve/fastdecode.py's FastDecoder, bf16 and weight-quantized.

    minigpt4qwen bench generate --variants fast-decode-compile-fused,fast-decode-compile-int8,fast-decode-compile-fp8

A `-int8` / `-fp8` / `-int4` variant (QUANT_VARIANTS; not in the default set) quantizes a copy of the LLM
(serve/quantize.py, what `--quantize` does; the bf16 LLM stays for the other variants, so peak memory counts both)
and decodes as chat/serve do (fused groups). It reports `llm_weight_gib` against the bf16 weights and
`answers_match_bf16`: the share of --gen-answers prompts (each with its own image) whose greedy answer, up to 32
tokens or a stop id, is identical to the bf16 FastDecoder's (CUDA graph, fused, not compiled: `chat` without
options). In a run with a quantized variant the compiled bf16 variants report it too: the floor that compiling alone
gives. With random weights (the default LLM) greedy answers are chaotic and flip easily: the quality gate (>= 98%
identical) is measured with a real LLM (--llm DIR) and enough prompts (--gen-answers 200).
"""

from __future__ import annotations

import copy
from functools import partial

import torch

from ..models.minigpt4qwen import MiniGPT4Qwen
from ..serve.fastdecode import FastDecoder
from ..serve.quantize import QUANTIZE_MODES, quantize_llm, tensor_bytes
from .common import GIB, Bench, timer

GENERATE_VARIANTS = ("hf-generate", "fast-decode", "fast-decode-fused", "fast-decode-compile", "fast-decode-compile-fused")
"""Also accepted: fast-decode[-autotune][-fused] (inductor max-autotune; its kernel search takes minutes)."""

QUANT_VARIANTS = ("fast-decode-int8", "fast-decode-compile-int8", "fast-decode-compile-fp8", "fast-decode-compile-int4")
"""Named with --variants (also fast-decode[-autotune]-int4, ...). They always run fused, as chat/serve do: compare
them with fast-decode[-compile]-fused. Quantizing switches on torchao's inductor settings (coordinate-descent tuning,
which also turns batch-1 matmuls into fused reductions) for the rest of the process: a bf16 compiled variant listed
after a quantized one is timed with the same settings."""

ANSWER_TOKENS = 32
"""Longest answer compared for `answers_match_bf16` (MME/POPE answers are a word or a sentence)."""


def answer_ids(row: torch.Tensor, eos: list[int]) -> list[int]:
    """A generated row up to and including its first stop id (the rest is padding)."""
    ids = row.tolist()
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


def hf_generate(model: MiniGPT4Qwen, embeds: torch.Tensor, mask: torch.Tensor, new_tokens: int, eos: list[int],
                pad_id: int, force_length: bool = False) -> torch.Tensor:
    """The baseline: HF generate from embeddings, greedy (serve/generate.py still uses it for sampling and beams)."""
    extra = {"min_new_tokens": new_tokens} if force_length else {}
    return model.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=eos or None, pad_token_id=pad_id, **extra)


def _quant(variant: str) -> str:
    """The --quantize mode a decode variant names (none for bf16 ones)."""
    return next((p for p in variant.split("-")[2:] if p in QUANTIZE_MODES), "none")


def generate_section(bench: Bench, variants: list[str]) -> None:
    """Batch-1 decode of --gen-tokens new tokens after a --gen-prompt text + one image prompt."""
    a, model = bench.args, bench.model
    model.eval()
    sample = bench.samples(1, a.seed + 1, a.gen_prompt, a.gen_prompt, 0.0)[0]
    with torch.inference_mode():
        embeds = model.inputs_embeds(sample.ids[None].to(bench.device), pixel_values=bench.images(1, a.seed + 1))
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=bench.device)
    n, prompt = a.gen_tokens, embeds.shape[1]
    reference: list[torch.Tensor] = []
    quality: list[torch.Tensor] = []  # the --gen-answers prompts' embeddings, made when a variant first needs them
    bf16_answers: list[list[list[int]]] = []
    eos = [bench.eos_id]

    def prompts() -> list[torch.Tensor]:
        """--gen-answers prompts of the timed prompt's length (each its own text and image): the quality set."""
        out = []
        for i, s in enumerate(bench.samples(a.gen_answers, a.seed + 100, a.gen_prompt, a.gen_prompt, 0.0)):
            with torch.inference_mode():
                out.append(model.inputs_embeds(s.ids[None].to(bench.device),
                                               pixel_values=bench.images(1, a.seed + 100 + i)))
        return out

    def answers(decoder: FastDecoder) -> list[list[int]]:
        k = min(n, ANSWER_TOKENS)
        return [answer_ids(decoder.generate(e, mask, k, eos)[0], eos) for e in quality]

    compare = any(_quant(v) != "none" for v in variants)  # the quality set is built only for quantized runs

    def run(name: str) -> dict:
        extra: dict = {}
        quant, compile_ = _quant(name), False
        if name == "hf-generate":
            def decode(k: int) -> torch.Tensor:
                with torch.inference_mode():
                    return hf_generate(model, embeds, mask, k, [], bench.pad_id, force_length=True)
        else:
            parts = set(name.split("-")[2:])
            compile_ = "max-autotune-no-cudagraphs" if "autotune" in parts else "compile" in parts
            llm = model.llm
            extra["llm_weight_gib"] = tensor_bytes(llm.parameters()) / GIB
            if quant != "none":
                llm = copy.deepcopy(model.llm)  # the bf16 LLM stays as it is for the other variants
                report = quantize_llm(llm, quant)
                extra.update(llm_weight_gib=report.llm_bytes_after / GIB,
                             llm_weight_gib_unquantized=report.llm_bytes_before / GIB, quantized_layers=report.layers)
            decoder = FastDecoder(llm, max_batch=1, max_len=prompt + n, fuse="fused" in parts or quant != "none",
                                  compile=compile_)

            def decode(k: int) -> torch.Tensor:
                return decoder.generate(embeds, mask, k)
        bench.reset_peak()
        decode(min(n, 8) if name == "hf-generate" else n)  # warm-up (and the CUDA graph capture)
        stop = timer(bench.device)
        for _ in range(a.gen_repeats):
            tokens = decode(n)
        seconds = stop()
        extra.update(new_tokens=n, prompt_tokens=prompt)
        if name == "hf-generate":
            reference.append(tokens)
        elif reference:  # share of positions where the greedy tokens agree (bf16 near-ties may flip a few)
            k = min(tokens.shape[1], reference[0].shape[1])
            extra["match_hf"] = float((tokens[:, :k] == reference[0][:, :k]).float().mean())
        if compare and (quant != "none" or compile_):
            if not bf16_answers:  # the reference: `chat` without options (fused, CUDA graph, not compiled)
                quality.extend(prompts())
                bf16_answers.append(answers(FastDecoder(model.llm, max_batch=1, max_len=prompt + n, fuse=True)))
            got = answers(decoder)
            extra.update(answers_match_bf16=sum(g == r for g, r in zip(got, bf16_answers[0], strict=True)) / len(got),
                         answers=len(got))
        runs = a.gen_repeats
        return {**bench.result(runs, n * runs, n * runs, seconds, runs * bench.flops.generate(prompt, n)), **extra}

    for name in variants:
        bench.attempt(name, partial(run, name))
