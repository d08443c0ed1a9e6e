"""`semilens serve` with dynamic batching, beside a plain transformers `generate` loop.

For the tiny text model and the tiny Qwen2.5-VL of the CPU default (built here from
``prepare_llm.tiny`` and ``prepare_vlm.tiny``, nothing downloaded), on the same prompts:

- a plain loop: the checkpoint loaded with transformers and ``generate`` called once per
  prompt, greedy, in this process (no HTTP): what a user would write instead;
- the real ``semilens serve`` CLI in its own process, with clients sending every prompt
  one at a time (concurrency 1), with 16 clients at once (concurrency 16, batched), and
  with 16 clients against ``--max-batch-size 1`` (one request per generate call).

Reported per model: requests per second of each, the ratios, the batch sizes the server
ran, and whether every answer equals the plain loop's (greedy answers must not depend on
the company a request keeps in its batch).

Writes ``metrics/bench_serve_batching.json`` (``--out``) and prints a table. Run from
the project root on an otherwise idle machine:
``.venv/bin/python benchmarks/serve_batching.py [--requests 256] [--max-tokens 24] [--threads 2]``
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_fairness import start_server  # noqa: E402  (the same way of starting the CLI)

QUESTIONS = [
    "What sets the etch rate in reactive ion etching?",
    "Why does CMP dish wide copper lines?",
    "Name two gases that etch silicon dioxide.",
    "What does a four-point probe measure?",
    "How is gate oxide thickness controlled?",
    "What causes notching at the foot of a polysilicon line?",
    "Why anneal after ion implantation?",
    "What is the role of a hard mask?",
]


def build(kind: str, folder: Path) -> None:
    """The CPU default's tiny text model or tiny Qwen2.5-VL, as prepare_llm / prepare_vlm
    build them (untrained: the work per token is what is measured)."""
    from semilens.config import Config

    cfg = Config()
    if kind == "text":
        from semilens.llm.prepare import build_tiny

        model, tokenizer = build_tiny(cfg.prepare_llm.tiny, seed=0)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return
    from semilens.tokenizer import general_corpus
    from semilens.vlm.qwen2_5_vl import build_tiny

    tiny = cfg.prepare_vlm.tiny.model_copy(update=cfg.prepare_vlm.tiny_overrides.get("qwen2_5_vl", {}))
    model, processor = build_tiny(tiny, general_corpus())
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def pictures(n: int) -> list[bytes]:
    """``n`` small PNGs: bright discs on a dark ground, each a different layout."""
    import numpy as np
    from PIL import Image

    out = []
    for seed in range(n):
        rng = np.random.default_rng(seed)
        img = np.full((112, 112), 40, np.uint8)
        yy, xx = np.mgrid[:112, :112]
        for cy, cx in rng.integers(12, 100, (5, 2)):
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < 49] = 220
        buf = io.BytesIO()
        Image.fromarray(img).convert("RGB").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def chats(kind: str, n: int) -> list[dict[str, Any]]:
    """``n`` chat bodies (without model and max_tokens): distinct questions, and for the
    VLM one of four micrographs each."""
    pngs = pictures(4)
    bodies = []
    for i in range(n):
        question = f"{QUESTIONS[i % len(QUESTIONS)]} (case {i})"
        if kind == "text":
            content: Any = question
        else:
            url = "data:image/png;base64," + base64.b64encode(pngs[i % len(pngs)]).decode()
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
        bodies.append({"messages": [{"role": "user", "content": content}]})
    return bodies


def plain_loop(kind: str, folder: Path, bodies: list[dict[str, Any]], max_tokens: int) -> tuple[float, list[str]]:
    """The loop a user would write: transformers loaders, one greedy ``generate`` per prompt."""
    import torch

    pngs = pictures(4)
    answers = []
    if kind == "text":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        start = time.perf_counter()
        for body in bodies:
            text = tok.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
            enc = tok([text], return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            answers.append(tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip())
        return time.perf_counter() - start, answers
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    start = time.perf_counter()
    for i, body in enumerate(bodies):
        question = body["messages"][0]["content"][1]["text"]
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        image = Image.open(io.BytesIO(pngs[i % len(pngs)])).convert("RGB")
        enc = processor(text=[text], images=[[image]], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False)
        answers.append(processor.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return time.perf_counter() - start, answers


def through_server(
    url: str, bodies: list[dict[str, Any]], max_tokens: int, concurrency: int
) -> tuple[float, list[str]]:
    """Every body sent once by ``concurrency`` clients (each sends its next when answered)."""
    import httpx

    answers: list[str] = [""] * len(bodies)
    local = threading.local()

    def send(i: int) -> None:
        if not hasattr(local, "http"):
            local.http = httpx.Client(timeout=600)
        resp = local.http.post(f"{url}/chat/completions", json={**bodies[i], "model": "tiny", "max_tokens": max_tokens})
        resp.raise_for_status()
        answers[i] = resp.json()["choices"][0]["message"]["content"]

    send(0)  # warm up (first-call allocations), not timed
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(send, range(len(bodies))))
    return time.perf_counter() - start, answers


def stats(url: str) -> dict[str, Any]:
    import httpx

    return httpx.get(url.removesuffix("/v1") + "/semilens/stats").json()["batching"]


def measure(kind: str, requests: int, max_tokens: int, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    bodies = chats(kind, requests)
    result: dict[str, Any] = {"requests": requests, "max_tokens": max_tokens, "threads": threads}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / kind
        build(kind, folder)
        seconds, reference = plain_loop(kind, folder, bodies, max_tokens)
        result["plain_generate_loop"] = {"seconds": round(seconds, 2), "rps": round(requests / seconds, 2)}
        runs = {}
        for name, extra, concurrency in (
            ("serve_c1", [], 1),
            ("serve_c16", [], 16),
            ("serve_c16_unbatched", ["--max-batch-size", "1"], 16),
        ):
            proc, url = start_server(folder, extra=["--threads", str(threads), *extra])
            try:
                seconds, answers = through_server(url, bodies, max_tokens, concurrency)
                runs[name] = {
                    "seconds": round(seconds, 2),
                    "rps": round(requests / seconds, 2),
                    "answers_equal_plain_loop": answers == reference,
                    "batching": stats(url),
                }
            finally:
                proc.terminate()
                proc.wait(30)
        result.update(runs)
    c1, c16 = result["serve_c1"]["rps"], result["serve_c16"]["rps"]
    result["c16_over_c1"] = round(c16 / c1, 2)
    result["c16_over_unbatched_c16"] = round(c16 / result["serve_c16_unbatched"]["rps"], 2)
    result["c1_over_plain_loop"] = round(c1 / result["plain_generate_loop"]["rps"], 2)
    result["c16_over_plain_loop"] = round(c16 / result["plain_generate_loop"]["rps"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server and the plain loop")
    parser.add_argument("--kinds", nargs="+", default=["text", "vlm"], choices=["text", "vlm"])
    parser.add_argument("--out", type=Path, default=ROOT / "metrics" / "bench_serve_batching.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = {"cores": len(os.sched_getaffinity(0))}
    for kind in args.kinds:
        result[kind] = measure(kind, args.requests, args.max_tokens, args.threads)
        r = result[kind]
        print(
            f"{kind}: plain loop {r['plain_generate_loop']['rps']} req/s; serve c=1 {r['serve_c1']['rps']}, "
            f"c=16 {r['serve_c16']['rps']} ({r['c16_over_c1']}x c=1), c=16 unbatched "
            f"{r['serve_c16_unbatched']['rps']}; answers equal: "
            f"{all(r[k]['answers_equal_plain_loop'] for k in ('serve_c1', 'serve_c16', 'serve_c16_unbatched'))}; "
            f"batch sizes {r['serve_c16']['batching']['batch_sizes']}"
        )
    from semilens.io import write_json

    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
