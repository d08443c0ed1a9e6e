"""Fault injection: ``semilens serve`` misbehaving the way real endpoints do, so that
clients' retry logic can be tested against it.

With ``fault_rate`` > 0 a valid chat request may get, drawn from a seeded RNG in arrival
order: a 429 with Retry-After, a 500, a reply held past the client's timeout, or a 200
whose body breaks off. The app draws (``Faults.draw``) and counts; ``injected_reply`` is
what the drawn fault does to the request.
"""

import asyncio
import json
import random
import time
from typing import TYPE_CHECKING, Any

from semilens.serve.schemas import ApiError

if TYPE_CHECKING:
    from fastapi.responses import Response

    from semilens.serve.options import ServeOptions

FAULT_KINDS = ("429", "500", "timeout", "malformed")


class Faults:
    """The seeded draw: for each valid chat request, in arrival order, fault or not and which."""

    def __init__(self, options: "ServeOptions"):
        self.rate = options.fault_rate
        self.kinds = options.fault_kinds
        self.rng = random.Random(options.fault_seed)

    def draw(self) -> str | None:
        # Called on the event loop only, so the order of draws is the order of requests.
        if self.rate <= 0 or self.rng.random() >= self.rate:
            return None
        return self.rng.choice(self.kinds)


async def hold(request: Any, seconds: float) -> bool:
    """Sleep ``seconds`` (a `timeout` fault); True if the client hung up meanwhile."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(0.1, left))
        if await request.is_disconnected():
            return True
    return False


async def injected_reply(fault: str | None, request: Any, options: "ServeOptions", name: str) -> "Response | None":
    """What a drawn ``fault`` does to the request: raises the 429 or 500 ApiError; returns
    the 200 whose body breaks off (``malformed``) or, when the client hung up while a
    ``timeout`` held the request, a 499; returns None to answer normally (no fault, or a
    ``timeout`` that held for ``fault_hold_s``)."""
    from fastapi.responses import Response

    if fault == "429":
        raise ApiError(
            429,
            "rate limit reached (injected fault)",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(options.fault_retry_after_s)},
        )
    if fault == "500":
        raise ApiError(
            500,
            "the server had an error while processing your request (injected fault)",
            type="server_error",
            code="injected_fault",
        )
    if fault == "malformed":
        # A 200 whose body breaks off mid-object: what a proxy that drops the
        # connection, or a server that crashes mid-write, delivers. The same for a
        # streamed request: a JSON body where events were expected is malformed too.
        cut = json.dumps(
            {
                "id": "chatcmpl-malformed",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "The answer is"}}],
            }
        )
        return Response(cut[: len(cut) // 2], status_code=200, media_type="application/json")
    if fault == "timeout" and await hold(request, options.fault_hold_s):
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    return None
