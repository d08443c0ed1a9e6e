"""One client for every OpenAI-compatible backend: OpenAI, vLLM, llama.cpp, Ollama, TGI
and ``semilens serve``.

Every step where a model writes data (Markdown cleaning, instruction synthesis, image
annotation, the expert judge) sends its chat requests through ``Client.run``:

- requests go out concurrently (asyncio, at most ``concurrency`` in flight) as plain
  HTTP POSTs to ``<base_url>/chat/completions`` over one aiohttp session. Not the
  ``openai`` SDK: its HTTP stack (httpx) costs about 1 ms of CPU per request, which capped
  the client at 0.65 of the ideal at 64 in flight; aiohttp costs about 0.15 ms. Every
  retry is decided, counted and logged here;
- 429, 5xx, timeouts, dropped connections and replies that are not a chat completion
  (malformed JSON) are retried with exponential backoff and jitter; a server's
  ``Retry-After`` wins over the backoff;
- every reply is kept in an on-disk cache keyed by a hash of the model, the messages
  (images are data URLs inside them, so their bytes are hashed too), the sampling params
  and the output schema. A re-run, or a run resumed after a kill, sends no request whose
  reply is already cached;
- with a pydantic ``schema`` the request asks for JSON-schema structured output, the reply
  is validated, and an invalid one is re-asked (with the validation error) a bounded
  number of times; each re-ask is a request of its own, cached like any other, so a
  re-run reaches the same outcome without sending anything;
- tokens and cost are added up in ``Accounting``, which a stage writes under ``metrics/``.

The API key is read from the environment variable the config names, never from params;
it is held by the HTTP session's headers only and appears in no log, metric, cache entry or error.

    client = Client(endpoint, cache_root=cfg.paths.cache)
    outcomes = client.run([Request(messages=[{"role": "user", "content": "Hi"}])])
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from semilens.cache import ItemCache
from semilens.config import EndpointConfig

log = logging.getLogger(__name__)

# Sent when the environment holds no key: local servers (vLLM, semilens serve) ignore the
# header, and hosted ones answer 401 (final) rather than a confusing missing-header error.
NO_KEY = "EMPTY"

# Failure kinds. The first five are worth another try; the rest are final.
RETRYABLE = ("rate_limited", "server_error", "timeout", "connection", "malformed")
FINAL = ("bad_request", "unauthorized", "not_found", "http_error", "invalid_output", "not_attempted")
# After this many requests in a row fail to connect even with their retries, the rest are
# not sent: a wrong URL would otherwise cost every remaining item its retries and backoff.
GIVE_UP_AFTER = 5


class RequestFailed(Exception):
    """A request that produced no usable answer; ``kind`` is one of RETRYABLE or FINAL."""

    def __init__(self, kind: str, detail: str, retry_after_s: float | None = None):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Request:
    """One chat request. ``schema``: the pydantic model the answer must validate against
    (the request then asks for JSON-schema structured output). ``max_tokens`` overrides
    the endpoint's. ``tag`` is the caller's name for the item (logs only, not hashed)."""

    messages: Sequence[Mapping[str, Any]]
    schema: type[BaseModel] | None = None
    max_tokens: int | None = None
    tag: str = ""


@dataclass
class Outcome:
    """What one request came to: ``text`` (and ``parsed`` with a schema) or ``error``."""

    text: str | None = None
    parsed: BaseModel | None = None
    error: RequestFailed | None = None
    cached: bool = False
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Accounting:
    """Requests, retries, tokens and cost of a client's life; ``as_dict`` for metrics."""

    price_input_per_mtok: float = 0.0
    price_output_per_mtok: float = 0.0
    items: int = 0
    completed: int = 0
    cache_hits: int = 0
    requests_sent: int = 0
    reasks: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0

    @property
    def cost_usd(self) -> float:
        return (
            self.prompt_tokens * self.price_input_per_mtok + self.completion_tokens * self.price_output_per_mtok
        ) / 1e6

    def as_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "completed": self.completed,
            "failed": sum(self.failures.values()),
            "failures": dict(sorted(self.failures.items())),
            "cache_hits": self.cache_hits,
            "requests_sent": self.requests_sent,
            "retries": dict(sorted(self.retries.items())),
            "reasks": self.reasks,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": round(self.cost_usd, 6),
            "wall_s": round(self.wall_s, 3),
        }


def request_key(model: str, request: Request, sampling: Mapping[str, Any]) -> list[Any]:
    """What identifies an answer: the model, the messages (image data URLs included), the
    sampling params and the schema. Not the base URL: the same model behind another host
    answers the same, and a moved server must not re-pay for finished work."""
    schema = None if request.schema is None else request.schema.model_json_schema()
    return [model, list(request.messages), dict(sampling), schema]


def response_format(schema: type[BaseModel]) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {"name": schema.__name__, "schema": schema.model_json_schema(), "strict": True},
    }


