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
``generate`` arguments. Model calls are serialised by one first-come, first-served lock
per loaded checkpoint (FifoLock) and run off the event loop, so connections are accepted
and answered in turn; a request whose client hangs up leaves the queue unrun, or stops
between generated tokens. Every limit (prompt within the context, max_tokens, image
pixels and count, JSON depth, requests in flight) is a ServeOptions field whose refusal
names it; a full queue is a 429 with Retry-After.

Fault injection (``fault_rate`` > 0) makes the server misbehave the way real endpoints do
(429 with Retry-After, 500, a reply held past the client's timeout, a 200 whose body is
not JSON), drawn from a seeded RNG, so that clients' retry logic can be tested against it.
"""

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import random
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from semilens.config import IngestImagesConfig

if TYPE_CHECKING:
    from fastapi import FastAPI

# No `from __future__ import annotations` here: FastAPI reads the route functions'
# annotations at run time, and `Request` is imported inside make_app (heavy imports stay
# out of `semilens --help`), so string annotations could not be resolved.

log = logging.getLogger("semilens.serve")

# The ingest stage's decompression-bomb cap, so that serve refuses what ingest refuses.
_INGEST_MAX_PIXELS: int = IngestImagesConfig.model_fields["max_pixels"].default

FAULT_KINDS = ("429", "500", "timeout", "malformed")


# ---------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------


class ServeOptions(BaseModel):
    """Everything ``semilens serve`` can be told besides the folder, host and port."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str | None = Field(None, min_length=1, description="the model id clients send; default: the folder path as given")
    api_key: SecretStr | None = Field(None, description="require `Authorization: Bearer <key>`; a SecretStr so it never shows in a repr or log")
    max_request_bytes: int = Field(20_000_000, ge=1, description="larger request bodies get 413 (20 MB holds a few base64 micrographs)")
    default_max_tokens: int = Field(256, ge=1, description="when a request names neither max_tokens nor max_completion_tokens")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; None leaves torch's default")
    latency_ms: float = Field(0.0, ge=0, description="added to every /v1 request before it is answered (asyncio.sleep: other requests go on)")
    fault_rate: float = Field(0.0, ge=0, le=1, description="probability that a valid chat request gets an injected fault")
    fault_kinds: tuple[str, ...] = Field(FAULT_KINDS, description="which faults to draw from: 429, 500, timeout, malformed")
    fault_seed: int = Field(0, description="seed of the fault RNG: the same request order gives the same faults")
    fault_hold_s: float = Field(30.0, ge=0, description="how long a `timeout` fault holds the request before answering normally")
    fault_retry_after_s: int = Field(1, ge=0, description="the Retry-After header (seconds) of an injected 429")
    # Limits: each refusal is a 4xx whose message names the setting, so a client (or its
    # operator) knows which knob it hit. The defaults keep one 2-core box responsive.
    max_tokens_cap: int = Field(4096, ge=1, description="a request asking for more max_tokens gets 400; higher: longer replies, longer holds of the model")
    context_tokens: int | None = Field(None, ge=2, description="prompt tokens + max_tokens must fit; None: the model's max_position_embeddings")
    max_image_pixels: int = Field(
        _INGEST_MAX_PIXELS, ge=1, description="images whose header claims more pixels get 400, undecoded (ingest_images.max_pixels by default)"
    )
    max_images: int = Field(8, ge=0, description="images per request; more get 400 before any is decoded")
    max_json_depth: int = Field(64, ge=2, description="deeper-nested request bodies get 400 (a chat body needs about 6)")
    # Below anyio's 40 worker threads, so waiting generations never starve image decoding.
    max_in_flight: int = Field(32, ge=1, description="chat requests admitted (queued or generating); more get 429 with Retry-After")
    busy_retry_after_s: int = Field(1, ge=0, description="the Retry-After header (seconds) of a 429 for a full queue")

    @field_validator("fault_kinds", mode="before")
    @classmethod
    def _split_kinds(cls, value: Any) -> Any:
        # The CLI passes "429,timeout"; Python callers may pass a list.
        if isinstance(value, str):
            value = [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("fault_kinds")
    @classmethod
    def _check_kinds(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [k for k in value if k not in FAULT_KINDS]
        if unknown:
            raise ValueError(f"unknown fault kind(s) {', '.join(unknown)}; known: {', '.join(FAULT_KINDS)}")
        if not value:
            raise ValueError(f"give at least one fault kind of {', '.join(FAULT_KINDS)}")
        return tuple(dict.fromkeys(value))  # de-duplicated: a repeated kind must not weigh more


# ---------------------------------------------------------------------------------------
# The checkpoint
# ---------------------------------------------------------------------------------------


@dataclass
class GenerationParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy, as `semilens ask` / `predict`
    top_p: float = 1.0
    seed: int | None = None
    # False when the request named no max_tokens: the server default then shrinks to the
    # room the prompt leaves in the context instead of refusing the request.
    explicit: bool = True


class ContextExceeded(ValueError):
    """The prompt (plus the requested max_tokens) does not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_tokens: int | None, context: int):
        asked = f" plus max_tokens {max_tokens}" if max_tokens is not None else ""
        super().__init__(
            f"the prompt is {prompt_tokens} tokens{asked}, over the context of {context} tokens "
            "(context_tokens, --context-tokens; default: the model's max_position_embeddings)"
        )


class FifoLock:
    """A lock granted in the order it was asked for, that a waiter can leave.

    ``threading.Lock`` promises no order: a request arriving just as the model frees up
    barges ahead of those already waiting, which gave 16 busy clients a p50 of 0.3 s and
    a max of 6.7 s where a queue gives everyone ~0.8 s. Here ``release`` hands the lock
    straight to the oldest waiter, and a waiter whose ``cancel`` is set (its client hung
    up) leaves the queue without ever running.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._waiters: deque[threading.Event] = deque()
        self._held = False

    def acquire(self, cancel: threading.Event | None = None, poll_s: float = 0.1) -> bool:
        """True once held; False if ``cancel`` was set first (then it is not held)."""
        me = threading.Event()
        with self._mutex:
            if not self._held and not self._waiters:
                self._held = True
                return True
            self._waiters.append(me)
        while not me.wait(poll_s):
            if cancel is not None and cancel.is_set():
                with self._mutex:
                    if not me.is_set():
                        self._waiters.remove(me)
                        return False
                # Granted in the same instant: pass it on rather than drop it.
                self.release()
                return False
        return True

    def release(self) -> None:
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().set()  # ownership passes on; _held stays True
            else:
                self._held = False

    def waiting(self) -> int:
        with self._mutex:
            return len(self._waiters)

    def __enter__(self) -> "FifoLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


@dataclass
class Completion:
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


def checkpoint_kind(folder: str | Path) -> tuple[Literal["text", "vision"], str]:
    """("text" or "vision", model_type) of a checkpoint folder, from its config.json (an
    adapter's: its base's), before any weights load; ValueError for anything else."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    from semilens.vlm.predict import locate_checkpoint

    located, base = locate_checkpoint(Path(folder))
    model_type = json.loads(((base or located) / "config.json").read_text()).get("model_type")
    # Image-text first: a VLM's type is never a plain causal LM's, and the reverse holds
    # for every family semilens writes (llama, qwen2_5_vl).
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return "vision", model_type
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "text", model_type
    what = f"adapter's base {base}" if base is not None else str(located)
    raise ValueError(
        f"{what}: model_type {model_type!r} is neither a causal language model nor an image-text-to-text "
        "model (give a semilens text or VLM checkpoint, e.g. models/llm/sft or models/qwen2_5_vl/merged)"
    )


@dataclass
class LoadedCheckpoint:
    """A model ready to answer chats. ``lock`` serialises every use of the model and its
    tokenizer (fast tokenizers raise "Already borrowed" when two threads share one), so
    several apps may share one LoadedCheckpoint (e.g. a test that needs several fault
    settings loads the model once)."""

    name: str  # the folder as given: the default model id
    kind: Literal["text", "vision"]
    model_type: str
    model: Any
    tokenizer: Any  # the text tokenizer (a VLM's processor.tokenizer)
    processor: Any | None = None  # VLM only
    lock: FifoLock = field(default_factory=FifoLock, repr=False)
    # A second tokenizer, so prompts are counted (and too-long ones refused) before they
    # queue for the model, without sharing the model's tokenizer across threads.
    _counter: Any = field(default=None, repr=False)
    _count_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def context_tokens(self) -> int:
        """Positions the model was built for (a VLM's: its language model's)."""
        config = self.model.config
        text = getattr(config, "text_config", None) or config
        return int(getattr(text, "max_position_embeddings", None) or getattr(config, "max_position_embeddings"))

    def count_prompt_tokens(self, messages: list[dict[str, Any]]) -> int:
        """Prompt tokens of chat ``messages``: exact for a text model; for a VLM those of
        its text only (images add more), so a refusal on this count is always right."""
        import copy

        with self._count_lock:
            if self._counter is None:
                self._counter = copy.deepcopy(self.tokenizer)
            if self.kind == "text":
                text = self._counter.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            else:
                text = "\n".join(p.get("text", "") for m in messages for p in m["content"] if p.get("type") == "text")
            return len(self._counter(text, add_special_tokens=False)["input_ids"])

    def complete(
        self,
        messages: list[dict[str, Any]],
        images: list[Any],
        params: GenerationParams,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        context_tokens: int | None = None,
    ) -> Completion | None:
        """The assistant's reply to chat ``messages`` (already in the template's format:
        see ``chat_messages``). Blocks while another call holds the model. ``on_text``
        receives the reply's text in pieces as it is generated; their concatenation is the
        returned text. ``cancel`` (the client hung up) stops the wait or the generation;
        None is returned if it was set before generation started. Callers are served
        first come, first served. ContextExceeded if the prompt plus an explicit
        ``max_new_tokens`` exceeds ``context_tokens`` (default: the model's)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        # A request whose client gave up leaves the queue without running.
        if not self.lock.acquire(cancel):
            return None
        try:
            if cancel is not None and cancel.is_set():
                return None
            inputs, gen_kwargs, eos = self._encode(messages, images)
            prompt_tokens = int(inputs["input_ids"].shape[1])
            context = context_tokens or self.context_tokens
            room = context - prompt_tokens
            if room < 1 or (params.explicit and params.max_new_tokens > room):
                raise ContextExceeded(prompt_tokens, params.max_new_tokens if params.explicit else None, context)
            max_new_tokens = min(params.max_new_tokens, room)
            kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, **gen_kwargs}
            if params.temperature > 0:
                # top_k=0: OpenAI's sampling has no top-k, while transformers' default is 50.
                kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
            else:
                kwargs.update(do_sample=False)
            if cancel is not None:

                class HungUp(StoppingCriteria):
                    def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> Any:
                        return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

                kwargs["stopping_criteria"] = StoppingCriteriaList([HungUp()])
            streamer = _DeltaStreamer(self.tokenizer, on_text) if on_text is not None else None
            cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
            # A seeded request forks the RNG, so it neither depends on nor disturbs what
            # earlier or later unseeded requests draw.
            with torch.random.fork_rng(devices=cuda, enabled=params.seed is not None), torch.no_grad():
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                out = self.model.generate(**inputs, **kwargs, streamer=streamer)
            new = out[0, prompt_tokens:].tolist()
            stop_at = next((i for i, t in enumerate(new) if t in eos), None)
            if stop_at is not None:
                new, finish = new[: stop_at + 1], "stop"
            else:
                finish = "length" if len(new) >= max_new_tokens else "stop"
            # Decoded and stripped as `semilens ask` / `predict` do, so the answers match.
            text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
            if streamer is not None:
                streamer.finish(text)
            return Completion(text, finish, prompt_tokens, len(new))
        finally:
            self.lock.release()

    def _encode(self, messages: list[dict[str, Any]], images: list[Any]) -> tuple[Any, dict[str, Any], set[int]]:
        """(model inputs, extra generate() arguments, end-of-sequence ids), built exactly
        as evaluate.answer_batch (text) and generate.greedy_answers (VLM) build them."""
        # Left padding as in both batch paths; one row has none, but the setting stays put.
        self.tokenizer.padding_side = "left"
        if self.kind == "text":
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            enc = self.tokenizer([text], return_tensors="pt", padding=True, add_special_tokens=False)
            eos_id = self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id
            extra = {"pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": eos_id}
        else:
            from semilens.vlm.generate import prompt_inputs

            enc = prompt_inputs(self.model, self.processor, [messages], [images] if images else None)
            eos_id = self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id
            extra = {}  # greedy_answers leaves pad/eos to the checkpoint's generation_config
        eos = set(eos_id if isinstance(eos_id, list) else [eos_id]) - {None}
        return enc.to(self.model.device), extra, eos


def load_checkpoint(folder: str | Path) -> LoadedCheckpoint:
    """Load any semilens checkpoint folder with the loaders ``ask`` and ``predict`` use."""
    kind, model_type = checkpoint_kind(folder)
    if kind == "vision":
        from semilens.vlm.predict import load_vlm

        model, processor = load_vlm(Path(folder))
        return LoadedCheckpoint(str(folder), kind, model_type, model, processor.tokenizer, processor)
    from transformers import AutoTokenizer

    from semilens.llm.ask import causal_lm_folder
    from semilens.llm.pretrain import load_causal

    located = causal_lm_folder(Path(folder))
    return LoadedCheckpoint(str(folder), kind, model_type, load_causal(located), AutoTokenizer.from_pretrained(located))


def _stable_end(text: str, hold_word: bool) -> int:
    """How much of a partly decoded reply can be sent without being taken back later.

    Trailing whitespace is held (the final answer is stripped); so is a trailing U+FFFD,
    which is an incomplete UTF-8 sequence until the next byte-level token completes it.
    With ``clean_up_tokenization_spaces`` the decoder rewrites " ." as "." once the dot
    arrives, so then the last word is held too.
    """
    end = len(text)
    while end and (text[end - 1].isspace() or text[end - 1] == "\ufffd"):
        end -= 1
    if hold_word:
        end = max((i for i in range(end) if text[i].isspace()), default=0)
    return end


class _DeltaStreamer:
    """Receives generate()'s token ids and hands text deltas to ``on_text``.

    Not transformers' TextIteratorStreamer: that yields text only (usage and
    finish_reason need the ids) and its pieces need not add up to the one-shot decode the
    non-streamed reply uses. This one re-decodes the whole reply at every token (cheap at
    the lengths served here) and sends only what can no longer change, then ``finish``
    sends the rest of the final text, so the pieces concatenate to exactly that text.
    Runs in the generating thread, under the model lock, like every tokenizer call.
    """

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.hold_word = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self.ids: list[int] = []
        self.sent = ""
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        ready = text[: _stable_end(text, self.hold_word)]
        if len(ready) > len(self.sent) and ready.startswith(self.sent):
            self.on_text(ready[len(self.sent) :])
            self.sent = ready

    def end(self) -> None:
        pass

    def finish(self, final: str) -> None:
        if not final.startswith(self.sent):
            log.warning("streamed text is not a prefix of the final answer; the stream differs from it")
        elif len(final) > len(self.sent):
            self.on_text(final[len(self.sent) :])
            self.sent = final


# ---------------------------------------------------------------------------------------
# The request
# ---------------------------------------------------------------------------------------


class ApiError(Exception):
    """An answer in OpenAI's error format: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Strict: OpenAI refuses "5" for max_tokens, and silently coercing would hide client bugs.
_STRICT = ConfigDict(strict=True, extra="ignore")


class ImageURL(BaseModel):
    model_config = _STRICT
    url: str
    detail: str | None = None  # accepted; the processor decides the resolution


class ContentPart(BaseModel):
    """One part of a message's content. A single model with a checked ``type``, not a
    tagged union, so that errors point at ``messages[0].content[1].image_url.url``
    rather than at pydantic's union branch names."""

    model_config = _STRICT
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _check(self) -> "ContentPart":
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs `text`")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an image_url part needs `image_url`")
        return self


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant"]
    content: list[ContentPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _string_is_one_text_part(cls, value: Any) -> Any:
        return [{"type": "text", "text": value}] if isinstance(value, str) else value


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of an OpenAI chat-completions body that this server reads; others
    (``user``, ``logprobs``, ``stop``...) are ignored, as most compatible servers do."""

    model_config = _STRICT
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # Accepted but not enforced: a tiny model cannot be constrained to a JSON schema (that
    # needs grammar-guided decoding), so the client validates what comes back.
    response_format: dict[str, Any] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only n=1 is supported")
        return value


def _param_path(loc: tuple[Any, ...]) -> str | None:
    """('messages', 0, 'content', 1, 'image_url', 'url') -> 'messages[0].content[1].image_url.url'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_chat_request(body: bytes, max_depth: int = 64) -> ChatRequest:
    """The request, or ApiError 400 naming the offending field (or the depth limit)."""
    too_deep = f"the request body is nested deeper than max_json_depth {max_depth} (--max-json-depth)"
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})") from exc
    except RecursionError as exc:  # deeper than the interpreter's stack: far past the limit
        raise ApiError(400, too_deep, code="json_too_deep") from exc
    # Checked before validation: pydantic would walk a deep `response_format` recursively.
    if _json_depth(payload) > max_depth:
        raise ApiError(400, too_deep, code="json_too_deep")
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return ChatRequest.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param_path(first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{param}: {msg}" if param else msg, param=param) from exc


def decode_image(url: str, param: str, max_pixels: int = _INGEST_MAX_PIXELS) -> Any:
    """A PIL RGB image from a base64 ``data:`` URL; anything else is refused: this server
    never fetches a URL, so it cannot be made to reach the network or read local files.
    An image whose header claims more than ``max_pixels`` is refused before decoding."""
    from PIL import Image

    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if ":" in url else "relative"
        raise ApiError(
            400,
            f"{param}: only base64 data: URLs are accepted (got a {scheme} URL); the server never fetches anything",
            param=param,
            code="invalid_image_url",
        )
    header, comma, data = url[len("data:") :].partition(",")
    if not comma or not header.endswith(";base64"):
        raise ApiError(400, f"{param}: not a base64 data URL (expected data:image/png;base64,...)", param=param, code="invalid_image_url")
    mime = header.removesuffix(";base64")
    if mime and not mime.startswith("image/"):
        raise ApiError(400, f"{param}: media type {mime!r} is not an image", param=param, code="invalid_image_url")
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"{param}: the data is not valid base64 ({exc})", param=param, code="invalid_image_url") from exc
    too_big = f"{param}: the image header claims {{}} pixels, over max_image_pixels {max_pixels} (--max-image-pixels; ingest's max_pixels); not decoded"
    try:
        # open() reads the header only; Pillow's own bomb warning (over 89 Mpx) is
        # superseded by the cap below, which is checked before anything is decoded.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(raw))
        with picture:
            if picture.width * picture.height > max_pixels:
                raise ApiError(400, too_big.format(f"{picture.width}x{picture.height} ="
                                                   f" {picture.width * picture.height}"), param=param, code="image_too_large")
            # convert() as predict does; it forces the full decode, so truncated files fail here.
            return picture.convert("RGB")
    except ApiError:
        raise
    except Image.DecompressionBombError as exc:  # over twice Pillow's own limit: refused in open()
        raise ApiError(400, too_big.format(f"more than {2 * Image.MAX_IMAGE_PIXELS}") + f" ({exc})", param=param, code="image_too_large") from exc
    except Exception as exc:  # noqa: BLE001 - any decoder failure (incl. decompression bombs) is a bad input
        raise ApiError(400, f"{param}: not a readable image ({exc.__class__.__name__}: {exc})", param=param, code="invalid_image") from exc


