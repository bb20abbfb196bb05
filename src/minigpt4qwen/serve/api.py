"""OpenAI-compatible HTTP API over the shared generation path, with requests of many clients batched together.

    minigpt4qwen serve --checkpoint RUN_DIR [--host 127.0.0.1 --port 8000 --api-key KEY --max-batch 8]
                       [--batching continuous|static]

Requests join and leave a running decode batch at every step (`--batching continuous`, scheduler.py, the default), or
are grouped into batches that run to their end through HF generate (`--batching static`, batcher.py).

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.chat.completions.create(model="minigpt4qwen", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "text", "text": "What is in the image?"}]}], max_tokens=64, stream=True)

Images come only as data: URLs (base64 PNG/JPEG), or from http(s) hosts named with --allow-remote-images; never from
a server path. Text and image parts keep their order inside a user message (an image part becomes the seed's
`<Img><ImageHere></Img>` prompt), so "image, then question" gives exactly the prompt of `minigpt4qwen chat`.
OpenAI semantics: temperature defaults to 1 (sampling) and 0 means greedy; `top_k` and `repetition_penalty` are
accepted as extensions (as vLLM does). System messages are accepted and ignored: the model answers with the system
prompt it was trained with (the template's).

A request is checked whole before it joins a batch, cheapest first and off the event loop where it costs: body size,
JSON and value ranges, text length, image count, each image's header and the request's declared pixels, then the
decoding (under a server-wide pixel budget, shrunk at once to the model's input size) and the tokenisation. Text is
encoded as text (`literal`, and the template's control-token handling): no role injection, no image markers by hand.
Server-level limits (header timeout, connection limit, exposure without a key) are in guard.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import secrets
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from ..data.conversation import IMAGE_PROMPT, OverlongError, Turn, literal
from ..data.images import (
    ImageError,
    ImageLimits,
    ImageTooLarge,
    TooManyImages,
    data_url_bytes,
    decode_image,
    probe_image,
)
from .args import (
    BODY_TIMEOUT_S,
    HEADER_TIMEOUT_S,
    KEEP_ALIVE_S,
    LIMIT_CONCURRENCY,
    MAX_DECODE_PIXELS,
    MAX_TEXT_CHARS,
    PREFILL_CHUNK,
    SWITCH_INTERVAL_MS,
)
from .args import add_serve_args as add_serve_args  # re-exported: the command's options live in args.py
from .batcher import Batcher, Delta, Failure, Finish, Job
from .generate import Assistant
from .guard import DecodeBudget, exposure_problem, header_timeout_protocol
from .scheduler import Scheduler
from .schema import DEFAULT_MAX_TOKENS, ApiError, ChatRequest, ContentPart, Message, invalid_request
from .session import ConversationError, check_conversation, turn_content

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------- the service


@dataclass
class ServeOptions:
    model_name: str = "minigpt4qwen"
    api_key: str | None = None
    limits: ImageLimits = field(default_factory=ImageLimits)
    allowed_hosts: list[str] = field(default_factory=list)
    """Hosts remote image URLs may come from ("*": any); empty: data: URLs only."""
    max_batch: int = 8
    """Answers decoded together: the continuous scheduler's KV-cache slots, or the static batch's rows."""
    batch_window_s: float = 0.01
    batching: str = "continuous"
    """"continuous" (default): requests join and leave the running batch at every decode step (scheduler.py);
    "static": a batch runs to its end through HF generate while newcomers wait (batcher.py)."""
    prefill_chunk: int = PREFILL_CHUNK
    """continuous: prompt tokens prefilled between two decode steps (a longer prompt is split)."""
    graph_vision: bool = False
    """continuous, CUDA: run admissions' vision tower + Q-Former as captured graphs (serve/vision_graphs.py)."""
    switch_interval_ms: float | None = SWITCH_INTERVAL_MS
    """The process's thread switch interval once the app is built (`sys.setswitchinterval`); None: left as it is."""
    slot_len: int | None = None
    """continuous: positions (prompt + answer) per slot; None: the prompt budget + max_tokens_limit, less where the
    KV cache would not fit the GPU."""
    max_tokens_limit: int = 2048
    max_n: int = 8
    max_text_chars: int = MAX_TEXT_CHARS
    """Characters of text in one request (400 above); long histories are cut to the model's budget anyway."""
    max_request_bytes: int | None = None
    """Request body (413 above); None: room for the largest images in base64 plus the text, + 1 MiB."""
    max_decode_pixels: int = MAX_DECODE_PIXELS
    """Image pixels being decoded at once over all requests (others wait)."""
    body_timeout_s: float = BODY_TIMEOUT_S
    """A request body not received within this time gets a 408."""
    header_timeout_s: float = HEADER_TIMEOUT_S
    """uvicorn: a connection whose request headers are incomplete this long after it opened (or after its last
    response) is closed."""
    keep_alive_s: int = KEEP_ALIVE_S
    limit_concurrency: int | None = LIMIT_CONCURRENCY
    """uvicorn: connections + requests in progress; beyond it new requests get 503."""
    max_header_bytes: int = 16 * 1024
    """uvicorn (h11): request line + headers; larger gives 400."""

    def body_limit(self) -> int:
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        images = self.limits.max_count * (self.limits.max_bytes * 4 // 3 + 64)
        return images + 8 * self.max_text_chars + (1 << 20)

    def uvicorn_kwargs(self) -> dict:
        return {"http": header_timeout_protocol(self.header_timeout_s), "timeout_keep_alive": self.keep_alive_s,
                "limit_concurrency": self.limit_concurrency, "h11_max_incomplete_event_size": self.max_header_bytes}


class ChatService:
    """Request -> (turns, images, settings) -> batcher job; no HTTP here, so the checks are testable directly."""

    def __init__(self, assistant: Assistant, options: ServeOptions) -> None:
        self.assistant = assistant
        self.options = options
        self.context = int(getattr(assistant.model.llm.config, "max_position_embeddings", 0) or 1 << 30)
        self.batcher: Batcher | Scheduler
        if options.batching == "static":
            self.batcher = Batcher(assistant, options.max_batch, options.batch_window_s)
        elif options.batching == "continuous":
            self.batcher = Scheduler(assistant, options.max_batch, prefill_chunk=options.prefill_chunk,
                                     graph_vision=options.graph_vision,
                                     max_len=options.slot_len or assistant.max_txt_len + options.max_tokens_limit)
            self.context = min(self.context, self.batcher.max_len)  # a slot holds prompt + answer
            self.batcher.start()  # the KV cache and every CUDA graph now, not in the first request's time
        else:
            raise ValueError(f"batching must be 'continuous' or 'static', not {options.batching!r}")
        self.decode_budget = DecodeBudget(options.max_decode_pixels,
                                          workers=options.max_decode_pixels // options.limits.max_pixels)

    async def images(self, urls: list[str]) -> list[torch.Tensor]:
        """Every image's header is read and the request's declared pixels checked before any image is decoded."""
        limits = self.options.limits
        try:
            probed = [await self._probe(url) for url in urls]
            pixels = [img.width * img.height for img in probed]
            limits.check_request_pixels(sum(pixels))
            return [await self.decode_budget.run(n, self._decode, img) for n, img in zip(pixels, probed)]
        except ValueError as exc:
            code = "image_too_large" if isinstance(exc, ImageTooLarge) else "invalid_image"
            raise ApiError(400, f"invalid image: {exc}", code=code, param="messages") from None

    async def _probe(self, url: str) -> Image.Image:
        limits = self.options.limits
        data = await asyncio.to_thread(data_url_bytes, url, limits)
        if data is None:
            data = await self._fetch(url)
        return await asyncio.to_thread(probe_image, data, limits)

    def _decode(self, img: Image.Image) -> torch.Tensor:
        """The image as the model's input tensor (resized and normalised here, on a worker thread, not on the thread
        that decodes tokens): a request waiting for its turn holds that, not the upload."""
        processor = self.assistant.processor
        small = processor.shrink(decode_image(img))
        if small is not img:
            img.close()  # the probed image keeps the decoded pixels while the request lists it, until closed
        return small if processor.train else processor(small)

    async def _fetch(self, url: str) -> bytes:
        parts = urlsplit(url)
        hosts = self.options.allowed_hosts
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ImageError("image_url must be a data: URL (base64 PNG/JPEG) or an http(s) URL")
        if "*" not in hosts and parts.hostname not in hosts:
            raise ImageError(f"remote images from {parts.hostname} are not allowed (server option "
                             "--allow-remote-images); send the image as a base64 data: URL")
        import httpx

        limit = self.options.limits.max_bytes
        try:
            async with httpx.AsyncClient(timeout=10, follow_redirects=False) as client, \
                    client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise ImageError(f"fetching {url} gave HTTP {resp.status_code}")
                data = b""
                async for chunk in resp.aiter_bytes():
                    data += chunk
                    if len(data) > limit:
                        raise ImageTooLarge(f"image at {url} is larger than the limit of {limit} bytes")
        except httpx.HTTPError as exc:  # unreachable host, timeout: the client's URL, a 400 and not a 500
            raise ImageError(f"fetching {url} failed ({type(exc).__name__}); check the URL or send a data: URL") \
                from None
        return data

    async def conversation(self, messages: list[Message]) -> tuple[list[Turn], list[Image.Image]]:
        turns: list[Turn] = []
        urls: list[str] = []
        try:
            for m in messages:
                if m.role in ("system", "developer"):
                    continue  # the template's (trained) system prompt is used
                parts = [ContentPart(type="text", text=m.content)] if isinstance(m.content, str) else (m.content or [])
                pieces = []
                for part in parts:
                    if part.type == "text":
                        pieces.append(literal(part.text or ""))
                    elif m.role != "user" or part.image_url is None:
                        raise ConversationError("image_url parts belong in user messages")
                    else:
                        urls.append(part.image_url.url)
                        pieces.append(IMAGE_PROMPT)
                turns.append(Turn(m.role, turn_content(pieces)))
            check_conversation(turns, len(urls), self.options.limits)  # the image count before any image is read
        except (ConversationError, TooManyImages) as exc:
            raise ApiError(400, str(exc), param="messages") from None
        return turns, await self.images(urls)

    def _prompt_tokens(self, turns: list[Turn]) -> int:
        try:
            return len(self.assistant.template.encode(turns, self.assistant.max_txt_len, True).input_ids)
        except OverlongError as exc:
            raise ApiError(400, str(exc), code="context_length_exceeded", param="messages") from None
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages") from None

    async def job(self, req: ChatRequest, on_event) -> Job:
        """Validate a request completely before it reaches the batch, so one bad request never fails others."""
        if req.model != self.options.model_name:
            raise ApiError(404, f"model {req.model!r} does not exist; GET /v1/models lists "
                                f"{self.options.model_name!r}", code="model_not_found", param="model")
        if req.n > self.options.max_n or (req.n > self.options.max_batch and self.options.batching == "continuous"):
            most = min(self.options.max_n, self.options.max_batch)
            raise ApiError(400, f"n is {req.n}; at most {most}", param="n")
        stops = req.stops()
        if (chars := req.text_chars()) > self.options.max_text_chars:
            raise ApiError(400, f"the request has {chars} characters of text; at most {self.options.max_text_chars}",
                           code="string_above_max_length", param="messages")
        turns, images = await self.conversation(req.messages)
        prompt = await asyncio.to_thread(self._prompt_tokens, turns)  # a long prompt must not stall the event loop
        room = self.context - prompt
        wanted = req.max_completion_tokens or req.max_tokens
        if wanted is not None and (wanted > self.options.max_tokens_limit or wanted > room):
            raise ApiError(400, f"max_tokens is {wanted}, but the prompt takes {prompt} of the model's {self.context} "
                                f"positions and the server allows at most {self.options.max_tokens_limit}",
                           code="context_length_exceeded", param="max_tokens")
        if room < 1:
            raise ApiError(400, f"the prompt takes {prompt} tokens; the model holds {self.context}",
                           code="context_length_exceeded", param="messages")
        max_new = wanted or min(DEFAULT_MAX_TOKENS, room, self.options.max_tokens_limit)
        return Job(turns, images, req.settings(max_new), on_event, n=req.n, stop=stops, prompt_tokens=prompt)


class Mailbox:
    """Events from the decoding thread to the event loop: one loop wake-up for everything posted since the last one.

    A step of 64 streaming rows posts 64 events; `loop.call_soon_threadsafe` for each would write to the loop's
    wake-up socket 64 times per step (a system call each, and each releases the interpreter lock the decoding
    thread needs next). Posting here queues the call and wakes the loop only when it is not already woken."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._calls: list[tuple] = []

    def post(self, fn, arg) -> None:
        """Run `fn(arg)` on the loop soon, after what was posted before (any thread)."""
        with self._lock:
            self._calls.append((fn, arg))
            if len(self._calls) > 1:
                return  # a wake-up is on its way and will run this call too
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for fn, arg in calls:
            fn(arg)


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def build_app(assistant: Assistant, options: ServeOptions | None = None) -> FastAPI:
    """The FastAPI app; the batching worker starts with the first request and stops with the app."""
    options = options or ServeOptions()
    if options.switch_interval_ms is not None:  # process-wide: the server owns its process
        sys.setswitchinterval(options.switch_interval_ms / 1000)
    service = ChatService(assistant, options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(service.batcher.close)

    # the schema would be the one route a client reaches without the key: none when there is a key
    app = FastAPI(title="minigpt4qwen", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None if options.api_key else "/openapi.json")
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return await api_error(request, ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return await api_error(request, ApiError(400, str(exc.errors()[0].get("msg", exc))))

    def auth(request: Request) -> None:
        if options.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), options.api_key.encode()):
            raise ApiError(401, "missing or incorrect API key (Authorization: Bearer KEY)", code="invalid_api_key")

    def model_card() -> dict:
        return {"id": options.model_name, "object": "model", "created": 0, "owned_by": "minigpt4qwen"}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}", dependencies=[Depends(auth)])
    async def model(model: str) -> dict:
        if model != options.model_name:
            raise ApiError(404, f"model {model!r} does not exist", code="model_not_found", param="model")
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(request: Request):
        body = await _body(request, options.body_limit(), options.body_timeout_s)
        try:
            req = await asyncio.to_thread(ChatRequest.model_validate_json, body)
        except ValidationError as exc:
            raise invalid_request(exc) from None
        loop = asyncio.get_running_loop()
        if getattr(app.state, "mailbox", None) is None or app.state.mailbox.loop is not loop:
            app.state.mailbox = Mailbox(loop)
        events: asyncio.Queue = asyncio.Queue()
        job = await service.job(req, functools.partial(app.state.mailbox.post, events.put_nowait))
        service.batcher.submit(job)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": options.model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _JobStream(job, _sse(job, events, head, include_usage), media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        collect = asyncio.ensure_future(_collect(job, events))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():  # the client went away (or the server stops): its rows stop at the next step
                job.cancelled = True
                collect.cancel()
        if collect.cancelled():
            return Response(status_code=499)  # nobody reads it
        finished = collect.result()
        choices = [{"index": f.index, "message": {"role": "assistant", "content": f.text}, "logprobs": None,
                    "finish_reason": f.reason} for f in sorted(finished, key=lambda f: f.index)]
        return {**head, "object": "chat.completion", "choices": choices,
                "usage": _usage(job.prompt_tokens, sum(f.completion_tokens for f in finished))}

    return app


async def _body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refused with 413 past `limit` bytes (from Content-Length before reading, when sent) and with
    408 when it is not all there within `timeout_s`."""
    too_large = ApiError(413, f"request body exceeds {limit} bytes", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()

    async def read() -> None:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise too_large

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"request body not received within {timeout_s:g} s", code="request_timeout") from None
    return bytes(body)


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body is read by then, so nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _JobStream(StreamingResponse):
    """The answer's event stream; its job stops however the response ends, even before the first chunk (when the
    event generator, never started, would not run its own cleanup)."""

    def __init__(self, job: Job, content, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancelled = True


def _failed(ev: Failure) -> ApiError:
    return ApiError(500, f"generation failed: {ev.error}", type_="server_error")


async def _collect(job: Job, events: asyncio.Queue) -> list[Finish]:
    finished: list[Finish] = []
    while len(finished) < job.n:
        ev = await events.get()
        if isinstance(ev, Failure):
            raise _failed(ev)
        if isinstance(ev, Finish):
            finished.append(ev)
    return finished


async def _sse(job: Job, events: asyncio.Queue, head: dict, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format: role chunk, content deltas, finish chunk, [usage], [DONE].

    When the stream falls behind the decoder (deltas of one answer queue up while the event loop is busy), the queued
    deltas go out as one chunk: the client gets the same text with fewer, larger chunks instead of a growing lag."""
    import json

    def chunk(choices: list[dict], **extra) -> str:
        usage = {"usage": None} if include_usage else {}
        return "data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": choices, **usage,
                                      **extra}, ensure_ascii=False) + "\n\n"

    def choice(index: int, delta: dict, reason: str | None = None) -> list[dict]:
        return [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}]

    done, completion = 0, 0
    try:
        for i in range(job.n):
            yield chunk(choice(i, {"role": "assistant", "content": ""}))
        held: list = []  # an event taken while merging deltas, to handle next
        while done < job.n:
            ev = held.pop() if held else await events.get()
            while isinstance(ev, Delta) and not events.empty():  # behind: one chunk for the deltas already here
                more = events.get_nowait()
                if not (isinstance(more, Delta) and more.index == ev.index):
                    held.append(more)
                    break
                ev = Delta(ev.index, ev.text + more.text)
            if isinstance(ev, Failure):
                yield "data: " + json.dumps(_failed(ev).body()) + "\n\n"
                break
            if isinstance(ev, Delta):
                yield chunk(choice(ev.index, {"content": ev.text}))
            else:
                done, completion = done + 1, completion + ev.completion_tokens
                yield chunk(choice(ev.index, {}, ev.reason))
        if include_usage:
            yield chunk([], usage=_usage(job.prompt_tokens, completion))
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True  # a client that went away stops its rows; after the end this changes nothing


# ---------------------------------------------------------------------- running


def batching_of(args: argparse.Namespace) -> str:
    """--batching as given; unset: continuous, or static with --compile-decode (what that flag selected before the
    continuous decoder could be compiled: `--batching continuous --compile-decode` compiles the slot decoder)."""
    return args.batching or ("static" if getattr(args, "compile_decode", False) else "continuous")


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    limits = ImageLimits(args.max_image_bytes, args.max_image_pixels, max_count=args.max_images,
                         max_request_pixels=args.max_request_pixels)
    return ServeOptions(
        model_name=args.model_name, api_key=args.api_key, allowed_hosts=list(args.allowed_hosts or []), limits=limits,
        max_batch=args.max_batch, batching=batching_of(args), prefill_chunk=args.prefill_chunk,
        slot_len=args.slot_len or None, max_tokens_limit=args.max_tokens_limit, max_text_chars=args.max_text_chars,
        max_request_bytes=args.max_request_bytes, max_decode_pixels=args.max_decode_pixels,
        body_timeout_s=args.body_timeout, header_timeout_s=args.header_timeout, keep_alive_s=args.keep_alive_timeout,
        limit_concurrency=args.limit_concurrency or None, switch_interval_ms=args.switch_interval_ms,
        graph_vision=args.graph_vision,
    )


def run_api(args: argparse.Namespace) -> int:
    import uvicorn

    problem = exposure_problem(args.host, args.api_key, args.insecure)
    if problem:  # before the model loads: a refused start costs nothing
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if not args.api_key:
        print(f"warning: no --api-key: every client that reaches {args.host}:{args.port} can use the API",
              file=sys.stderr)
    options = options_from_args(args)
    assistant = Assistant.from_args(args)
    log.info("serving %s as %r on http://%s:%d/v1", args.checkpoint, options.model_name, args.host, args.port)
    uvicorn.run(build_app(assistant, options), host=args.host, port=args.port, log_level="info",
                **options.uvicorn_kwargs())
    return 0
