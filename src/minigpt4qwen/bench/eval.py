"""`bench eval`: batched evaluation at real size with random weights.

    minigpt4qwen bench eval                                  # --suite model: MME-sized prompts, HF vs FastDecoder
    minigpt4qwen bench eval --suite all --preset 7b          # the `eval all` path on official-size files

`--suite model` times the model alone (vision + prefill + a few new tokens) on token ids. The other suites time what
`minigpt4qwen eval all` runs, end to end after the model is built: official-size synthetic files written in the
official layouts (MME 2,374 questions; POPE 3 x 3,000; MMBench 4,377 questions with 4/4/3/2 options in turn, each
asked once per rotation), read and checked, every image decoded and resized, answers generated through
`serve.generate.Assistant` (FastDecoder on CUDA), scored and written. One JSON line per benchmark, then the total.
Random weights never stop early, so every answer runs to its full length (an upper bound on decoding time).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import Config, ModelConfig
from ..data.images import ImageProcessor
from ..eval.mme import SUBTASKS
from ..eval.pope import SPLITS
from ..eval.run import DEFAULT_NEW_TOKENS, AssistantAnswers
from ..eval.suite import BENCHMARKS, evaluate_suite, read_suite
from ..runs import make_template
from ..serve.fastdecode import FastDecoder
from ..serve.generate import Assistant
from ..train.step import to_device
from .common import Bench, collate_samples, log, timer
from .generate import answer_ids, hf_generate

EVAL_VARIANTS = ("eval-hf-generate", "eval-fast-decode", "eval-fast-decode-fused")
SUITES = ("model", *BENCHMARKS, "all")
MME_QUESTIONS = {"existence": 60, "count": 60, "position": 60, "color": 60, "posters": 294, "celebrity": 340,
                 "scene": 400, "landmark": 400, "artwork": 400, "OCR": 40, "commonsense_reasoning": 140,
                 "numerical_calculation": 40, "text_translation": 40, "code_reasoning": 40}
"""Questions per subtask in the released MME (2,374 in all, two per image)."""
MME_SPLIT_LAYOUT = {"artwork", "celebrity", "landmark", "posters", "scene"}
MMBENCH_OPTIONS = (4, 4, 3, 2)
"""Option counts given to the synthetic MMBench rows in turn (3.25 rotations per question on average)."""
CATEGORIES = (("attribute_recognition", "FP-S"), ("image_scene", "CP"), ("spatial_relationship", "LR"))
OBJECTS = ("dog", "cat", "person", "car", "bicycle", "kite", "boat", "chair", "cup", "bench", "bird", "clock")


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
    new = a.eval_new_tokens or 3
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


# --------------------------------------------------------------------------------------------- the `eval all` path


def image_pool(n: int, px: int, seed: int) -> list[bytes]:
    """JPEG bytes of n smooth random px x 3/4 px images (photo-like sizes: what decoding and resizing cost)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        buf = io.BytesIO()
        small.resize((px, max(1, px * 3 // 4)), Image.BICUBIC).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_mme(root: Path, questions: int, pool: list[bytes]) -> Path:
    """MME's released layout; the official 2,374 keep MME's per-subtask counts, other sizes go round the subtasks."""
    per_image = {name: n // 2 for name, n in MME_QUESTIONS.items()} if questions == sum(MME_QUESTIONS.values()) \
        else {name: len(range(i, max(1, questions // 2), len(SUBTASKS))) for i, name in enumerate(SUBTASKS)}
    k = 0
    for name, images in per_image.items():
        split = name in MME_SPLIT_LAYOUT
        image_dir, text_dir = (root / name / "images", root / name / "questions_answers_YN") if split \
            else (root / name, root / name)
        for i in range(images):
            image_dir.mkdir(parents=True, exist_ok=True)
            text_dir.mkdir(parents=True, exist_ok=True)
            obj = OBJECTS[k % len(OBJECTS)]
            (image_dir / f"{i:04d}.jpg").write_bytes(pool[k % len(pool)])
            (text_dir / f"{i:04d}.txt").write_text(f"Is there a {obj} in this image? Please answer yes or no.\tYes\n"
                                                   f"Is there a {obj} in this picture? Please answer yes or no.\tNo\n")
            k += 1
    return root


def write_pope(root: Path, per_split: int, pool: list[bytes]) -> tuple[Path, Path]:
    """POPE's output/coco/coco_pope_<split>.json (JSON lines) and COCO val2014-named images, 6 questions each."""
    qdir, images = root / "output" / "coco", root / "val2014"
    qdir.mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    names = [f"COCO_val2014_{i:012d}.jpg" for i in range(math.ceil(per_split / 6))]
    for i, name in enumerate(names):
        (images / name).write_bytes(pool[i % len(pool)])
    for s, split in enumerate(SPLITS):
        rows = [{"question_id": q + 1, "image": names[q // 6], "text": f"Is there a {OBJECTS[(q + s) % len(OBJECTS)]} "
                 "in the image?", "label": "yes" if q % 2 == 0 else "no"} for q in range(per_split)]
        (qdir / f"coco_pope_{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, images


def write_mmbench(path: Path, questions: int, pool: list[bytes]) -> Path:
    """The official TSV columns, a base64 image in every row, a hint in every other row."""
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
              "comment", "split"]
    hint = ("The picture was taken in a small town near a river, where people gather at the market every morning "
            "to sell fruit, vegetables and bread.")
    images = [base64.b64encode(b).decode() for b in pool]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(header)
        for i in range(questions):
            n = MMBENCH_OPTIONS[i % len(MMBENCH_OPTIONS)]
            options = [f"a {OBJECTS[(i + j) % len(OBJECTS)]} next to the road" for j in range(n)] + [""] * (4 - n)
            category, l2 = CATEGORIES[i % len(CATEGORIES)]
            writer.writerow([i, f"Which of these is shown in the picture (question {i})?", hint if i % 2 else "",
                             *options, "ABCD"[i % n], category, images[i % len(images)], "synthetic", l2, "", "dev"])
    return path


def _time_phases(assistant: Assistant, device: torch.device) -> dict[str, float]:
    """Seconds spent (device-synced) in the assistant's phases, summed until reset: `prepare_s` (template, image
    tensors, vision tower, Q-Former, input embeddings), `decode_s` (prefill and greedy decoding), `text_s` (turning
    answer tokens into text). What a benchmark's time has beyond them (`other_s`) is waiting for images the loader
    threads have not decoded yet, scoring and writing."""
    phases = {"prepare_s": 0.0, "decode_s": 0.0, "text_s": 0.0}

    def wrap(obj, name: str, key: str) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            stop = timer(device)
            try:
                return fn(*args, **kwargs)
            finally:
                phases[key] += stop()

        setattr(obj, name, timed)

    wrap(assistant, "prepare", "prepare_s")
    wrap(assistant, "_fast_decode", "decode_s")
    wrap(assistant.tokenizer, "batch_decode", "text_s")
    return phases


def suite_section(bench: Bench) -> None:
    """Write the chosen benchmarks' files, then time reading them and `eval all`'s answering, scoring and writing."""
    a = bench.args
    chosen = BENCHMARKS if a.suite == "all" else (a.suite,)

    def run(root: Path) -> dict:
        t_write = time.perf_counter()
        pool = image_pool(min(64, max(a.mme_questions, a.pope_questions, a.mmbench_questions)), a.image_px, a.seed)
        paths = {"mme_root": write_mme(root / "MME", a.mme_questions, pool) if "mme" in chosen else None}
        paths["pope_root"], paths["pope_images"] = write_pope(root / "POPE", a.pope_questions, pool) \
            if "pope" in chosen else (None, None)
        paths["mmbench_tsv"] = write_mmbench(root / "mmbench_dev.tsv", a.mmbench_questions, pool) \
            if "mmbench" in chosen else None
        log.info("benchmark files written to %s in %.1f s", root, time.perf_counter() - t_write)
        stop = timer(bench.device)
        suite = read_suite(**paths)
        read_s = stop()
        log.info("read in %.1f s; answering", read_s)
        template = make_template(Config(model=ModelConfig(num_query_tokens=a.num_query_tokens)), bench.tokenizer,
                                 bench.model.image_token_id)
        assistant = Assistant(bench.model, bench.tokenizer, template, ImageProcessor(bench.image_size, train=False))
        tokens = {name: a.eval_new_tokens or DEFAULT_NEW_TOKENS[name] for name in chosen}
        phases = _time_phases(assistant, bench.device)
        bench.reset_peak()

        def done(name: str, r: dict) -> None:
            spent = dict(phases)
            spent["other_s"] = r["seconds"] - sum(phases.values())
            phases.update(dict.fromkeys(phases, 0.0))
            bench.emit({"variant": f"eval-{name}", "questions": r["questions"], "asked": r["asked"],
                        "total_s": r["seconds"], "asked_per_s": r["asked"] / r["seconds"], "batch_size": a.eval_batch,
                        "max_new_tokens": tokens[name], **spent, "peak_mem_gib": bench.peak_mem_gib()})

        combined = evaluate_suite(lambda name: AssistantAnswers(assistant, tokens[name]), suite, root / "out",
                                  a.eval_batch, progress=False, on_done=done)
        return {"benchmarks": list(combined["benchmarks"]), "total_s": read_s + combined["total_seconds"],
                "read_s": read_s, "answer_s": combined["total_seconds"],
                "asked": sum(r["asked"] for r in combined["benchmarks"].values()), "batch_size": a.eval_batch,
                "image_px": a.image_px, "tokenizer": a.tokenizer or "tiny byte-level BPE (prompts ~2.5x Qwen's)",
                "peak_mem_gib": bench.peak_mem_gib(), "out": str(root / "out") if a.data_dir else None}

    def timed() -> dict:
        if a.data_dir:
            return run(Path(a.data_dir))
        with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
            return run(Path(tmp))

    bench.attempt("eval-total", timed)
