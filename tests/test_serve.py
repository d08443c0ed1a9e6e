"""`semilens serve`: the OpenAI-compatible server on tiny, untrained checkpoints.

Random weights are enough: what is checked is that the server answers exactly what
`semilens ask` / `semilens predict` answer, speaks the protocol (through the official
openai SDK, and raw httpx for what the SDK will not send), refuses bad input in OpenAI's
error format, and injects the faults it is told to. Nothing is downloaded.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from pydantic import ValidationError

from semilens.serve import ServeOptions, load_checkpoint, make_app, serve_in_background

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What controls the etch rate in reactive ion etching?"


# ---------------------------------------------------------------------------------------
# Tiny checkpoints, built once
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(serve_checkpoints: dict[str, Path]) -> dict[str, Path]:
    return serve_checkpoints


@pytest.fixture(scope="module")
def text_model(folders):
    """The text checkpoint, loaded once and shared by every text app below."""
    return load_checkpoint(folders["llm"])


@pytest.fixture(scope="module")
def text_server(text_model):
    app = make_app(text_model)
    with serve_in_background(app) as url:
        yield url, app.state.model_name


@pytest.fixture(scope="module")
def vlm_server(folders):
    app = make_app(folders["vlm"])
    with serve_in_background(app) as url:
        yield url, app.state.model_name


def client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, **kw)


def data_url(path: Path, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def openai_error(resp: httpx.Response, status: int) -> dict:
    """The error object of an OpenAI-style error reply, after checking its shape."""
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# ---------------------------------------------------------------------------------------
# Answers: the same as `semilens ask` / `semilens predict`
# ---------------------------------------------------------------------------------------


def test_models_lists_the_checkpoint_under_its_name(text_server, text_model, folders):
    url, name = text_server
    assert name == str(folders["llm"])
    listed = client(url).models.list()
    assert [m.id for m in listed.data] == [name] and listed.data[0].owned_by == "semilens"
    raw = httpx.get(f"{url}/models").json()
    assert (
        raw["object"] == "list" and raw["data"][0]["object"] == "model" and isinstance(raw["data"][0]["created"], int)
    )

    # --model-name renames it; the folder path is then an unknown model
    with serve_in_background(make_app(text_model, ServeOptions(model_name="semilens-tiny"))) as url2:
        assert [m.id for m in client(url2).models.list().data] == ["semilens-tiny"]
        error = openai_error(httpx.post(f"{url2}/chat/completions", json={"model": name, "messages": user("hi")}), 404)
        assert error["code"] == "model_not_found" and error["param"] == "model"


def test_text_answer_is_what_semilens_ask_prints(text_server, text_model, folders):
    from semilens.llm.ask import ask

    url, name = text_server
    reply = client(url).chat.completions.create(model=name, messages=user(QUESTION), max_tokens=12)
    expected = ask(folders["llm"], QUESTION, 12)
    assert expected  # an untrained model still says something
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == name
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    # the prompt is the chat template's rendering, counted by the tokenizer
    prompt = text_model.tokenizer.apply_chat_template(user(QUESTION), tokenize=False, add_generation_prompt=True)
    n_prompt = len(text_model.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert reply.usage.prompt_tokens == n_prompt
    assert 0 < reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_adapter_folder_answers_as_semilens_ask_does(folders):
    from semilens.llm.ask import ask

    app = make_app(folders["adapter"])
    assert app.state.checkpoint.kind == "text"
    with serve_in_background(app) as url:
        got = client(url).chat.completions.create(model=str(folders["adapter"]), messages=user(QUESTION), max_tokens=10)
    assert got.choices[0].message.content == ask(folders["adapter"], QUESTION, 10)
    assert got.choices[0].message.content != ask(folders["llm"], QUESTION, 10)  # the adapter was applied


def test_vlm_answer_with_a_data_url_is_what_semilens_predict_prints(vlm_server, folders):
    from semilens.vlm.predict import predict

    url, name = vlm_server
    question = "How many particles are visible?"
    content = [
        {"type": "image_url", "image_url": {"url": data_url(folders["png"])}},
        {"type": "text", "text": question},
    ]
    reply = client(url).chat.completions.create(
        model=name, messages=[{"role": "user", "content": content}], max_tokens=10
    )
    assert reply.choices[0].message.content == predict(folders["vlm"], folders["png"], question, 10)
    with_image = reply.usage.prompt_tokens
    # the image's tokens are part of the prompt: the same question without it is shorter
    text_only = client(url).chat.completions.create(model=name, messages=user(question), max_tokens=2)
    assert text_only.choices[0].message.content is not None
    assert with_image > text_only.usage.prompt_tokens + 4
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_multi_turn_chats_go_through_the_chat_template(text_server, text_model):
    url, name = text_server
    chat = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "What is RIE?"}, {"type": "text", "text": "One line."}]},
        {"role": "assistant", "content": "Reactive ion etching."},
        {"role": "user", "content": QUESTION},
    ]
    reply = client(url).chat.completions.create(model=name, messages=chat, max_tokens=4)
    # text parts of one message are joined with a newline, then the template renders the turns
    rendered = [
        {**m, "content": m["content"] if isinstance(m["content"], str) else "What is RIE?\nOne line."} for m in chat
    ]
    prompt = text_model.tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    assert reply.usage.prompt_tokens == len(text_model.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    single = client(url).chat.completions.create(model=name, messages=user(QUESTION), max_tokens=4)
    assert reply.usage.prompt_tokens > single.usage.prompt_tokens


def test_finish_reason_is_length_at_max_tokens_and_stop_at_eos(text_server, folders):
    import torch

    url, name = text_server
    reply = client(url).chat.completions.create(model=name, messages=user(QUESTION), max_completion_tokens=3)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3

    # A copy of the model that stops on the token it greedily says first must stop there.
    own = load_checkpoint(folders["llm"])
    prompt = own.tokenizer.apply_chat_template(user(QUESTION), tokenize=False, add_generation_prompt=True)
    ids = own.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        first = int(own.model(**ids).logits[0, -1].argmax())
    own.model.generation_config.eos_token_id = [first]
    with serve_in_background(make_app(own)) as url2:
        reply = client(url2).chat.completions.create(model=str(folders["llm"]), messages=user(QUESTION), max_tokens=8)
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == 1


def test_sampling_is_reproducible_with_a_seed(text_server):
    url, name = text_server
    c = client(url)

    def say(**kw) -> str:
        return (
            c.chat.completions.create(model=name, messages=user(QUESTION), max_tokens=12, **kw)
            .choices[0]
            .message.content
        )

    greedy = say()
    assert say(temperature=0) == greedy
    a, b, other = say(temperature=1.0, seed=7), say(temperature=1.0, seed=7), say(temperature=1.0, seed=8)
    assert a == b and a != other and a != greedy
    assert say(temperature=1.0, top_p=0.5, seed=7) != a  # top_p is applied


def test_stream_concatenates_to_the_answer(text_server, vlm_server, folders):
    for url, name, content in (
        (*text_server, QUESTION),
        (
            *vlm_server,
            [
                {"type": "image_url", "image_url": {"url": data_url(folders["png"])}},
                {"type": "text", "text": "Describe it."},
            ],
        ),
    ):
        c = client(url)
        messages = [{"role": "user", "content": content}]
        whole = c.chat.completions.create(model=name, messages=messages, max_tokens=16)
        chunks = list(
            c.chat.completions.create(
                model=name, messages=messages, max_tokens=16, stream=True, stream_options={"include_usage": True}
            )
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
        assert len(pieces) > 1, "the reply should arrive in several pieces"
        assert "".join(pieces) == whole.choices[0].message.content
        finished = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert finished == [whole.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == {**whole.usage.model_dump()}
        assert len({ch.id for ch in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"

    # on the wire: server-sent events ending with [DONE]
    url, name = text_server
    with httpx.stream(
        "POST", f"{url}/chat/completions", json={"model": name, "messages": user("hi"), "max_tokens": 3, "stream": True}
    ) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("clean_up_spaces", [False, True])
def test_streamed_pieces_never_take_anything_back(folders, clean_up_spaces):
    """Token by token, the pieces sent add up to the stripped one-shot decode: trailing
    spaces, split UTF-8 characters and (with clean_up_tokenization_spaces) " ." are held
    until they are settled."""
    import torch
    from transformers import AutoTokenizer

    from semilens.serve.checkpoint import _DeltaStreamer, _RowStreamer

    tok = AutoTokenizer.from_pretrained(folders["llm"])
    tok.clean_up_tokenization_spaces = clean_up_spaces
    # transformers 5 skips the clean-up for BPE unless forced; a WordPiece checkpoint would not
    tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = clean_up_spaces
    for text in [
        "  Etch rate = 390 nm/min .  \n",
        "Rate: 1.2 µm/min , do n't tilt Å",
        "Tilt it 7 degrees .",
        "a \x1c\ufffd é",
    ]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        final = tok.decode(ids, skip_special_tokens=True).strip()
        pieces: list[str] = []
        row = _DeltaStreamer(tok, pieces.append)
        # as generate() feeds it: the prompt first (not sent), then a token per step; a
        # step past the row's max_new_tokens (its neighbours in the batch run on) is not sent
        streamer = _RowStreamer([row], [len(ids)], eos=set())
        streamer.put(torch.tensor([[1, 2, 3]]))
        for i in [*ids, ids[0]]:
            streamer.put(torch.tensor([i]))
            assert final.startswith("".join(pieces)), (text, pieces)
        row.finish(final)
        assert "".join(pieces) == final and all(pieces)
    assert len(tok("é", add_special_tokens=False)["input_ids"]) > 1  # the split-character case was exercised
    assert (tok.decode(tok("do n't", add_special_tokens=False)["input_ids"]) == "don't") == clean_up_spaces


# ---------------------------------------------------------------------------------------
# Batching: concurrent requests share a generate call and get what they get alone
# ---------------------------------------------------------------------------------------


def replies_alone_and_together(model, bodies: list[dict]) -> tuple[list, list, dict]:
    """Each body's reply (content, finish_reason, usage) from an app answering one request
    at a time, then from a batching app that got them all at once; and its batch stats.

    The test holds the model while the batched requests arrive, so they queue behind it
    whatever this machine's speed, as concurrent clients of a busy server do."""

    def reply(url: str, name: str, body: dict) -> tuple:
        body = {**body, "model": name}
        if body.get("stream"):
            pieces = client(url).chat.completions.create(**body)
            return ("".join(c.choices[0].delta.content or "" for c in pieces if c.choices), "stream")
        done = httpx.post(f"{url}/chat/completions", json=body, timeout=120)
        assert done.status_code == 200, done.text
        choice = done.json()["choices"][0]
        return (choice["message"]["content"], choice["finish_reason"], done.json()["usage"])

    def alone_reply(url: str, name: str, body: dict) -> tuple:
        got = reply(url, name, body)
        return got if not body.get("stream") else (got[0], "stream")

    single = make_app(model, ServeOptions(max_batch_size=1))
    with serve_in_background(single) as url:
        alone = [alone_reply(url, single.state.model_name, b) for b in bodies]
    batched = make_app(model, ServeOptions(max_batch_size=16, batch_window_ms=50))
    with serve_in_background(batched) as url:
        name = batched.state.model_name
        before = stats_of(url)["batching"]
        with ThreadPoolExecutor(len(bodies)) as pool:
            assert model.lock.acquire()
            try:
                futures = [pool.submit(reply, url, name, b) for b in bodies]
                deadline = time.monotonic() + 60
                while model.queued() < len(bodies):
                    assert time.monotonic() < deadline, "the requests never queued"
                    time.sleep(0.005)
            finally:
                model.lock.release()
            together = [f.result() for f in futures]
        after = stats_of(url)["batching"]
    sizes = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    return alone, together, {k: v for k, v in sizes.items() if v}


