"""OpenAI-compatible HTTP API over the shared generation path, with requests of many clients batched together.

    minigpt4qwen serve --checkpoint RUN_DIR [--host 127.0.0.1 --port 8000 --api-key KEY --max-batch 8]

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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException

from ..data.conversation import IMAGE_PROMPT, OverlongError, Turn
from ..data.images import ImageError, ImageLimits, ImageTooLarge, TooManyImages, data_url_bytes, open_image
from .args import add_serve_args as add_serve_args  # re-exported: the command's options live in args.py
from .batcher import Batcher, Delta, Failure, Finish, Job
from .generate import Assistant, GenerationSettings
from .session import ConversationError, check_conversation, turn_content

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256


# ---------------------------------------------------------------------- errors and request schema


class ApiError(Exception):
    """An OpenAI-style error: status code + {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)

    def settings(self, max_new_tokens: int) -> GenerationSettings:
        temperature = 1.0 if self.temperature is None else self.temperature
        return GenerationSettings(
            max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
            top_p=self.top_p or 1.0, top_k=self.top_k or 0, repetition_penalty=self.repetition_penalty or 1.0,
            seed=self.seed,
        )

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")
        return stops


def _validation_error(exc: ValidationError) -> ApiError:
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return ApiError(400, f"request body is not valid JSON: {err['msg']}", code="invalid_json")
    where = ".".join(str(x) for x in err["loc"])
    return ApiError(400, f"{where}: {err['msg']}", param=where or None)


# ---------------------------------------------------------------------- the service


@dataclass
class ServeOptions:
    model_name: str = "minigpt4qwen"
    api_key: str | None = None
    limits: ImageLimits = field(default_factory=ImageLimits)
    allowed_hosts: list[str] = field(default_factory=list)
    """Hosts remote image URLs may come from ("*": any); empty: data: URLs only."""
    max_batch: int = 8
    batch_window_s: float = 0.01
    max_tokens_limit: int = 2048
    max_n: int = 8


class ChatService:
    """Request -> (turns, images, settings) -> batcher job; no HTTP here, so the checks are testable directly."""

    def __init__(self, assistant: Assistant, options: ServeOptions) -> None:
        self.assistant = assistant
        self.options = options
        self.batcher = Batcher(assistant, options.max_batch, options.batch_window_s)
        self.context = int(getattr(assistant.model.llm.config, "max_position_embeddings", 0) or 1 << 30)

    async def image(self, url: str) -> Image.Image:
        limits = self.options.limits
        try:
            data = data_url_bytes(url, limits)
            if data is None:
                data = await self._fetch(url)
            return await asyncio.to_thread(open_image, data, limits)
        except ValueError as exc:
            code = "image_too_large" if isinstance(exc, ImageTooLarge) else "invalid_image"
            raise ApiError(400, f"invalid image: {exc}", code=code, param="messages") from None

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
        async with httpx.AsyncClient(timeout=10, follow_redirects=False) as client:
            async with client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise ImageError(f"fetching {url} gave HTTP {resp.status_code}")
                data = b""
                async for chunk in resp.aiter_bytes():
                    data += chunk
                    if len(data) > limit:
                        raise ImageTooLarge(f"image at {url} is larger than the limit of {limit} bytes")
        return data

    async def conversation(self, messages: list[Message]) -> tuple[list[Turn], list[Image.Image]]:
        turns: list[Turn] = []
        images: list[Image.Image] = []
        try:
            for m in messages:
                if m.role in ("system", "developer"):
                    continue  # the template's (trained) system prompt is used
                parts = [ContentPart(type="text", text=m.content)] if isinstance(m.content, str) else (m.content or [])
                pieces = []
                for part in parts:
                    if part.type == "text":
                        pieces.append(part.text or "")
                    elif m.role != "user" or part.image_url is None:
                        raise ConversationError("image_url parts belong in user messages")
                    else:
                        images.append(await self.image(part.image_url.url))  # raises ApiError (with its code)
                        pieces.append(IMAGE_PROMPT)
                turns.append(Turn(m.role, turn_content(pieces)))
            check_conversation(turns, len(images), self.options.limits)
        except (ConversationError, TooManyImages) as exc:
            raise ApiError(400, str(exc), param="messages") from None
        return turns, images

    async def job(self, req: ChatRequest, on_event) -> Job:
        """Validate a request completely before it reaches the batch, so one bad request never fails others."""
        if req.model != self.options.model_name:
            raise ApiError(404, f"model {req.model!r} does not exist; GET /v1/models lists "
                                f"{self.options.model_name!r}", code="model_not_found", param="model")
        if req.n > self.options.max_n:
            raise ApiError(400, f"n is {req.n}; at most {self.options.max_n}", param="n")
        stops = req.stops()
        turns, images = await self.conversation(req.messages)
        try:
            prompt = len(self.assistant.template.encode(turns, self.assistant.max_txt_len, True).input_ids)
        except OverlongError as exc:
            raise ApiError(400, str(exc), code="context_length_exceeded", param="messages") from None
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


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def build_app(assistant: Assistant, options: ServeOptions | None = None) -> FastAPI:
    """The FastAPI app; the batching worker starts with the first request and stops with the app."""
    options = options or ServeOptions()
    service = ChatService(assistant, options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(service.batcher.close)

    app = FastAPI(title="minigpt4qwen", lifespan=lifespan, docs_url=None, redoc_url=None)
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
        body = bytearray()
        limit = options.limits.max_bytes * options.limits.max_count * 4 // 3 + (1 << 20)
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"request body exceeds {limit} bytes", code="request_too_large")
        try:
            req = ChatRequest.model_validate_json(bytes(body))
        except ValidationError as exc:
            raise _validation_error(exc) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = await service.job(req, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        service.batcher.submit(job)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": options.model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(job, events, head, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            finished = await _collect(job, events)
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        choices = [{"index": f.index, "message": {"role": "assistant", "content": f.text}, "logprobs": None,
                    "finish_reason": f.reason} for f in sorted(finished, key=lambda f: f.index)]
        return {**head, "object": "chat.completion", "choices": choices,
                "usage": _usage(job.prompt_tokens, sum(f.completion_tokens for f in finished))}

    return app


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
    """Server-sent events in OpenAI's chunk format: role chunk, content deltas, finish chunk, [usage], [DONE]."""
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
        while done < job.n:
            ev = await events.get()
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


def run_api(args: argparse.Namespace) -> int:
    import uvicorn

    assistant = Assistant.from_run(args.checkpoint, device=args.device, compile_decoder=args.compile_decode)
    options = ServeOptions(
        model_name=args.model_name, api_key=args.api_key, allowed_hosts=list(args.allowed_hosts or []),
        limits=ImageLimits(args.max_image_bytes, args.max_image_pixels), max_batch=args.max_batch,
        max_tokens_limit=args.max_tokens_limit,
    )
    log.info("serving %s as %r on http://%s:%d/v1", args.checkpoint, options.model_name, args.host, args.port)
    uvicorn.run(build_app(assistant, options), host=args.host, port=args.port, log_level="info")
    return 0
