"""The FastAPI app serving one checkpoint (``make_app``) and running it in a thread
(``serve_in_background``).

``make_app`` loads the checkpoint, then wires three routes and the error handlers to a
``_Service``: the one checkpoint, the options, the live counters and the in-flight count
that every request handler of the app reads and updates, on the event loop only. A chat
request goes: ``chat_completions`` (body, admission) -> ``admitted`` (parse, count the
prompt, draw a fault) -> ``generate`` in a worker thread, answered whole or ``stream``-ed.
"""

import asyncio
import hmac
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from semilens.serve.checkpoint import ContextExceeded, GenerationParams, LoadedCheckpoint, load_checkpoint
from semilens.serve.faults import FAULT_KINDS, Faults, injected_reply
from semilens.serve.options import ServeOptions
from semilens.serve.schemas import (
    ApiError,
    ChatRequest,
    chat_messages,
    generation_params,
    param_path,
    parse_chat_request,
    sse,
    usage,
)

if TYPE_CHECKING:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response

# No `from __future__ import annotations` here: FastAPI reads the route functions'
# annotations at run time, and `Request` is imported inside the functions that declare
# the routes (heavy imports stay out of `semilens --help`), so string annotations could
# not be resolved.

log = logging.getLogger("semilens.serve")  # one name for the whole server: one filter sees all its logs


@dataclass
class ServeStats:
    """What ``GET /semilens/stats`` returns: chat requests seen (past authentication),
    answered normally, turned away with 429 because the queue was full, and injected
    faults by kind."""

    requests: int = 0
    completed: int = 0
    busy: int = 0
    faults: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAULT_KINDS, 0))

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "completed": self.completed, "busy": self.busy, "faults": dict(self.faults)}


@dataclass
class _Slot:
    """One admitted request's place in the in-flight count; ``owned`` once a generation
    task will release it."""

    owned: bool = False


async def _read_body(request: Any, limit: int) -> bytes:
    """The body, or ApiError 413 when it (its Content-Length or the bytes actually sent)
    exceeds ``limit``. An oversized body is still read and dropped, up to 16x the limit:
    closing a socket with unread data makes the kernel reset the connection, and the
    client would see a reset instead of the 413."""
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    too_big = declared is not None and declared.isdigit() and int(declared) > limit
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                too_big = True
            if too_big:
                chunks.clear()
                if size > 16 * limit:
                    break
            else:
                chunks.append(chunk)
    except ClientDisconnect as exc:  # gone mid-upload: nobody reads the answer, keep the log quiet
        raise ApiError(499, "the client closed the connection while sending the request") from exc
    if too_big:
        raise ApiError(
            413, f"the request body exceeds {limit} bytes (--max-request-bytes)", param=None, code="request_too_large"
        )
    return b"".join(chunks)


# Bodies at least this large leave megabytes of freed heap behind (JSON, the validated
# request, the prompt's text and token ids); glibc keeps such pages for reuse rather than
# returning them, and under many concurrent large requests the kept pages add up: a soak
# mixing 200 kB prompts with normal chats climbed ~180 MB that one malloc_trim handed back.
_TRIM_AFTER_BODY_BYTES = 64 * 1024
_TRIM_MIN_INTERVAL_S = 1.0


@lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_free_heap() -> bool:
    """Return the C heap's free pages to the system; False where that is not possible."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


async def _until_done(request: Any, fut: "asyncio.Future[Any]", cancel: threading.Event) -> Any:
    """Await ``fut``; if the client hangs up meanwhile, set ``cancel`` so the model stops
    (or never starts) working for nobody, and still wait for ``fut`` to finish."""
    while True:
        done, _ = await asyncio.wait({fut}, timeout=0.2)
        if done:
            return fut.result()
        if not cancel.is_set() and await request.is_disconnected():
            cancel.set()


def _context_error(exc: ContextExceeded) -> ApiError:
    return ApiError(400, str(exc), param="messages", code="context_length_exceeded")


def _generation_failed(exc: Exception) -> ApiError:
    return ApiError(
        500, f"generation failed: {exc.__class__.__name__}: {exc}", type="server_error", code="generation_failed"
    )


@dataclass
class _Service:
    """What every request handler of one app reads and updates. Its methods run on the
    event loop (model work goes to worker threads), so the counters need no lock."""

    options: ServeOptions
    loaded: LoadedCheckpoint
    name: str  # the model id clients must send
    created: int
    context: int  # prompt + reply tokens allowed
    stats: ServeStats = field(default_factory=ServeStats)
    faults: Faults = field(init=False)
    in_flight: int = 0  # chat requests admitted and not yet done generating
    last_trim: float = 0.0  # time.monotonic() of the last release_free_heap

    def __post_init__(self) -> None:
        self.faults = Faults(self.options)
        self.latency_s = self.options.latency_ms / 1000.0

    def leave(self, *_: Any) -> None:
        self.in_flight -= 1

    def check_key(self, request: Any) -> None:
        options = self.options
        if options.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing API key: send `Authorization: Bearer <key>`", code="invalid_api_key")
        # Constant-time comparison; neither key is ever echoed or logged.
        if not hmac.compare_digest(token.strip().encode(), options.api_key.get_secret_value().encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    async def models(self) -> dict[str, Any]:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return {
            "object": "list",
            "data": [{"id": self.name, "object": "model", "created": self.created, "owned_by": "semilens"}],
        }

    async def chat_completions(self, request: Any) -> "Response":
        options, stats = self.options, self.stats
        stats.requests += 1
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        body = await _read_body(request, options.max_request_bytes)
        # Admission after the body is read (closing on unread data would reset the
        # connection and the client would never see the 429), before any decoding or
        # queueing: this bounds the images held in memory and the queue's length.
        if self.in_flight >= options.max_in_flight:
            stats.busy += 1
            raise ApiError(
                429,
                f"the server is busy: {self.in_flight} requests are queued or running, the max_in_flight limit (--max-in-flight); "
                f"retry after {options.busy_retry_after_s} s",
                type="rate_limit_error",
                code="server_busy",
                headers={"Retry-After": str(options.busy_retry_after_s)},
            )
        self.in_flight += 1
        slot = _Slot()
        try:
            return await self.admitted(request, body, slot)
        finally:
            if not slot.owned:
                self.leave()
            self.trim_after(len(body))

    def trim_after(self, body_bytes: int) -> None:
        """After a large body, hand freed heap back (in a worker thread, at most once a
        second): RSS then follows what is in use rather than the high-water of bursts."""
        now = time.monotonic()
        if body_bytes < _TRIM_AFTER_BODY_BYTES or now - self.last_trim < _TRIM_MIN_INTERVAL_S:
            return
        self.last_trim = now
        asyncio.get_running_loop().run_in_executor(None, release_free_heap)

    def generate(self, slot: "_Slot", *args: Any) -> "asyncio.Future[Any]":
        """Run loaded.complete(*args) in a worker thread; the task owns the request's
        in-flight slot from now on and frees it when generation ends (a stream's last
        pieces are only sent after that)."""
        from starlette.concurrency import run_in_threadpool

        batching = (self.options.max_batch_size, self.options.batch_window_ms)
        task = asyncio.ensure_future(run_in_threadpool(self.loaded.complete, *args, self.context, *batching))
        slot.owned = True
        task.add_done_callback(self.leave)
        return task

    async def admitted(self, request: Any, body: bytes, slot: "_Slot") -> "Response":
        """The reply to a request admitted to the queue."""
        from fastapi.responses import JSONResponse, Response
        from starlette.concurrency import run_in_threadpool

        options, loaded, name, context = self.options, self.loaded, self.name, self.context
        chat = parse_chat_request(body, options.max_json_depth)
        if chat.model != name:
            raise ApiError(
                404,
                f"the model {chat.model!r} does not exist; this server serves {name!r}",
                param="model",
                code="model_not_found",
            )
        params = generation_params(chat, options.default_max_tokens, options.max_tokens_cap)
        # Image decoding and prompt counting are CPU work: off the event loop. Counting
        # here refuses an over-long prompt before it waits for, or holds, the model.
        messages, images = await run_in_threadpool(
            chat_messages, chat, loaded.kind, options.max_images, options.max_image_pixels
        )
        prompt_tokens, at_least = await run_in_threadpool(loaded.count_prompt_tokens, messages, context)
        if prompt_tokens >= context or (params.explicit and prompt_tokens + params.max_new_tokens > context):
            asked = params.max_new_tokens if params.explicit else None
            raise _context_error(ContextExceeded(prompt_tokens, asked, context, at_least))

        fault = self.faults.draw()
        if fault is not None:
            self.stats.faults[fault] += 1
            log.info("injected fault: %s", fault)
        faulty = await injected_reply(fault, request, options, name)
        if faulty is not None:
            return faulty

        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        cancel = threading.Event()
        if chat.stream:
            return await self.stream(request, reply_id, messages, images, params, cancel, chat, slot)
        task = self.generate(slot, messages, images, params, None, cancel)
        try:
            done = await _until_done(request, task, cancel)
        except ContextExceeded as exc:  # the exact count (a VLM's images included) says no
            raise _context_error(exc) from exc
        except Exception as exc:  # noqa: BLE001 - any failure of the model is this request's 500, not the server's end
            log.exception("generation failed")
            raise _generation_failed(exc) from exc
        if done is None or cancel.is_set():
            return Response(status_code=499)
        self.stats.completed += 1
        return JSONResponse(
            {
                "id": reply_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": done.text},
                        "finish_reason": done.finish_reason,
                        "logprobs": None,
                    }
                ],
                "usage": usage(done),
            }
        )

    async def stream(
        self,
        request: Any,
        reply_id: str,
        messages: Any,
        images: Any,
        params: GenerationParams,
        cancel: threading.Event,
        chat: ChatRequest,
        slot: "_Slot",
    ) -> "Response":
        from fastapi.responses import Response, StreamingResponse

        name, stats = self.name, self.stats
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def on_text(delta: str) -> None:  # in the model's thread
            loop.call_soon_threadsafe(queue.put_nowait, ("text", delta))

        task = self.generate(slot, messages, images, params, on_text, cancel)
        # Runs on the loop after every on_text callback the thread scheduled: FIFO.
        task.add_done_callback(lambda _: queue.put_nowait(("done", None)))
        # Headers wait for the first piece of text (or the end), so that a model that
        # fails before producing anything still gets a proper 500 rather than a 200 stream.
        first = await _until_done(request, asyncio.ensure_future(queue.get()), cancel)
        if first[0] == "done":
            try:
                task.result()
            except ContextExceeded as exc:
                raise _context_error(exc) from exc
            except Exception as exc:  # noqa: BLE001
                log.exception("generation failed")
                raise _generation_failed(exc) from exc
            if cancel.is_set():
                return Response(status_code=499)
        created_at = int(time.time())
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            body: dict[str, Any] = {
                "id": reply_id,
                "object": "chat.completion.chunk",
                "created": created_at,
                "model": name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }
            if include_usage:
                body["usage"] = None
            return sse(body)

        async def events() -> Any:
            item = first
            try:
                yield chunk({"role": "assistant", "content": ""})
                while item[0] == "text":
                    yield chunk({"content": item[1]})
                    item = await queue.get()
                try:
                    done = task.result()
                except Exception as exc:  # noqa: BLE001 - headers are out: the error goes in the stream
                    log.exception("generation failed mid-stream")
                    yield sse(_generation_failed(exc).body())
                    return
                if done is None:
                    return
                yield chunk({}, done.finish_reason)
                if include_usage:
                    yield sse(
                        {
                            "id": reply_id,
                            "object": "chat.completion.chunk",
                            "created": created_at,
                            "model": name,
                            "choices": [],
                            "usage": usage(done),
                        }
                    )
                yield sse("[DONE]")
                stats.completed += 1
            finally:
                # The client hung up mid-stream (the generator is closed early): stop the model.
                if not task.done():
                    cancel.set()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _error_response(exc: ApiError) -> "JSONResponse":
    from fastapi.responses import JSONResponse

    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _add_error_handlers(app: "FastAPI") -> None:
    """Every error, ours or FastAPI's, answers in OpenAI's error format."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 becomes OpenAI's 400 (no route here declares a body model,
        # but query or header parameters would be validated this way).
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = param_path(tuple(p for p in first["loc"] if p not in ("body", "query", "header", "path")))
        return _error_response(ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return _error_response(
                ApiError(404, f"unknown path: {request.method} {request.url.path}", code="unknown_url")
            )
        return _error_response(
            ApiError(
                exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", headers=dict(exc.headers or {})
            )
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug here must still answer in the format clients parse; starlette logs the
        # traceback and the server goes on serving.
        return _error_response(
            ApiError(
                500, f"internal error: {exc.__class__.__name__}: {exc}", type="server_error", code="internal_error"
            )
        )


def _add_routes(app: "FastAPI", service: _Service) -> None:
    """The three routes; each hands the request to the service."""
    from fastapi import Request
    from fastapi.responses import Response

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return await service.models()

    @app.get("/semilens/stats")
    async def get_stats() -> dict[str, Any]:
        return {**service.stats.as_dict(), "batching": service.loaded.batch_stats()}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await service.chat_completions(request)


def make_app(checkpoint: "str | Path | LoadedCheckpoint", options: ServeOptions | None = None) -> "FastAPI":
    """The FastAPI app serving one checkpoint: a folder (loaded now, so a bad folder fails
    here with ValueError / OSError, before any port is opened) or a LoadedCheckpoint that
    several apps may share. Serve it with ``serve_in_background`` or any ASGI server.

    ``app.state`` holds ``stats`` (the live ServeStats behind ``/semilens/stats``),
    ``checkpoint`` (the LoadedCheckpoint) and ``model_name`` (the id clients must send).
    """
    import torch
    from fastapi import Depends, FastAPI, Request

    options = options or ServeOptions()
    loaded = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(checkpoint)
    if options.threads:
        torch.set_num_threads(options.threads)
    service = _Service(
        options=options,
        loaded=loaded,
        name=options.model_name or loaded.name,
        created=int(time.time()),
        context=options.context_tokens or loaded.context_tokens,
    )

    async def require_key(request: Request) -> None:
        service.check_key(request)

    app = FastAPI(
        title="semilens serve",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(require_key)],
    )
    app.state.stats = service.stats
    app.state.checkpoint = loaded
    app.state.model_name = service.name
    _add_error_handlers(app)
    _add_routes(app, service)
    return app


# ---------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------


@contextmanager
def serve_in_background(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    log_level: str = "warning",
    startup_timeout_s: float = 30.0,
    shutdown_timeout_s: float = 5.0,
) -> Iterator[str]:
    """Run ``app`` with uvicorn in a daemon thread; yields the base URL ending in ``/v1``
    (``http://127.0.0.1:54321/v1``: port 0 picks a free port, read back from the bound
    socket) once the server accepts connections, and stops it on exit.

    On exit, requests still in flight get ``shutdown_timeout_s`` to finish, then are
    cancelled (a `timeout` fault holding a connection would otherwise keep the server up).
    A generation already running in a worker thread cannot be interrupted and finishes on
    its own. RuntimeError if the server does not start (port in use: see the log).
    """
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout_s
    )
    server = uvicorn.Server(config)
    # uvicorn installs no signal handlers outside the main thread, so this thread leaves
    # Ctrl-C to the caller.
    thread = threading.Thread(target=server.run, name=f"semilens-serve-{host}:{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port} (port in use? see the log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            thread.join(shutdown_timeout_s)
            raise RuntimeError(f"the server did not start on {host}:{port} within {startup_timeout_s:g} s")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    try:
        yield f"http://{shown}:{bound}/v1"
    finally:
        server.should_exit = True
        thread.join(shutdown_timeout_s + 5.0)
