"""The OpenAI-compatible HTTP API and the web UI: a thin protocol layer over the engines.

    app = create_app({"smollm2": ServedModel("smollm2", lmforge.load("smollm2-135m-instruct"))})

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``,
``POST /v1/embeddings``, ``GET /health``, ``GET /metrics`` (Prometheus), and the web UI
at ``/``. Every error is OpenAI's error object with a 4xx status; streaming uses
server-sent events. A client that disconnects aborts its requests, freeing their rows.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import InputError
from lmforge.eval.human import RatingStore
from lmforge.infer.request import RequestOutput
from lmforge.inspector import inspect_text
from lmforge.inspector.export import Focus, payload
from lmforge.serve.completions import (
    Plan,
    build_chat,
    build_completion,
    chat_logprobs,
    completion_logprobs,
    finish_reason,
    usage,
)
from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    InspectRequest,
    RagAskRequest,
    TokenizeRequest,
)
from lmforge.serve.ratings import rating_routes
from lmforge.serve.served_model import ServedModel
from lmforge.serve.tools import OPEN, ToolCallStream, parse_tool_calls

STATIC = Path(__file__).parent / "static"
INSPECT_TOKENS = 512  # the longest text POST /v1/inspect reads
INSPECT_WEIGHTS = 2**24  # ... and at most this many attention weights (SmolLM2's 270 heads: 249 tokens, 32 MB)
INSPECTIONS_KEPT = 4  # texts whose inspection the server keeps (SmolLM2, 64 tokens: about 35 MB each)
TOKENIZER_ROUTES = ("/tokenize", "/detokenize", "/tokenizer_info")


def create_app(models: dict[str, ServedModel], api_key: str | None = None, max_queue: int = 64,
               engine_threads: bool = True, ratings: RatingStore | None = None, embedder=None,
               knowledge_base=None) -> FastAPI:
    """An app serving ``models`` (the first is the default). ``max_queue``: requests waiting for
    a slot, per model, beyond which new ones get 429. ``engine_threads``: start a thread per
    engine with the app; False when the caller drives them (``lmforge serve``: its main thread).
    ``ratings``: also serve the human-evaluation routes over this store (serve/ratings.py).
    ``embedder`` (:class:`lmforge.embed.Embedder`): /v1/embeddings answers with this encoder
    (requests naming it, or naming no chat model). ``knowledge_base``
    (:class:`lmforge.rag.KnowledgeBase`): ``POST /v1/rag/ask`` answers from it with sources."""
    if not models:
        raise ValueError("serve at least one model")
    metrics = ServerMetrics(lambda: {name: _figures(m) for name, m in models.items()})
    inspections: OrderedDict = OrderedDict()  # (model, text) -> Inspection, the last few (POST /v1/inspect)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine_threads:
            for model in models.values():
                model.worker.start()
        yield
        for model in models.values():  # SIGTERM: uvicorn has let in-flight responses finish or closed them
            model.worker.stop()

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.models, app.state.metrics = models, metrics

    # ---- errors, authentication, request counting ------------------------------------------------

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return JSONResponse(APIError(400, "the request body is not valid JSON").body(), status_code=400)
        message = f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(APIError(400, message, ".".join(where) or None).body(), status_code=400)

    @app.exception_handler(Exception)
    async def bug(_: Request, err: Exception):  # a failure of ours, not of the request: say so, keep serving
        body = APIError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException):
        return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    def guarded(path: str) -> bool:
        return path.startswith("/v1/") or path in TOKENIZER_ROUTES

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if api_key and guarded(path) and request.headers.get("authorization") != f"Bearer {api_key}":
            response: Response = JSONResponse(APIError(401, "missing or wrong API key (send Authorization: "
                                                            "Bearer <key>)", code="invalid_api_key").body(),
                                              status_code=401)
        else:
            response = await call_next(request)
        if path.startswith("/v1/"):
            metrics.requests.labels(path, str(response.status_code)).inc()
        return response


    def pick(name: str | None) -> ServedModel:
        if name is None or name == "":
            return next(iter(models.values()))
        if name not in models:
            raise APIError(404, f"the model {name!r} does not exist; served: {', '.join(models)}", "model",
                           "model_not_found")
        return models[name]

    def admit(model: ServedModel, plan: Plan) -> Plan:
        """Check each request against the engine (400), and the queue's room for them (429)."""
        for request in plan.requests:
            try:
                model.engine.validate(request)
            except ValueError as err:
                raise APIError(400, str(err)) from err
        if model.worker.queued + len(plan.requests) > max_queue:
            raise APIError(429, f"the server is busy: {model.worker.queued} requests are waiting; retry shortly",
                           code="queue_full", headers={"Retry-After": "1"})
        return plan

    # ---- routes ------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(models)}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models():
        cards = [m.card() for m in models.values()]
        if embedder is not None:
            cards.append({"id": embedder.name, "object": "model", "created": 0, "owned_by": "lmforge",
                          "max_model_len": embedder.max_tokens, "kind": "embedding"})
        return {"object": "list", "data": cards}

    @app.get("/v1/rag")
    async def rag_info():
        """What the server's knowledge base holds (404 without one): the web UI offers it when it exists."""
        if knowledge_base is None:
            raise APIError(404, "this server has no knowledge base (start it with --kb KB)", code="no_knowledge_base")
        return {"object": "rag.knowledge_base", "chunks": len(knowledge_base), "files": len(knowledge_base.files),
                "encoder": knowledge_base.meta.get("encoder")}

    @app.post("/v1/rag/ask")
    async def rag_ask(body: RagAskRequest, raw: Request):
        """An answer from the knowledge base citing numbered sources (lmforge.rag.ask), decoded on the engine."""
        if knowledge_base is None:
            raise APIError(404, "this server has no knowledge base (start it with --kb KB)", code="no_knowledge_base")
        from lmforge.rag import Retriever
        from lmforge.rag.ask import ask

        model = pick(body.model)
        retriever = Retriever(knowledge_base, embedder)
        loop = asyncio.get_running_loop()

        def generate(messages: list[dict], max_new_tokens: int) -> str:
            chat = ChatCompletionRequest(messages=messages, model=model.name, max_tokens=max_new_tokens, temperature=0)
            plan = admit(model, build_chat(model, chat))
            outputs = asyncio.run_coroutine_threadsafe(_collect(model, plan, raw, metrics), loop).result()
            return "".join(o.text for o in outputs[0])

        try:
            answer = await asyncio.to_thread(ask, retriever, body.question, generate, body.k, body.method,
                                             body.min_score, body.max_tokens)
        except ValueError as err:
            raise APIError(400, str(err), "question") from err
        sources = [{"number": i, "title": h.chunk.title, "source": h.chunk.source, "start": h.chunk.start,
                    "end": h.chunk.end, "text": h.chunk.text, "score": h.score, "cited": i in answer.cited}
                   for i, h in enumerate(answer.sources, 1)]
        return {"object": "rag.answer", "model": model.name, "question": body.question, "answer": answer.text,
                "found": answer.found, "sources": sources}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        return pick(name).card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        model = pick(body.model)
        plan = admit(model, build_chat(model, body))
        if body.stream:
            return _sse(_chat_stream(model, plan, body.include_usage, metrics))
        outputs = await _collect(model, plan, raw, metrics)
        choices = []
        for index, outs in enumerate(outputs):
            text = "".join(o.text for o in outs)
            content, calls = parse_tool_calls(OPEN + "\n" + text if plan.forced_call else text) \
                if plan.tools else (text, [])
            message = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            logprobs = None
            if plan.requests[index].logprobs is not None:
                logprobs = chat_logprobs(model, [e for o in outs for e in o.logprobs])
            choices.append({"index": index, "message": message, "logprobs": logprobs,
                            "finish_reason": finish_reason(outs[-1].finish_reason, bool(calls))})
        return {"id": plan.id, "object": "chat.completion", "created": plan.created, "model": model.name,
                "choices": choices, "usage": usage([o[-1] for o in outputs], [len(plan.requests[0].prompt_ids)])}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        model = pick(body.model)
        plan = admit(model, build_completion(model, body))
        if body.stream:
            return _sse(_completion_stream(model, plan, body, body.include_usage, metrics))
        outputs = await _collect(model, plan, raw, metrics)
        choices = []
        for index, outs in enumerate(outputs):
            request = plan.requests[index]
            entries = [e for o in outs for e in o.logprobs]  # a stop token has one, and no text
            ids = [e.token_id for e in entries]
            text = "".join(o.text for o in outs)
            if body.max_tokens == 0:  # echo only: score the prompt, drop the one token generated for it
                ids, entries, text = [], [], ""
            logprobs = None
            if body.echo:
                if request.logprobs is not None:
                    logprobs = completion_logprobs(model, request.prompt_ids + ids,
                                                   list(outs[0].prompt_logprobs or []) + entries,
                                                   echoed=plan.prompt_texts[index])
                text = plan.prompt_texts[index] + text
            elif request.logprobs is not None:
                logprobs = completion_logprobs(model, ids, entries)
            reason = "length" if body.max_tokens == 0 else finish_reason(outs[-1].finish_reason, False)
            choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason})
        once = [len(r.prompt_ids) for r in plan.requests[::body.n]]
        if body.max_tokens == 0:
            for outs in outputs:
                outs[-1].completion_tokens = 0
        return {"id": plan.id, "object": "text_completion", "created": plan.created, "model": model.name,
                "choices": choices, "usage": usage([o[-1] for o in outputs], once)}

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        if embedder is not None and body.model not in models:
            return await _encoder_embeddings(embedder, body)
        model = pick(body.model)
        inputs = body.input
        if isinstance(inputs, str) or (inputs and all(isinstance(t, int) for t in inputs)):
            inputs = [inputs]
        if not inputs:
            raise APIError(400, "input is empty", "input")
        batch = [model.encode_plain(x) if isinstance(x, str) else list(x) for x in inputs]
        for index, ids in enumerate(batch):
            if not ids:
                raise APIError(400, f"input {index} is empty", "input")
            if len(ids) > model.context:
                raise APIError(400, f"input {index} has {len(ids)} tokens; the context is {model.context}", "input",
                               "context_length_exceeded")
        if body.dimensions is not None and body.dimensions != model.lm.model.config.dim:
            raise APIError(400, f"this model's embeddings have {model.lm.model.config.dim} dimensions", "dimensions")
        vectors = await asyncio.wrap_future(model.worker.call(lambda: model.embed(batch)))
        data = [{"object": "embedding", "index": i,
                 "embedding": _encode_vector(v) if body.encoding_format == "base64" else v}
                for i, v in enumerate(vectors)]
        tokens = sum(map(len, batch))
        return {"object": "list", "data": data, "model": model.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    # lm-evaluation-harness's remote tokenizer (tokenizer_backend=remote) and vLLM's routes of the same names
    @app.get("/tokenizer_info")
    async def tokenizer_info(model: str | None = None):
        return pick(model).tokenizer_info()

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        model = pick(body.model)
        tokens = model.encode(body.prompt) if body.add_special_tokens else model.encode_plain(body.prompt)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": model.context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        model = pick(body.model)
        if any(t < 0 or t >= model.lm.model.config.vocab_size for t in body.tokens):
            raise APIError(400, "token ids must be within the vocabulary", "tokens")
        return {"prompt": model.tokenizer.decode(body.tokens)}

    @app.post("/v1/inspect")
    async def inspect(body: InspectRequest):
        """The inspector's views of one text (lmforge.inspector.export.payload), with this engine's prefix cache."""
        model = pick(body.model)
        focus = Focus(**body.model_dump(exclude={"model", "text", "target", "views"}))
        views = tuple(body.views) if body.views is not None else None

        def run() -> dict:
            key = (model.name, body.text, body.target)
            config = model.lm.model.config  # the attention sent is L x H x T x T weights: cap T by the model
            limit = min(INSPECT_TOKENS, math.isqrt(INSPECT_WEIGHTS // (config.num_layers * config.num_heads)))
            inspection = inspections.pop(key, None) or inspect_text(model.lm, body.text, model.name,
                                                                    max_tokens=limit, target=body.target)
            inspections[key] = inspection  # the newest last; a slider moved on the page reads it again
            while len(inspections) > INSPECTIONS_KEPT:
                inspections.popitem(last=False)
            data = payload(inspection, focus, views)
            stats = model.engine.stats
            data["server"] = {"prefix_queries": stats.prefix_queries, "prefix_hits": stats.prefix_hits,
                              "prompt_tokens": stats.prompt_tokens, "cached_tokens": stats.cached_tokens,
                              "text_cached_tokens": model.engine.cached_prefix(inspection.ids),
                              **model.engine.usage()}
            return data
        try:
            return await asyncio.wrap_future(model.worker.call(run))
        except InputError as err:
            raise APIError(400, str(err)) from err

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    if ratings is not None:
        app.include_router(rating_routes(ratings))

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


# ---- helpers ---------------------------------------------------------------------------------------

def _figures(model: ServedModel) -> dict[str, float]:
    usage_now, stats = model.engine.usage(), model.engine.stats
    hit_rate = stats.prefix_hits / stats.prefix_queries if stats.prefix_queries else 0.0
    return {**usage_now, "prefix_hit_rate": hit_rate, "cached_tokens": stats.cached_tokens,
            "drafted": stats.drafted, "accepted": stats.accepted}


def _encode_vector(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def lines():
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _Timer:
    """Time to first token and inter-token latency of one request, into the metrics."""

    def __init__(self, model: ServedModel, metrics: ServerMetrics, arrival: float):
        self.model, self.metrics, self.arrival, self.last = model.name, metrics, arrival, None

    def tokens(self, output: RequestOutput) -> None:
        now, count = time.monotonic(), len(output.token_ids) or (1 if output.completion_tokens else 0)
        if count:
            if self.last is None:
                self.metrics.time_to_first_token.labels(self.model).observe(now - self.arrival)
            else:
                self.metrics.inter_token_latency.labels(self.model).observe((now - self.last) / count)
            self.last = now
        if output.finished:
            self.metrics.request_latency.labels(self.model).observe(now - self.arrival)
            self.metrics.completion_tokens.labels(self.model).inc(output.completion_tokens)
            self.metrics.prompt_tokens.labels(self.model).inc(output.prompt_tokens)


async def _merged(model: ServedModel, plan: Plan, metrics: ServerMetrics) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Every choice's outputs as they come, tagged with the choice index; cancelling aborts them all."""
    arrival = time.monotonic()
    if len(plan.requests) == 1:  # one choice: no merging needed
        timer = _Timer(model, metrics, arrival)
        try:
            async for output in model.worker.submit(plan.requests[0]):
                timer.tokens(output)
                yield 0, output
        except ValueError as err:
            raise APIError(400, str(err)) from err
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int) -> None:
        timer = _Timer(model, metrics, arrival)
        try:
            async for output in model.worker.submit(plan.requests[index]):
                timer.tokens(output)
                await queue.put((index, output))
        except BaseException as err:  # hand it to the consumer
            await queue.put((index, err))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(plan.requests))]
    done = 0
    try:
        while done < len(tasks):
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise APIError(400, str(item)) if isinstance(item, ValueError) else item
            done += item.finished
            yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def _encoder_embeddings(embedder, body: EmbeddingRequest) -> dict:
    """/v1/embeddings from the server's encoder: text inputs only (token ids are another model's)."""
    inputs = [body.input] if isinstance(body.input, str) else list(body.input)
    if not inputs:
        raise APIError(400, "input is empty", "input")
    if not all(isinstance(x, str) for x in inputs):
        raise APIError(400, f"the encoder {embedder.name!r} takes text; send strings, not token ids", "input")
    if body.dimensions is not None and body.dimensions != embedder.dim:
        raise APIError(400, f"this encoder's embeddings have {embedder.dim} dimensions", "dimensions")
    vectors = await asyncio.to_thread(embedder.encode, inputs)
    data = [{"object": "embedding", "index": i,
             "embedding": _encode_vector(v.tolist()) if body.encoding_format == "base64" else v.tolist()}
            for i, v in enumerate(vectors)]
    tokens = sum(map(len, embedder.tokenize(inputs)))
    return {"object": "list", "data": data, "model": embedder.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


async def _collect(model: ServedModel, plan: Plan, raw: Request, metrics: ServerMetrics) -> list[list[RequestOutput]]:
    """All outputs of every choice; aborts them if the client disconnects while waiting."""
    outputs: list[list[RequestOutput]] = [[] for _ in plan.requests]

    async def gather() -> None:
        async for index, output in _merged(model, plan, metrics):
            outputs[index].append(output)

    task = asyncio.create_task(gather())
    while not task.done():
        await asyncio.wait({task}, timeout=0.5)
        if not task.done() and await raw.is_disconnected():
            task.cancel()
            raise APIError(499, "the client closed the connection")
    task.result()
    return outputs


async def _chat_stream(model: ServedModel, plan: Plan, include_usage: bool,
                       metrics: ServerMetrics) -> AsyncIterator[dict]:
    def chunk(index: int, delta: dict, reason: str | None = None, logprobs: dict | None = None) -> dict:
        return {"id": plan.id, "object": "chat.completion.chunk", "created": plan.created, "model": model.name,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}

    calls = [ToolCallStream() for _ in plan.requests]
    if plan.forced_call:
        for stream in calls:
            stream.push(OPEN + "\n")
    last: list[RequestOutput | None] = [None] * len(plan.requests)
    for index in range(len(plan.requests)):
        yield chunk(index, {"role": "assistant", "content": ""})
    async for index, output in _merged(model, plan, metrics):
        last[index] = output
        text = calls[index].push(output.text) if plan.tools else output.text
        logprobs = chat_logprobs(model, output.logprobs) if plan.requests[index].logprobs is not None else None
        if text or (logprobs and logprobs["content"]):
            yield chunk(index, {"content": text}, logprobs=logprobs)
        if output.finished:
            tool_calls = []
            if plan.tools:
                tail = calls[index].flush()
                content, tool_calls = parse_tool_calls(calls[index].held) if calls[index].held else (None, [])
                rest = (tail + (content or "")) if tool_calls else tail + calls[index].held
                if rest:
                    yield chunk(index, {"content": rest})
                for position, call in enumerate(tool_calls):
                    yield chunk(index, {"tool_calls": [{"index": position, **call}]})
            yield chunk(index, {}, finish_reason(output.finish_reason, bool(tool_calls)))
    if include_usage:
        yield {"id": plan.id, "object": "chat.completion.chunk", "created": plan.created, "model": model.name,
               "choices": [], "usage": usage(last, [len(plan.requests[0].prompt_ids)])}


async def _completion_stream(model: ServedModel, plan: Plan, body: CompletionRequest, include_usage: bool,
                             metrics: ServerMetrics) -> AsyncIterator[dict]:
    def chunk(index: int, text: str, reason: str | None = None, logprobs: dict | None = None) -> dict:
        return {"id": plan.id, "object": "text_completion", "created": plan.created, "model": model.name,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}]}

    last: list[RequestOutput | None] = [None] * len(plan.requests)
    echoed = [False] * len(plan.requests)
    async for index, output in _merged(model, plan, metrics):
        last[index] = output
        request = plan.requests[index]
        text, entries = output.text, list(output.logprobs)
        ids = [e.token_id for e in entries]
        if body.max_tokens == 0:
            text, ids, entries = "", [], []
        echo_text = None
        if body.echo and not echoed[index]:
            echoed[index], echo_text = True, plan.prompt_texts[index]
            text = echo_text + text
            ids, entries = request.prompt_ids + ids, list(output.prompt_logprobs or [None] * len(request.prompt_ids)) + entries
        logprobs = None
        if request.logprobs is not None:
            logprobs = completion_logprobs(model, ids, entries, echoed=echo_text)
        reason = None
        if output.finished:
            reason = "length" if body.max_tokens == 0 else finish_reason(output.finish_reason, False)
        if text or reason or ids:
            yield chunk(index, text, reason, logprobs)
    if include_usage:
        once = [len(r.prompt_ids) for r in plan.requests[::body.n]]
        yield {"id": plan.id, "object": "text_completion", "created": plan.created, "model": model.name,
               "choices": [], "usage": usage(last, once)}
