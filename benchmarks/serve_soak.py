"""Soak of `semilens serve`: 16 clients for 5 minutes mixing normal chats with hostile input.

Issue 29's must-hold: under a mix of normal requests, oversize prompts, oversize images,
client disconnects and malformed bodies the server answers no 5xx, its memory stays under
a stated bound, and the p95 latency of normal requests stays within 2x of what a
first-come, first-served queue gives at the same load (clients x service time, as in
``serve_fairness.py``).

What runs: the real ``semilens serve`` CLI in its own process (started by
``serve_fairness.start_server``: one torch thread, model id ``tiny``), by default on a
tiny untrained Qwen2.5-VL built here from ``TinyVLMConfig`` (nothing downloaded). A VLM,
not the tiny Llama, because only a model that reads images decodes them: a text model
refuses every image part as ``images_not_supported`` before its header is looked at, so
against it an oversize image tests nothing about the pixel cap or memory. ``--model llm``
runs the same mix against the tiny Llama (images then expect that 400 instead).

Each of ``--clients`` threads loops for ``--seconds``, drawing from a seeded mix:

- normal (60%): a non-streamed chat, a streamed chat (read to ``[DONE]``) and, on the VLM,
  a chat with a small valid PNG; ``--max-tokens`` each. Only these are timed.
- oversize prompt: longer than the context (-> 400 context_length_exceeded), one in four
  of them a 200 kB body, the size that once held the model for 30 s.
- oversize image: PNGs whose header claims 20000 x 20000 (Pillow's own bomb limit) or
  10000 x 10000 (over the 64 Mpx ingest cap), or 9 images (over max_images) -> 400.
- disconnect: a raw socket that sends a whole chat and closes; one that sends half a body
  and closes; a streamed chat closed after its first event; a 20 ms read timeout.
- malformed: bad JSON, bytes that are not UTF-8, wrong types, a body nested 10,000 deep,
  a JSON array, max_tokens 10^9 -> 400.

A 5xx anywhere fails the soak, and so does an error event inside a 200 stream (a 500
after the headers went out). The server's RSS (VmRSS, its child processes included) is
sampled every 0.5 s: peak, and end (``--settle-s`` after the clients stop). The FIFO
ideal is ``--clients`` x the mean service time of the normal mix measured alone (one
client) first; hostile requests also take server time (prompt counting, image headers,
the first token of a stream closed early), measured alone too and reported beside it,
but not added to the ideal, so the 2x bound is the stricter one. Beside the verdicts:
p95 against the rate normal requests were actually served at during the soak (fair
queue, slower machine: near 1), and the generations the server finished for clients
that had already hung up (``/semilens/stats``; near 0).

Writes ``metrics/bench_serve_soak.json`` (``--out``) and prints it.

Run from the project root: ``.venv/bin/python benchmarks/serve_soak.py`` (5 minutes plus
about a minute of set-up); a smoke run: ``--seconds 20 --out /tmp/soak_smoke.json``.
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import random
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_fairness import ROOT, build_model, percentile, start_server  # noqa: E402

# Weights of the mix (per request drawn); normal kinds are the only ones timed.
MIX = {
    "chat": 40,
    "chat_stream": 12,
    "chat_image": 8,  # VLM only; folded into "chat" for the text model
    "oversize_prompt": 10,
    "oversize_image": 10,
    "disconnect": 12,
    "malformed": 8,
}
NORMAL = ("chat", "chat_stream", "chat_image")


# ---------------------------------------------------------------------------------------
# Model and inputs
# ---------------------------------------------------------------------------------------


def build_vlm(folder: Path) -> None:
    """The tiny Qwen2.5-VL of the server tests (tests/conftest.py ``serve_checkpoints``)."""
    from semilens.config import TinyVLMConfig
    from semilens.tokenizer import general_corpus
    from semilens.vlm.qwen2_5_vl import build_tiny

    tiny = TinyVLMConfig(
        vocab_size=600, hidden_size=32, heads=2, kv_heads=1, layers=1, vision_hidden=32, vision_depth=1
    )
    model, processor = build_tiny(tiny, general_corpus())
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def small_png() -> bytes:
    from PIL import Image

    picture = Image.new("RGB", (96, 80), (30, 30, 30))
    picture.paste((220, 220, 220), (20, 10, 60, 50))
    buf = io.BytesIO()
    picture.save(buf, "PNG")
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header claims width x height: a decompression bomb's shape.
    Built by hand, since Pillow would have to hold the pixels to write one."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def chat_body(content: object, max_tokens: int, stream: bool = False) -> dict:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


# ---------------------------------------------------------------------------------------
# The requests: each returns its status (an int, or a word for a closed connection)
# ---------------------------------------------------------------------------------------


class Client:
    """One soak client: an httpx connection pool and the request kinds it can send."""

    def __init__(self, url: str, context: int, max_tokens: int, rng: random.Random):
        import httpx

        self.url, self.rng = url, rng
        self.max_tokens = max_tokens
        self.http = httpx.Client(timeout=120)
        self.quick = httpx.Client(timeout=httpx.Timeout(120, read=0.02))
        parts = urlsplit(url)
        self.addr, self.path = (parts.hostname, parts.port), parts.path + "/chat/completions"
        # Two words per context position: each word is at least one token, so always over.
        self.long_prompt = " ".join(rng.choice(("plasma", "etch", "wafer", "oxide")) for _ in range(2 * context))
        self.huge_prompt = "plasma etch rate " * 12_000  # ~200 kB
        self.picture = data_url(small_png())
        self.bombs = [data_url(png_claiming(20_000, 20_000)), data_url(png_claiming(10_000, 10_000))]
        self.stream_errors = 0  # error events inside 200 streams: 5xx after the headers

    def post(self, body: object, raw: bytes | None = None) -> int:
        content = raw if raw is not None else json.dumps(body).encode()
        return self.http.post(
            self.url + "/chat/completions", content=content, headers={"content-type": "application/json"}
        ).status_code

    def question(self) -> str:
        return self.rng.choice(("What sets the etch rate?", "Describe the grain size.", "Is the oxide uniform?"))

    # Normal
    def chat(self) -> int:
        return self.post(chat_body(self.question(), self.max_tokens))

    def chat_image(self) -> int:
        parts = [{"type": "image_url", "image_url": {"url": self.picture}}, {"type": "text", "text": self.question()}]
        return self.post(chat_body(parts, self.max_tokens))

    def chat_stream(self) -> int:
        body = chat_body(self.question(), self.max_tokens, stream=True)
        with self.http.stream("POST", self.url + "/chat/completions", json=body) as resp:
            done = False
            for line in resp.iter_lines():
                if line.startswith("data: {") and '"error"' in line[:20]:
                    self.stream_errors += 1
                done = done or line == "data: [DONE]"
            if resp.status_code == 200 and not done:
                return 0  # a 200 stream that ended without [DONE]: counted as a broken reply
            return resp.status_code

    # Hostile
    def oversize_prompt(self) -> int:
        text = self.huge_prompt if self.rng.random() < 0.25 else self.long_prompt
        return self.post(chat_body(text, self.max_tokens))

    def oversize_image(self) -> int:
        pick = self.rng.randrange(3)
        if pick < 2:
            parts = [{"type": "image_url", "image_url": {"url": self.bombs[pick]}}]
        else:  # nine small valid images: over max_images (8), refused before decoding
            parts = [{"type": "image_url", "image_url": {"url": self.picture}}] * 9
        return self.post(chat_body([*parts, {"type": "text", "text": "Scale bar?"}], self.max_tokens))

    def disconnect(self) -> int | str:
        import httpx

        pick = self.rng.randrange(4)
        if pick == 3:  # a streamed chat whose client leaves after the first event
            body = chat_body(self.question(), self.max_tokens, stream=True)
            with self.http.stream("POST", self.url + "/chat/completions", json=body) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data:"):
                        break
                return resp.status_code
        if pick == 2:  # gives up waiting after 20 ms, long before the queue reaches it
            try:
                return self.quick.post(
                    self.url + "/chat/completions", json=chat_body("Hi", self.max_tokens)
                ).status_code
            except httpx.ReadTimeout:
                return "timed_out"
        body = json.dumps(chat_body(self.question(), self.max_tokens)).encode()
        sent = body if pick == 0 else body[: len(body) // 2]  # 1: hangs up mid-upload
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.addr[0]}:{self.addr[1]}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection(self.addr, timeout=10) as sock:
            sock.sendall(head + sent)
        return "closed"

    def malformed(self) -> int:
        good = chat_body("Hi", self.max_tokens)
        deep = b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "response_format": '
        raws = [
            b'{"model": "tiny", "messages": [',
            b"\xff\xfe\x00not utf-8",
            json.dumps({"model": "tiny", "messages": "Hi", "max_tokens": "12"}).encode(),
            json.dumps({**good, "messages": [{"role": "wizard", "content": 5}]}).encode(),
            deep + b"[" * 10_000 + b"]" * 10_000 + b"}",
            b"[1, 2, 3]",
            json.dumps({**good, "max_tokens": 10**9}).encode(),
        ]
        return self.post(None, raw=self.rng.choice(raws))

    def send(self, kind: str) -> int | str:
        return getattr(self, kind)()

    def close(self) -> None:
        self.http.close()
        self.quick.close()


# ---------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` and all its descendants, in MB (0 for a process already gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total / 1024


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.samples: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(rss_mb(self.pid))
            self.stop.wait(self.every_s)


# ---------------------------------------------------------------------------------------
# Running the mix
# ---------------------------------------------------------------------------------------


def timed(send: Callable[[], int | str]) -> tuple[int | str, float]:
    start = time.monotonic()
    status = send()
    return status, time.monotonic() - start


def service_times(client: Client, kinds: list[str], repeats: int) -> dict[str, float]:
    """Mean seconds per request of each kind, one client alone (after a warm-up)."""
    for kind in kinds:
        client.send(kind)
    return {kind: statistics.mean(timed(lambda k=kind: client.send(k))[1] for _ in range(repeats)) for kind in kinds}


def soak(url: str, args: argparse.Namespace, context: int, weights: dict[str, int]) -> dict:
    """Run ``args.clients`` looping clients for ``args.seconds``; what they saw."""
    import httpx

    statuses: dict[str, collections.Counter] = {kind: collections.Counter() for kind in weights}
    latencies: dict[str, list[float]] = {kind: [] for kind in NORMAL}
    errors: list[str] = []
    stream_errors = 0
    guard = threading.Lock()
    deadline = time.monotonic() + args.seconds

    def loop(i: int) -> None:
        nonlocal stream_errors
        rng = random.Random(args.seed * 1000 + i)
        client = Client(url, context, args.max_tokens, rng)
        kinds = list(weights)
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights=list(weights.values()))[0]
            try:
                status, took = timed(lambda k=kind: client.send(k))
            except (httpx.HTTPError, OSError) as exc:  # the server closed or refused: its fault, not the mix's
                status, took = f"error:{exc.__class__.__name__}", 0.0
                with guard:
                    errors.append(f"{kind}: {exc.__class__.__name__}: {exc}")
            with guard:
                statuses[kind][str(status)] += 1
                if kind in NORMAL and status == 200:
                    latencies[kind].append(took)
        client.close()
        with guard:
            stream_errors += client.stream_errors

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(args.clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "wall_s": time.monotonic() - start,
        "statuses": statuses,
        "latencies": latencies,
        "errors": errors,
        "stream_errors": stream_errors,
    }


def summarise(args: argparse.Namespace, seen: dict, service: dict, rss: dict, weights: dict[str, int]) -> dict:
    """The JSON row: settings, counts, memory, latency and the must-hold verdicts."""
    statuses = seen["statuses"]
    fives = sum(n for counts in statuses.values() for s, n in counts.items() if s.isdigit() and int(s) >= 500)
    fives += seen["stream_errors"]
    # A normal request must get 200; a hostile one a 4xx (disconnects: whatever the
    # client saw before it left). Anything else is listed, even when it is not a 5xx.
    unexpected = {
        kind: {
            s: n
            for s, n in counts.items()
            if not (s == "200" if kind in NORMAL else s[0] == "4" or kind == "disconnect")
        }
        for kind, counts in statuses.items()
    }
    normal_ms = [t * 1000 for kind in NORMAL for t in seen["latencies"][kind]]
    normal_service = sum(service[k] * weights[k] for k in NORMAL if k in weights) / sum(
        weights[k] for k in NORMAL if k in weights
    )
    ideal_ms = args.clients * normal_service * 1000
    per_normal = sum(service.get(k, 0.0) * w for k, w in weights.items()) / sum(
        weights[k] for k in NORMAL if k in weights
    )
    with_hostile_ms = args.clients * per_normal * 1000
    p95 = percentile(normal_ms, 0.95) if normal_ms else float("nan")
    return {
        "settings": {
            "model": args.model,
            "clients": args.clients,
            "seconds": args.seconds,
            "max_tokens": args.max_tokens,
            "mix_weights": weights,
            "seed": args.seed,
            "normal_only": args.normal_only,
            "rss_bound_mb": args.rss_bound_mb,
            "server": "semilens serve --threads 1 (defaults for every limit)",
        },
        "service_alone_ms": {k: round(v * 1000, 1) for k, v in service.items()},
        "normal_service_ms": round(normal_service * 1000, 1),
        "requests": {kind: dict(sorted(c.items())) for kind, c in statuses.items()},
        "requests_total": sum(sum(c.values()) for c in statuses.values()),
        "unexpected_statuses": {k: v for k, v in unexpected.items() if v},
        "five_xx": fives,
        "stream_error_events": seen["stream_errors"],
        "connection_errors": len(seen["errors"]),
        "connection_error_examples": seen["errors"][:5],
        "rss_mb": rss,
        "latency_normal_ms": {
            "count": len(normal_ms),
            "p50": round(percentile(normal_ms, 0.5), 1) if normal_ms else None,
            "p95": round(p95, 1),
            "max": round(max(normal_ms), 1) if normal_ms else None,
            "by_kind_p95": {
                k: round(percentile([t * 1000 for t in v], 0.95), 1) for k, v in seen["latencies"].items() if v
            },
        },
        "fifo_ideal_ms": round(ideal_ms, 1),
        "p95_over_ideal": round(p95 / ideal_ms, 2),
        # Diagnostic: the ideal with the hostile requests' server time (measured alone)
        # charged to the normal ones, i.e. clients x server time spent per normal request
        # at this mix. Disconnects are charged nothing (their cost cannot be timed alone),
        # so this is still a lower estimate of the FIFO latency at the same load.
        "fifo_ideal_with_hostile_ms": round(with_hostile_ms, 1),
        "p95_over_ideal_with_hostile": round(p95 / with_hostile_ms, 2),
        # Diagnostic, not the must-hold: the same ratio against the time each normal
        # request actually took of the soak's wall clock (hostile work, client CPU and
        # anything else on the machine included). Near 1 with p95_over_ideal high means
        # the queue is fair but the machine was slower than alone; high means unfair.
        "normal_per_s": round(len(normal_ms) / seen["wall_s"], 1),
        "p95_over_fifo_at_soak_rate": round(p95 / (args.clients * seen["wall_s"] * 1000 / len(normal_ms)), 2)
        if normal_ms
        else None,
        "wall_s": round(seen["wall_s"], 1),
        "holds": {
            "zero_5xx": fives == 0,
            "no_connection_errors": not seen["errors"],
            "rss_peak_under_bound": rss["peak"] < args.rss_bound_mb,
            "p95_within_2x_fifo": p95 / ideal_ms <= 2.0,
        },
    }


def main() -> None:
    import httpx

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--model", choices=("vlm", "llm"), default="vlm", help="the tiny model served (see above)")
    parser.add_argument("--max-tokens", type=int, default=12, help="of every normal request")
    parser.add_argument("--seed", type=int, default=0, help="of the mix each client draws")
    parser.add_argument("--settle-s", type=float, default=5.0, help="wait after the clients stop, then read end RSS")
    # The server process (python, torch, transformers, FastAPI and the tiny VLM, whose
    # weights are under 1 MB) starts at about 0.9 GB resident; tokenizing the 200 kB
    # prompts raises it to 1.2-1.3 GB, where it levels off (16 clients sending half
    # oversize prompts: flat at 1.33 GB from 15 s to 50 s; a normal-only run stays at
    # 0.93 GB). One decoded 20000 x 20000 RGB bomb alone
    # would add 1.2 GB (issue 29 saw 5.7 GB from four 13300 x 13300 ones), so 1.5 GB is
    # room for fragmentation and small images in flight but not for a single bomb. The
    # server hands freed heap back after large bodies; without that, the kept pages
    # climbed to the bound over 5 minutes.
    parser.add_argument("--rss-bound-mb", type=float, default=1500.0)
    parser.add_argument(
        "--normal-only",
        action="store_true",
        help="a control: the same clients sending only the normal kinds, to tell a hostile mix's cost from the machine's",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "metrics" / "bench_serve_soak.json")
    args = parser.parse_args()

    vision = args.model == "vlm"
    weights = {k: v for k, v in MIX.items() if k in NORMAL or not args.normal_only}
    if not vision:  # a text model refuses every image: the image chats would not be normal
        weights["chat"] += weights.pop("chat_image")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / args.model
        (build_vlm if vision else build_model)(folder)
        proc, url = start_server(folder)
        sampler = RssSampler(proc.pid)
        try:
            config = json.loads((folder / "config.json").read_text())
            # The server's default context: the (language) model's positions.
            context = (config.get("text_config") or config)["max_position_embeddings"]
            alone = Client(url, context, args.max_tokens, random.Random(args.seed))
            timed_kinds = [k for k in weights if k in NORMAL or k in ("oversize_prompt", "oversize_image", "malformed")]
            service = service_times(alone, timed_kinds, repeats=20)
            stats_url = url.removesuffix("/v1") + "/semilens/stats"
            stats_before = httpx.get(stats_url, timeout=30).json()
            rss_start = rss_mb(proc.pid)
            sampler.start()
            seen = soak(url, args, context, weights)
            time.sleep(args.settle_s)
            sampler.stop.set()
            sampler.join()
            # The peak of each tenth of the run: a leak climbs to the end, warm-up levels off.
            tenth = max(1, len(sampler.samples) // 10)
            rss = {
                "start": round(rss_start, 1),
                "peak": round(max(sampler.samples), 1),
                "end": round(rss_mb(proc.pid), 1),
                "samples": len(sampler.samples),
                "peak_per_tenth": [
                    round(max(sampler.samples[i : i + tenth]), 1) for i in range(0, len(sampler.samples), tenth)
                ],
            }
            stats_after = httpx.get(stats_url, timeout=30).json()
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    row = summarise(args, seen, service, rss, weights)
    # Generations the server finished during the soak for clients that had already gone
    # (issue 29: a request whose client hung up is dropped before it runs); near 0, as a
    # hang-up is noticed within 0.2 s and only one that comes in the last instant runs.
    completed = stats_after["completed"] - stats_before["completed"]
    row["server"] = {
        "completed": completed,
        "completed_for_gone_clients": completed - row["latency_normal_ms"]["count"],
        "busy_429": stats_after["busy"] - stats_before["busy"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
