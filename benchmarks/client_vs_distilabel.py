"""semilens' OpenAI-compatible client beside distilabel's, on the same prompts and server.

The server answers every chat completion after a fixed latency and does no other work
(aiohttp, its own process); it counts what it receives and answers, per phase. Each
client runs in its own process, so no side shares an interpreter with the server or
with the other: semilens' ``Client.run`` in this project's Python, distilabel's
``OpenAILLM`` in the Python of a virtualenv that has distilabel (``--distilabel-python``;
``benchmarks/distilabel_client.py`` is its side). Every run sends the same ``--n``
prompts (distinct, so nothing is answered twice by accident).

- **Throughput** at concurrency 1, 8, 32 and 64: requests per second of semilens (cache
  off: every request is sent), of distilabel's LLM called on ``concurrency`` prompts at a
  time, and of a distilabel ``Pipeline`` (``LoadDataFromDicts >> TextGeneration``,
  ``input_batch_size=concurrency``); the ideal is concurrency / latency.
- **A kill half-way** (concurrency 32): each client with its cache on is killed
  (SIGKILL) once the server has answered half the prompts, then run again to the end.
  Reported: the requests the second run sent for prompts the server had answered more
  than 50 ms before the kill (re-sent finished requests: a reply younger than that may
  still have been on its way to the client; their count is reported too), whether the
  second run finished within ``--timeout-s``, and what a third run, over the finished
  cache, sends.

Writes ``metrics/bench_client_vs_distilabel.json`` (``--out``). Run from the project root
on an otherwise idle machine:
``python -m venv /tmp/distvenv && /tmp/distvenv/bin/pip install distilabel openai`` once, then
``.venv/bin/python benchmarks/client_vs_distilabel.py --distilabel-python /tmp/distvenv/bin/python``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER = Path(__file__).with_name("distilabel_client.py")
LEVELS = (1, 8, 32, 64)
KILL_LEVEL = 32


# ---------------------------------------------------------------- the server


def serve(port: int, latency_s: float) -> None:
    from aiohttp import web

    state = {"phase": "", "answered": set()}
    received: Counter = Counter()
    answered: Counter = Counter()
    resent: Counter = Counter()  # requests for a prompt answered in an earlier phase

    async def complete(request: web.Request) -> web.Response:
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        phase = state["phase"]
        received[phase] += 1
        if prompt in state["answered"]:
            resent[phase] += 1
        await asyncio.sleep(latency_s)
        answered[phase] += 1
        state.setdefault("now", {})[prompt] = time.monotonic()
        reply = {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", "bench"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"answer to {prompt[:24]}"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 16, "completion_tokens": 4, "total_tokens": 20},
        }
        return web.json_response(reply)

    async def phase(request: web.Request) -> web.Response:
        # Prompts answered in the phase that ends count as answered for the next ones; with
        # "finished_before" (a time.monotonic() instant: the kill less a grace), only those
        # answered by then, the rest were replies still on the wire.
        body = await request.json()
        cutoff = body.get("finished_before", float("inf"))
        now = state.pop("now", {})
        state["answered"] |= {p for p, t in now.items() if t <= cutoff}
        state["phase"] = body["name"]
        return web.json_response({"on_the_wire": sum(t > cutoff for t in now.values())})

    async def forget(request: web.Request) -> web.Response:
        state["answered"] = set()
        state.pop("now", None)
        return web.json_response({})

    async def stats(request: web.Request) -> web.Response:
        p = request.query.get("phase", state["phase"])
        return web.json_response({"received": received[p], "answered": answered[p], "resent_finished": resent[p]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", complete)
    app.router.add_post("/phase", phase)
    app.router.add_post("/forget", forget)
    app.router.add_get("/stats", stats)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


class Server:
    def __init__(self, latency_ms: float):
        from semilens.launch import free_port

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/v1"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(self.port), "--latency-ms", str(latency_ms)]
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.stats()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the benchmark server did not start")

    def _call(self, path: str, body: dict | None = None) -> dict:
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def phase(self, name: str, finished_before: float | None = None) -> int:
        """Start phase ``name``; the replies of the last phase not counted as finished."""
        body = {"name": name} if finished_before is None else {"name": name, "finished_before": finished_before}
        return self._call("/phase", body)["on_the_wire"]

    def forget(self) -> None:
        self._call("/forget", {})

    def stats(self, phase: str | None = None) -> dict:
        return self._call("/stats" + (f"?phase={phase}" if phase else ""))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


# ---------------------------------------------------------------- the semilens side


def semilens_client(url: str, concurrency: int, n: int, max_tokens: int, cache: str | None) -> None:
    from distilabel_client import prompts  # the peer's texts; it imports distilabel only when it runs

    from semilens.config import EndpointConfig
    from semilens.openai_client import Client, Request

    endpoint = EndpointConfig(base_url=url, model="bench", concurrency=concurrency, max_retries=0, timeout_s=30)
    client = Client(endpoint, cache_root=Path(cache) if cache else None, environ={})
    requests = [Request([{"role": "user", "content": t}], max_tokens=max_tokens) for t in prompts(n)]
    start = time.perf_counter()
    outcomes = client.run(requests)
    wall = time.perf_counter() - start
    print(json.dumps({"wall_s": wall, "replies": sum(o.ok for o in outcomes)}), flush=True)


# ---------------------------------------------------------------- the runs


def command(side: str, args: argparse.Namespace, url: str, concurrency: int, cache: str | None) -> list[str]:
    if side == "semilens":
        cmd = [sys.executable, __file__, "--client", "--url", url]
    else:
        mode = "llm" if side == "distilabel_llm" else "pipeline"
        cmd = [args.distilabel_python, str(PEER), "--url", url, "--mode", mode]
    cmd += ["--concurrency", str(concurrency), "--n", str(args.n), "--max-tokens", "16"]
    return cmd + (["--cache", cache] if cache else [])


def run_to_end(cmd: list[str], timeout_s: float) -> dict:
    """The client's JSON line; ``{"hung": True}`` when it had not ended after ``timeout_s``."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"hung": True, "timeout_s": timeout_s, "replies": 0}
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def kill_half_way(server: Server, cmd: list[str], n: int) -> tuple[int, float]:
    """Start ``cmd``, SIGKILL its process group once the server has answered n/2.
    Returns the answers so far and the instant of the kill (``time.monotonic``)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while proc.poll() is None and server.stats()["answered"] < n // 2:
        time.sleep(0.01)
    killed_at = time.monotonic()
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return server.stats()["answered"], killed_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--distilabel-python", default="/tmp/distvenv/bin/python")
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--n", type=int, default=1000, help="prompts per run")
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS))
    parser.add_argument("--timeout-s", type=float, default=300, help="a run not ended by then counts as hung")
    parser.add_argument("--out", type=Path, default=ROOT / "metrics" / "bench_client_vs_distilabel.json")
    # internal: the server and the semilens client, each in its own process
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-tokens", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.latency_ms / 1000)
    if args.client:
        return semilens_client(args.url, args.concurrency, args.n, args.max_tokens, args.cache)

    sides = ("semilens", "distilabel_llm", "distilabel_pipeline")
    server = Server(args.latency_ms)
    report: dict = {"latency_ms": args.latency_ms, "prompts": args.n, "levels": [], "kill": {}}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for c in args.levels:
                row: dict = {"concurrency": c, "ideal_rps": round(c / (args.latency_ms / 1000), 1)}
                for side in sides:
                    cache = str(Path(tmp) / f"{side}-{c}") if side == "distilabel_pipeline" else None
                    server.phase(f"{side}-{c}")
                    done = run_to_end(command(side, args, server.url, c, cache), args.timeout_s)
                    sent = server.stats()["received"]
                    if done.get("hung"):
                        row[side] = {"hung": True, "requests_sent": server.stats()["received"]}
                        continue
                    row[side] = {
                        "rps": round(args.n / done["wall_s"], 1),
                        "ratio": round(args.n / done["wall_s"] / row["ideal_rps"], 3),
                        "wall_s": round(done["wall_s"], 2),
                        "replies": done["replies"],
                        "requests_sent": sent,
                    }
                report["levels"].append(row)
                print(json.dumps(row), flush=True)
            for side in ("semilens", "distilabel_pipeline"):
                server.forget()
                cache = str(Path(tmp) / f"kill-{side}")
                cmd = command(side, args, server.url, KILL_LEVEL, cache)
                server.phase(f"kill-{side}-first")
                answered, killed_at = kill_half_way(server, cmd, args.n)
                # a reply sent in the last 50 ms before the kill may not have been read yet
                on_the_wire = server.phase(f"kill-{side}-resumed", finished_before=killed_at - 0.05)
                resumed = run_to_end(cmd, args.timeout_s)
                second = server.stats()
                server.phase(f"kill-{side}-again")
                again = run_to_end(cmd, args.timeout_s)
                report["kill"][side] = {
                    "concurrency": KILL_LEVEL,
                    "answered_before_kill": answered,
                    "answered_in_last_50ms": on_the_wire,
                    "resumed_hung": bool(resumed.get("hung")),
                    "resumed_requests_sent": second["received"],
                    "resent_finished": second["resent_finished"],
                    "resumed_replies": resumed["replies"],
                    "third_run_requests_sent": server.stats()["received"],
                    "third_run_replies": again["replies"],
                }
                print(side, json.dumps(report["kill"][side]), flush=True)
    finally:
        server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