def test_concurrent_text_requests_are_batched_and_answered_as_alone(text_model):
    """Prompts of different lengths (padding), replies of different max_tokens (a row
    stops at its own), a stream among them, and a seeded sampled request (it runs alone)."""
    questions = [QUESTION, "Why?", "List three plasma etch gases and say which etches oxide fastest.", "CMP?"]
    bodies = [{"messages": user(q), "max_tokens": 3 + 5 * i} for i, q in enumerate(questions * 2)]
    bodies[5]["stream"] = True
    bodies.append({"messages": user("Say anything."), "max_tokens": 12, "temperature": 0.9, "seed": 7})
    alone, together, sizes = replies_alone_and_together(text_model, bodies)
    assert together == alone
    assert {a[1] for a in alone[:-1]} >= {"length"}  # the limits were reached, not only EOS
    # the batch that took the first request before the rest arrived, one for the greedy
    # requests that queued behind it, and the sampled one alone
    assert sum(sizes.values()) <= 3 and sum(k * v for k, v in sizes.items()) == len(bodies)


def test_concurrent_vlm_requests_are_batched_and_answered_as_alone(folders, tmp_path):
    from PIL import Image

    second = tmp_path / "second.png"
    Image.open(folders["png"]).transpose(Image.Transpose.ROTATE_90).save(second)
    model = load_checkpoint(folders["vlm"])
    bodies = []
    for i, (png, question) in enumerate(
        [(folders["png"], "How many particles?"), (second, "Describe this micrograph."), (second, "Scale?")] * 2
    ):
        content = [{"type": "image_url", "image_url": {"url": data_url(png)}}, {"type": "text", "text": question}]
        bodies.append({"messages": [{"role": "user", "content": content}], "max_tokens": 4 + 3 * i})
    bodies.append({"messages": user("No image here."), "max_tokens": 5})  # no image: not in the image rows' batch
    alone, together, sizes = replies_alone_and_together(model, bodies)
    assert together == alone
    # the first batch, the image rows that queued behind it, the text-only one
    assert sum(sizes.values()) <= 3 and sum(k * v for k, v in sizes.items()) == len(bodies)


