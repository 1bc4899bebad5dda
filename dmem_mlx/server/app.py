"""The HTTP API (FastAPI on uvicorn): OpenAI's chat completions and models, health, memories.

Every error is OpenAI's error body with a 4xx/5xx status — never a traceback. The API key, when
set, is compared in constant time; request bodies are bounded before they are read whole.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections import deque
from contextlib import asynccontextmanager
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import ChatJob, Engine
from .schemas import APIError, Limits, chat_request, chunk, completion, error_body, memory_id

log = logging.getLogger("dmem_mlx.server")
MEMORY_HEADER = "x-dmem-memory"


class Guard:
    """ASGI middleware in front of the app: the API key (compared in constant time; /health is
    open) and the body size (read up to `max_bytes`, else 413 — with or without a
    Content-Length)."""

    def __init__(self, app: Any, max_bytes: int, api_key: Optional[str]):
        self.app, self.max_bytes = app, max_bytes
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers") or []}
        if self.key is not None and scope.get("path") != "/health":
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                return await _refuse(send, 401, "invalid or missing API key (send "
                                                "'Authorization: Bearer <key>')",
                                     "invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            if not length.isdigit():
                return await _refuse(send, 400, "bad Content-Length header", "invalid_body")
            return await _refuse(send, 413, f"the request body is larger than {self.max_bytes} "
                                            "bytes", "request_too_large")
        body, more = [], True
        seen = 0
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body.append(message.get("body", b""))
            seen += len(body[-1])
            if seen > self.max_bytes:
                return await _refuse(send, 413, f"the request body is larger than "
                                                f"{self.max_bytes} bytes", "request_too_large")
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()  # later: the client's disconnect

        await self.app(scope, replay, send)


async def _refuse(send: Any, status: int, message: str, code: str) -> None:
    payload = json.dumps(error_body(status, message, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def create_app(engine: Engine, model_id: str, limits: Limits, api_key: Optional[str] = None,
               max_body_bytes: int = 1 << 20) -> Any:
    """The ASGI application serving `engine` (started and stopped with the app)."""
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="dmem-serve", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(
            exc.status_code, str(exc.detail))
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(400, "invalid request"), status_code=400)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse(error_body(500, "internal server error"), status_code=500)

    @app.get("/health")
    async def health() -> Any:
        ok = engine.healthy
        return JSONResponse({"status": "ok" if ok else "unavailable"},
                            status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": model_id, "object": "model",
                                            "created": created, "owned_by": "dmem-mlx"}]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> Any:
        if name != model_id:
            raise APIError(404, f"no model {name[:80]!r}", "model", "model_not_found")
        return {"id": model_id, "object": "model", "created": created, "owned_by": "dmem-mlx"}

    async def on_worker(memory: str, method: Any, *args: Any) -> Any:
        future = engine.call(memory, lambda: method(memory, *args), (method.__name__, *args))
        return await asyncio.wrap_future(future)

    @app.get("/v1/memories/{memory}")
    async def memory_get(memory: str) -> Any:
        return await on_worker(memory_id(memory, "id"), engine.memory_info)

    @app.delete("/v1/memories/{memory}")
    async def memory_delete(memory: str) -> Any:
        return await on_worker(memory_id(memory, "id"), engine.memory_delete)

    @app.post("/v1/memories/{memory}/snapshot")
    async def memory_snapshot(memory: str, request: Request) -> Any:
        memory = memory_id(memory, "id")
        body = await _json(request, empty_ok=True)
        name = body.get("name") if isinstance(body, dict) else None
        if body is not None and (not isinstance(body, dict)
                                 or (name is not None and not isinstance(name, str))):
            raise APIError(400, "the body must be {\"name\": \"...\"} or empty", "name")
        return await on_worker(memory, engine.memory_snapshot, name)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        req = chat_request(await _json(request), request.headers.get(MEMORY_HEADER), limits)
        if req.model not in ("", model_id):  # as OpenAI: a model this server does not serve
            raise APIError(404, f"the model {req.model[:80]!r} does not exist here: this server "
                                f"serves {model_id!r} (GET /v1/models)", "model",
                           "model_not_found")
        channel = Channel(asyncio.get_running_loop())
        job = ChatJob(req, channel.put)
        engine.submit(job)
        if not req.stream:
            try:
                while True:
                    for kind, value in await channel.get():
                        if kind == "error":
                            raise value
                        if kind == "done":
                            return completion(req, model_id, value.text, value.finish_reason,
                                              value.usage())
            finally:
                job.cancelled.set()  # no effect once done; stops the reply if the client left

        first = await channel.get()  # an error before any text gets a proper status
        if first[0][0] == "error":
            raise first[0][1]

        async def stream() -> Any:
            try:
                yield _sse(chunk(req, model_id, {"role": "assistant", "content": ""}))
                events = first
                while True:
                    # the deltas that came together go out as one chunk
                    text = "".join(v for k, v in events if k == "delta")
                    if text:
                        yield _sse(chunk(req, model_id, {"content": text}))
                    last_kind, last = events[-1]
                    if last_kind == "error":
                        yield _sse(last.body())
                        break
                    if last_kind == "done":
                        yield _sse(chunk(req, model_id, {}, last.finish_reason))
                        if req.include_usage:
                            yield _sse(chunk(req, model_id, {}, usage_=last.usage()))
                        break
                    events = await channel.get()
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return Guard(app, max_body_bytes, api_key)


class Channel:
    """Events from the engine's thread to a request's handler: `put` on the worker thread,
    `get` (everything that arrived, in order) on the event loop. The loop is woken once for
    however many events arrive before it looks, not once per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: deque = deque()
        self.lock = threading.Lock()
        self.ready = asyncio.Event()
        self.woken = False

    def put(self, kind: str, value: Any) -> None:
        with self.lock:
            self.items.append((kind, value))
            if self.woken:
                return
            self.woken = True
        self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self.lock:
            self.woken = False
        self.ready.set()

    async def get(self) -> list:
        while True:
            with self.lock:
                if self.items:
                    out = list(self.items)
                    self.items.clear()
                    return out
                self.ready.clear()
            await self.ready.wait()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _json(request: Request, empty_ok: bool = False) -> Any:
    raw = await request.body()
    if not raw.strip() and empty_ok:
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({type(exc).__name__}: "
                            f"{str(exc)[:120]})", None, "invalid_json") from None
