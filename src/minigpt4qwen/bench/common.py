"""What every bench section shares: timing, the synthetic samples and their batches (through `data.collate`), and
the `Bench` object (model, measured peak, records)."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..data.collate import collate
from ..data.conversation import IGNORE_INDEX
from ..data.dataset import length_grouped
from ..models.minigpt4qwen import MiniGPT4Qwen, build_model
from .flops import FlopModel

log = logging.getLogger("minigpt4qwen.bench")

RESULT_FIELDS = ("samples_per_s", "tokens_per_s", "step_s", "flops_per_sample", "mfu", "peak_mem_gib")
GIB = 2**30


# --------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timer(device: torch.device) -> Callable[[], float]:
    """Start a wall clock after the device is idle; calling the result syncs and returns the seconds since."""
    sync(device)
    t0 = time.perf_counter()

    def stop() -> float:
        sync(device)
        return time.perf_counter() - t0

    return stop


def matmul_peak(device: torch.device) -> float:
    """FLOP/s of one large matmul (bf16 8192^3 on CUDA, fp32 512^3 on CPU): the MFU denominator of this run."""
    cuda = device.type == "cuda"
    n, dtype, reps = (8192, torch.bfloat16, 50) if cuda else (512, torch.float32, 10)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    stop = timer(device)
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / stop()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc) or "ALLOC_FAILED" in str(exc)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------- synthetic data


@dataclass
class Sample:
    ids: torch.Tensor
    labels: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.ids.numel()

    @property
    def supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def item(self, pixel_values: torch.Tensor | None = None, features: torch.Tensor | None = None) -> dict:
        """The dataset item `collate` takes (data/dataset.py: no pixels when features are cached)."""
        return {"input_ids": self.ids, "labels": self.labels, "truncated": False,
                "pixel_values": pixel_values if features is None else None, "features": features}


def make_samples(n: int, seed: int, vocab: int, image_token_id: int, n_query: int, seq_min: int, seq_max: int,
                 answer_frac: float) -> list[Sample]:
    """Tokenizer-free prompts: a few text tokens, one image's placeholder run, more text; labels on a trailing span.

    Random ids stand in for text (throughput does not depend on which ids); the placeholder id is the real one so
    `model.embed` swaps in image features exactly as in training.
    """
    g = torch.Generator().manual_seed(seed)
    lo = 16 if vocab > 64 else 0
    out = []
    for _ in range(n):
        n_text = int(torch.randint(seq_min, seq_max + 1, (1,), generator=g))
        text = torch.randint(lo, vocab, (n_text,), generator=g)
        text = torch.where(text == image_token_id, (text + 1) % vocab, text)
        lead = min(8, n_text)
        ids = torch.cat([text[:lead], torch.full((n_query,), image_token_id), text[lead:]])
        labels = torch.full_like(ids, IGNORE_INDEX)
        n_answer = min(n_text - lead, max(1, round(answer_frac * n_text))) if answer_frac > 0 else 0
        if n_answer:
            labels[-n_answer:] = ids[-n_answer:]
        out.append(Sample(ids, labels))
    return out


def collate_samples(samples: list[Sample], pad_id: int, images: torch.Tensor | None = None,
                    features: torch.Tensor | None = None, length: int | None = None, left: bool = False) -> dict:
    """A `collate` batch of bench samples (row i gets images[i] / features[i]); `length`: the seed's pad-to-maximum
    and static-shape multiples, `left`: batched generation."""
    items = [s.item(None if images is None else images[i : i + 1], None if features is None else features[i : i + 1])
             for i, s in enumerate(samples)]
    return collate(items, pad_id, length, left)


def batch_order(lengths: list[int], batch_size: int, by_length: bool, seed: int) -> list[list[int]]:
    """Index batches: in sample order, or length-grouped by `train`'s own sampler function with one window over the
    whole pool (a global sort, then the batch order shuffled, the longest batch first)."""
    idx = list(range(len(lengths)))
    if by_length:
        idx = length_grouped(idx, lengths, batch_size, window=len(idx) // batch_size + 1, seed=seed)
    return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]


def random_images(n: int, size: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, device=device).to(dtype)


# --------------------------------------------------------------------------------------------- the run's state


class Bench:
    """The model, the measured peak and the records of one `bench` run."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        self.precision = "bf16" if device.type == "cuda" else "fp32"
        self.t0 = time.perf_counter()
        cfg = ModelConfig(vision=args.vision, qformer=args.qformer, llm=args.llm, tokenizer=args.tokenizer,
                          num_query_tokens=args.num_query_tokens, attn_implementation=args.attn_implementation)
        torch.manual_seed(args.seed)
        with torch.device(device):  # random init directly on the GPU: seconds instead of minutes on the host
            built = build_model(cfg, device)
        self.model: MiniGPT4Qwen = built.model
        self.tokenizer = tok = built.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else self.pad_id
        self.vocab = self.model.llm.config.vocab_size
        self.image_size = self.model.vision_model.config.image_size
        self.image_dtype = self.model.vision_model.embeddings.patch_embedding.weight.dtype
        self.flops = FlopModel.of(self.model, self.images(1, seed=args.seed))
        self.peak = matmul_peak(device)
        log.info("built in %.1f s; matmul peak %.1f TFLOP/s; tower %.3g FLOP/image",
                 time.perf_counter() - self.t0, self.peak / 1e12, self.flops.tower)
        self.records: list[dict] = []

    def samples(self, n: int, seed: int, seq_min: int | None = None, seq_max: int | None = None,
                answer_frac: float | None = None) -> list[Sample]:
        a = self.args
        return make_samples(n, seed, self.vocab, self.model.image_token_id, self.model.num_query_tokens,
                            a.seq_min if seq_min is None else seq_min, a.seq_max if seq_max is None else seq_max,
                            a.answer_frac if answer_frac is None else answer_frac)

    def images(self, n: int, seed: int) -> torch.Tensor:
        return random_images(n, self.image_size, self.image_dtype, self.device, seed)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mem_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / GIB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process high-water mark (KiB -> GiB)

    def result(self, samples: int, tokens: int, steps: int, seconds: float, flops: float) -> dict:
        """The common JSON fields from what a variant did in `seconds`."""
        return {"samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds, "step_s": seconds / steps,
                "flops_per_sample": flops / samples, "mfu": flops / seconds / self.peak,
                "peak_mem_gib": self.peak_mem_gib()}

    def attempt(self, name: str, fn: Callable[[], dict]) -> dict:
        """Run one variant; a failure (OOM, compile error) becomes an error record and the run continues."""
        if time.perf_counter() - self.t0 > self.args.budget_s:
            rec = {"variant": name, "error": f"skipped: past --budget-s {self.args.budget_s:.0f}"}
        else:
            log.info("variant %s", name)
            try:
                rec = {"variant": name, **fn()}
            except Exception as exc:  # one variant's failure must not cost the other numbers
                log.exception("variant %s failed", name)
                rec = {"variant": name, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        self.model.zero_grad(set_to_none=True)
        release(self.device)
        self.emit(rec)
        return rec

    def emit(self, rec: dict) -> None:
        rec = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in rec.items()}
        self.records.append(rec)
        line = json.dumps(rec)
        print(line, flush=True)
        if self.args.out:
            with open(self.args.out, "a") as f:
                f.write(line + "\n")
