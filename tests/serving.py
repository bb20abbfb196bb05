"""Test helpers for the HTTP servers: run an ASGI app on a free local port, and load it with concurrent clients.

    from serving import load_test, running_server
    with running_server(build_app(assistant, options)) as url:
        stats = load_test(url, clients=32, requests=64, max_tokens=8)
"""

from __future__ import annotations

import asyncio
import base64
import io
import statistics
import time

from PIL import Image

from minigpt4qwen.bench.serve import running_server  # the bench drives the same server

__all__ = ["load_test", "png_data_url", "running_server", "until"]


def png_data_url(img: Image.Image) -> str:
    """An image as the data: URL an API client sends."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def until(condition, what: str, deadline_s: float = 60.0) -> None:
    """Wait for `condition()`; the deadline only ends a test that fails (no timing is asserted)."""
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting: {what}")
        time.sleep(0.005)


def load_test(base_url: str, clients: int = 32, requests: int = 64, max_tokens: int = 8,
              model: str = "minigpt4qwen", api_key: str | None = None, image_url: str | None = None) -> dict:
    """`clients` concurrent streaming clients send `requests` requests in all; prints and returns the latencies."""
    import httpx
    import openai

    content: list[dict] = [{"type": "text", "text": "What is in the image?"}]
    if image_url:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    latencies: list[float] = []
    failures: list[str] = []

    async def run() -> float:
        http = httpx.AsyncClient(limits=httpx.Limits(max_connections=clients), timeout=300)
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key or "none", max_retries=0,
                                    http_client=http)
        todo = iter(range(requests))

        async def worker() -> None:
            for _ in todo:
                t0 = time.perf_counter()
                try:
                    stream = await client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
                        temperature=0, stream=True)
                    reasons = [c.choices[0].finish_reason async for c in stream if c.choices]
                    if not reasons or reasons[-1] not in ("stop", "length"):
                        raise RuntimeError(f"stream ended without a finish reason: {reasons[-3:]}")
                    latencies.append(time.perf_counter() - t0)
                except Exception as exc:  # counted, the load test goes on
                    failures.append(repr(exc))

        t0 = time.perf_counter()
        async with http:
            await asyncio.gather(*(worker() for _ in range(clients)))
        return time.perf_counter() - t0

    wall = asyncio.run(run())
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    stats = {"requests": requests, "clients": clients, "ok": len(latencies), "failed": len(failures),
             "p50_s": round(q[49], 3) if q else None, "p95_s": round(q[94], 3) if q else None,
             "wall_s": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 2), "errors": failures[:3]}
    print(f"load test: {clients} streaming clients, {requests} requests, {len(latencies)} ok, {len(failures)} failed; "
          f"latency p50 {stats['p50_s']} s, p95 {stats['p95_s']} s; {stats['requests_per_s']} requests/s")
    return stats
