"""Fairness of `semilens serve`'s queue: 16 clients x 20 requests against one tiny model.

The server answers one chat at a time (one model, one lock), so with c clients each
sending its next request as soon as the last is answered, a first-come, first-served
queue gives every request about c x (service time): the same for everyone. A lock that
lets a newly arriving request barge ahead of those already waiting gives a low median and
a long tail instead (issue 29 measured p50 353 ms, p95 2,476 ms, max 6,733 ms at 16 x 20).

What runs: the real ``semilens serve`` CLI in its own process on a tiny untrained Llama
built here from ``TinyLLMConfig`` (nothing downloaded), one torch thread. The service
time is measured first with one client; then ``--clients`` threads each send
``--requests`` non-streamed chats. Reported: latency p50 / p95 / max, the FIFO ideal
(clients x service time), and p95 / ideal.

Writes ``metrics/bench_serve_fairness.json`` (``--out``) and prints it.

Run from the project root: ``.venv/bin/python benchmarks/serve_fairness.py``
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_model(folder: Path) -> None:
    from semilens.config import TinyLLMConfig
    from semilens.llm.prepare import build_tiny

    model, tokenizer = build_tiny(
        TinyLLMConfig(vocab_size=512, hidden_size=32, intermediate_size=64, heads=2, kv_heads=1), seed=0
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# Runs `semilens serve` with semilens/serve.py and semilens/cli.py as they are at a git
# ref (read with `git show`, nothing checked out), so a baseline is measured on the same
# machine under the same load as the working tree.
AT_REF = """
import subprocess, sys, types
ref = sys.argv.pop(1)
for name in ("serve", "cli"):
    code = subprocess.run(["git", "show", f"{ref}:src/semilens/{name}.py"], capture_output=True, text=True, check=True).stdout
    module = types.ModuleType(f"semilens.{name}")
    module.__file__ = f"<{ref}:semilens/{name}.py>"
    sys.modules[f"semilens.{name}"] = module
    exec(compile(code, module.__file__, "exec"), module.__dict__)
sys.modules["semilens.cli"].app()
"""


def start_server(folder: Path, ref: str | None = None, extra: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """``semilens serve folder`` as model "tiny" on a free port; ``extra`` options replace
    the default ``--threads 1``. Returns the process and its /v1 URL."""
    entry = ["-m", "semilens.cli"] if ref is None else ["-c", AT_REF, ref]
    options = ["--threads", "1"] if extra is None else extra
    proc = subprocess.Popen(
        [sys.executable, *entry, "serve", str(folder), "--port", "0", "--model-name", "tiny", *options],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"},
    )
    deadline = time.monotonic() + 180
    for line in iter(proc.stdout.readline, ""):
        if "serving" in line:
            # uvicorn logs every request to stdout: keep draining it, or after ~900 requests
            # the 64 kB pipe fills and the server blocks on a log write
            threading.Thread(target=lambda: collections.deque(proc.stdout, maxlen=0), daemon=True).start()
            return proc, line.split(" at ")[1].split(",")[0].strip()
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("semilens serve did not start")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    import httpx

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=20, help="per client")
    parser.add_argument("--target-ms", type=float, default=50.0, help="service time per request to aim max_tokens at")
    parser.add_argument("--label", default="", help="recorded with the numbers (e.g. before / after)")
    parser.add_argument(
        "--ref", default=None, help="serve the code of this git ref instead of the working tree (a baseline)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="fix the request size instead of aiming at --target-ms"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "metrics" / "bench_serve_fairness.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llm"
        build_model(folder)
        proc, url = start_server(folder, args.ref)
        try:
            http = httpx.Client(timeout=120)

            def chat(max_tokens: int) -> float:
                start = time.monotonic()
                resp = http.post(
                    f"{url}/chat/completions",
                    json={
                        "model": "tiny",
                        "messages": [{"role": "user", "content": "What sets the etch rate?"}],
                        "max_tokens": max_tokens,
                        # a random model may stop at EOS early; sampling off, so every request is the same work
                    },
                )
                resp.raise_for_status()
                return time.monotonic() - start

            # Service time: warm up, then size max_tokens so one request takes ~target-ms.
            for _ in range(3):
                chat(8)
            per_token = statistics.median(chat(32) for _ in range(5)) / 32
            max_tokens = args.max_tokens or max(1, int(args.target_ms / 1000 / per_token))
            service_s = statistics.median(chat(max_tokens) for _ in range(10))

            latencies: list[float] = []
            errors: list[str] = []
            guard = threading.Lock()

            def client() -> None:
                for _ in range(args.requests):
                    try:
                        took = chat(max_tokens)
                    except Exception as exc:  # noqa: BLE001 - counted, not fatal
                        with guard:
                            errors.append(f"{exc.__class__.__name__}: {exc}")
                        continue
                    with guard:
                        latencies.append(took)

            threads = [threading.Thread(target=client) for _ in range(args.clients)]
            start = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.monotonic() - start
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    ideal = args.clients * service_s
    row = {
        "label": args.label,
        "code": args.ref or "working tree",
        "clients": args.clients,
        "requests_per_client": args.requests,
        "max_tokens": max_tokens,
        "service_ms": round(service_s * 1000, 1),
        "fifo_ideal_ms": round(ideal * 1000, 1),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "p95_ms": round(percentile(latencies, 0.95) * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1),
        "p95_over_ideal": round(percentile(latencies, 0.95) / ideal, 2),
        "answered": len(latencies),
        "errors": len(errors),
        "wall_s": round(wall, 1),
    }
    # Before/after runs accumulate under their labels; a rerun of a label replaces it.
    rows = []
    if args.out.is_file():
        rows = [r for r in json.loads(args.out.read_text()).get("runs", []) if r.get("label") != args.label]
    rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": rows}, indent=2) + "\n")
    print(json.dumps(row, indent=2))
    if errors:
        print(f"{len(errors)} errors, first: {errors[0]}", file=sys.stderr)


if __name__ == "__main__":
    main()
