"""The one OpenAI-compatible client: retries, Retry-After, the request cache, structured
outputs with re-asks, accounting, and the API key's absence from everything written.

Protocol-level behaviour runs against ``semilens serve`` (a tiny Llama on loopback) in
its fault-injection mode; replies that a model cannot be made to give (a valid JSON
object after an invalid one) come from the scripted ``ChatStub``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from conftest import ChatStub
from pydantic import BaseModel

from semilens.config import EndpointConfig
from semilens.openai_client import (
    Client,
    Request,
    classify,
    parse_structured,
    request_key,
    retry_after,
    status_failure,
)

# ---------------------------------------------------------------------------- pure parts


def test_retry_after_reads_seconds_milliseconds_and_http_dates():
    assert retry_after({"retry-after": "3"}) == 3.0
    assert retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    in_a_minute = format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)
    assert 55 < retry_after({"retry-after": in_a_minute}) <= 60
    assert retry_after({"retry-after": "-4"}) == 0.0
    assert retry_after({}) is None and retry_after(None) is None


def test_error_statuses_and_transport_failures_get_their_kind_and_the_server_message():
    import aiohttp

    limited = status_failure(429, '{"error": {"message": "slow down", "type": "rate"}}', {"retry-after": "2"})
    assert (limited.kind, limited.detail, limited.retry_after_s) == ("rate_limited", "HTTP 429: slow down", 2.0)
    busy = status_failure(503, "<html>busy</html>\n", {})
    assert (busy.kind, busy.detail, busy.retry_after_s) == ("server_error", "HTTP 503: <html>busy</html>", None)
    kinds = {code: status_failure(code, "{}", None).kind for code in (400, 401, 403, 404, 413, 418, 422)}
    assert kinds == {
        400: "bad_request",
        401: "unauthorized",
        403: "unauthorized",
        404: "not_found",
        413: "bad_request",
        418: "http_error",
        422: "bad_request",
    }
    assert classify(aiohttp.SocketTimeoutError()).kind == "timeout"  # a ClientError too, but a timeout
    assert classify(aiohttp.ServerDisconnectedError()).kind == "connection"
    assert classify(aiohttp.InvalidURL("ftp:/x")).kind == "bad_request"
    with pytest.raises(KeyError):
        classify(KeyError("a bug is not a failed request"))


def test_a_server_that_is_not_there_is_a_connection_failure_retried_then_final():
    from semilens.launch import free_port

    endpoint = EndpointConfig(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m", max_retries=2, backoff_s=0)
    client = Client(endpoint, None, environ={})
    [outcome] = client.run([Request([{"role": "user", "content": "hello"}])])
    assert outcome.error.kind == "connection" and outcome.attempts == 3
    assert client.accounting.as_dict()["retries"] == {"connection": 2}


class Verdict(BaseModel):
    label: str
    score: int


def test_structured_replies_are_read_from_fences_and_refused_when_wrong():
    assert parse_structured('```json\n{"label": "ok", "score": 3}\n```', Verdict) == Verdict(label="ok", score=3)
    assert parse_structured('Sure: {"label": "x", "score": 1} done', Verdict).score == 1
    with pytest.raises(ValueError):
        parse_structured('{"label": "x"}', Verdict)


def test_the_cache_key_covers_image_bytes_sampling_and_schema_but_not_the_host():
    def msg(png: str) -> list[dict]:
        return [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "q"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                ],
            }
        ]

    base = request_key("m", Request(msg("AAAA")), {"temperature": 0})
    assert base == request_key("m", Request(msg("AAAA"), tag="another name"), {"temperature": 0})
    assert base != request_key("m", Request(msg("AAAB")), {"temperature": 0})
    assert base != request_key("m", Request(msg("AAAA")), {"temperature": 0.7})
    assert base != request_key("m", Request(msg("AAAA"), schema=Verdict), {"temperature": 0})
    assert base != request_key("other", Request(msg("AAAA")), {"temperature": 0})


# ---------------------------------------------------------------------------- scripted replies


def test_an_invalid_structured_reply_is_re_asked_with_the_reason(tmp_path):
    script = {
        "[v]": ['{"label": "fine"}', '```json\n{"label": "fine", "score": 4}\n```'],
        "[never]": ["not json"] * 3,
    }
    endpoint = EndpointConfig(base_url="http://x/v1", model="m", max_reasks=2, backoff_s=0)
    with ChatStub(script) as stub:
        client = Client(endpoint.model_copy(update={"base_url": stub.url}), tmp_path, environ={})
        ok, bad = client.run(
            [
                Request([{"role": "user", "content": "[v]"}], schema=Verdict),
                Request([{"role": "user", "content": "[never]"}], schema=Verdict),
            ]
        )
        assert ok.parsed == Verdict(label="fine", score=4) and ok.error is None
        assert bad.error.kind == "invalid_output" and "Invalid JSON" in bad.error.detail
        reask = next(
            r["body"]
            for r in stub.requests
            if len(r["body"]["messages"]) == 3 and "[v]" in r["body"]["messages"][0]["content"]
        )
        assert reask["messages"][1] == {"role": "assistant", "content": '{"label": "fine"}'}
        assert "score" in reask["messages"][2]["content"]  # the validation error is told
        assert reask["response_format"]["json_schema"]["schema"]["required"] == ["label", "score"]
        assert client.accounting.reasks == 3 and client.accounting.failures == {"invalid_output": 1}
        # a re-run replays every reply, the invalid ones and their re-asks included: the
        # same outcomes, and nothing is sent
        n = len(stub.requests)
        again = Client(endpoint.model_copy(update={"base_url": stub.url}), tmp_path, environ={})
        ok2, bad2 = again.run(
            [
                Request([{"role": "user", "content": "[v]"}], schema=Verdict),
                Request([{"role": "user", "content": "[never]"}], schema=Verdict),
            ]
        )
        assert ok2.cached and ok2.parsed == ok.parsed and bad2.cached and bad2.error.kind == "invalid_output"
        assert len(stub.requests) == n and again.accounting.requests_sent == 0 and again.accounting.cache_hits == 5


def test_a_client_error_is_final_and_retry_after_is_honoured(tmp_path):
    with ChatStub({"[a]": [404, "never"], "[b]": [503, "fine"]}) as stub:
        client = Client(EndpointConfig(base_url=stub.url, model="m", backoff_s=0), None, environ={})
        a, b = client.run(
            [Request([{"role": "user", "content": "[a]"}]), Request([{"role": "user", "content": "[b]"}])]
        )
    assert a.error.kind == "not_found" and a.attempts == 1
    assert b.text == "fine" and b.attempts == 2
    assert client.accounting.as_dict()["retries"] == {"server_error": 1}


# ---------------------------------------------------------------------------- against semilens serve


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from semilens.config import TinyLLMConfig
    from semilens.llm.prepare import build_tiny
    from semilens.serve import load_checkpoint

    folder = tmp_path_factory.mktemp("llm") / "llm"
    model, tokenizer = build_tiny(
        TinyLLMConfig(vocab_size=512, hidden_size=32, intermediate_size=64, heads=2, kv_heads=1), seed=0
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_checkpoint(folder)


def _questions(n: int) -> list[Request]:
    return [
        Request([{"role": "user", "content": f"What limits the etch rate in trench {i}?"}], max_tokens=4, tag=f"q{i}")
        for i in range(n)
    ]


def _stats(url: str) -> dict:
    import httpx

    return httpx.get(url.removesuffix("/v1") + "/semilens/stats").json()


def test_every_item_completes_through_20_percent_faults_and_a_rerun_sends_nothing(tiny_llm, tmp_path):
    from semilens.serve import ServeOptions, make_app, serve_in_background

    options = ServeOptions(fault_rate=0.2, fault_seed=3, fault_hold_s=4, fault_retry_after_s=0)
    endpoint = EndpointConfig(
        base_url="http://x/v1", model="m", concurrency=8, timeout_s=2, max_retries=10, backoff_s=0.01
    )
    app = make_app(tiny_llm, options)
    with serve_in_background(app) as url:
        endpoint = endpoint.model_copy(update={"base_url": url, "model": app.state.model_name})
        client = Client(endpoint, tmp_path, environ={})
        outcomes = client.run(_questions(60))
        stats = _stats(url)
        assert all(o.ok and o.text is not None for o in outcomes)  # every item completed
        acc = client.accounting.as_dict()
        assert acc["completed"] == 60 and acc["failed"] == 0
        faults = stats["faults"]
        # every injected fault was seen and retried as its kind; on a busy machine a real
        # generation can outlast the 2 s timeout too, which is retried the same way
        retries = acc["retries"]
        assert (retries.get("rate_limited"), retries.get("server_error"), retries.get("malformed")) == (
            faults["429"],
            faults["500"],
            faults["malformed"],
        )
        assert retries.get("timeout", 0) >= faults["timeout"]
        assert sum(faults.values()) >= 8 and all(faults.values())  # about 20% of requests, all four kinds
        assert acc["requests_sent"] == stats["requests"] == 60 + sum(retries.values())
        assert acc["prompt_tokens"] > 0 and acc["completion_tokens"] > 0

        again = Client(endpoint, tmp_path, environ={})
        repeat = again.run(_questions(60))
        assert [o.text for o in repeat] == [o.text for o in outcomes] and all(o.cached for o in repeat)
        assert again.accounting.requests_sent == 0 and _stats(url)["requests"] == stats["requests"]


def test_retry_after_is_waited_for(tiny_llm):
    from semilens.serve import ServeOptions, make_app, serve_in_background

    app = make_app(tiny_llm, ServeOptions(fault_rate=1.0, fault_kinds="429", fault_retry_after_s=1))
    with serve_in_background(app) as url:
        client = Client(
            EndpointConfig(base_url=url, model=app.state.model_name, max_retries=1, backoff_s=0), None, environ={}
        )
        start = time.perf_counter()
        [outcome] = client.run(_questions(1))
        took = time.perf_counter() - start
    assert outcome.error.kind == "rate_limited" and outcome.attempts == 2
    assert took >= 1.0  # the server's Retry-After, not the zero backoff


KILLED_RUN = """
import sys
from pathlib import Path
from semilens.config import EndpointConfig
from semilens.openai_client import Client, Request
url, model, cache = sys.argv[1:4]
qs = [Request([{"role": "user", "content": f"What limits the etch rate in trench {i}?"}], max_tokens=4) for i in range(40)]
Client(EndpointConfig(base_url=url, model=model, concurrency=2, max_retries=0), Path(cache), environ={}).run(qs)
"""


def test_a_run_killed_half_way_resumes_without_repeating_a_finished_request(tiny_llm, tmp_path):
    from semilens.serve import ServeOptions, make_app, serve_in_background

    app = make_app(tiny_llm, ServeOptions(latency_ms=100))  # 40 requests, 2 at a time: about 2 s
    with serve_in_background(app) as url:
        proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, url, app.state.model_name, str(tmp_path)])
        entries = lambda: list((tmp_path / "openai").rglob("*.json")) if (tmp_path / "openai").is_dir() else []  # noqa: E731
        deadline = time.monotonic() + 60
        while len(entries()) < 12 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        finished = len(entries())
        assert 12 <= finished < 40, "the run should have been killed half-way"
        sent_before = _stats(url)["requests"]
        client = Client(EndpointConfig(base_url=url, model=app.state.model_name, concurrency=4), tmp_path, environ={})
        outcomes = client.run(_questions(40))
    assert all(o.ok for o in outcomes) and len(entries()) == 40
    # exactly the unfinished ones were asked again; every finished one came from the cache
    assert client.accounting.requests_sent == 40 - finished and client.accounting.cache_hits == finished
    assert sum(o.cached for o in outcomes) == finished
    assert sent_before >= finished


def test_the_api_key_is_sent_but_never_written(tiny_llm, tmp_path, caplog):
    from pydantic import SecretStr

    from semilens.serve import ServeOptions, make_app, serve_in_background

    planted = "sk-planted-7f3a9c2e51"
    app = make_app(
        tiny_llm, ServeOptions(api_key=SecretStr(planted), fault_rate=0.5, fault_kinds="500", fault_retry_after_s=0)
    )
    caplog.set_level("DEBUG")
    with serve_in_background(app) as url:
        endpoint = EndpointConfig(base_url=url, model=app.state.model_name, api_key_env="MY_KEY", backoff_s=0)
        client = Client(endpoint, tmp_path, environ={"MY_KEY": planted})
        assert all(o.ok for o in client.run(_questions(6)))  # the server accepted the key
        [denied] = Client(endpoint, None, environ={}).run(_questions(1))
    assert denied.error.kind == "unauthorized"
    written = [p.read_text() for p in tmp_path.rglob("*") if p.is_file()]
    assert written and not any(planted in text for text in written)
    assert planted not in json.dumps(client.accounting.as_dict()) and planted not in caplog.text
    assert planted not in repr(endpoint) and planted not in str(denied.error)
