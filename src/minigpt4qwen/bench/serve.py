"""`minigpt4qwen bench serve`: the real HTTP API under 1-64 concurrent streaming clients, static vs continuous batching.

    minigpt4qwen bench serve --out serve.jsonl       # CUDA: EVA ViT-g + Q-Former + random:qwen-7b, both modes
    minigpt4qwen bench serve --device cpu --serve-clients 1,4 --serve-tokens 8   # tiny presets: proves it runs

For each batching mode the app of `minigpt4qwen serve` (`serve.api.build_app`) runs under uvicorn on a free local
port in this process, with the model `bench` built (random weights). At each concurrency level, every client sends
`--serve-requests` streaming requests one after another (one image + a question, greedy, `--serve-tokens` new tokens,
usage included) over HTTP, from a separate process (the load generator must not share the server's interpreter lock,
as it would not in a deployment); an untimed round at the highest level first captures the decoder's CUDA graphs. One JSON
line per (mode, level): aggregate output tokens/s (completion tokens of all requests / wall time), time to first
token p50/p95 (request sent -> first non-empty content delta), inter-token latency p95 (gaps between content deltas);
for continuous batching also the decode steps run and the scheduler thread's seconds by phase (`scheduler_s`:
admit, prefill, launch, wait for the device, stream, sampled steps; see serve/scheduler.py PHASES).

Random weights favour ids that stream no text (unknown to the tokenizer, special, whitespace, partial bytes): the
bench masks them at the LLM's output layer, in both modes alike (`_printable_tokens_only`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import json
import logging
import multiprocessing
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from PIL import Image

from ..config import Config, ModelConfig
from ..data.images import ImageProcessor
from ..runs import make_template
from ..serve.generate import Assistant
from .common import Bench

log = logging.getLogger("minigpt4qwen.bench")

MODES = ("static", "continuous")
QUESTION = "What is in the image? Describe it in detail."


@contextlib.contextmanager
def running_server(app, host: str = "127.0.0.1", port: int = 0, **config) -> Iterator[str]:
    """Serve `app` with uvicorn on a background thread (port 0: a free one); yields the base URL. `config`: more
    uvicorn.Config options (the API's limits: `ServeOptions.uvicorn_kwargs()`)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the API server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def png_data_url(size: int, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def _request(client, url: str, body: dict) -> dict:
    """One streaming request: when each content delta came, the completion tokens, the finish reason."""
    t0 = time.perf_counter()
    times: list[float] = []
    tokens, reason = None, None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            for choice in event["choices"]:
                if choice["delta"].get("content"):
                    times.append(time.perf_counter())
                reason = choice.get("finish_reason") or reason
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    if tokens is None or reason is None:
        raise RuntimeError("the stream ended without usage or finish reason")
    return {"ttft": times[0] - t0 if times else None, "gaps": list(np.diff(times)), "tokens": tokens,
            "reason": reason}


def drive(url: str, clients: int, requests_per_client: int, max_tokens: int, image_url: str) -> dict:
    """`clients` concurrent streaming clients, each sending its requests one after another."""
    import httpx

    body = {"model": "minigpt4qwen", "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                      {"type": "text", "text": QUESTION}]}]}
    done: list[dict] = []
    failures: list[str] = []

    async def client_loop(client) -> None:
        for _ in range(requests_per_client):
            try:
                done.append(await _request(client, url, body))
            except Exception as exc:  # noqa: BLE001 -- counted and reported, the other clients go on
                failures.append(repr(exc)[:200])

    async def run() -> float:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:
            t0 = time.perf_counter()
            await asyncio.gather(*(client_loop(client) for _ in range(clients)))
            return time.perf_counter() - t0

    wall = asyncio.run(run())
    ttft = [r["ttft"] for r in done if r["ttft"] is not None]
    gaps = [g for r in done for g in r["gaps"]]
    per_request = [r["tokens"] for r in done]
    return {"clients": clients, "requests": clients * requests_per_client, "ok": len(done), "failed": len(failures),
            "max_tokens": max_tokens, "output_tokens": sum(per_request), "tokens_per_request": per_request,
            "stopped_early": sum(r["reason"] == "stop" for r in done), "wall_s": wall,
            "tokens_per_s": sum(per_request) / wall, "ttft_p50_s": percentile(ttft, 50),
            "ttft_p95_s": percentile(ttft, 95), "itl_p95_s": percentile(gaps, 95), "errors": failures[:3]}


def _printable_tokens_only(bench: Bench) -> None:
    """Random weights favour ids that stream no text: past the tokenizer's vocabulary (the tiny tokenizer beside
    random:qwen-7b), special tokens (skipped when decoding), whitespace (held back) and partial UTF-8 bytes. A hook
    on the LLM's output layer masks them in both batching modes alike (HF generate and the slot decoder call the
    same module), so that every new token is streamed text and time to first token and inter-token gaps exist."""
    tok = bench.tokenizer
    head = bench.model.llm.get_output_embeddings()
    vocab = head.weight.shape[0]
    banned = torch.ones(vocab, dtype=torch.bool)
    for i in range(min(vocab, len(tok))):
        text = tok.decode([i], skip_special_tokens=True)
        banned[i] = not text.strip() or "\ufffd" in text
    banned[[i for i in tok.all_special_ids if i < vocab]] = True
    banned = banned.to(head.weight.device)
    head.register_forward_hook(lambda module, args, out: out.masked_fill(banned, torch.finfo(out.dtype).min))


def serve_section(bench: Bench) -> None:
    """Both batching modes (or --serve-modes) at every level of --serve-clients, one JSON line each."""
    a = bench.args
    levels = sorted({int(c) for c in a.serve_clients.split(",")})
    modes = [m.strip() for m in a.serve_modes.split(",")]
    if unknown := set(modes) - set(MODES):
        raise ValueError(f"--serve-modes: unknown {sorted(unknown)}; choose from {MODES}")
    _printable_tokens_only(bench)
    template = make_template(Config(model=ModelConfig(num_query_tokens=a.num_query_tokens)), bench.tokenizer,
                             bench.model.image_token_id)
    assistant = Assistant(bench.model, bench.tokenizer, template, ImageProcessor(bench.image_size, train=False),
                          max_txt_len=a.serve_prompt_budget, compile_decoder=a.serve_compile)
    image_url = png_data_url(bench.image_size, a.seed)
    switch = sys.getswitchinterval()  # the app sets the process's (ServeOptions.switch_interval_ms)
    try:
        for mode in modes:
            _mode_section(bench, assistant, mode, levels, image_url)
    finally:
        sys.setswitchinterval(switch)


def option_overrides(pairs: list[str]) -> dict:
    """`--serve-set FIELD=VALUE` pairs as ServeOptions keyword arguments, each value of its field's type."""
    from ..serve.api import ServeOptions

    defaults = ServeOptions()
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not hasattr(defaults, name) or isinstance(getattr(defaults, name), (list, dict)) or \
                dataclasses.is_dataclass(getattr(defaults, name)):
            raise ValueError(f"--serve-set {pair!r}: give FIELD=VALUE for a plain ServeOptions field")
        current = getattr(defaults, name)
        if isinstance(current, bool):
            if value.lower() not in ("true", "false"):
                raise ValueError(f"--serve-set {pair!r}: {name} takes true or false")
            out[name] = value.lower() == "true"
        else:
            kind = type(current) if current is not None else (lambda v: None if v == "None" else int(v))
            out[name] = kind(value)
    return out


def _mode_section(bench: Bench, assistant: Assistant, mode: str, levels: list[int], image_url: str) -> None:
    """One server with this batching mode: a warm-up round, then one record per concurrency level."""
    from ..serve.api import ServeOptions, build_app

    a = bench.args
    options = ServeOptions(batching=mode, max_batch=max(levels), limit_concurrency=None,
                           max_tokens_limit=a.serve_tokens, slot_len=a.serve_prompt_budget + a.serve_tokens)
    options = dataclasses.replace(options, **option_overrides(a.serve_set))
    app = build_app(assistant, options)
    spawn = multiprocessing.get_context("spawn")
    with running_server(app, **options.uvicorn_kwargs()) as url, \
            ProcessPoolExecutor(1, mp_context=spawn) as clients_process:

        worker = app.state.service.batcher

        def level(clients: int, requests_per_client: int) -> dict:
            bench.reset_peak()
            before = dict(getattr(worker, "seconds", {})), getattr(worker, "steps", 0)
            rec = clients_process.submit(drive, url, clients, requests_per_client, a.serve_tokens, image_url).result()
            extra = {}
            if before[0]:  # continuous: where the scheduler thread's time went during this level
                extra = {"decode_steps": worker.steps - before[1],
                         "scheduler_s": {k: round(v - before[0][k], 3) for k, v in worker.seconds.items()}}
            return {"mode": mode, **rec, "max_batch": options.max_batch, "compiled": a.serve_compile,
                    "prefill_chunk": options.prefill_chunk,
                    "switch_interval_ms": sys.getswitchinterval() * 1000, **extra,
                    "peak_mem_gib": bench.peak_mem_gib()}

        # untimed: the first requests capture the CUDA graphs and warm the allocator
        bench.attempt(f"serve-{mode}-warmup", lambda: level(max(levels), 1))
        for clients in levels:
            bench.attempt(f"serve-{mode}-c{clients}", lambda c=clients: level(c, a.serve_requests))
