"""The HTTP side: an OpenAI-compatible API (FastAPI on uvicorn) in front of the engine.

    app = create_app(engine, model_name="smollm2-135m-instruct", api_key=None)
    app = create_app(None, model_name="all-minilm-l6-v2", embedder=encoder)   # an encoder: embeddings only
    run(app, host="127.0.0.1", port=8000)

Routes: `GET /v1/models[/{id}]`, `POST /v1/chat/completions`, `POST /v1/completions`, `POST /v1/embeddings`
(when an embedding model is served, see serve/embeddings.py; a server of an encoder alone has no engine
and answers the generative routes with 400), `GET /health`, `GET /metrics`.
Every error is the OpenAI error body `{"error": {"message", "type", "param", "code"}}`: 400 for invalid
requests (bad JSON, a field out of range, an argument the API does not have, a prompt longer than the
context), 401 without the right `Authorization: Bearer` key (only /v1/ routes need it), 404 for an unknown
model or route, 413 for a body over 8 MiB, 429 when the queue is full, 500 for the unexpected (never a
traceback); the server goes on serving after each.

Requests are parsed and tokenized here, on the event loop; the engine (a thread of its own) hands each
step's outputs back through `loop.call_soon_threadsafe`. A streaming response is server-sent events ending
with `data: [DONE]`; a client that disconnects (streaming or not) has its request cancelled, and its KV
slots are free at the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InvalidArgumentError, LeanformersError
from ..generation.sampling import SamplingParams
from . import schemas as S
from .embeddings import Embedder, embed_request
from .engine import Engine, EngineStoppedError, PromptSpec, QueueFullError
from .grammar import JsonGrammars
from .metrics import CONTENT_TYPE, Metrics
from .sequence import Output, SequenceOptions, TokenLogprob

log = logging.getLogger("leanformers.serve")

MAX_BODY_BYTES = 8 * 2**20
_ROUTES = {"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/health", "/metrics"}
# message fields that carry nothing this server would have to act on
_IGNORED_MESSAGE_FIELDS = {"refusal", "annotations"}


class APIError(Exception):
    """An error answered with the OpenAI error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, type=self.type, param=self.param, code=self.code)


