"""`semilens serve` under hostile load: every limit refuses with a 4xx naming its setting,
the queue is first come, first served, and a client that hangs up costs nobody else.

Each test starts the real server (uvicorn on loopback) on tiny untrained checkpoints built
here from config; nothing is downloaded.
"""

from __future__ import annotations

import base64
import os
import re
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import pytest

from semilens.serve import ServeOptions, load_checkpoint, make_app, serve_in_background

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What controls the etch rate in reactive ion etching?"


@pytest.fixture(scope="module")
def folders(serve_checkpoints: dict[str, Path]) -> dict[str, Path]:
    return serve_checkpoints


@pytest.fixture(scope="module")
def text_model(folders):
    return load_checkpoint(folders["llm"])


@pytest.fixture(scope="module")
def vlm_model(folders):
    return load_checkpoint(folders["vlm"])


def chat(url: str, name: str, content="hi", timeout: float = 60, **body) -> httpx.Response:
    payload = {"model": name, "messages": [{"role": "user", "content": content}], **body}
    return httpx.post(f"{url}/chat/completions", json=payload, timeout=timeout)


def refused(resp: httpx.Response, status: int, setting: str) -> dict:
    """The OpenAI-style error of a refusal, after checking its status and that its
    message names the setting that refused it."""
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert setting in error["message"], error["message"]
    return error