def chat_messages(
    request: ChatRequest, kind: Literal["text", "vision"], max_images: int = 8, max_pixels: int = _INGEST_MAX_PIXELS
) -> tuple[list[dict[str, Any]], list[Any]]:
    """(messages in the chat template's format, the images in order) for a checkpoint kind.

    More than ``max_images`` images are refused before any is decoded; each image is
    refused from its header when it claims more than ``max_pixels``.

    A VLM gets content lists with ``{"type": "image"}`` placeholders, as ``predict``
    builds them; a text model gets each message's text parts joined by newlines (Llama's
    template reads ``content`` as one string), and an image is refused.
    """
    messages: list[dict[str, Any]] = []
    images: list[Any] = []
    n_images = sum(part.type == "image_url" for message in request.messages for part in message.content)
    if kind == "vision" and n_images > max_images:
        raise ApiError(400, f"messages: {n_images} images, over max_images {max_images} per request (--max-images)",
                       param="messages", code="too_many_images")
    for i, message in enumerate(request.messages):
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(message.content):
            where = f"messages[{i}].content[{j}]"
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
                continue
            if kind == "text":
                raise ApiError(400, f"{where}: this checkpoint is a text-only model; it cannot read images", param=where, code="images_not_supported")
            if message.role != "user":
                raise ApiError(400, f"{where}: images are accepted in user messages only", param=where)
            images.append(decode_image(part.image_url.url, f"{where}.image_url.url", max_pixels))
            parts.append({"type": "image"})
        if kind == "text":
            messages.append({"role": message.role, "content": "\n".join(p["text"] for p in parts)})
        else:
            messages.append({"role": message.role, "content": parts})
    return messages, images