def error_response(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = S.ErrorResponse(error=S.ErrorBody(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


# ------------------------------------------------------------------------------------------ the app
def create_app(engine: Engine | None, *, model_name: str, api_key: str | None = None,
               embedder: Embedder | None = None, embedding_model_name: str | None = None) -> FastAPI:
    """The FastAPI application serving `engine` as `model_name` (and `embedder` as `embedding_model_name`).

    With engine None the server is an embedding server: `embedder` is served as `model_name` (or
    `embedding_model_name`) on /v1/embeddings, and the generative routes answer 400 for it."""
    if engine is None:
        if embedder is None:
            raise InvalidArgumentError("create_app needs an engine, an embedder, or both")
        embedding_model_name = embedding_model_name or model_name
    api = _API(engine, model_name, embedder, embedding_model_name)
    metrics_ = engine.metrics if engine is not None else Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if engine is not None:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="leanformers", description="OpenAI-compatible API", docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=lifespan)
    app.state.api = api

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(404, f"Unknown route {request.method} {request.url.path}", code="not_found")
        if exc.status_code == 405:
            return error_response(405, f"Method {request.method} is not allowed for {request.url.path}",
                                  code="method_not_allowed")
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error: {type(exc).__name__}", type="server_error")

    @app.get("/health")
    async def health() -> Response:
        if engine is not None and not engine.alive:
            return error_response(503, "the engine is not running", type="server_error")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        if engine is not None:
            running, waiting = engine.counts()
            metrics_.running.set(running)
            metrics_.waiting.set(waiting)
            for how, count in getattr(engine.step, "calls", {}).items():  # a compiled step counts how its calls ran
                metrics_.step_calls.labels(how=how).set(count)
        return Response(metrics_.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse(S.ModelList(data=api.model_cards()).model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        for card in api.model_cards():
            if card.id == model_id:
                return JSONResponse(card.model_dump())
        raise APIError(404, f"The model `{model_id}` does not exist", code="model_not_found", param="model")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await api.chat(request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await api.completions(request)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await api.embeddings(request)

    return _Gate(app, api_key, metrics_)  # type: ignore[return-value]


class _Gate:
    """Pure ASGI middleware: the API key check on /v1/ routes, the body size limit, and per-route counts
    (a BaseHTTPMiddleware would buffer streams and hide client disconnects)."""

    def __init__(self, app: FastAPI, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics
        self.state = app.state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in _ROUTES else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        status = {"code": 500}

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            refusal = self._refuse(scope)
            if refusal is not None:
                await refusal(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            self.metrics.http.labels(route=route, status=str(status["code"])).inc()

    def _refuse(self, scope: dict) -> Response | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"].startswith("/v1"):
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if not auth:
                return error_response(401, "You didn't provide an API key: send it in the Authorization header "
                                           "as `Authorization: Bearer KEY`.", code="invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return error_response(401, "Incorrect API key provided.", code="invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return error_response(413, f"the request body is {int(length)} bytes; at most {MAX_BODY_BYTES} are "
                                       "accepted", code="request_too_large")
        return None


# ------------------------------------------------------------------------------------------ handlers
class _API:
    """Request handling shared by the routes: parsing, the engine bridge, response assembly."""

    def __init__(self, engine: Engine | None, model_name: str, embedder: Embedder | None,
                 embedding_model_name: str | None):
        self.engine: Engine = engine  # type: ignore[assignment]  # None only for an embedding server
        self.model_name = model_name
        self.tokenizer = engine.tokenizer if engine is not None else None
        self.embedder, self.embedding_model_name = embedder, embedding_model_name
        self.created = int(time.time())
        self._token_text: dict[int, tuple[str, list[int] | None]] = {}
        self._defaults = _default_sampling(engine.lm) if engine is not None else {}
        self._embed_lock = asyncio.Lock()

    def model_cards(self) -> list[S.ModelCard]:
        cards = []
        if self.engine is not None:
            cards.append(S.ModelCard(id=self.model_name, created=self.created, max_model_len=self.engine.max_model_len))
        if self.embedder is not None and self.embedding_model_name is not None:
            cards.append(S.ModelCard(id=self.embedding_model_name, created=self.created))
        return cards

    # ------------------------------------------------------------------------------ chat
    async def chat(self, request: Request) -> Response:
        req = await _parse(request, S.ChatCompletionRequest)
        self._check_model(req.model)
        _refuse_unsupported_chat(req)
        if self.tokenizer.chat_template is None:
            raise APIError(400, f"the model `{self.model_name}` has no chat template; use /v1/completions",
                           param="messages")
        messages = _template_messages(req.messages)
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        except LeanformersError as exc:
            raise APIError(400, f"the messages could not be rendered with the model's chat template: {exc}",
                           param="messages") from None
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs to be true", param="top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        n = self._check_n(req.n)
        self._check_length([ids], max_tokens, "messages")
        grammar = await self._grammar(req)
        options = self._options(req, max_tokens, logprobs, grammar)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = self._stream_options(req)
        if req.stream:
            return self._stream(request, [PromptSpec(ids, n)], options,
                                lambda q: self._chat_events(q, rid, created, n, [len(ids)], include_usage))
        outs = await self._collect(request, [PromptSpec(ids, n)], options)
        choices = [S.ChatChoice(index=i, message=S.AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                                logprobs=S.ChatLogprobs(content=self._chat_logprobs(c.logprobs))
                                if logprobs is not None else None) for i, c in enumerate(outs)]
        usage = _usage([len(ids)], outs)
        body = S.ChatCompletion(id=rid, created=created, model=self.model_name, choices=choices, usage=usage)
        return Response(body.model_dump_json(), media_type="application/json")

    async def _chat_events(self, outputs: AsyncIterator[list[Output]], rid: str, created: int, n: int,
                           prompt_lens: list[int], include_usage: bool) -> AsyncIterator[str]:
        exclude = None if include_usage else {"usage"}

        def chunk(choices: list[S.ChatChunkChoice], usage: S.Usage | None = None) -> str:
            c = S.ChatCompletionChunk(id=rid, created=created, model=self.model_name, choices=choices, usage=usage)
            return f"data: {c.model_dump_json(exclude=exclude)}\n\n"

        yield chunk([S.ChatChunkChoice(index=i, delta=S.ChatDelta(role="assistant", content=""))
                     for i in range(n)])
        totals = [0] * n
        async for batch in outputs:
            choices = []
            for o in _merge(batch):
                totals[o.index] += len(o.token_ids)
                lp = S.ChatLogprobs(content=self._chat_logprobs(o.logprobs)) if o.logprobs is not None else None
                if o.text or lp is not None or o.finish_reason is not None:
                    choices.append(S.ChatChunkChoice(index=o.index, delta=S.ChatDelta(content=o.text or None),
                                                     logprobs=lp, finish_reason=o.finish_reason))
            if choices:
                yield chunk(choices)
        if include_usage:
            prompt = sum(prompt_lens)
            yield chunk([], S.Usage(prompt_tokens=prompt, completion_tokens=sum(totals),
                                    total_tokens=prompt + sum(totals)))

    def _chat_logprobs(self, lps: list[TokenLogprob] | None) -> list[S.ChatTokenLogprob]:
        out = []
        for lp in lps or []:
            text, raw = self._token(lp.token_id)
            out.append(S.ChatTokenLogprob(token=text, logprob=lp.logprob, bytes=raw, top_logprobs=[
                S.TopLogprob(token=self._token(t)[0], logprob=v, bytes=self._token(t)[1]) for t, v in lp.top]))
        return out

    # ------------------------------------------------------------------------------ completions
    async def completions(self, request: Request) -> Response:
        req = await _parse(request, S.CompletionRequest)
        self._check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        n = self._check_n(req.n)
        if req.best_of is not None and req.best_of != n:
            raise APIError(400, "best_of is not supported by this server (other than best_of == n)", param="best_of")
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported by this server (no prompt logprobs)",
                           param="echo")
        prompts = self._completion_prompts(req.prompt)
        capacity = self.engine.max_batch_size + self.engine.max_queue
        if len(prompts) * n > capacity:
            raise APIError(400, f"{len(prompts)} prompts x n={n} choices exceed what the server can hold at once "
                                f"({capacity} sequences)", param="prompt")
        self._check_length(prompts, req.max_tokens, "prompt")
        options = self._options(req, req.max_tokens, req.logprobs)
        specs = [PromptSpec(p, n) for p in prompts]
        echo = [self.tokenizer.decode(p) if req.echo else "" for p in prompts for _ in range(n)]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = self._stream_options(req)
        lens = [len(p) for p in prompts]
        if req.stream:
            return self._stream(request, specs, options,
                                lambda q: self._completion_events(q, rid, created, lens, n, echo, include_usage))
        outs = await self._collect(request, specs, options)
        choices = [S.CompletionChoice(index=i, text=echo[i] + c.text, finish_reason=c.finish_reason,
                                      logprobs=self._completion_logprobs(c.logprobs, 0) if req.logprobs is not None
                                      else None) for i, c in enumerate(outs)]
        body = S.Completion(id=rid, created=created, model=self.model_name, choices=choices, usage=_usage(lens, outs))
        return Response(body.model_dump_json(), media_type="application/json")

    async def _completion_events(self, outputs: AsyncIterator[list[Output]], rid: str, created: int,
                                 prompt_lens: list[int], n: int, echo: list[str],
                                 include_usage: bool) -> AsyncIterator[str]:
        exclude = None if include_usage else {"usage"}

        def chunk(choices: list[S.CompletionChoice], usage: S.Usage | None = None) -> str:
            c = S.Completion(id=rid, created=created, model=self.model_name, choices=choices, usage=usage)
            return f"data: {c.model_dump_json(exclude=exclude)}\n\n"

        totals = [0] * len(echo)
        offsets = [0] * len(echo)
        if any(echo):
            yield chunk([S.CompletionChoice(index=i, text=e, finish_reason=None) for i, e in enumerate(echo) if e])
        async for batch in outputs:
            choices = []
            for o in _merge(batch):
                totals[o.index] += len(o.token_ids)
                lp = None
                if o.logprobs is not None:
                    lp = self._completion_logprobs(o.logprobs, offsets[o.index])
                    offsets[o.index] += sum(len(t) for t in lp.tokens)
                if o.text or lp is not None or o.finish_reason is not None:
                    choices.append(S.CompletionChoice(index=o.index, text=o.text, logprobs=lp,
                                                      finish_reason=o.finish_reason))
            if choices:
                yield chunk(choices)
        if include_usage:
            prompt = sum(prompt_lens)
            yield chunk([], S.Usage(prompt_tokens=prompt, completion_tokens=sum(totals),
                                    total_tokens=prompt + sum(totals)))

    def _completion_logprobs(self, lps: list[TokenLogprob] | None, offset: int) -> S.CompletionLogprobs:
        tokens, values, tops, offsets = [], [], [], []
        for lp in lps or []:
            text = self._token(lp.token_id)[0]
            offsets.append(offset)
            offset += len(text)
            tokens.append(text)
            values.append(lp.logprob)
            tops.append({self._token(t)[0]: v for t, v in lp.top})
        return S.CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)

    def _completion_prompts(self, prompt: Any) -> list[list[int]]:
        vocab = self.engine.vocab_size
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            prompt = [prompt]
        out = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                ids = self.tokenizer.encode(p)
            else:
                ids = list(p)
                bad = [t for t in ids if not 0 <= t < vocab]
                if bad:
                    raise APIError(400, f"prompt {i}: token ids out of range [0, {vocab}): {bad[:5]}", param="prompt")
            if not ids:
                raise APIError(400, f"prompt {i} is empty" if len(prompt) > 1 else "prompt is empty", param="prompt")
            out.append(ids)
        return out

    # ------------------------------------------------------------------------------ embeddings
    async def embeddings(self, request: Request) -> Response:
        req = await _parse(request, S.EmbeddingRequest)
        if self.embedder is None or req.model != self.embedding_model_name:
            if req.model == self.model_name:
                raise APIError(400, f"the model `{req.model}` is a generative model; this server has no embedding "
                                    "model (serve one with --embedding-model)", param="model")
            raise APIError(404, f"The model `{req.model}` does not exist", param="model", code="model_not_found")
        async with self._embed_lock:  # one embedding batch at a time beside the engine
            try:
                body = await run_in_threadpool(embed_request, self.embedder, req, self.embedding_model_name)
            except LeanformersError as exc:
                raise APIError(400, str(exc), param="input") from None
        return Response(body.model_dump_json(), media_type="application/json")

    # ------------------------------------------------------------------------------ shared
    def _check_model(self, name: str) -> None:
        if name == self.embedding_model_name and (self.engine is None or name != self.model_name):
            raise APIError(400, f"the model `{name}` is an embedding model: it serves /v1/embeddings, not text "
                                "generation", param="model", code="model_not_supported")
        if self.engine is None or name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist (this server serves `{self.model_name}`)",
                           param="model", code="model_not_found")

    def _check_n(self, n: int | None) -> int:
        n = 1 if n is None else n
        if n > self.engine.max_batch_size:
            raise APIError(400, f"n must be at most {self.engine.max_batch_size} (the server's --max-batch-size), "
                                f"got {n}", param="n")
        return n

    def _check_length(self, prompts: list[list[int]], max_tokens: int | None, param: str) -> None:
        limit = self.engine.max_model_len
        for ids in prompts:
            if len(ids) >= limit or (max_tokens is not None and len(ids) + max_tokens > limit):
                asked = f"{len(ids)} in the {param}" + (f" and {max_tokens} in the completion" if max_tokens else "")
                raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                    f"{len(ids) + (max_tokens or 0)} tokens ({asked}). Please reduce the length of "
                                    f"the {param} or the completion.", param=param, code="context_length_exceeded")

    def _stream_options(self, req: S._Sampling) -> bool:
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        return bool(req.stream_options and req.stream_options.include_usage)

    async def _grammar(self, req: S.ChatCompletionRequest) -> str | None:
        """The llguidance grammar of a JSON response_format (None for text); 400 for a schema it cannot take."""
        rf = req.response_format
        if rf is None or rf.type == "text":
            return None
        if not JsonGrammars.available():
            raise APIError(400, f"response_format {rf.type!r} needs llguidance on the server "
                                "(pip install 'leanformers[serve]')", param="response_format")
        if req.ignore_eos:
            raise APIError(400, "ignore_eos cannot be combined with a JSON response_format (the JSON ends with "
                                "the end-of-sequence token)", param="ignore_eos")
        if rf.type == "json_schema" and rf.json_schema is None:
            raise APIError(400, "response_format json_schema needs a json_schema object", param="response_format")
        try:  # the first one builds llguidance's tokenizer table (about a second): off the event loop
            return await run_in_threadpool(self.engine.grammars.grammar, rf.type, rf.json_schema)
        except LeanformersError as exc:
            raise APIError(400, str(exc), param="response_format") from None

    def _options(self, req: S._Sampling, max_tokens: int | None, logprobs: int | None,
                 grammar: str | None = None) -> SequenceOptions:
        d = self._defaults
        temperature = req.temperature if req.temperature is not None else d.get("temperature", 1.0)
        top_p = req.top_p if req.top_p is not None else d.get("top_p")
        if top_p == 0:
            top_p = 1e-9  # keeps only the most likely token, as top_p 0 means
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > S.MAX_STOP:
            raise APIError(400, f"stop takes at most {S.MAX_STOP} strings, got {len(stop)}", param="stop")
        bias: dict[int, float] = {}
        for key, value in (req.logit_bias or {}).items():
            if not key.lstrip("-").isdigit() or not 0 <= int(key) < self.engine.vocab_size:
                raise APIError(400, f"logit_bias: {key!r} is not a token id in [0, {self.engine.vocab_size})",
                               param="logit_bias")
            if not -100 <= value <= 100:
                raise APIError(400, f"logit_bias: the bias of token {key} must be in [-100, 100], got {value}",
                               param="logit_bias")
            bias[int(key)] = float(value)
        try:
            sampling = SamplingParams(
                temperature=float(temperature), top_p=top_p if top_p is None or top_p < 1 else None,
                top_k=req.top_k if req.top_k is not None else d.get("top_k"),
                min_p=req.min_p if req.min_p is not None else d.get("min_p"),
                repetition_penalty=req.repetition_penalty if req.repetition_penalty is not None
                else d.get("repetition_penalty"),
                seed=req.seed)
        except LeanformersError as exc:
            raise APIError(400, str(exc)) from None
        return SequenceOptions(
            max_tokens=max_tokens if max_tokens is not None else self.engine.max_model_len,
            sampling=sampling, presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0, logit_bias=bias, stop=tuple(s for s in stop if s),
            ignore_eos=bool(req.ignore_eos), logprobs=logprobs, grammar=grammar)

    def _token(self, token_id: int) -> tuple[str, list[int] | None]:
        """A token's text and UTF-8 bytes for logprobs (bytes None when they cannot be told)."""
        hit = self._token_text.get(token_id)
        if hit is None:
            hit = self._token_text[token_id] = _token_text(self.tokenizer, token_id)
        return hit

    def _submit(self, specs: list[PromptSpec], options: SequenceOptions) -> tuple[Any, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def deliver(outputs: list[Output]) -> None:  # engine thread
            loop.call_soon_threadsafe(queue.put_nowait, outputs)

        try:
            handle = self.engine.submit(specs, options, deliver)
        except QueueFullError as exc:
            raise APIError(429, str(exc), type="rate_limit_error", code="rate_limit_exceeded") from None
        except EngineStoppedError as exc:
            raise APIError(503, str(exc), type="server_error") from None
        except LeanformersError as exc:
            raise APIError(400, str(exc)) from None
        return handle, queue

    async def _collect(self, request: Request, specs: list[PromptSpec], options: SequenceOptions) -> list[Output]:
        """Run a request to the end; one Output per choice (text, ids and logprobs joined). A client that
        disconnects meanwhile has its request cancelled."""
        handle, queue = self._submit(specs, options)
        total = sum(s.n for s in specs)
        results = [Output(i, "", [], [] if options.logprobs is not None else None) for i in range(total)]
        left = total
        watcher = asyncio.create_task(_disconnected(request))
        try:
            while left:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    raise _ClientGone()
                for o in getter.result():
                    r = results[o.index]
                    r.text += o.text
                    r.token_ids += o.token_ids
                    if o.logprobs is not None and r.logprobs is not None:
                        r.logprobs += o.logprobs
                    if o.finish_reason is not None:
                        r.finish_reason, r.error = o.finish_reason, o.error
                        left -= 1
        finally:
            watcher.cancel()
            if left:
                handle.cancel()
        for r in results:
            if r.finish_reason == "error":
                raise APIError(500, f"generation failed: {r.error}", type="server_error")
        return results

    def _stream(self, request: Request, specs: list[PromptSpec], options: SequenceOptions,
                events: Callable[[AsyncIterator[list[Output]]], AsyncIterator[str]]) -> StreamingResponse:
        handle, queue = self._submit(specs, options)  # a 429 is still an HTTP error, before the stream starts
        total = sum(s.n for s in specs)

        async def outputs() -> AsyncIterator[list[Output]]:
            left = total
            while left:
                batch = [await queue.get()]
                while not queue.empty():  # the client fell behind: send what is there in one chunk
                    batch.append(queue.get_nowait())
                flat = [o for b in batch for o in b]
                left -= sum(o.finish_reason is not None for o in flat)
                errors = [o.error for o in flat if o.finish_reason == "error"]
                if errors:
                    raise _StreamFailed(errors[0] or "generation failed")
                yield flat

        async def body() -> AsyncIterator[str]:
            finished = False
            try:
                async for piece in events(outputs()):
                    yield piece
                finished = True
            except _StreamFailed as exc:
                err = S.ErrorResponse(error=S.ErrorBody(message=f"generation failed: {exc}", type="server_error"))
                yield f"data: {err.model_dump_json()}\n\n"
                finished = True
            finally:
                if not finished:  # the client went away (the stream was cancelled): free the slots
                    handle.cancel()
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _ClientGone(Exception):
    pass


class _StreamFailed(Exception):
    pass


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is {len(body)} bytes; at most {MAX_BODY_BYTES} are accepted",
                       code="request_too_large")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _validation_error(exc: ValidationError) -> APIError:
    """The first problem of a pydantic error as an OpenAI 400: which field, what was expected."""
    err = exc.errors(include_url=False)[0]
    kind = err["type"]
    if kind == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request: "
                             f"{err.get('ctx', {}).get('error', 'invalid JSON')}. The body must be a JSON object.")
    loc = [str(p) for p in err["loc"] if isinstance(p, int) or _is_field(str(p))]
    param = ".".join(loc) or None
    if kind in ("model_type", "model_attributes_type") and not loc:
        return APIError(400, "the request body must be a JSON object")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param)
    return APIError(400, f"Invalid value for '{param}': {err['msg']}.", param=param)


def _is_field(part: str) -> bool:
    # pydantic adds the branch of a union (`str`, `list[int]`, `function-after[...]`) to an error's location
    return part.isidentifier() and part not in {"str", "int", "float", "bool", "list", "dict", "none"}


def _refuse_unsupported_chat(req: S.ChatCompletionRequest) -> None:
    if req.tools or req.functions:
        raise APIError(400, "tools / function calling are not supported by this server", param="tools")
    if req.tool_choice not in (None, "none", "auto") or req.function_call not in (None, "none", "auto"):
        raise APIError(400, "tool_choice is only allowed when tools are specified (tools are not supported)",
                       param="tool_choice")
    if req.audio is not None or (req.modalities is not None and req.modalities != ["text"]):
        raise APIError(400, "this server produces text only (audio output is not supported)", param="modalities")
    if req.prediction is not None:
        raise APIError(400, "predicted outputs are not supported by this server", param="prediction")
    if req.reasoning_effort is not None:
        raise APIError(400, "Unsupported parameter: 'reasoning_effort' is not supported with this model.",
                       param="reasoning_effort")
    if req.web_search_options is not None:
        raise APIError(400, "web search is not supported by this server", param="web_search_options")


def _template_messages(messages: list[S.ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the chat template takes them: text content, `developer` as `system`."""
    out = []
    for i, m in enumerate(messages):
        extra = set(m.model_extra or {}) - _IGNORED_MESSAGE_FIELDS
        if m.role == "tool" or extra & {"tool_calls", "tool_call_id", "function_call"}:
            raise APIError(400, f"messages.{i}: tool messages and tool calls are not supported by this server",
                           param=f"messages.{i}")
        if extra:
            raise APIError(400, f"messages.{i}: unsupported field(s) {', '.join(sorted(extra))}",
                           param=f"messages.{i}")
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"messages.{i}.content.{j}: only text content parts are supported, got "
                                        f"type {part.type!r}", param=f"messages.{i}.content.{j}")
                texts.append(part.text)
            content = "\n".join(texts)
        if content is None:
            raise APIError(400, f"messages.{i}: content is required", param=f"messages.{i}.content")
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return out


def _merge(outputs: list[Output]) -> list[Output]:
    """Outputs of one choice in order joined into one (a client that fell behind gets one chunk per choice)."""
    merged: dict[int, Output] = {}
    for o in outputs:
        m = merged.get(o.index)
        if m is None:
            merged[o.index] = Output(o.index, o.text, list(o.token_ids),
                                     list(o.logprobs) if o.logprobs is not None else None, o.finish_reason, o.error)
        else:
            m.text += o.text
            m.token_ids += o.token_ids
            if o.logprobs is not None:
                m.logprobs = (m.logprobs or []) + o.logprobs
            m.finish_reason, m.error = o.finish_reason or m.finish_reason, o.error or m.error
    return list(merged.values())


def _usage(prompt_lens: list[int], outs: list[Output]) -> S.Usage:
    prompt, completion = sum(prompt_lens), sum(len(o.token_ids) for o in outs)
    return S.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _default_sampling(lm: Any) -> dict[str, Any]:
    """Sampling defaults for fields a request leaves out: the OpenAI API's (temperature 1, top_p 1), except
    what the model's generation_config.json asks for (its sampling settings when it samples, its
    repetition penalty), as vLLM does. A request's own fields always win; temperature 0 is greedy."""
    d = lm.defaults
    out: dict[str, Any] = {"temperature": 1.0, "repetition_penalty": d.repetition_penalty}
    if lm.generation_config.get("do_sample") is True:
        out.update(temperature=d.temperature, top_p=d.top_p, top_k=d.top_k, min_p=d.min_p)
    return out


_BYTE_OF_CHAR: dict[str, int] | None = None


def _token_text(tokenizer: Any, token_id: int) -> tuple[str, list[int] | None]:
    """(text, UTF-8 bytes) of one token. A token that is part of a multi-byte character decodes to U+FFFD;
    its bytes come from the vocabulary's byte-level alphabet or a sentencepiece <0xNN> piece when it has one."""
    global _BYTE_OF_CHAR
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return text, list(text.encode("utf-8"))
    piece = tokenizer.id_to_token(token_id) or ""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return text, [int(piece[3:5], 16)]
        except ValueError:
            return text, None
    if _BYTE_OF_CHAR is None:
        from ..tokenizer import _byte_chars

        _BYTE_OF_CHAR = {c: b for b, c in enumerate(_byte_chars())}
    if piece and all(c in _BYTE_OF_CHAR for c in piece):
        return text, [_BYTE_OF_CHAR[c] for c in piece]
    return text, None


def run(app: Any, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Serve `app` with uvicorn until interrupted (SIGINT/SIGTERM: open streams get 5 s to finish)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)
