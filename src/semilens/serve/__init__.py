"""An OpenAI-compatible HTTP server for any semilens checkpoint folder (``semilens serve``).

Reads one checkpoint folder: a text causal LM (``models/llm/{base,pretrained,sft,gptq}``
or its LoRA ``adapter``) or a VLM (``models/qwen2_5_vl/{base,merged,adapter}``); text or
vision is decided from ``config.json``'s ``model_type`` (an adapter's: its base's). Writes
nothing. Answers, on 127.0.0.1 by default:

    GET  /v1/models             the one model, named as given (``--model-name`` overrides)
    POST /v1/chat/completions   OpenAI chat completions, optionally streamed (SSE)
    GET  /semilens/stats        request counters, including injected faults

Run it with ``semilens serve models/llm/sft`` (see ``semilens serve --help``), or in a
test, in-process:

    app = make_app(Path("models/llm/sft"), ServeOptions(fault_rate=0.5))
    with serve_in_background(app) as base_url:        # "http://127.0.0.1:54321/v1"
        openai.OpenAI(base_url=base_url, api_key="x").chat.completions.create(...)

A single user question gets exactly the greedy answer ``semilens ask`` (text) or
``semilens predict`` (VLM) prints: the same loaders, the same chat template, the same
``generate`` arguments, whatever else is batched with it. Concurrent requests to one
model are batched first come, first served (semilens.serve.batching) by one thread per
loaded checkpoint, off the event loop; a request whose client hangs up leaves the queue
unrun, or stops between generated tokens. Every limit (prompt within the context, max_tokens, image
pixels and count, JSON depth, requests in flight) is a ServeOptions field whose refusal
names it; a full queue is a 429 with Retry-After.

Fault injection (``fault_rate`` > 0) makes the server misbehave the way real endpoints do
(429 with Retry-After, 500, a reply held past the client's timeout, a 200 whose body is
not JSON), drawn from a seeded RNG, so that clients' retry logic can be tested against it.

The package, by what each part is about: ``options`` (ServeOptions: every setting and
limit), ``schemas`` (the OpenAI wire format: request models, parsing, refusals as
ApiError, the reply's usage and SSE framing), ``checkpoint`` (loading a folder and
generating under the FIFO lock), ``faults`` (the injected misbehaviour) and ``app`` (the
FastAPI app and ``serve_in_background``).
"""

from semilens.serve.app import ServeStats, make_app, serve_in_background
from semilens.serve.checkpoint import LoadedCheckpoint, load_checkpoint
from semilens.serve.faults import FAULT_KINDS
from semilens.serve.options import ServeOptions

__all__ = [
    "FAULT_KINDS",
    "LoadedCheckpoint",
    "ServeOptions",
    "ServeStats",
    "load_checkpoint",
    "make_app",
    "serve_in_background",
]
