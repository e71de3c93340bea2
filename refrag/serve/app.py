"""The OpenAI-compatible HTTP API (FastAPI): chat and text completions (SSE streaming), models, search, health.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``POST /v1/search``,
``GET /health`` (liveness: always 200, no key), ``GET /ready`` (503 until the engine runs, and while it shuts
down). With an API key every route but ``/health`` needs ``Authorization: Bearer KEY`` (compared in constant
time). Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 bad input, 401 key,
404 unknown model, 413 body too large, 429 queue full and 503 not ready (both with ``Retry-After``), 504 timeout.
A client that disconnects cancels its generation (the decoder stops that row at the next token).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from refrag.config import (
    DEFAULT_EXPAND_FRACTION,
    DEFAULT_POLICY,
    CompressionOptions,
    SamplingOptions,
    check_question,
)
from refrag.errors import InputError, RefragError
from refrag.relevance import HitFilter
from refrag.serve.engine import Delta, Done, Engine, Failed, Job, QueueFull, ShuttingDown
from refrag.serve.schemas import ChatRequest, CompletionFields, CompletionRequest, SearchRequest


@dataclass(frozen=True)
class ServeOptions:
    model_id: str = "refrag"  # what /v1/models lists and requests must name
    api_key: str | None = None
    max_body_bytes: int = 1 << 20  # larger requests get 413
    timeout_s: float = 120.0  # per request, queueing included (504 after)
    default_max_tokens: int = 64
    max_tokens_cap: int = 512
    default_policy: str = DEFAULT_POLICY
    default_fraction: float = DEFAULT_EXPAND_FRACTION
    retry_after_s: int = 1


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        """OpenAI's error object (a JSON response's body, or a stream's last event)."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def create_app(engine: Engine, options: ServeOptions = ServeOptions()) -> FastAPI:
    """The ASGI app around a started-on-entry engine (``uvicorn.run(create_app(...))``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not engine.ready:
            engine.start()
        yield
        await asyncio.to_thread(engine.stop)  # in-flight batch finishes; queued requests get a clean error

    app = FastAPI(title="refrag", lifespan=lifespan, docs_url=None, redoc_url=None)
    retry = {"Retry-After": str(options.retry_after_s)}

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Body size, then the API key (every route but /health)."""
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > options.max_body_bytes):
            return APIError(413, f"the request body exceeds {options.max_body_bytes} bytes.").response()
        if options.api_key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            expected = f"Bearer {options.api_key}"
            if not secrets.compare_digest(given.encode(), expected.encode()):
                return APIError(401, "missing or wrong API key (Authorization: Bearer KEY).",
                                "authentication_error", code="invalid_api_key").response()
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return APIError(400, message, param=where or None).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        return APIError(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else
                        "invalid_request_error").response()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if not engine.ready:
            raise APIError(503, "not ready.", "server_error", headers=retry)
        return JSONResponse({"status": "ready", "waiting": engine.waiting})

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": options.model_id, "object": "model", "created": 0,
                                            "owned_by": "refrag"}]}

    @app.post("/v1/search")
    async def search(body: SearchRequest) -> dict:
        if engine.pipeline is None:
            raise APIError(400, "this server has no index to search.")
        hits = await asyncio.to_thread(engine.pipeline.index.search, body.query, body.top_k)
        return {"object": "list", "data": [_source(h) | {"text": h.meta.text} for h in hits]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        return await _complete(body, body.question(), request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _complete(body, body.question(), request, chat=False)

    async def _complete(body: CompletionFields, question: str, request: Request, *, chat: bool):
        if body.model != options.model_id:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {options.model_id!r}.",
                           "not_found_error", param="model", code="model_not_found")
        job = _job(body, question)
        try:
            engine.submit(job)
        except QueueFull as e:
            raise APIError(429, f"{e} Retry later.", "rate_limit_error", headers=retry) from e
        except ShuttingDown as e:
            raise APIError(503, str(e), "server_error", headers=retry) from e
        reply = _Reply(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()), options.model_id,
                       chat)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(job, reply, include_usage, request), media_type="text/event-stream")
        done = await _wait(job, request)
        return JSONResponse(reply.full(done))

    def _job(body: CompletionFields, question: str) -> Job:
        try:
            check_question(question)
            max_tokens = body.max_completion_tokens or body.max_tokens or options.default_max_tokens
            if max_tokens > options.max_tokens_cap:
                raise InputError(f"max_tokens {max_tokens} exceeds this server's cap of {options.max_tokens_cap}.")
            fraction = options.default_fraction if body.expand_fraction is None else body.expand_fraction
            policy = body.policy or (options.default_policy if body.expand_tokens or fraction else "none")
            compression = CompressionOptions(mode=body.mode, policy=policy,  # type: ignore[arg-type]
                                             expand_fraction=0.0 if body.expand_tokens is not None else fraction,
                                             expand_tokens=body.expand_tokens, seed=body.seed or 0)
            sampling = SamplingOptions(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                       stop=body.stops, seed=body.seed)
        except InputError as e:
            raise APIError(400, str(e)) from e
        passages = tuple(body.passages) if body.passages is not None else None
        return Job(question, passages, body.top_k, compression, sampling, asyncio.get_running_loop(),
                   HitFilter(body.min_score, body.relative_score, body.dedup))

    async def _next(job: Job, request: Request, deadline: float):
        """The job's next event; cancels the job when the client has gone or the deadline passed."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), timeout=0.25)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    raise APIError(499, "the client closed the request.", "cancelled") from None
                if time.perf_counter() > deadline:
                    job.cancelled.set()
                    raise APIError(504, f"the request took longer than {options.timeout_s:g} s.", "timeout_error") \
                        from None

    async def _wait(job: Job, request: Request) -> Done:
        deadline = time.perf_counter() + options.timeout_s
        while True:
            event = await _next(job, request, deadline)
            if isinstance(event, Done):
                return event
            if isinstance(event, Failed):
                raise _as_api_error(event.error)

    async def _stream(job: Job, reply: _Reply, include_usage: bool, request: Request) -> AsyncIterator[str]:
        deadline = time.perf_counter() + options.timeout_s
        try:
            yield _sse(reply.chunk(role=True))
            while True:
                event = await _next(job, request, deadline)
                if isinstance(event, Delta):
                    yield _sse(reply.chunk(text=event.text))
                elif isinstance(event, Done):
                    yield _sse(reply.chunk(finish=event.answer.finish_reason) | {"refrag": _extra(event)})
                    if include_usage:
                        yield _sse(reply.chunk(usage=_usage(event)))
                    break
                else:
                    yield _sse(_as_api_error(event.error).body())
                    break
            yield "data: [DONE]\n\n"
        except APIError as e:  # timeout while streaming: the stream still ends cleanly
            yield _sse(e.body())
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # a no-op when finished; stops generation when the client went away

    return app


def _as_api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, ShuttingDown):
        return APIError(503, str(e), "server_error")
    if isinstance(e, asyncio.CancelledError):
        return APIError(499, "cancelled.", "cancelled")
    if isinstance(e, InputError):
        return APIError(400, str(e))
    if isinstance(e, RefragError):
        return APIError(500, str(e), "server_error")
    return APIError(500, f"internal error ({type(e).__name__}).", "server_error")


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _source(hit) -> dict:
    return {"id": hit.id, "score": hit.score, "title": hit.meta.title, "source": hit.meta.source}


def _usage(done: Done) -> dict:
    prompt, completion = done.answer.decoder_positions, len(done.answer.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _extra(done: Done) -> dict:
    """refrag's additions to a response: sources, timings, what compression saved."""
    a = done.answer
    return {
        "sources": [_source(h) for h in done.hits],
        "dropped": [_source(d.hit) | {"reason": d.reason} for d in done.dropped],
        "timings": asdict(a.timings) | {"retrieval_s": done.retrieval_s, "queue_s": done.queue_s},
        "decoder_positions": a.decoder_positions,
        "context_tokens": a.context_tokens,
        "positions_saved": a.context_tokens - a.context_positions,
        "expanded_chunks": list(a.expanded_chunks),
        "policy": a.policy,
    }


_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


@dataclass(frozen=True)
class _Reply:
    """Builds the response objects of one request (chat or text completion)."""

    id: str
    created: int
    model: str
    chat: bool

    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def full(self, done: Done) -> dict:
        finish = _FINISH[done.answer.finish_reason]
        choice = ({"index": 0, "message": {"role": "assistant", "content": done.answer.text}, "finish_reason": finish}
                  if self.chat else {"index": 0, "text": done.answer.text, "finish_reason": finish, "logprobs": None})
        return self._head(False) | {"choices": [choice], "usage": _usage(done), "refrag": _extra(done)}

    def chunk(self, *, text: str | None = None, role: bool = False, finish: str | None = None,
              usage: dict | None = None) -> dict:
        if usage is not None:
            return self._head(True) | {"choices": [], "usage": usage}
        reason = _FINISH[finish] if finish else None
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        return self._head(True) | {"choices": [choice]}