def parse_structured(text: str, schema: type[BaseModel]) -> BaseModel:
    """``text`` validated against ``schema``. Servers that ignore ``response_format``
    often wrap the JSON in a Markdown fence or a sentence; the outermost object is taken."""
    body = text.strip()
    start, end = body.find("{"), body.rfind("}")
    if start != -1 and end > start:
        body = body[start : end + 1]
    return schema.model_validate_json(body)


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds a server asked us to wait (``retry-after-ms``, ``retry-after`` as seconds
    or as an HTTP date), or None."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if value else None
        return None if when is None else max(0.0, when.timestamp() - time.time())


def classify(exc: Exception) -> RequestFailed:
    """A transport exception as a RequestFailed with its kind; anything else is re-raised.
    The detail names the exception type only: a message may carry the URL or headers."""
    import aiohttp

    if isinstance(exc, RequestFailed):
        return exc
    # Before ClientError: aiohttp's socket timeouts are both.
    if isinstance(exc, TimeoutError):
        return RequestFailed("timeout", "no reply in time")
    if isinstance(exc, aiohttp.InvalidURL):
        return RequestFailed("bad_request", "base_url is not a valid http(s) URL")
    if isinstance(exc, aiohttp.ClientError):
        return RequestFailed("connection", type(exc).__name__)
    raise exc


def status_failure(status: int, body: str, headers: Mapping[str, str] | None) -> RequestFailed:
    """A reply with an HTTP error status as a RequestFailed: 429 and 5xx retryable (with
    the server's Retry-After), the rest final. The detail is the status and the error
    message of the body, never the request."""
    detail = f"HTTP {status}: {_error_message(body)}"
    if status == 429:
        return RequestFailed("rate_limited", detail, retry_after(headers))
    if status >= 500:
        return RequestFailed("server_error", detail, retry_after(headers))
    kind = {400: "bad_request", 401: "unauthorized", 403: "unauthorized", 404: "not_found", 413: "bad_request"}
    return RequestFailed(kind.get(status, "bad_request" if status == 422 else "http_error"), detail)


