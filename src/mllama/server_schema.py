"""Request bodies of the OpenAI-compatible API (pydantic) and the OpenAI error shape.

Every model forbids fields it does not know, so a field mllama does not implement (tools,
response_format, logit_bias, ...) is a 400 that names it rather than something silently ignored.
Besides OpenAI's fields, both endpoints take `top_k`, `min_p`, `repetition_penalty` and
`ignore_eos` (generate up to max_tokens whatever the model's end-of-turn tokens say), and
`/v1/completions` takes `images`: a list of image URLs (data: or http(s)), one per `<|image|>` in
the prompt, in order.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             503: "service_unavailable", 500: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[Part]]
    name: str | None = None

    @model_validator(mode="after")
    def _images_from_users(self) -> "Message":
        if self.role != "user" and isinstance(self.content, list) and \
                any(isinstance(p, ImagePart) for p in self.content):
            raise ValueError(f"only user messages may carry images, not {self.role} messages")
        return self


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields both endpoints share."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    stop: Union[str, list[str], None] = Field(default=None, validate_default=True)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: Union[str, list[str], None]) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stops)}")
        if not all(stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value not in (None, 0, 0.0):
            raise ValueError("only 0 is supported (use repetition_penalty instead)")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "_Sampling":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream=true")
        return self


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _checks(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs=true")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_completion_tokens: disagrees with max_tokens; give one of them")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str
    images: list[str] = Field(default_factory=list)
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: Literal[False] = False

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def logprob_count(self) -> int | None:
        return self.logprobs


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate a decoded JSON body; a problem becomes a 400 naming its field (of a union's failed
    branches, the one that got furthest into the value)."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        errors = [(_param(e["loc"]), e) for e in err.errors()]
        param, first = max(errors, key=lambda pe: len(pe[1]["loc"]))
        message = str(first["msg"]).removeprefix("Value error, ")
        if not param and ": " in message:  # a check across fields names its field first
            param, message = message.split(": ", 1)
        if first["type"] == "extra_forbidden":
            raise APIError(400, f"unsupported parameter: {param!r} is not supported by this server",
                           param=param) from None
        if first["type"] == "missing":
            raise APIError(400, f"missing required parameter: {param!r}", param=param) from None
        raise APIError(400, f"invalid value for {param or 'the request'}: {message}", param=param or None) from None


_TYPE_TAGS = {"str", "int", "float", "bool", "none"}


def _param(loc: tuple[Any, ...]) -> str:
    """('messages', 0, 'content', 'list[...]', 1, 'image_url', 'image_url', 'url') ->
    'messages[0].content[1].image_url.url': pydantic's union-branch and discriminator tags dropped."""
    out: list[Any] = []
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out.append(part)
            continue
        if "[" in part or part in _TYPE_TAGS:
            continue
        if i >= 2 and isinstance(loc[i - 1], int) and "tagged-union" in str(loc[i - 2]):
            continue  # the discriminator tag; the field itself follows
        out.append(part)
    text = ""
    for part in out:
        text += f"[{part}]" if isinstance(part, int) else ("." if text else "") + part
    return text
