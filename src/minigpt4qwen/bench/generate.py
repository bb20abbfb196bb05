"""`bench generate`: batch-1 decode, HF generate against serve/fastdecode.py's FastDecoder."""

from __future__ import annotations

from functools import partial

import torch

from ..models.minigpt4qwen import MiniGPT4Qwen
from ..serve.fastdecode import FastDecoder
from .common import Bench, timer

GENERATE_VARIANTS = ("hf-generate", "fast-decode", "fast-decode-fused", "fast-decode-compile", "fast-decode-compile-fused")
"""Also accepted: fast-decode[-autotune][-fused] (inductor max-autotune; its kernel search takes minutes)."""


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

    def run(name: str) -> dict:
        if name == "hf-generate":
            def decode(k: int) -> torch.Tensor:
                with torch.inference_mode():
                    return hf_generate(model, embeds, mask, k, [], bench.pad_id, force_length=True)
        else:
            parts = set(name.split("-")[2:])
            compile_ = "max-autotune-no-cudagraphs" if "autotune" in parts else "compile" in parts
            decoder = FastDecoder(model.llm, max_batch=1, max_len=prompt + n, fuse="fused" in parts,
                                  compile=compile_)

            def decode(k: int) -> torch.Tensor:
                return decoder.generate(embeds, mask, k)
        bench.reset_peak()
        decode(min(n, 8) if name == "hf-generate" else n)  # warm-up (and the CUDA graph capture)
        stop = timer(bench.device)
        for _ in range(a.gen_repeats):
            tokens = decode(n)
        seconds = stop()
        extra = {"new_tokens": n, "prompt_tokens": prompt}
        if name == "hf-generate":
            reference.append(tokens)
        elif reference:  # share of positions where the greedy tokens agree (bf16 near-ties may flip a few)
            k = min(tokens.shape[1], reference[0].shape[1])
            extra["match_hf"] = float((tokens[:, :k] == reference[0][:, :k]).float().mean())
        runs = a.gen_repeats
        return {**bench.result(runs, n * runs, n * runs, seconds, runs * bench.flops.generate(prompt, n)), **extra}

    for name in variants:
        bench.attempt(name, partial(run, name))
