"""`bench eval`: MME-sized batched evaluation (vision + prefill + a few new tokens), HF generate against
FastDecoder."""

from __future__ import annotations

from functools import partial

import torch

from ..serve.fastdecode import FastDecoder
from ..train.step import to_device
from .common import Bench, collate_samples, timer
from .generate import answer_ids, hf_generate

EVAL_VARIANTS = ("eval-hf-generate", "eval-fast-decode", "eval-fast-decode-fused")


def eval_section(bench: Bench, variants: list[str]) -> None:
    """--eval-questions short-answer prompts (~60 text tokens + one image), large batches, vision included."""
    a, model = bench.args, bench.model
    model.eval()
    prompts = bench.samples(a.eval_questions, a.seed + 2, 50, 70, 0.0)
    order = sorted(range(len(prompts)), key=lambda i: -prompts[i].tokens)  # similar lengths share a prefill
    batches = [order[i : i + a.eval_batch] for i in range(0, len(order), a.eval_batch)]
    padded = [to_device(collate_samples([prompts[i] for i in idx], bench.pad_id, left=True), bench.device)
              for idx in batches]
    eos = [bench.eos_id]  # a stop id as evaluation passes one; random weights rarely emit it
    new = a.eval_new_tokens
    max_len = max(p.tokens for p in prompts) + new
    reference: list[list[int]] = []

    def run(name: str) -> dict:
        decoder = None
        if name != "eval-hf-generate":
            decoder = FastDecoder(model.llm, a.eval_batch, max_len, fuse=name.endswith("-fused"))

        def answer(i: int) -> torch.Tensor:
            with torch.inference_mode():
                images = bench.images(len(batches[i]), a.seed + 1000 + i)
                embeds = model.inputs_embeds(padded[i]["input_ids"], features=model.qformer_features(images))
                mask = padded[i]["attention_mask"]
                if decoder is None:
                    return hf_generate(model, embeds, mask, new, eos, bench.pad_id).cpu()
                return decoder.generate(embeds, mask, new, eos, bench.pad_id).cpu()

        bench.reset_peak()
        answer(0)  # warm-up; the last batch is smaller: its CUDA graph is captured here too, not while timed
        answer(len(batches) - 1)
        stop = timer(bench.device)
        rows = [answer_ids(r, eos) for i in range(len(batches)) for r in answer(i)]
        seconds = stop()
        generated = sum(len(r) for r in rows)
        flops = sum(bench.flops.generate(p.tokens, new, vision=True) for p in prompts)
        extra = {"questions": len(prompts), "batch_size": a.eval_batch, "total_s": seconds,
                 "questions_per_s": len(prompts) / seconds}
        if decoder is None:
            reference.extend(rows)
        elif reference:
            extra["match_hf"] = sum(x == y for x, y in zip(rows, reference, strict=True)) / len(rows)
        return {**bench.result(len(prompts), generated, len(batches), seconds, flops), **extra}

    for name in variants:
        bench.attempt(name, partial(run, name))
