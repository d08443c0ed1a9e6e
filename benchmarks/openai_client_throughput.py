"""Throughput of semilens.openai_client against a server that answers in a fixed 100 ms.

What is measured is the client: its concurrency, connection pool and per-request work
(hashing, accounting, JSON). The server therefore does no work at all: a FastAPI app that
sleeps ``--latency-ms`` and returns one fixed chat completion. It runs in a separate
process (uvicorn), so it does not share the client's interpreter lock. A client with
concurrency c can at best reach c / latency requests per second; the target is 80% of
that at c = 32.

It then checks fault tolerance against ``semilens serve`` itself (a tiny untrained Llama
built here) with 20% of requests failing (429, 500, timeouts, malformed JSON mixed):
every item must complete, and a second run over the same items must send nothing.

Writes ``<paths.metrics>/bench_openai_client.json`` (one row per concurrency: requests,
wall time, requests per second, the ideal and their ratio; and the fault run's counts)
and prints both.

Run from the project root: ``.venv/bin/python benchmarks/openai_client_throughput.py``
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEVELS = (1, 4, 16, 32, 64)
TARGET_LEVEL, TARGET_RATIO = 32, 0.8


def fixed_latency_app(latency_s: float):
    from fastapi import FastAPI

    app = FastAPI()
    reply = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
    }

    @app.post("/v1/chat/completions")
    async def complete() -> dict:
        await asyncio.sleep(latency_s)
        return reply

    return app


def serve(port: int, latency_ms: float) -> None:
    import uvicorn

    uvicorn.run(fixed_latency_app(latency_ms / 1000), host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, timeout_s: float = 30) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.post(url + "/chat/completions", json={}, timeout=2)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"the benchmark server at {url} did not start")


def measure(url: str, concurrency: int, n: int) -> dict:
    from semilens.config import EndpointConfig
    from semilens.openai_client import Client, Request

    endpoint = EndpointConfig(base_url=url, model="bench", concurrency=concurrency, max_retries=0, timeout_s=30)
    client = Client(endpoint, cache_root=None, environ={})
    # distinct messages, as a real batch has (the cache is off: every request is sent)
    requests = [Request([{"role": "user", "content": f"question {i}"}]) for i in range(n)]
    start = time.perf_counter()
    outcomes = client.run(requests)
    wall = time.perf_counter() - start
    failed = sum(not o.ok for o in outcomes)
    if failed:
        raise RuntimeError(f"{failed} of {n} benchmark requests failed: {outcomes[0].error}")
    return {"concurrency": concurrency, "requests": n, "wall_s": round(wall, 3), "rps": round(n / wall, 1)}


def faults(n: int, rate: float) -> dict:
    """``n`` items through ``semilens serve`` failing at ``rate``, then the same again."""
    import tempfile

    import httpx

    from semilens.config import EndpointConfig, TinyLLMConfig
    from semilens.llm.prepare import build_tiny
    from semilens.openai_client import Client, Request
    from semilens.serve import ServeOptions, make_app, serve_in_background

    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = build_tiny(
            TinyLLMConfig(vocab_size=512, hidden_size=32, intermediate_size=64, heads=2, kv_heads=1), seed=0
        )
        model.save_pretrained(Path(tmp) / "llm")
        tokenizer.save_pretrained(Path(tmp) / "llm")
        app = make_app(Path(tmp) / "llm", ServeOptions(fault_rate=rate, fault_hold_s=5, fault_retry_after_s=0))
        with serve_in_background(app) as url:
            endpoint = EndpointConfig(
                base_url=url, model=app.state.model_name, concurrency=16, timeout_s=3, max_retries=10, backoff_s=0.05
            )
            items = [
                Request([{"role": "user", "content": f"Why does the etch rate fall in trench {i}?"}], max_tokens=4)
                for i in range(n)
            ]
            first = Client(endpoint, Path(tmp) / "cache", environ={})
            done = first.run(items)
            served = httpx.get(url.removesuffix("/v1") + "/semilens/stats").json()
            second = Client(endpoint, Path(tmp) / "cache", environ={})
            again = second.run(items)
    return {
        "items": n,
        "fault_rate": rate,
        "completed": sum(o.ok for o in done),
        "injected": served["faults"],
        "first_run": first.accounting.as_dict(),
        "second_run_requests_sent": second.accounting.requests_sent,
        "second_run_identical": [o.text for o in again] == [o.text for o in done],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument(
        "--rounds",
        type=int,
        default=30,
        help="requests per level = rounds * concurrency (at least 48): enough that opening the connections does not count",
    )
    parser.add_argument("--fault-items", type=int, default=300, help="items of the fault-tolerance run")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # internal: run the server on this port
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.latency_ms)

    from semilens.config import load_config
    from semilens.io import write_json

    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--latency-ms", str(args.latency_ms)])
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_up(url)
        measure(url, 4, 16)  # warm-up: imports, first connections
        rows = []
        for c in LEVELS:
            row = measure(url, c, max(48, args.rounds * c))
            row["ideal_rps"] = round(c / (args.latency_ms / 1000), 1)
            row["ratio"] = round(row["rps"] / row["ideal_rps"], 3)
            rows.append(row)
            print(
                f"concurrency {c:>3}: {row['rps']:>7.1f} req/s of {row['ideal_rps']:>6.1f} ideal ({row['ratio']:.0%})"
            )
    finally:
        server.terminate()
        server.wait(timeout=10)
    target = next(r for r in rows if r["concurrency"] == TARGET_LEVEL)
    fault_run = faults(args.fault_items, 0.2)
    print(
        f"fault run: {fault_run['completed']} of {fault_run['items']} completed through {fault_run['injected']}; "
        f"retries {fault_run['first_run']['retries']}; second run sent {fault_run['second_run_requests_sent']} requests"
    )
    report = {
        "latency_ms": args.latency_ms,
        "levels": rows,
        "target": {
            "concurrency": TARGET_LEVEL,
            "min_ratio": TARGET_RATIO,
            "ratio": target["ratio"],
            "met": target["ratio"] >= TARGET_RATIO,
        },
        "faults": fault_run,
    }
    out = load_config(ROOT / "params.yaml").paths.metrics
    write_json(ROOT / out / "bench_openai_client.json", report)
    print(
        f"target at concurrency {TARGET_LEVEL}: ratio {target['ratio']} (>= {TARGET_RATIO}: {report['target']['met']})"
    )


if __name__ == "__main__":
    main()
