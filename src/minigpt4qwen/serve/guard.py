"""What keeps the API server up when clients misbehave, beside the checks on a request's content (api.py): a shared
budget for image decoding, a header-read timeout uvicorn lacks, and the refusal to expose an unauthenticated server.

uvicorn closes idle kept-alive connections (`timeout_keep_alive`) and answers 503 past `limit_concurrency`, but it
has no timeout for reading a request's headers: a client that sends them one byte at a time (slowloris) holds its
connection forever. `header_timeout_protocol` adds one to uvicorn's h11 protocol. In front of the internet, run the
server behind a reverse proxy all the same (nginx: `client_header_timeout`, `client_body_timeout`,
`client_max_body_size`, `limit_conn`), which also terminates TLS.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class DecodeBudget:
    """Pixels being decoded at once over all requests; a request waits for room instead of the server decoding many
    full-size uploads together (Pillow holds 4 bytes a pixel).

    Decoding runs on `workers` threads of its own: each thread's malloc arena keeps the memory of the largest image
    it decoded after the image is freed, so few threads keep the resident size bounded after a burst too.
    """

    def __init__(self, total_pixels: int, workers: int = 2) -> None:
        self.total = max(1, total_pixels)
        self.used = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="decode")

    @property
    def waiting(self) -> int:
        return sum(not w.done() for w in self._waiters)

    async def run(self, pixels: int, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` on a decode thread once `pixels` fit the budget (an image larger than the whole budget runs
        alone). The pixels stay counted until `fn` returns, even when the request that asked is cancelled."""
        need = min(pixels, self.total)
        loop = asyncio.get_running_loop()
        while self.used + need > self.total:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                self._waiters.remove(waiter)
        self.used += need
        task = asyncio.ensure_future(loop.run_in_executor(self._pool, fn, *args))

        def release(done: asyncio.Future) -> None:
            self.used -= need
            for w in self._waiters:
                if not w.done():
                    w.set_result(None)
            if not done.cancelled():
                done.exception()  # retrieved: an abandoned decode that failed is not logged as "never retrieved"

        task.add_done_callback(release)
        return await asyncio.shield(task)


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete `seconds` after it opened
    or after its previous response."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class H11WithHeaderTimeout(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _armed_for: object = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            self._arm()  # first: the call below may already read the headers of a pipelined request
            super().on_response_complete()

        def handle_events(self) -> None:
            super().handle_events()
            if self._timer is not None and self.cycle is not self._armed_for:  # a new request's headers arrived
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._armed_for = self.cycle
            self._timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self) -> None:
            self._timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return H11WithHeaderTimeout


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_problem(host: str, api_key: str | None, insecure: bool) -> str | None:
    """Why the server must not start (one line), or None."""
    if api_key or insecure or is_loopback(host):
        return None
    return (f"--host {host} would let anyone who reaches it use the API without a key: pass --api-key KEY "
            "(or --insecure to serve without one)")
