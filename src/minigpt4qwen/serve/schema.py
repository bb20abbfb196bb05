"""The OpenAI chat-completions request as the API accepts it, and its error format.

Ranges are OpenAI's, narrowed where a value would break generation: such a request is the client's to fix (400),
never a server error (500).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from .generate import GenerationSettings

DEFAULT_MAX_TOKENS = 256
MIN_TEMPERATURE = 0.01
"""Below this (but above 0, greedy) the logits divided by the temperature overflow float32: inf/nan probabilities
(vLLM raises such temperatures to 0.01 for the same reason)."""


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
    """OpenAI's ranges, narrowed where a value would break generation (a client error, so a 400, never a 500)."""

    model: str
    messages: list[Message] = Field(min_length=1, max_length=4096)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.manual_seed takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, t: float | None) -> float | None:
        if t is not None and 0 < t < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return t

    def text_chars(self) -> int:
        """Characters of text in the request (messages and stop strings), counted before anything is tokenised."""
        n = sum(len(s) for s in ([self.stop] if isinstance(self.stop, str) else self.stop or []))
        for m in self.messages:
            parts = m.content if isinstance(m.content, list) else [ContentPart(type="text", text=m.content)]
            n += sum(len(p.text or "") for p in parts)
        return n

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


def invalid_request(exc: ValidationError) -> ApiError:
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return ApiError(400, f"request body is not valid JSON: {err['msg']}", code="invalid_json")
    where = ".".join(str(x) for x in err["loc"])
    return ApiError(400, f"{where}: {err['msg']}", param=where or None)