def _error_message(body: str) -> str:
    """``error.message`` of an OpenAI-style error body, else the body's start."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body.strip()[:300]
    inner = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
    message = inner.get("message", inner) if isinstance(inner, dict) else inner
    return str(message)[:300]


def _completion_text(body: str) -> tuple[str, int, int]:
    """(content, prompt tokens, completion tokens) of a chat-completion response body; a
    body that is not JSON, or has no text message, is malformed (retried)."""
    try:
        completion = json.loads(body)
        content = completion["choices"][0]["message"]["content"]
        usage = completion.get("usage") or {}
        prompt, generated = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    except json.JSONDecodeError as exc:
        raise RequestFailed("malformed", "the reply is not a chat completion (invalid JSON)") from exc
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise RequestFailed("malformed", "the reply has no choices[0].message") from exc
    if not isinstance(content, str):
        raise RequestFailed("malformed", f"message content is {type(content).__name__}, not text")
    return content, prompt, generated


class _Post:
    """POST a JSON body to one URL on a shared session: the reply body as text, or a
    RequestFailed for an error status (transport errors propagate to ``classify``)."""

    def __init__(self, session: Any, url: str):
        self.session = session
        self.url = url

    async def __call__(self, payload: dict[str, Any]) -> str:
        async with self.session.post(self.url, data=json.dumps(payload), headers=_JSON) as reply:
            body = (await reply.read()).decode("utf-8", errors="replace")
            if reply.status >= 400:
                raise status_failure(reply.status, body, reply.headers)
            return body


_JSON = {"Content-Type": "application/json"}


class Client:
    """One endpoint (base URL + model); ``run`` sends a batch of requests concurrently."""

    def __init__(
        self,
        endpoint: EndpointConfig,
        cache_root: Path | None,
        environ: Mapping[str, str] = os.environ,
        cache_stage: str = "openai",
    ):
        if not endpoint.base_url or not endpoint.model:
            raise ValueError("an OpenAI-compatible backend needs base_url and model")
        self.endpoint = endpoint
        self._key = environ.get(endpoint.api_key_env) or NO_KEY
        # No code version: an answer depends on the model and the request, not our code.
        self.cache = None if cache_root is None else ItemCache(Path(cache_root), cache_stage, "")
        self.accounting = Accounting(endpoint.price_input_per_mtok, endpoint.price_output_per_mtok)
        self._rng = random.Random(0)  # jitter only; never affects what is asked
        self._unreachable = 0  # requests in a row that never connected

    # ------------------------------------------------------------------ public

    def run(self, requests: Sequence[Request]) -> list[Outcome]:
        """Outcomes in request order; a request that failed for good has ``error`` set
        (the caller counts and skips it), and the others are unaffected."""
        start = time.perf_counter()
        try:
            return asyncio.run(self._run_all(list(requests)))
        finally:
            self.accounting.wall_s += time.perf_counter() - start

    def sampling(self, request: Request) -> dict[str, Any]:
        e = self.endpoint
        params: dict[str, Any] = {"temperature": e.temperature, "max_tokens": request.max_tokens or e.max_tokens}
        if e.seed is not None:
            params["seed"] = e.seed
        return params

    # ------------------------------------------------------------------ internals

    async def _run_all(self, requests: list[Request]) -> list[Outcome]:
        import aiohttp

        # One keep-alive pool serves the batch; the semaphore bounds the requests in flight,
        # and the pool holds as many connections. The timeout is for the server's silence
        # (connecting, or waiting for the next bytes of the reply), as an SDK's is, not for
        # the whole exchange: a large image upload is not a timeout.
        e = self.endpoint
        session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {self._key}", "Accept": "application/json"},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=e.timeout_s, sock_read=e.timeout_s),
            connector=aiohttp.TCPConnector(limit=e.concurrency),
        )
        post = _Post(session, e.base_url.rstrip("/") + "/chat/completions")
        gate = asyncio.Semaphore(e.concurrency)
        try:
            return list(await asyncio.gather(*(self._one(post, gate, r) for r in requests)))
        finally:
            await session.close()

    async def _one(self, post: _Post, gate: asyncio.Semaphore, request: Request) -> Outcome:
        acc = self.accounting
        acc.items += 1
        sampling = self.sampling(request)
        outcome = Outcome(cached=True)
        messages = list(request.messages)
        extra = {} if request.schema is None else {"response_format": response_format(request.schema)}
        for ask in range(self.endpoint.max_reasks + 1):
            try:
                text = await self._reply(
                    post,
                    gate,
                    Request(messages, request.schema, request.max_tokens, request.tag),
                    sampling,
                    extra,
                    outcome,
                )
            except RequestFailed as exc:
                outcome.error = exc
                break
            if request.schema is None:
                outcome.text = text
                break
            try:
                outcome.parsed = parse_structured(text, request.schema)
                outcome.text = text
                break
            except ValidationError as exc:
                problem = _validation_summary(exc)
                if ask == self.endpoint.max_reasks:
                    outcome.error = RequestFailed("invalid_output", f"{problem} (after {ask} re-asks)")
                    break
                acc.reasks += 1
                log.info("re-asking %s: %s", request.tag or "a request", problem)
                messages = [
                    *request.messages,
                    {"role": "assistant", "content": text},
                    {
                        "role": "user",
                        "content": f"That reply does not match the JSON schema: {problem}. "
                        "Answer again with only the JSON object.",
                    },
                ]
        if outcome.error is None:
            self._unreachable = 0
        elif outcome.error.kind == "connection":
            self._unreachable += 1
        if outcome.error is not None:
            acc.failures[outcome.error.kind] += 1
            log.warning("request %s failed: %s", request.tag or "", outcome.error)
            return outcome
        acc.completed += 1
        return outcome

    async def _reply(
        self,
        post: _Post,
        gate: asyncio.Semaphore,
        request: Request,
        sampling: dict[str, Any],
        extra: dict[str, Any],
        outcome: Outcome,
    ) -> str:
        """The reply text to exactly these messages: from the cache, or sent (with retries)
        and then cached. Every reply that arrived is cached, an invalid one too: a re-run
        replays the same re-asks from the cache and pays for none of them again. Only a
        request that got no reply at all is asked anew."""
        key = None
        if self.cache is not None:
            key = self.cache.key(*request_key(self.endpoint.model, request, sampling))
            hit = self.cache.get(key)
            if hit is not None:
                self.accounting.cache_hits += 1
                return hit["text"]
        outcome.cached = False
        async with gate:
            text = await self._with_retries(post, list(request.messages), sampling, extra, outcome, request.tag)
        if self.cache is not None and key is not None:
            self.cache.put(key, {"text": text})
        return text

    async def _with_retries(
        self,
        post: _Post,
        messages: list[Any],
        sampling: dict[str, Any],
        extra: dict[str, Any],
        outcome: Outcome,
        tag: str,
    ) -> str:
        e = self.endpoint
        acc = self.accounting
        for attempt in range(e.max_retries + 1):
            if self._unreachable >= GIVE_UP_AFTER:
                raise RequestFailed("not_attempted", f"{self._unreachable} requests in a row could not connect")
            outcome.attempts += 1
            acc.requests_sent += 1
            try:
                body = await post({"model": e.model, "messages": messages, **sampling, **extra})
                text, prompt, generated = _completion_text(body)
            except Exception as exc:  # noqa: BLE001 - classify() re-raises what it does not know
                failure = classify(exc)
                if failure.kind not in RETRYABLE or attempt == e.max_retries:
                    raise failure from None
                acc.retries[failure.kind] += 1
                wait = self._backoff(attempt, failure.retry_after_s)
                log.info("retry %d of %s after %s; waiting %.2f s", attempt + 1, tag or "a request", failure.kind, wait)
                await asyncio.sleep(wait)
                continue
            acc.prompt_tokens += prompt
            acc.completion_tokens += generated
            return text
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _backoff(self, attempt: int, server_says: float | None) -> float:
        """The server's Retry-After when it gave one (capped), else exponential backoff
        with full jitter, so that many workers rate-limited together do not return in
        lockstep."""
        e = self.endpoint
        if server_says is not None:
            return min(server_says, e.max_backoff_s)
        return self._rng.uniform(0, min(e.max_backoff_s, e.backoff_s * 2**attempt))


def _validation_summary(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "(root)"
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts)
