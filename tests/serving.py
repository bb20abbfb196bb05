"""Test helpers for the HTTP servers: run an ASGI app on a free local port, and load it with concurrent clients.

    from serving import load_test, running_server
    with running_server(build_app(assistant, options)) as url:
        stats = load_test(url, clients=32, requests=64, max_tokens=8)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import threading
import time
from collections.abc import Iterator


@contextlib.contextmanager
def running_server(app, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` with uvicorn on a background thread (port 0: a free one); yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
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