def generation_params(request: ChatRequest, default_max_tokens: int, max_tokens_cap: int | None = None) -> GenerationParams:
    """The generate() settings of a request; ApiError 400 for max_tokens over the cap."""
    asked = request.max_completion_tokens or request.max_tokens
    if max_tokens_cap is not None and asked is not None and asked > max_tokens_cap:
        param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        raise ApiError(400, f"{param}: {asked} is over max_tokens_cap {max_tokens_cap} (--max-tokens-cap)", param=param, code="max_tokens_too_large")
    max_tokens = asked or min(default_max_tokens, max_tokens_cap or default_max_tokens)
    return GenerationParams(max_tokens, request.temperature or 0.0, request.top_p or 1.0, request.seed, explicit=asked is not None)


# ---------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------


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


class _Faults:
    """The seeded draw: for each valid chat request, in arrival order, fault or not and which."""

    def __init__(self, options: ServeOptions):
        self.rate = options.fault_rate
        self.kinds = options.fault_kinds
        self.rng = random.Random(options.fault_seed)

    def draw(self) -> str | None:
        # Called on the event loop only, so the order of draws is the order of requests.
        if self.rate <= 0 or self.rng.random() >= self.rate:
            return None
        return self.rng.choice(self.kinds)


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


async def _until_done(request: Any, fut: "asyncio.Future[Any]", cancel: threading.Event) -> Any:
    """Await ``fut``; if the client hangs up meanwhile, set ``cancel`` so the model stops
    (or never starts) working for nobody, and still wait for ``fut`` to finish."""
    while True:
        done, _ = await asyncio.wait({fut}, timeout=0.2)
        if done:
            return fut.result()
        if not cancel.is_set() and await request.is_disconnected():
            cancel.set()


