"""The OpenAI request bodies the server accepts, as pydantic models, and its error object.

Fields follow OpenAI's API reference; a few extensions that vLLM and llama.cpp also
accept are marked (``top_k``, ``repetition_penalty``, ``ignore_eos``). Unknown fields
are ignored, as OpenAI's own server does for ones it deprecated. Validation errors
become a 400 with OpenAI's error object naming the parameter (see ``app.py``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 8  # choices per request: each is a row of the batch


class APIError(Exception):
    """An error answered with OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.kind = kind or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             429: "rate_limit_exceeded", 503: "server_error"}.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # extension; 0 and -1 are off
    max_tokens: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)  # extension
    ignore_eos: bool = False  # extension: keep generating past the end-of-text token (benchmarks)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        """A streamed answer ends with a chunk holding the token counts."""
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[dict[str, Any]] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class RagAskRequest(BaseModel):
    """``POST /v1/rag/ask``: a question answered from the server's knowledge base (``lmforge serve --kb``)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    question: str
    model: str | None = None
    k: int = Field(4, ge=1, le=50)
    method: Literal["bm25", "dense", "hybrid"] = "hybrid"
    min_score: float = 0.3
    max_tokens: int = Field(256, ge=1)


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class InspectRequest(BaseModel):
    """``POST /v1/inspect``: one text through the inspector (lmforge.inspector), the views at one focus."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str | None = None
    text: str = Field(min_length=1)
    target: str | None = None  # an encoder-decoder: what its decoder reads (default: its greedy reply)
    layer: int = 0
    head: int = 0
    position: int | None = None  # None: the last token; negative counts from the end
    temperature: float = Field(1.0, ge=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int = 0
    beams: int = Field(4, ge=1, le=16)
    beam_tokens: int = Field(8, ge=1, le=64)
    kv_steps: int = Field(16, ge=0, le=256)
    views: list[str] | None = None  # None: every view


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


def stop_list(stop: str | list[str] | None) -> list[str]:
    """OpenAI's ``stop`` (a string or a list) as a list of non-empty strings."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise APIError(400, "stop strings must not be empty", "stop")
    return stops
