"""A minimal client for OpenAI-compatible chat-completions servers.

vLLM, llama.cpp's server, Ollama, TGI and OpenAI itself all answer
``POST <base_url>/chat/completions``; this module speaks that one call over httpx, so no
vendor SDK is needed. It raises ``ChatError`` with a ``kind`` a caller can count instead
of letting transport exceptions of several libraries escape.

    client = ChatClient("http://127.0.0.1:8000/v1", "qwen2.5-7b-instruct")
    text = client.complete([{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx

# Worth another try: the server is restarting, overloaded or rate-limiting.
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class ChatError(Exception):
    """A request that produced no usable reply. ``kind`` is one of ``timeout``,
    ``connection``, ``http_error`` or ``bad_response``; the message says the rest."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass
class ChatClient:
    """One server and model. ``complete`` is safe to call from several threads."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 60.0
    max_retries: int = 2
    retry_backoff_s: float = 1.0

    def __post_init__(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.Client(timeout=self.timeout_s, headers=headers)
        self.url = self.base_url.rstrip("/") + "/chat/completions"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def complete(self, messages: list[dict[str, str]], temperature: float = 0.0, **params: Any) -> str:
        """The assistant message's text for ``messages``; extra ``params`` (``max_tokens``
        ...) go into the request body as they are."""
        body = {"model": self.model, "messages": messages, "temperature": temperature, **params}
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
            last = attempt == self.max_retries
            try:
                resp = self._http.post(self.url, json=body)
            except httpx.ConnectTimeout as exc:
                if last:
                    raise ChatError("connection", f"connect timeout to {self.url}") from exc
                continue
            except httpx.TimeoutException as exc:
                # The server took the request and is slow: another try would most likely be
                # slow too and multiply the stage's wall time, so a timeout is final.
                raise ChatError("timeout", f"no reply within {self.timeout_s:g} s") from exc
            except httpx.TransportError as exc:
                if last:
                    raise ChatError("connection", f"{type(exc).__name__}: {exc}") from exc
                continue
            if resp.status_code in _RETRY_STATUS and not last:
                continue
            if resp.status_code >= 400:
                raise ChatError("http_error", f"HTTP {resp.status_code}: {resp.text[:200]}")
            return _message_text(resp)
        raise AssertionError("unreachable: the last attempt returns or raises")


def _message_text(resp: httpx.Response) -> str:
    try:
        content = resp.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ChatError("bad_response", f"not a chat completion: {resp.text[:200]}") from exc
    if not isinstance(content, str):
        raise ChatError("bad_response", f"message content is {type(content).__name__}, not text")
    return content
