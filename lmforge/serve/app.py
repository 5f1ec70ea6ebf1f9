"""The HTTP side: FastAPI routes in OpenAI's shapes over one Engine.

    app = create_app(model, tokenizer, ServeSettings(name="my-model"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Everything a client can get wrong is an ApiError answered with a 4xx JSON error (protocol.py);
a 500 means a bug here. The engine thread starts and stops with the app's lifespan, so a
SIGTERM (uvicorn stops accepting connections and waits for open ones) lets running requests end.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from lmforge.errors import LmforgeError
from lmforge.finetune.instruct import DEFAULT_CHAT_TEMPLATE, render
from lmforge.generate import GenerationConfig
from lmforge.serve.engine import Engine
from lmforge.serve.limits import Access, Denied, OutputFilter
from lmforge.serve.metrics import Metrics
from lmforge.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse,
)
from lmforge.serve.respond import ChatFormat, CompletionFormat, Generation, collect, stream

STATIC = Path(__file__).parent / "static"
MAX_CHOICES = 64  # prompts × n in one request
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize",
             "/detokenize", "/tokenizer_info", "/")


@dataclass
class ServeSettings:
    name: str = "lmforge"
    api_keys: list[str] = field(default_factory=list)
    rate_limit: int | None = None  # requests per minute per key (or per client address without keys)
    max_batch: int = 16
    max_queue: int = 64
    max_prompt_tokens: int | None = None  # default: the model's block size
    max_tokens: int = 256
    timeout: float | None = 300.0  # seconds from arrival to the last token
    output_filter: OutputFilter = field(default_factory=OutputFilter)
    chat_template: str = DEFAULT_CHAT_TEMPLATE
    max_body: int = 4 << 20


class Server:
    """The state the routes share."""

    def __init__(self, model, tokenizer, settings: ServeSettings):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.block_size = model.config.block_size
        self.vocab_size = model.config.vocab_size
        self.max_prompt = settings.max_prompt_tokens or self.block_size
        if settings.max_tokens < 1:
            raise LmforgeError(f"--max-tokens must be at least 1; got {settings.max_tokens}")
        self.engine = Engine(model, tokenizer.eos_id, settings.max_batch, settings.max_queue)
        self.access = Access(settings.api_keys, settings.rate_limit)
        self.output_filter = settings.output_filter
        self.metrics = Metrics(self.engine)
        self.inbox = None  # respond.Inbox of the serving event loop, made by the first request

    def guard(self, request: Request) -> None:
        try:
            self.access.check(request.headers.get("authorization"), request.client.host if request.client else "-")
        except Denied as exc:
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
            raise ApiError(exc.status, str(exc), code=exc.code, headers=headers) from None

    async def body(self, request: Request) -> bytes:
        limit = self.settings.max_body
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.name:
            raise ApiError(404, f"The model '{name}' does not exist; this server serves '{self.settings.name}'.",
                           "model", "model_not_found")

    def encode(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "the prompt is empty", param)
            try:
                ids = self.tokenizer.encode(prompt)
            except Exception as exc:  # noqa: BLE001 — whatever the tokenizer refuses is the input's fault
                raise ApiError(400, f"the prompt cannot be tokenized: {exc}", param) from None
        else:
            ids = prompt
            if any(i >= self.vocab_size for i in ids):
                raise ApiError(400, f"token ids must be below the vocabulary size {self.vocab_size}", param)
        if not ids:
            raise ApiError(400, "the prompt is empty", param)
        if len(ids) > self.max_prompt:
            raise ApiError(413, f"the prompt has {len(ids)} tokens; this server takes at most {self.max_prompt}",
                           param, "context_length_exceeded")
        return ids

    def max_tokens(self, asked: int | None, default: int) -> int:
        if asked is None:
            return min(default, self.settings.max_tokens)
        if asked > self.settings.max_tokens:
            raise ApiError(400, f"max_tokens is {asked}; this server generates at most {self.settings.max_tokens}",
                           "max_tokens", "invalid_value")
        return asked

    def config(self, req, copy: int, max_tokens: int) -> GenerationConfig:
        seed = req.seed if req.seed is None or not copy else (req.seed + copy) % 2**63
        try:
            return GenerationConfig(
                max_new_tokens=max(1, max_tokens), temperature=req.temperature,
                top_k=req.top_k if req.top_k and req.top_k > 0 else None,
                top_p=req.top_p if req.top_p < 1.0 else None, min_p=req.min_p or None,
                repetition_penalty=req.repetition_penalty, stop=tuple(req.stops()), seed=seed)
        except LmforgeError as exc:
            raise ApiError(400, str(exc)) from None

    async def respond(self, request: Request, gen: Generation, fmt: CompletionFormat, req) -> Response:
        if len(gen.choices) > MAX_CHOICES:
            raise ApiError(400, f"at most {MAX_CHOICES} choices (prompts × n) per request", "n")
        gen.submit()
        if req.stream:
            async def events():
                async for chunk in stream(gen, fmt, self.settings.name, req.include_usage()):
                    yield chunk
                self.metrics.finished(gen, time.monotonic())

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        body = await collect(gen, fmt, request, self.settings.name)
        self.metrics.finished(gen, time.monotonic())
        return JSONResponse(body)


def create_app(model, tokenizer, settings: ServeSettings | None = None) -> FastAPI:
    server = Server(model, tokenizer, settings or ServeSettings())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        yield
        server.engine.stop()

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(_CountStatus, metrics=server.metrics)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return JSONResponse(ApiError(422, str(exc.errors()[:1])).body(), status_code=422)

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}").body(), status_code=500)

    @app.get("/")
    async def playground():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        if server.engine.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok", "model": server.settings.name, "running": server.engine.batch_size,
                "queued": server.engine.queue_depth}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        server.guard(request)
        return {"object": "list", "data": [{"id": server.settings.name, "object": "model", "created": 0,
                                            "owned_by": "lmforge", "max_model_len": server.block_size}]}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = server.tokenizer
        name = {role: tok.id_to_token(i) if i is not None else None
                for role, i in (("eos_token", tok.eos_id), ("bos_token", tok.bos_id), ("pad_token", tok.pad_id))}
        return {**name, "model_max_length": server.block_size, "vocab_size": server.vocab_size,
                "chat_template": server.settings.chat_template}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        server.guard(request)
        req = parse(await server.body(request), TokenizeRequest)
        server.check_model(req.model)
        # lmforge's tokenizers add no template tokens, so add_special_tokens changes nothing
        try:
            ids = server.tokenizer.encode(req.prompt)
        except Exception as exc:  # noqa: BLE001
            raise ApiError(400, f"the prompt cannot be tokenized: {exc}", "prompt") from None
        return {"tokens": ids, "count": len(ids), "max_model_len": server.block_size}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        server.guard(request)
        req = parse(await server.body(request), DetokenizeRequest)
        server.check_model(req.model)
        if any(i >= server.vocab_size for i in req.tokens):
            raise ApiError(400, f"token ids must be below the vocabulary size {server.vocab_size}", "tokens")
        return {"prompt": server.tokenizer.decode(req.tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        server.guard(request)
        req = parse(await server.body(request), CompletionRequest)
        server.check_model(req.model)
        prompts = req.prompts()
        if not prompts:
            raise ApiError(400, "the prompt list is empty", "prompt")
        max_tokens = server.max_tokens(req.max_tokens, 16)
        echo_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
        gen = Generation(server)
        for prompt in prompts:
            ids = server.encode(prompt)
            if echo_logprobs is not None and len(ids) > server.block_size:
                raise ApiError(413, f"a prompt to score has {len(ids)} tokens; the model's window is "
                               f"{server.block_size}", "prompt", "context_length_exceeded")
            echo = (prompt if isinstance(prompt, str) else server.tokenizer.decode(ids)) if req.echo else None
            for copy in range(req.n):
                gen.add(ids, server.config(req, copy, max_tokens), max_tokens, copy, echo, req.logprobs,
                        echo_logprobs)
        return await server.respond(request, gen, CompletionFormat(server, req.logprobs is not None), req)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        server.guard(request)
        req = parse(await server.body(request), ChatRequest)
        server.check_model(req.model)
        try:
            text = render(server.settings.chat_template, [m.as_dict() for m in req.messages], server.tokenizer,
                          add_generation_prompt=True)
        except LmforgeError as exc:
            raise ApiError(400, str(exc), "messages") from None
        ids = server.encode(text, "messages")
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = server.max_tokens(asked, server.settings.max_tokens)
        top = (req.top_logprobs or 0) if req.logprobs else None
        gen = Generation(server)
        for copy in range(req.n):
            gen.add(ids, server.config(req, copy, max_tokens), max_tokens, copy, None, top, None)
        return await server.respond(request, gen, ChatFormat(server, req.logprobs), req)

    return app


class _CountStatus:
    """ASGI middleware: count every response by endpoint and status (streams are never buffered)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, counted)