def png_header(width: int, height: int) -> bytes:
    """A valid PNG whose header claims width x height (its data is a few bytes): what a
    decompression bomb looks like before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")
    )


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{base64.b64encode(data).decode()}"}}


def per_token_s(url: str, name: str) -> float:
    chat(url, name, QUESTION, max_tokens=4)  # warm
    start = time.monotonic()
    resp = chat(url, name, QUESTION, max_tokens=40)
    assert resp.json()["usage"]["completion_tokens"] == 40  # random weights: no early EOS here
    return (time.monotonic() - start) / 40


# ---------------------------------------------------------------------------------------
# Prompt and reply length
# ---------------------------------------------------------------------------------------


def test_prompt_and_max_tokens_must_fit_the_context(text_model):
    app = make_app(text_model)
    with serve_in_background(app) as url:
        name = app.state.model_name
        assert text_model.context_tokens == 1024
        long_prompt = " ".join(["etch"] * 3000)  # > 1024 tokens whatever the merges
        error = refused(chat(url, name, long_prompt, max_tokens=8), 400, "context_tokens")
        assert error["code"] == "context_length_exceeded" and "1024" in error["message"]
        # a short prompt whose max_tokens leaves no room in the context
        refused(chat(url, name, "hi", max_tokens=1020), 400, "context_tokens")
        # without max_tokens the default shrinks to the room left instead of refusing
        prompt = " ".join(["etch"] * 300)
        fits = chat(url, name, prompt)
        assert fits.status_code == 200, fits.text
        usage = fits.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] <= 1024
        # a lower --context-tokens applies as well
    with serve_in_background(make_app(text_model, ServeOptions(context_tokens=64))) as url:
        refused(chat(url, name, " ".join(["etch"] * 100), max_tokens=1), 400, "context_tokens")


def test_a_prompt_far_past_the_context_is_refused_without_tokenizing_it(text_model, monkeypatch):
    """Only a floor is needed to refuse: characters / (4 x the longest vocabulary entry).
    The tokenizer never sees a 2 MB prompt, while a merely long one is still counted exactly."""
    seen: list[int] = []
    counter = text_model.tokenizer.__class__.__call__

    def counting(self, text, *args, **kwargs):
        seen.append(len(text))
        return counter(self, text, *args, **kwargs)

    monkeypatch.setattr(text_model.tokenizer.__class__, "__call__", counting)
    app = make_app(text_model)
    with serve_in_background(app) as url:
        name = app.state.model_name
        error = refused(chat(url, name, "x" * 2_000_000, max_tokens=8), 400, "context_tokens")
        assert error["code"] == "context_length_exceeded" and "at least" in error["message"]
        assert all(n < 100_000 for n in seen), seen  # the huge prompt was never tokenized
        error = refused(chat(url, name, " ".join(["etch"] * 3000), max_tokens=8), 400, "context_tokens")
        assert "at least" not in error["message"] and any(n > 10_000 for n in seen)  # counted exactly


def test_freed_heap_is_returned_after_large_bodies(text_model, monkeypatch):
    """A 200 kB prompt leaves freed heap that glibc would keep: the server hands it back
    after such a body, never after small ones."""
    import semilens.serve.app as serve_app

    assert serve_app.release_free_heap()  # Debian's glibc has malloc_trim
    trims: list[float] = []
    monkeypatch.setattr(serve_app, "release_free_heap", lambda: trims.append(time.monotonic()) or True)
    app = make_app(text_model)
    with serve_in_background(app) as url:
        name = app.state.model_name
        assert chat(url, name, "hi", max_tokens=2).status_code == 200
        time.sleep(0.3)
        assert trims == []  # a small body: nothing to hand back
        big = "plasma etch rate " * 12_000
        refused(chat(url, name, big, max_tokens=8), 400, "context_tokens")
        deadline = time.monotonic() + 5
        while not trims and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(trims) == 1, trims


def test_max_tokens_is_capped(text_model):
    app = make_app(text_model, ServeOptions(max_tokens_cap=50))
    with serve_in_background(app) as url:
        name = app.state.model_name
        error = refused(chat(url, name, max_tokens=10**9), 400, "max_tokens_cap")
        assert error["param"] == "max_tokens" and "1000000000" in error["message"]
        error = refused(chat(url, name, max_completion_tokens=51), 400, "max_tokens_cap")
        assert error["param"] == "max_completion_tokens"
        assert chat(url, name, max_tokens=50).status_code == 200


# ---------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------


def test_images_over_the_ingest_pixel_cap_are_refused_from_their_header(vlm_model, folders):
    app = make_app(vlm_model)
    with serve_in_background(app) as url:
        name = app.state.model_name
        assert app.state.checkpoint is vlm_model
        # 81 Mpx: under Pillow's own warning level, over ingest's 64 Mpx
        for width, height in ((9000, 9000), (100_000, 100_000)):
            bomb = png_header(width, height)
            assert len(bomb) < 200
            content = [image_part(bomb), {"type": "text", "text": "what is this"}]
            error = refused(chat(url, name, content, max_tokens=2), 400, "max_image_pixels")
            assert error["code"] == "image_too_large" and "64000000" in error["message"]
        # the real picture goes through
        ok = chat(url, name, [image_part(folders["png"].read_bytes()), {"type": "text", "text": "what"}], max_tokens=2)
        assert ok.status_code == 200, ok.text
    with serve_in_background(make_app(vlm_model, ServeOptions(max_image_pixels=96 * 80 - 1))) as url:
        content = [image_part(folders["png"].read_bytes()), {"type": "text", "text": "what"}]
        refused(chat(url, name, content, max_tokens=2), 400, "max_image_pixels")


def test_images_per_request_are_capped(vlm_model, folders):
    app = make_app(vlm_model, ServeOptions(max_images=2))
    with serve_in_background(app) as url:
        name = app.state.model_name
        picture = image_part(folders["png"].read_bytes())
        error = refused(
            chat(url, name, [picture, picture, picture, {"type": "text", "text": "x"}], max_tokens=1), 400, "max_images"
        )
        assert error["code"] == "too_many_images" and "3 images" in error["message"]


def test_predict_refuses_a_bomb_header_in_one_line(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(100_000, 100_000))
    for picture in (bomb, tmp_path / "mid.png"):
        if picture.name == "mid.png":
            picture.write_bytes(png_header(9000, 9000))  # over 64 Mpx, under Pillow's own limit
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "semilens.cli",
                "predict",
                str(picture),
                "what is it",
                "--checkpoint",
                str(tmp_path / "none"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"},
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "max_pixels 64000000" in done.stderr and picture.name in done.stderr


# ---------------------------------------------------------------------------------------
# Malformed bodies
# ---------------------------------------------------------------------------------------


def test_deeply_nested_json_is_400_not_500(text_model):
    app = make_app(text_model)
    with serve_in_background(app) as url:
        name = app.state.model_name
        for depth in (10_000, 100):
            head = f'"model": "{name}", "messages": [{{"role": "user", "content": "hi"}}]'
            body = "{" + head + ', "response_format": ' + "[" * depth + "]" * depth + "}"
            resp = httpx.post(f"{url}/chat/completions", content=body, headers={"content-type": "application/json"})
            error = refused(resp, 400, "max_json_depth")
            assert error["code"] == "json_too_deep"
        # the server is still up and answers
        assert chat(url, name, max_tokens=1).status_code == 200


# ---------------------------------------------------------------------------------------
# The queue
# ---------------------------------------------------------------------------------------


def test_a_full_queue_is_429_with_retry_after(text_model):
    app = make_app(text_model, ServeOptions(max_in_flight=1, busy_retry_after_s=3))
    with serve_in_background(app) as url:
        name = app.state.model_name
        first: list[httpx.Response] = []
        # The test holds the model, so the first request stays in flight (queued) meanwhile.
        assert text_model.lock.acquire()
        try:
            holder = threading.Thread(target=lambda: first.append(chat(url, name, QUESTION, max_tokens=2)))
            holder.start()
            deadline = time.monotonic() + 30
            while text_model.queued() < 1:
                assert time.monotonic() < deadline, "the first request never queued"
                time.sleep(0.005)
            resp = chat(url, name, max_tokens=1)
        finally:
            text_model.lock.release()
        error = refused(resp, 429, "max_in_flight")
        assert resp.headers["retry-after"] == "3" and error["code"] == "server_busy"
        holder.join()
        assert first[0].status_code == 200
        # the slot is free again once the first is done
        assert chat(url, name, max_tokens=1).status_code == 200
        assert httpx.get(f"{url.removesuffix('/v1')}/semilens/stats").json()["busy"] == 1


def test_requests_are_answered_first_come_first_served(text_model):
    app = make_app(text_model)
    with serve_in_background(app) as url:
        name = app.state.model_name
        # The order the model serves them, seen where a request holds it (the prompt is
        # encoded under the model's lock): the clients' own finishing order can swap two
        # neighbours on a busy machine after the server answered them in order.
        served: list[int] = []
        encode = text_model._encode

        def encode_and_note(messages: Any, images: Any) -> Any:
            # one batch's chats, in their order in the batch
            served.extend(int(re.findall(r"request (\d+)", str(chat))[-1]) for chat in messages)
            return encode(messages, images)

        text_model._encode = encode_and_note

        def send(i: int) -> None:
            assert chat(url, name, f"{QUESTION} (request {i})", max_tokens=2).status_code == 200

        # The test holds the model itself, so the queue forms behind it however slow this
        # machine is; each request is sent once the one before is waiting for the model.
        assert text_model.lock.acquire()
        threads = []
        try:
            for i in range(8):
                threads.append(threading.Thread(target=send, args=(i,)))
                threads[-1].start()
                deadline = time.monotonic() + 30
                while text_model.queued() < i + 1:
                    assert time.monotonic() < deadline, f"request {i} never queued"
                    time.sleep(0.005)
        finally:
            text_model.lock.release()
        try:
            for t in threads:
                t.join()
        finally:
            del text_model._encode
        assert served == list(range(8))


def test_a_dropped_request_does_not_delay_the_next(text_model):
    app = make_app(text_model)
    with serve_in_background(app) as url:
        name = app.state.model_name
        slow = min(int(3.0 / per_token_s(url, name)), 960)  # ~3 s of generation if it ever ran
        results: dict[str, object] = {}

        def send(key: str, tokens: int, timeout: float) -> None:
            try:
                results[key] = chat(url, name, QUESTION, max_tokens=tokens, timeout=timeout).status_code
            except httpx.TimeoutException:
                results[key] = "gave up"
            results[key + "_done"] = time.monotonic()

        def queued(n: int) -> None:
            deadline = time.monotonic() + 30
            while text_model.queued() != n:
                assert time.monotonic() < deadline, f"the queue never held {n}"
                time.sleep(0.005)

        # The test holds the model: b queues, then c behind it; b's client gives up.
        assert text_model.lock.acquire()
        try:
            b = threading.Thread(target=send, args=("b", slow, 0.5))
            b.start()
            queued(1)
            c = threading.Thread(target=send, args=("c", 1, 60))
            c.start()
            queued(2)
            b.join()
            queued(1)  # b has left the queue without running
        finally:
            released = time.monotonic()
            text_model.lock.release()
        c.join()
        assert results["b"] == "gave up" and results["c"] == 200
        # c runs right away, never behind b's ~3 s
        assert results["c_done"] - released < 1.0, results["c_done"] - released
        counts = httpx.get(f"{url.removesuffix('/v1')}/semilens/stats").json()
        assert counts["completed"] == 3  # two warm-ups and c; b never generated