async def _hold(request: Any, seconds: float) -> bool:
    """Sleep ``seconds`` (a `timeout` fault); True if the client hung up meanwhile."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(0.1, left))
        if await request.is_disconnected():
            return True
    return False


def _sse(payload: Any) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def make_app(checkpoint: "str | Path | LoadedCheckpoint", options: ServeOptions | None = None) -> "FastAPI":
    """The FastAPI app serving one checkpoint: a folder (loaded now, so a bad folder fails
    here with ValueError / OSError, before any port is opened) or a LoadedCheckpoint that
    several apps may share. Serve it with ``serve_in_background`` or any ASGI server.

    ``app.state`` holds ``stats`` (the live ServeStats behind ``/semilens/stats``),
    ``checkpoint`` (the LoadedCheckpoint) and ``model_name`` (the id clients must send).
    """
    import torch
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    options = options or ServeOptions()
    loaded = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(checkpoint)
    if options.threads:
        torch.set_num_threads(options.threads)
    name = options.model_name or loaded.name
    created = int(time.time())
    stats = ServeStats()
    faults = _Faults(options)
    latency_s = options.latency_ms / 1000.0
    context = options.context_tokens or loaded.context_tokens
    in_flight = 0  # chat requests admitted and not yet done generating (event loop only)

    def leave(*_: Any) -> None:
        nonlocal in_flight
        in_flight -= 1

    def context_error(exc: ContextExceeded) -> ApiError:
        return ApiError(400, str(exc), param="messages", code="context_length_exceeded")

    async def require_key(request: Request) -> None:
        if options.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing API key: send `Authorization: Bearer <key>`", code="invalid_api_key")
        # Constant-time comparison; neither key is ever echoed or logged.
        if not hmac.compare_digest(token.strip().encode(), options.api_key.get_secret_value().encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    app = FastAPI(
        title="semilens serve",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(require_key)],
    )
    app.state.stats = stats
    app.state.checkpoint = loaded
    app.state.model_name = name

    def error(exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 becomes OpenAI's 400 (no route here declares a body model,
        # but query or header parameters would be validated this way).
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = _param_path(tuple(p for p in first["loc"] if p not in ("body", "query", "header", "path")))
        return error(ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error(ApiError(404, f"unknown path: {request.method} {request.url.path}", code="unknown_url"))
        return error(ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug here must still answer in the format clients parse; starlette logs the
        # traceback and the server goes on serving.
        return error(ApiError(500, f"internal error: {exc.__class__.__name__}: {exc}", type="server_error", code="internal_error"))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        if latency_s:
            await asyncio.sleep(latency_s)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "semilens"}]}

    @app.get("/semilens/stats")
    async def get_stats() -> dict[str, Any]:
        return stats.as_dict()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        nonlocal in_flight
        stats.requests += 1
        if latency_s:
            await asyncio.sleep(latency_s)
        body = await _read_body(request, options.max_request_bytes)
        # Admission after the body is read (closing on unread data would reset the
        # connection and the client would never see the 429), before any decoding or
        # queueing: this bounds the images held in memory and the queue's length.
        if in_flight >= options.max_in_flight:
            stats.busy += 1
            raise ApiError(
                429, f"the server is busy: {in_flight} requests are queued or running, the max_in_flight limit (--max-in-flight); "
                f"retry after {options.busy_retry_after_s} s", type="rate_limit_error", code="server_busy",
                headers={"Retry-After": str(options.busy_retry_after_s)},
            )
        in_flight += 1
        slot = _Slot()
        try:
            return await admitted(request, body, slot)
        finally:
            if not slot.owned:
                leave()

    def generate(slot: "_Slot", *args: Any) -> "asyncio.Future[Any]":
        """Run loaded.complete(*args) in a worker thread; the task owns the request's
        in-flight slot from now on and frees it when generation ends (a stream's last
        pieces are only sent after that)."""
        task = asyncio.ensure_future(run_in_threadpool(loaded.complete, *args, context))
        slot.owned = True
        task.add_done_callback(leave)
        return task

    async def admitted(request: Request, body: bytes, slot: "_Slot") -> Response:
        """The reply to a request admitted to the queue."""
        chat = parse_chat_request(body, options.max_json_depth)
        if chat.model != name:
            raise ApiError(404, f"the model {chat.model!r} does not exist; this server serves {name!r}", param="model", code="model_not_found")
        params = generation_params(chat, options.default_max_tokens, options.max_tokens_cap)
        # Image decoding and prompt counting are CPU work: off the event loop. Counting
        # here refuses an over-long prompt before it waits for, or holds, the model.
        messages, images = await run_in_threadpool(chat_messages, chat, loaded.kind, options.max_images, options.max_image_pixels)
        prompt_tokens = await run_in_threadpool(loaded.count_prompt_tokens, messages)
        if prompt_tokens >= context or (params.explicit and prompt_tokens + params.max_new_tokens > context):
            raise context_error(ContextExceeded(prompt_tokens, params.max_new_tokens if params.explicit else None, context))

        fault = faults.draw()
        if fault is not None:
            stats.faults[fault] += 1
            log.info("injected fault: %s", fault)
        if fault == "429":
            raise ApiError(
                429, "rate limit reached (injected fault)", type="rate_limit_error", code="rate_limit_exceeded",
                headers={"Retry-After": str(options.fault_retry_after_s)},
            )
        if fault == "500":
            raise ApiError(500, "the server had an error while processing your request (injected fault)", type="server_error", code="injected_fault")
        if fault == "malformed":
            # A 200 whose body breaks off mid-object: what a proxy that drops the
            # connection, or a server that crashes mid-write, delivers. The same for a
            # streamed request: a JSON body where events were expected is malformed too.
            cut = json.dumps({"id": "chatcmpl-malformed", "object": "chat.completion", "created": int(time.time()), "model": name,
                              "choices": [{"index": 0, "message": {"role": "assistant", "content": "The answer is"}}]})
            return Response(cut[: len(cut) // 2], status_code=200, media_type="application/json")
        if fault == "timeout" and await _hold(request, options.fault_hold_s):
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        cancel = threading.Event()
        if chat.stream:
            return await stream(request, reply_id, messages, images, params, cancel, chat, slot)
        task = generate(slot, messages, images, params, None, cancel)
        try:
            done = await _until_done(request, task, cancel)
        except ContextExceeded as exc:  # the exact count (a VLM's images included) says no
            raise context_error(exc) from exc
        except Exception as exc:  # noqa: BLE001 - any failure of the model is this request's 500, not the server's end
            log.exception("generation failed")
            raise ApiError(500, f"generation failed: {exc.__class__.__name__}: {exc}", type="server_error", code="generation_failed") from exc
        if done is None or cancel.is_set():
            return Response(status_code=499)
        stats.completed += 1
        return JSONResponse({
            "id": reply_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text}, "finish_reason": done.finish_reason, "logprobs": None}],
            "usage": _usage(done),
        })

    async def stream(request: Request, reply_id: str, messages: Any, images: Any, params: GenerationParams,
                     cancel: threading.Event, chat: ChatRequest, slot: "_Slot") -> Response:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def on_text(delta: str) -> None:  # in the model's thread
            loop.call_soon_threadsafe(queue.put_nowait, ("text", delta))

        task = generate(slot, messages, images, params, on_text, cancel)
        # Runs on the loop after every on_text callback the thread scheduled: FIFO.
        task.add_done_callback(lambda _: queue.put_nowait(("done", None)))
        # Headers wait for the first piece of text (or the end), so that a model that
        # fails before producing anything still gets a proper 500 rather than a 200 stream.
        first = await _until_done(request, asyncio.ensure_future(queue.get()), cancel)
        if first[0] == "done":
            try:
                task.result()
            except ContextExceeded as exc:
                raise context_error(exc) from exc
            except Exception as exc:  # noqa: BLE001
                log.exception("generation failed")
                raise ApiError(500, f"generation failed: {exc.__class__.__name__}: {exc}", type="server_error", code="generation_failed") from exc
            if cancel.is_set():
                return Response(status_code=499)
        created_at = int(time.time())
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            body: dict[str, Any] = {
                "id": reply_id, "object": "chat.completion.chunk", "created": created_at, "model": name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }
            if include_usage:
                body["usage"] = None
            return _sse(body)

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
                    yield _sse(ApiError(500, f"generation failed: {exc.__class__.__name__}: {exc}", type="server_error", code="generation_failed").body())
                    return
                if done is None:
                    return
                yield chunk({}, done.finish_reason)
                if include_usage:
                    yield _sse({"id": reply_id, "object": "chat.completion.chunk", "created": created_at, "model": name,
                                "choices": [], "usage": _usage(done)})
                yield _sse("[DONE]")
                stats.completed += 1
            finally:
                # The client hung up mid-stream (the generator is closed early): stop the model.
                if not task.done():
                    cancel.set()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def _usage(done: Completion) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens, "total_tokens": done.prompt_tokens + done.completion_tokens}


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

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout_s)
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
