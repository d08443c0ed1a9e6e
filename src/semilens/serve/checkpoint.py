"""One checkpoint folder, loaded and answering chats: text or vision decided from its
config.json, the loaders ``semilens ask`` and ``predict`` use, greedy (or sampled)
generation in first-come, first-served batches (semilens.serve.batching) run by one
thread under the model's lock, and the streamer whose pieces add up to the non-streamed
reply."""

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from semilens.serve.batching import BatchQueue, BatchStats, Pending

log = logging.getLogger("semilens.serve")  # one name for the whole server: one filter sees all its logs


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

    def __init__(self, prompt_tokens: int, max_tokens: int | None, context: int, at_least: bool = False):
        asked = f" plus max_tokens {max_tokens}" if max_tokens is not None else ""
        size = f"at least {prompt_tokens}" if at_least else str(prompt_tokens)
        super().__init__(
            f"the prompt is {size} tokens{asked}, over the context of {context} tokens "
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

    from semilens.checkpoints import locate_checkpoint

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
    _longest_token: int = field(default=1, repr=False)
    # The batching: the queue, the one thread that runs the model, what the batches were.
    _queue: BatchQueue = field(default_factory=BatchQueue, repr=False)
    _taken: list[Pending] = field(default_factory=list, repr=False)  # a batch waiting for `lock`
    _worker: threading.Thread | None = field(default=None, repr=False)
    _worker_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _batch_stats: BatchStats = field(default_factory=BatchStats, repr=False)
    _stats_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def context_tokens(self) -> int:
        """Positions the model was built for (a VLM's: its language model's)."""
        config = self.model.config
        text = getattr(config, "text_config", None) or config
        return int(getattr(text, "max_position_embeddings", None) or config.max_position_embeddings)

    def count_prompt_tokens(self, messages: list[dict[str, Any]], limit: int | None = None) -> tuple[int, bool]:
        """Prompt tokens of chat ``messages`` and whether the count is only a lower bound:
        exact for a text model; for a VLM those of its text only (images add more), so a
        refusal on this count is always right.

        With ``limit``, a prompt whose text is so long that it must exceed ``limit`` tokens
        is not tokenized at all: no token spans more characters than the vocabulary's
        longest entry, so ``len(text) / longest`` tokens is a floor. Tokenizing a prompt
        near the 20 MB body limit costs seconds and hundreds of MB, held under this lock."""
        import copy

        with self._count_lock:
            if self._counter is None:
                self._counter = copy.deepcopy(self.tokenizer)
                vocab = self._counter.get_vocab()
                self._longest_token = max((len(t) for t in vocab), default=1)
            if self.kind == "text":
                text = self._counter.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            else:
                text = "\n".join(p.get("text", "") for m in messages for p in m["content"] if p.get("type") == "text")
            # Normalizers may compose characters (NFKC), so the floor keeps a 4x margin.
            floor = len(text) // (4 * self._longest_token)
            if limit is not None and floor > limit:
                return floor, True
            return len(self._counter(text, add_special_tokens=False)["input_ids"]), False

    def complete(
        self,
        messages: list[dict[str, Any]],
        images: list[Any],
        params: GenerationParams,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        context_tokens: int | None = None,
        max_batch_size: int = 1,
        batch_window_ms: float = 0.0,
    ) -> Completion | None:
        """The assistant's reply to chat ``messages`` (already in the template's format:
        see ``chat_messages``). Blocks until the reply is done. ``on_text`` receives the
        reply's text in pieces as it is generated; their concatenation is the returned
        text. ``cancel`` (the client hung up) stops the wait or the generation; None is
        returned if it was set before generation started. ContextExceeded if the prompt
        plus an explicit ``max_new_tokens`` exceeds ``context_tokens`` (default: the
        model's).

        Requests are served first come, first served, in batches of up to
        ``max_batch_size`` gathered for ``batch_window_ms`` (see semilens.serve.batching);
        a greedy reply is the one the request gets alone."""
        pending = Pending(
            messages,
            images,
            params,
            on_text,
            cancel,
            context_tokens,
            max_batch_size,
            batch_window_ms / 1000.0,
        )
        self._start_worker()
        self._queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result

    def queued(self) -> int:
        """Requests waiting for the model (in the queue, or in a batch waiting for the
        lock) whose clients have not hung up."""
        return self._queue.waiting() + sum(not p.cancelled() for p in self._taken)

    def batch_stats(self) -> dict[str, Any]:
        with self._stats_lock:
            return self._batch_stats.as_dict()

    def _start_worker(self) -> None:
        with self._worker_lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve_batches, name="semilens-batches", daemon=True)
                self._worker.start()

    def _serve_batches(self) -> None:
        """The one thread that runs the model: batch after batch, each under ``lock``."""
        while True:
            batch = self._queue.take()
            self._taken = batch
            self.lock.acquire()
            self._taken = []
            try:
                live = []
                for p in batch:
                    if p.cancelled():  # its client gave up while the batch waited
                        p.finish(None)
                    else:
                        live.append(p)
                if not live:
                    continue
                with self._stats_lock:
                    self._batch_stats.add(live, time.monotonic())
                try:
                    outcomes = self._generate(live)
                except Exception as exc:  # noqa: BLE001 - each request of the batch gets it
                    outcomes = [exc] * len(live)
                for p, outcome in zip(live, outcomes):
                    if isinstance(outcome, BaseException):
                        p.finish(error=outcome)
                    else:
                        p.finish(outcome)
            finally:
                self.lock.release()

    def _generate(self, rows: list[Pending]) -> list["Completion | BaseException"]:
        """One generate call for ``rows`` (left-padded together); a row whose prompt does
        not fit its context gets ContextExceeded and the others run without it."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        inputs, gen_kwargs, eos = self._encode([p.messages for p in rows], [p.images for p in rows])
        width = int(inputs["input_ids"].shape[1])
        prompts = [int(n) for n in inputs["attention_mask"].sum(dim=1).tolist()]
        limits: list[int] = []
        refused: dict[int, BaseException] = {}
        for i, (p, prompt_tokens) in enumerate(zip(rows, prompts)):
            context = p.context_tokens or self.context_tokens
            room = context - prompt_tokens
            if room < 1 or (p.params.explicit and p.params.max_new_tokens > room):
                refused[i] = ContextExceeded(
                    prompt_tokens, p.params.max_new_tokens if p.params.explicit else None, context
                )
            limits.append(min(p.params.max_new_tokens, room))
        if refused:
            rest = [p for i, p in enumerate(rows) if i not in refused]
            done = iter(self._generate(rest) if rest else [])
            return [refused[i] if i in refused else next(done) for i in range(len(rows))]

        kwargs: dict[str, Any] = {"max_new_tokens": max(limits), **gen_kwargs}
        params = rows[0].params
        if params.temperature > 0:  # a sampled request runs alone (batching.Pending.joins)
            # top_k=0: OpenAI's sampling has no top-k, while transformers' default is 50.
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False)
        cancels = [p.cancel for p in rows]

        class RowDone(StoppingCriteria):
            """A row stops at its own max_new_tokens, or when its client hangs up."""

            def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> Any:
                made = input_ids.shape[1] - width
                stop = [made >= limit or (c is not None and c.is_set()) for limit, c in zip(limits, cancels)]
                return torch.tensor(stop, dtype=torch.bool, device=input_ids.device)

        kwargs["stopping_criteria"] = StoppingCriteriaList([RowDone()])
        streams = [_DeltaStreamer(self.tokenizer, p.on_text) if p.on_text is not None else None for p in rows]
        streamer = _RowStreamer(streams, limits, eos) if any(streams) else None
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        # A seeded request forks the RNG, so it neither depends on nor disturbs what
        # earlier or later unseeded requests draw.
        with torch.random.fork_rng(devices=cuda, enabled=params.seed is not None), torch.no_grad():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            out = self.model.generate(**inputs, **kwargs, streamer=streamer)
        completions: list[Completion | BaseException] = []
        for i, limit in enumerate(limits):
            new = out[i, width:].tolist()[:limit]
            stop_at = next((k for k, t in enumerate(new) if t in eos), None)
            if stop_at is not None:
                new, finish = new[: stop_at + 1], "stop"
            else:
                finish = "length" if len(new) >= limit else "stop"
            # Decoded and stripped as `semilens ask` / `predict` do, so the answers match.
            text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
            if streams[i] is not None:
                streams[i].finish(text)
            completions.append(Completion(text, finish, prompts[i], len(new)))
        return completions

    def _encode(
        self, messages: list[list[dict[str, Any]]], images: list[list[Any]]
    ) -> tuple[Any, dict[str, Any], set[int]]:
        """(model inputs, extra generate() arguments, end-of-sequence ids) for a batch of
        chats, built exactly as evaluate.answer_batch (text) and generate.greedy_answers
        (VLM) build theirs: left-padded, so every reply starts right after its prompt."""
        self.tokenizer.padding_side = "left"
        if self.kind == "text":
            texts = [
                self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages
            ]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            eos_id = self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id
            extra = {"pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": eos_id}
        else:
            from semilens.vlm.generate import prompt_inputs

            enc = prompt_inputs(self.model, self.processor, messages, images if any(images) else None)
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
    """Receives one reply's token ids (from ``_RowStreamer``) and hands text deltas to
    ``on_text``.

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

    def add(self, ids: list[int]) -> None:
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        ready = text[: _stable_end(text, self.hold_word)]
        if len(ready) > len(self.sent) and ready.startswith(self.sent):
            self.on_text(ready[len(self.sent) :])
            self.sent = ready

    def finish(self, final: str) -> None:
        if not final.startswith(self.sent):
            log.warning("streamed text is not a prefix of the final answer; the stream differs from it")
        elif len(final) > len(self.sent):
            self.on_text(final[len(self.sent) :])
            self.sent = final


class _RowStreamer:
    """generate()'s streamer for a batch: each row's new token to that row's
    ``_DeltaStreamer`` (None: a row that did not ask to stream), up to the row's own
    end-of-sequence or max_new_tokens. Past those, generate pads the row or runs it on
    for its neighbours, and none of that is the row's reply."""

    def __init__(self, rows: list["_DeltaStreamer | None"], limits: list[int], eos: set[int]):
        self.rows, self.limits, self.eos = rows, limits, eos
        self.made = [0] * len(rows)
        self.closed = [r is None for r in rows]
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first puts the prompts
            self.prompt_seen = True
            return
        for i, token in enumerate(value.reshape(-1).tolist()):
            if self.closed[i]:
                continue
            self.made[i] += 1
            if self.made[i] > self.limits[i]:
                self.closed[i] = True
                continue
            self.rows[i].add([token])
            if token in self.eos:
                self.closed[i] = True

    def end(self) -> None:
        pass
