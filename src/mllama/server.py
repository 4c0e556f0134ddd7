"""The OpenAI-compatible HTTP API over an Engine, as a Starlette app (`ApiServer.app`).

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus) and the chat page at /. Request handling: API key, size limit and JSON
body, validation (server_schema), images (image_fetch), prompt (server_prompt), then one engine
request per choice. Answers stream as server-sent events or come whole; a client that goes away
cancels its engine requests, so their slots are free after the engine's next step. Errors are
OpenAI error objects; an unexpected failure is logged here and answered as a bare 500.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mllama.engine import Engine
from mllama.image_fetch import ImageInputError, ImagePolicy, load_image_url
from mllama.processor import MllamaProcessor
from mllama.request import RequestHandle, SamplingParams
from mllama.server_metrics import CONTENT_TYPE, ServerMetrics
from mllama.server_prompt import Prompt, PromptBuilder, PromptError
from mllama.server_schema import APIError, ChatCompletionRequest, CompletionRequest, ImagePart, parse
from mllama.server_stream import Choice, StopText, chat_logprobs, completion_logprobs, merge

log = logging.getLogger("mllama.server")


@dataclass(frozen=True)
class ServerOptions:
    """model_name: the id /v1/models lists; api_key: required as a Bearer token when set; max_queue:
    generations that may wait for a slot before new requests get 429; max_body_bytes: request
    bodies beyond it get 413; defaults: SamplingParams fields used when a request leaves them out."""

    model_name: str = "mllama"
    api_key: str | None = None
    max_queue: int = 256
    max_body_bytes: int = 64 * 1024 * 1024
    images: ImagePolicy = field(default_factory=ImagePolicy)
    defaults: dict[str, Any] = field(default_factory=dict)
    stop_token_ids: tuple[int, ...] = ()


class ApiServer:
    def __init__(self, engine: Engine, processor: MllamaProcessor, *, options: ServerOptions) -> None:
        self.engine, self.processor, self.options = engine, processor, options
        self.builder = PromptBuilder(processor)
        self.draining = False
        self.active: set[RequestHandle] = set()  # engine requests of this server not yet released
        self.metrics = ServerMetrics(slots_in_use=lambda: engine.num_decoding, queue_depth=lambda: engine.num_waiting,
                                     active=lambda: len(self.active), max_slots=engine.max_slots, engine=engine)
        self.created = int(time.time())
        routes = [Route("/", self.page), Route("/health", self.health), Route("/metrics", self.prometheus),
                  Route("/v1/models", self.models), Route("/v1/models/{model:path}", self.model_info),
                  Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"])]
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: self._http_error,
                                                                Exception: self._unexpected})

    # ---- plain endpoints ---------------------------------------------------------------------------------------
    async def page(self, request: HTTPRequest) -> Response:
        html = (resources.files("mllama") / "static" / "chat.html").read_text(encoding="utf-8")
        return HTMLResponse(html)

    async def health(self, request: HTTPRequest) -> Response:
        if self.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok", "slots_in_use": self.engine.num_decoding,
                             "queue_depth": self.engine.num_waiting})

    async def prometheus(self, request: HTTPRequest) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.options.model_name, "object": "model", "created": self.created, "owned_by": "mllama"}

    async def models(self, request: HTTPRequest) -> Response:
        return await self._guarded("models", request, self._models)

    async def _models(self, request: HTTPRequest) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model_info(self, request: HTTPRequest) -> Response:
        async def answer(request: HTTPRequest) -> Response:
            if request.path_params["model"] != self.options.model_name:
                raise APIError(404, f"the model {request.path_params['model']!r} does not exist", param="model")
            return JSONResponse(self._model_card())
        return await self._guarded("models", request, answer)

    # ---- generation endpoints ----------------------------------------------------------------------------------
    async def chat(self, request: HTTPRequest) -> Response:
        return await self._guarded("chat", request, self._chat)

    async def completions(self, request: HTTPRequest) -> Response:
        return await self._guarded("completions", request, self._completions)

    async def _chat(self, request: HTTPRequest) -> Response:
        body = parse(ChatCompletionRequest, await self._json(request))
        messages, urls = [], []
        for i, message in enumerate(body.messages):
            role = "system" if message.role == "developer" else message.role
            if isinstance(message.content, str):
                messages.append({"role": role, "content": message.content})
                continue
            parts = []
            for j, part in enumerate(message.content):
                if isinstance(part, ImagePart):
                    urls.append((part.image_url.url, f"messages[{i}].content[{j}].image_url.url"))
                    parts.append({"type": "image"})
                else:
                    parts.append({"type": "text", "text": part.text})
            messages.append({"role": role, "content": parts})
        images = await self._images(urls)
        prompt = await self._prompt(self.builder.chat, messages, images)
        return await self._generate(request, body, prompt, chat=True)

    async def _completions(self, request: HTTPRequest) -> Response:
        body = parse(CompletionRequest, await self._json(request))
        images = await self._images([(url, f"images[{i}]") for i, url in enumerate(body.images)])
        prompt = await self._prompt(self.builder.raw, body.prompt, images)
        return await self._generate(request, body, prompt, chat=False)

    async def _images(self, urls: list[tuple[str, str]]) -> list[Any]:
        async def one(url: str, param: str) -> Any:
            try:
                return await load_image_url(url, self.options.images)
            except ImageInputError as err:
                raise APIError(err.status, f"{param}: {err}", param=param) from None
        return list(await asyncio.gather(*(one(url, param) for url, param in urls)))

    @staticmethod
    async def _prompt(build: Callable[..., Prompt], *args: Any) -> Prompt:
        try:
            return await asyncio.to_thread(build, *args)
        except PromptError as err:
            raise APIError(400, str(err), param=err.param) from None

    def _sampling(self, body: ChatCompletionRequest | CompletionRequest, prompt_len: int, index: int) -> SamplingParams:
        defaults = self.options.defaults
        room = self.engine.max_len - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens and leaves no room to generate within the "
                                f"server's context of {self.engine.max_len} tokens", param="messages")
        chosen = {name: getattr(body, name) for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
                  if getattr(body, name) is not None}
        settings = {**defaults, **chosen}
        limit = body.token_limit
        return SamplingParams(max_tokens=min(limit, room) if limit else room,
                              seed=None if body.seed is None else body.seed + index,
                              stop_token_ids=() if body.ignore_eos else self.options.stop_token_ids, stop_strings=tuple(body.stop),
                              logprobs=body.logprob_count, **settings)

    async def _generate(self, request: HTTPRequest, body: Any, prompt: Prompt, *, chat: bool) -> Response:
        if self.draining:
            raise APIError(503, "the server is shutting down")
        if self.engine.num_waiting + body.n > self.options.max_queue:
            raise APIError(429, f"the queue is full ({self.engine.num_waiting} requests waiting); retry later")
        arrival = time.perf_counter()
        handles = []
        try:
            for index in range(body.n):
                handles.append(self.engine.submit(prompt.request(self._sampling(body, len(prompt.input_ids), index))))
        except ValueError as err:
            for handle in handles:
                handle.cancel()
            raise APIError(400, str(err), param="messages" if chat else "prompt") from None
        self.active.update(handles)
        self.metrics.prompt_tokens.inc(len(prompt.input_ids) * body.n)
        choices = [Choice(handle, index, StopText(body.stop)) for index, handle in enumerate(handles)]
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12), "created": int(time.time()),
                "model": self.options.model_name}
        if body.stream:
            return StreamingResponse(self._stream(choices, meta, body, len(prompt.input_ids), arrival, chat=chat),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        collect = asyncio.ensure_future(asyncio.gather(*(self._run(c, arrival) for c in choices)))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait([collect, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():  # the client went away
                collect.cancel()
            self._release(handles)  # frees the slots of unfinished choices
        if collect.cancelled():
            return Response(status_code=499)
        collect.result()  # raises the generation's APIError, if any
        usage = _usage(len(prompt.input_ids) * body.n, sum(len(c.handle.tokens) for c in choices))
        if chat:
            out = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(self.processor.tokenizer, c.logprobs) if body.logprobs else None,
                    "finish_reason": c.finish} for c in choices]
            return JSONResponse({**meta, "object": "chat.completion", "choices": out, "usage": usage})
        out = [{"index": c.index, "text": c.text, "finish_reason": c.finish,
                "logprobs": completion_logprobs(self.processor.tokenizer, c.logprobs, 0)
                if body.logprobs is not None else None} for c in choices]
        return JSONResponse({**meta, "object": "text_completion", "choices": out, "usage": usage})

    async def _run(self, choice: Choice, arrival: float) -> None:
        async for _ in self._events(choice, arrival):
            pass

    async def _events(self, choice: Choice, arrival: float) -> AsyncIterator[tuple[str, list[Any]]]:
        """Drive one choice, yielding (new text, new logprob entries); records metrics; finished
        choices have `finish` set."""
        last = None
        try:
            async for event in choice.handle:
                now = time.perf_counter()
                if event.token is not None:
                    self.metrics.generation_tokens.inc()
                    (self.metrics.ttft if last is None else self.metrics.inter_token).observe(now - (last or arrival))
                    last = now
                if event.finish_reason == "cancelled":
                    raise APIError(503, "the request was cancelled: the server is shutting down")
                if event.finish_reason == "error":
                    log.error("generation failed", exc_info=choice.handle.error)
                    raise APIError(500, "the generation failed inside the server")
                text, entries = choice.take(event)
                if text or entries or choice.finish:
                    yield text, entries
                if choice.finish:
                    break
        except APIError:
            raise
        except Exception:
            log.exception("generation failed")
            raise APIError(500, "the generation failed inside the server") from None
        finally:
            if choice.finish:
                self.metrics.finished.labels(choice.finish).inc()
                self.metrics.e2e.observe(time.perf_counter() - arrival)
            if not choice.handle.finished:
                choice.handle.cancel()
            self.active.discard(choice.handle)

    async def _stream(self, choices: list[Choice], meta: dict[str, Any], body: Any, prompt_len: int,
                      arrival: float, *, chat: bool) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        usage_wanted = body.stream_options is not None and body.stream_options.include_usage
        extra = {"usage": None} if usage_wanted else {}

        def chunk(choice: dict[str, Any]) -> str:
            return "data: " + json.dumps({**meta, "object": kind, "choices": [choice], **extra}) + "\n\n"
        try:
            if chat:
                for c in choices:
                    yield chunk({"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None})
            offsets = [0] * len(choices)
            async for index, (text, entries) in merge([self._events(c, arrival) for c in choices]):
                c = choices[index]
                if chat:
                    logprobs = chat_logprobs(self.processor.tokenizer, entries) if body.logprobs else None
                    if text or entries:
                        yield chunk({"index": index, "delta": {"content": text}, "logprobs": logprobs,
                                     "finish_reason": None})
                    if c.finish:
                        yield chunk({"index": index, "delta": {}, "logprobs": None, "finish_reason": c.finish})
                else:
                    logprobs = completion_logprobs(self.processor.tokenizer, entries, offsets[index]) \
                        if body.logprobs is not None else None
                    offsets[index] += len(text)
                    yield chunk({"index": index, "text": text, "logprobs": logprobs, "finish_reason": c.finish})
            if usage_wanted:
                usage = _usage(prompt_len * len(choices), sum(len(c.handle.tokens) for c in choices))
                yield "data: " + json.dumps({**meta, "object": kind, "choices": [], "usage": usage}) + "\n\n"
        except APIError as err:
            yield "data: " + json.dumps(err.body()) + "\n\n"
        finally:  # also when the client went away (the response task is cancelled)
            self._release([c.handle for c in choices])
        yield "data: [DONE]\n\n"

    def _release(self, handles: list[RequestHandle]) -> None:
        for handle in handles:
            if not handle.finished:
                handle.cancel()
            self.active.discard(handle)

    # ---- plumbing ----------------------------------------------------------------------------------------------
    async def _guarded(self, endpoint: str, request: HTTPRequest,
                       handler: Callable[[HTTPRequest], Awaitable[Response]]) -> Response:
        """Authentication, the metrics and OpenAI-shaped errors around one API handler."""
        try:
            self._authenticate(request)
            if self.draining and request.method == "POST":
                raise APIError(503, "the server is shutting down")
            response = await handler(request)
        except APIError as err:
            response = JSONResponse(err.body(), status_code=err.status)
        self.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    def _authenticate(self, request: HTTPRequest) -> None:
        key = self.options.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def _json(self, request: HTTPRequest) -> Any:
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body is larger than the limit of {limit} bytes")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise APIError(413, f"the request body is larger than the limit of {limit} bytes")
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON: {err}") from None

    async def _http_error(self, request: HTTPRequest, exc: HTTPException) -> Response:
        error = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
        return JSONResponse(error.body(), status_code=exc.status_code)

    async def _unexpected(self, request: HTTPRequest, exc: Exception) -> Response:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(APIError(500, "internal server error").body(), status_code=500)


async def _disconnected(request: HTTPRequest) -> None:
    """Returns when the client has gone away (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