def stats_of(url: str) -> dict:
    return httpx.get(url.removesuffix("/v1") + "/semilens/stats").json()


# ---------------------------------------------------------------------------------------
# Refusals, in OpenAI's error format
# ---------------------------------------------------------------------------------------

TINY_PNG_B64 = base64.b64encode(b"not an image at all").decode()


@pytest.mark.parametrize(
    "body, param, says",
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model", "Field required"),
        ({"model": "M"}, "messages", "Field required"),
        ({"model": "M", "messages": []}, "messages", "at least 1"),
        ({"model": "M", "messages": "hi"}, "messages", "valid list"),
        ({"model": "M", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "system"),
        ({"model": "M", "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "valid list"),
        ({"model": "M", "messages": [{"role": "user"}]}, "messages[0].content", "Field required"),
        (
            {"model": "M", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "messages[0].content[0].type",
            "image_url",
        ),
        (
            {"model": "M", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0].image_url.url",
            "Field required",
        ),
        ({"model": "M", "messages": user("hi"), "max_tokens": "5"}, "max_tokens", "integer"),
        ({"model": "M", "messages": user("hi"), "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"model": "M", "messages": user("hi"), "temperature": -1}, "temperature", "greater than or equal to 0"),
        ({"model": "M", "messages": user("hi"), "n": 2}, "n", "only n=1"),
        ({"model": "M", "messages": user("hi"), "stream": "yes"}, "stream", "boolean"),
    ],
)
def test_bad_payloads_are_400_naming_the_field(text_server, body, param, says):
    url, name = text_server
    if isinstance(body, dict):
        body = json.dumps({k: (name if v == "M" else v) for k, v in body.items()}).encode()
    error = openai_error(
        httpx.post(f"{url}/chat/completions", content=body, headers={"Content-Type": "application/json"}), 400
    )
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert says in error["message"] and (param is None or error["message"].startswith(param))


@pytest.mark.parametrize(
    "image_url, says",
    [
        ("http://example.com/sem.png", "only base64 data: URLs"),
        ("https://example.com/sem.png", "only base64 data: URLs"),
        ("file:///etc/passwd", "only base64 data: URLs"),
        ("data:image/png,rawbytes", "not a base64 data URL"),
        ("data:text/plain;base64,aGVsbG8=", "is not an image"),
        ("data:image/png;base64,@@@not-base64@@@", "not valid base64"),
        (f"data:image/png;base64,{TINY_PNG_B64}", "not a readable image"),
    ],
)
def test_bad_images_are_400(vlm_server, image_url, says):
    url, name = vlm_server
    content = [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": image_url}}]
    error = openai_error(
        httpx.post(f"{url}/chat/completions", json={"model": name, "messages": [{"role": "user", "content": content}]}),
        400,
    )
    assert error["param"] == "messages[0].content[1].image_url.url" and says in error["message"]


def test_an_image_for_the_text_model_is_400(text_server, folders):
    url, name = text_server
    content = [
        {"type": "image_url", "image_url": {"url": data_url(folders["png"])}},
        {"type": "text", "text": "What is it?"},
    ]
    with pytest.raises(openai.BadRequestError) as caught:
        client(url).chat.completions.create(model=name, messages=[{"role": "user", "content": content}], max_tokens=4)
    assert caught.value.status_code == 400 and "text-only" in caught.value.message
    assert caught.value.body["param"] == "messages[0].content[0]"


def test_unknown_model_and_unknown_path_are_404(text_server):
    url, name = text_server
    with pytest.raises(openai.NotFoundError) as caught:
        client(url).chat.completions.create(model="gpt-4o", messages=user("hi"))
    assert caught.value.body["code"] == "model_not_found"
    error = openai_error(httpx.get(f"{url}/embeddings"), 404)
    assert "/v1/embeddings" in error["message"]
    error = openai_error(httpx.get(f"{url}/chat/completions"), 405)
    assert error["type"] == "invalid_request_error"


def test_a_body_over_the_limit_is_413(text_model):
    options = ServeOptions(max_request_bytes=4096)
    app = make_app(text_model, options)
    with serve_in_background(app) as url:
        name = app.state.model_name
        small = {"model": name, "messages": user("hi"), "max_tokens": 1}
        assert httpx.post(f"{url}/chat/completions", json=small).status_code == 200
        big = {"model": name, "messages": user("x" * 10_000), "max_tokens": 1}
        error = openai_error(httpx.post(f"{url}/chat/completions", json=big), 413)  # refused by Content-Length
        assert error["code"] == "request_too_large" and "4096" in error["message"]

        def chunked():  # no Content-Length: the bytes actually read are counted
            for _ in range(10):
                yield b" " * 1000
            yield json.dumps(small).encode()

        openai_error(httpx.post(f"{url}/chat/completions", content=chunked()), 413)
        # the connection and the server are fine afterwards
        assert httpx.post(f"{url}/chat/completions", json=small).status_code == 200


def test_an_api_key_is_required_when_configured(text_model):
    options = ServeOptions(api_key="s3cret-value")
    assert "s3cret-value" not in repr(options) and "s3cret-value" not in str(options.model_dump())
    app = make_app(text_model, options)
    with serve_in_background(app) as url:
        name = app.state.model_name
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-value"}):
            error = openai_error(httpx.get(f"{url}/models", headers=headers), 401)
            assert error["code"] == "invalid_api_key" and "s3cret" not in error["message"]
        with pytest.raises(openai.AuthenticationError):
            client(url).chat.completions.create(model=name, messages=user("hi"), max_tokens=1)
        good = openai.OpenAI(base_url=url, api_key="s3cret-value", max_retries=0)
        assert (
            good.chat.completions.create(model=name, messages=user("hi"), max_tokens=1).choices[0].message.role
            == "assistant"
        )


def test_a_client_that_hangs_up_frees_the_model(text_model):
    app = make_app(text_model)
    with serve_in_background(app) as url:
        name = app.state.model_name
        c = client(url)
        timings = []
        for _ in range(3):  # the fastest of three, the first warming up: a slow outlier on a
            start = time.monotonic()  # busy machine would make `long` short enough to finish in 0.3 s
            c.chat.completions.create(model=name, messages=user(QUESTION), max_tokens=40)
            timings.append((time.monotonic() - start) / 40)
        per_token = min(timings)
        # tokens that would keep the model busy for ~2 s, within the context (a fast machine
        # would ask for more than the 1,024 positions and be refused)
        long = min(2.0 / per_token, text_model.context_tokens - 100)
        with pytest.raises(openai.APITimeoutError):
            client(url, timeout=0.3).chat.completions.create(model=name, messages=user(QUESTION), max_tokens=int(long))
        stream = c.chat.completions.create(model=name, messages=user(QUESTION), max_tokens=int(long), stream=True)
        next(iter(stream))
        stream.close()
        start = time.monotonic()
        c.chat.completions.create(model=name, messages=user(QUESTION), max_tokens=1)
        # without the hang-up checks, this request would wait ~2 s behind each of the two
        assert time.monotonic() - start < 1.5
        counts = stats(url)
    assert counts["requests"] == 6 and counts["completed"] == 4


def test_a_generation_failure_is_500_and_the_server_goes_on(text_model, monkeypatch):
    app = make_app(text_model)
    real = text_model.model.generate
    calls = []

    def fails_twice(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(text_model.model, "generate", fails_twice)
    with serve_in_background(app) as url:
        name = app.state.model_name
        body = {"model": name, "messages": user("hi"), "max_tokens": 2}
        error = openai_error(httpx.post(f"{url}/chat/completions", json=body), 500)
        assert error["type"] == "server_error" and "out of memory (simulated)" in error["message"]
        error = openai_error(httpx.post(f"{url}/chat/completions", json={**body, "stream": True}), 500)
        assert "out of memory (simulated)" in error["message"]
        assert httpx.post(f"{url}/chat/completions", json=body).status_code == 200
        assert stats(url) == {
            "requests": 3,
            "completed": 1,
            "busy": 0,
            "faults": dict.fromkeys(["429", "500", "timeout", "malformed"], 0),
        }


# ---------------------------------------------------------------------------------------
# Fault injection and latency
# ---------------------------------------------------------------------------------------


def stats(url: str) -> dict:
    """The app's request counts (less the batches, which count the model's work for every
    app of this module that shares it)."""
    counts = httpx.get(url.removesuffix("/v1") + "/semilens/stats").json()
    counts.pop("batching")
    return counts


@pytest.mark.parametrize("kind", ["429", "500", "malformed"])
def test_each_fault_kind_is_injected_and_counted(text_model, kind):
    app = make_app(text_model, ServeOptions(fault_rate=1.0, fault_kinds=kind, fault_retry_after_s=0))
    with serve_in_background(app) as url:
        name = app.state.model_name
        c = client(url)
        for _ in range(2):
            if kind == "429":
                with pytest.raises(openai.RateLimitError) as caught:
                    c.chat.completions.create(model=name, messages=user("hi"), max_tokens=2)
                assert caught.value.response.headers["retry-after"] == "0"
                assert caught.value.body["code"] == "rate_limit_exceeded"
            elif kind == "500":
                with pytest.raises(openai.InternalServerError) as caught:
                    c.chat.completions.create(model=name, messages=user("hi"), max_tokens=2)
                assert caught.value.body["type"] == "server_error"
            else:
                resp = httpx.post(f"{url}/chat/completions", json={"model": name, "messages": user("hi")})
                assert resp.status_code == 200 and resp.text.startswith("{")
                with pytest.raises(json.JSONDecodeError):
                    json.loads(resp.text)
        # a bad request is still a 400, not a fault
        assert httpx.post(f"{url}/chat/completions", json={"model": name, "messages": []}).status_code == 400
        counts = stats(url)
    assert counts["requests"] == 3 and counts["completed"] == 0
    assert counts["faults"] == {k: (2 if k == kind else 0) for k in ("429", "500", "timeout", "malformed")}


def test_timeout_fault_holds_past_the_client_timeout(text_model):
    app = make_app(text_model, ServeOptions(fault_rate=1.0, fault_kinds=["timeout"], fault_hold_s=1.0))
    with serve_in_background(app) as url:
        name = app.state.model_name
        start = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            client(url, timeout=0.3).chat.completions.create(model=name, messages=user("hi"), max_tokens=2)
        assert time.monotonic() - start < 0.9
        # a patient client gets the normal answer after the hold
        start = time.monotonic()
        reply = client(url, timeout=20).chat.completions.create(model=name, messages=user("hi"), max_tokens=2)
        assert time.monotonic() - start >= 1.0 and reply.choices[0].message.content is not None
        time.sleep(0.3)  # the first request notices its client is gone
        counts = stats(url)
    assert counts == {
        "requests": 2,
        "completed": 1,
        "busy": 0,
        "faults": {"429": 0, "500": 0, "timeout": 2, "malformed": 0},
    }


def test_faults_follow_the_seed_and_the_rate(text_model):
    def outcomes(seed: int) -> tuple[list[int], dict]:
        app = make_app(text_model, ServeOptions(fault_rate=0.5, fault_kinds="429,500", fault_seed=seed))
        with serve_in_background(app) as url:
            body = {"model": app.state.model_name, "messages": user("hi"), "max_tokens": 1}
            codes = [httpx.post(f"{url}/chat/completions", json=body).status_code for _ in range(16)]
            return codes, stats(url)

    codes, counts = outcomes(0)
    assert outcomes(0)[0] == codes  # the same seed, the same faults
    assert outcomes(1)[0] != codes
    assert set(codes) == {200, 429, 500}
    assert counts["requests"] == 16 and counts["completed"] == codes.count(200)
    assert counts["faults"]["429"] == codes.count(429) and counts["faults"]["500"] == codes.count(500)


def test_latency_delays_every_request_without_blocking_the_others(text_model):
    app = make_app(text_model, ServeOptions(latency_ms=200))
    with serve_in_background(app) as url:
        c = client(url)
        name = app.state.model_name
        c.chat.completions.create(model=name, messages=user("warm up"), max_tokens=2)
        start = time.monotonic()
        one = c.chat.completions.create(model=name, messages=user(QUESTION), max_tokens=2)
        single = time.monotonic() - start
        assert single >= 0.2
        start = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            replies = list(
                pool.map(
                    lambda _: c.chat.completions.create(model=name, messages=user(QUESTION), max_tokens=2), range(8)
                )
            )
        together = time.monotonic() - start
    # the model calls are serialised, the sleeps are not
    assert together < 0.6 * 8 * 0.2 + 8 * (single - 0.2), (together, single)
    assert {r.choices[0].message.content for r in replies} == {one.choices[0].message.content}


# ---------------------------------------------------------------------------------------
# Options and the CLI
# ---------------------------------------------------------------------------------------


def test_options_are_validated():
    assert ServeOptions(fault_kinds="timeout, 429,timeout").fault_kinds == ("timeout", "429")
    for bad in (
        {"fault_kinds": "429,503"},
        {"fault_kinds": ""},
        {"fault_rate": 1.5},
        {"latency_ms": -1},
        {"max_request_bytes": 0},
        {"nonsense": 1},
    ):
        with pytest.raises(ValidationError):
            ServeOptions(**bad)


def test_a_folder_that_is_neither_text_nor_vision_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="model_type 'vit' is neither"):
        make_app(tmp_path)
    with pytest.raises(FileNotFoundError):
        make_app(tmp_path / "missing")


def semilens_cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "semilens.cli", *args],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **kw.pop("env", {})},
    )


def test_cli_serves_until_terminated(folders):
    proc = semilens_cli(
        "serve",
        str(folders["llm"]),
        "--port",
        "0",
        "--model-name",
        "tiny",
        "--api-key-env",
        "SERVE_TEST_KEY",
        env={"SERVE_TEST_KEY": "k-123"},
    )
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        while not any("serving" in line for line in lines):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        line = next(line for line in lines if "serving" in line)
        assert "k-123" not in line and "SERVE_TEST_KEY" in line
        url = line.split(" at ")[1].split(",")[0].strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        models = httpx.get(f"{url}/models", headers={"Authorization": "Bearer k-123"}).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "k-123" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_refuses_a_bad_folder_or_option_in_one_line(tmp_path):
    proc = semilens_cli("serve", str(tmp_path / "missing"), "--port", "0")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "no such folder" in stderr and "Traceback" not in stderr
    proc = semilens_cli("serve", str(tmp_path), "--fault-kinds", "429,418")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "unknown fault kind(s) 418" in stderr
