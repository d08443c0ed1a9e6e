"""Shared test fixtures: the real data (the committed sample and the full set), a Config
whose paths point into tmp_path, and a stub OpenAI-compatible chat server on loopback."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn

import pytest

from semilens.config import Config

# One torch thread per core between the xdist workers (`make test` runs two on a 2-core
# box). Two threads per worker there made MiniLM embedding 2x slower, not faster, as the
# workers' OpenMP threads fight over the cores. Set before torch is imported; the stages
# and CLIs the tests start inherit it. An explicit OMP_NUM_THREADS wins.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


def pytest_configure(config: pytest.Config) -> None:
    # xdist's --dist loadfile hands out the files with the most tests first. The DVC pipeline
    # file has six tests yet runs longest, so it started last while the other worker sat
    # idle for minutes. Keep the collection order instead, set below.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with end-to-end tests (marked `e2e`: real stages, a minute or more per file)
    start first, so the quick files fill in around them on the other worker."""
    e2e_files = {item.path for item in items if item.get_closest_marker("e2e")}
    items.sort(key=lambda item: item.path not in e2e_files)  # stable: keeps each file's order


ROOT = Path(__file__).parents[1]
# The committed real sample (data/raw/SOURCES.md): part of every clone, laid out like the
# full set below (images/<set>/..., pdfs/<set>/...) and byte-identical to its files there.
SAMPLE = ROOT / "data" / "raw"
# The full public set, read by path and never copied whole. SEMILENS_REALDATA points
# elsewhere (a non-existent folder shows what a clone without ../shared does).
REALDATA = Path(os.environ.get("SEMILENS_REALDATA") or ROOT.parent / "shared" / "realdata").resolve()


def missing_realdata(what: str) -> NoReturn:
    """Skip a test that needs the full set where it is absent, with the reason; under
    ``CI=true`` fail instead: CI has the set, so its absence there hides that the pipeline
    was never checked on those files."""
    msg = (
        f"{what} needs the full real-data set, not found at {REALDATA} (../shared/realdata "
        "beside the project root, or SEMILENS_REALDATA; the committed sample in data/raw "
        "does not hold it)"
    )
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def realdata() -> Path:
    """The full ``../shared/realdata`` set, for tests whose files or counts the committed
    sample does not have; skipped where it is absent (failed under ``CI=true``)."""
    if not REALDATA.is_dir():
        missing_realdata("this test")
    return REALDATA


@pytest.fixture(scope="session")
def real_sample() -> Path:
    """``data/raw``, the committed real sample. It ships with the repository, so a missing
    folder is a broken checkout: a failure, never a skip."""
    if not any((SAMPLE / "pdfs").rglob("*.pdf")) or not (SAMPLE / "SOURCES.md").is_file():
        pytest.fail(f"the committed real sample is missing from {SAMPLE} (see data/raw/SOURCES.md)")
    return SAMPLE


def real_file(rel: str) -> Path:
    """One real file by its path in the full set (``pdfs/nist_mist/x.pdf``): the committed
    copy where the sample has it, else the full set's, else skip (fail under ``CI=true``)."""
    for root in (SAMPLE, REALDATA):
        if (root / rel).is_file():
            return root / rel
    missing_realdata(rel)


def lazy_pdf_pages(cfg: Any) -> Callable[[str], list[dict]]:
    """``get(name)`` -> the extracted pages of ``pdfs/<name>`` (via ``real_file``), each file
    read once and only when a test asks for it."""
    from semilens.text.extract import extract_pdf

    pages: dict[str, list[dict]] = {}

    def get(name: str) -> list[dict]:
        if name not in pages:
            pages[name] = extract_pdf(real_file(f"pdfs/{name}").read_bytes(), cfg)
        return pages[name]

    return get


def ingest_folder(images: Path, tmp: Path) -> tuple[Config, dict[str, Any]]:
    """ingest_images on ``images`` alone (no synthetic set), outputs under ``tmp``: the
    config it ran with (records.jsonl and quarantine.jsonl are in its interim_images) and
    the stage's summary."""
    from semilens.images.ingest import ingest_images

    cfg = Config.model_validate(
        {
            "paths": {
                "raw_images": str(images),
                "synthetic_images": str(tmp / "no_synthetic"),
                "interim_images": str(tmp / "interim"),
                "cache": str(tmp / "cache"),
                "logs": str(tmp / "logs"),
            }
        }
    )
    return cfg, ingest_images(cfg)


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., Config]:
    """``make_cfg(raw=..., synthetic=..., **ingest_images_overrides)`` -> Config.

    Outputs, cache and logs live under tmp_path; the input folders default to empty ones.
    """

    def make(raw: Path | None = None, synthetic: Path | None = None, **ingest: Any) -> Config:
        return Config.model_validate(
            {
                "paths": {
                    "raw_images": str(raw or tmp_path / "raw"),
                    "synthetic_images": str(synthetic or tmp_path / "synthetic"),
                    "interim_images": str(tmp_path / "out" / "images"),
                    "cache": str(tmp_path / "cache"),
                    "logs": str(tmp_path / "logs"),
                },
                "ingest_images": ingest,
            }
        )

    return make


KNOWLEDGE = Path(__file__).parents[1] / "knowledge"


# The text tests train the tiny from-scratch preset, not the shipped SmolLM2 base: a
# random model learns only when trained in full, at the preset's own rates and batches.
TINY_TEXT: dict[str, dict[str, Any]] = {
    "prepare_llm": {"base": "tiny"},
    "pretrain_llm": {
        "method": "full",
        "learning_rate": 3e-3,
        "batch_size": 16,
        "gradient_accumulation_steps": 1,
        "warmup_steps": 20,
    },
    "sft_llm": {"learning_rate": 2e-3, "batch_size": 8, "gradient_accumulation_steps": 1, "max_length": 512},
    "synth_instructions": {"n_math_drill": 0},
}


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, mappings merged key by key."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def text_config(tmp: Path, **sections: Any) -> Config:
    """A Config for the text path on the tiny preset (``TINY_TEXT`` under ``sections``): the
    project's knowledge base, everything else under ``tmp``."""
    names = (
        "raw_pdfs",
        "synthetic_pdfs",
        "pages",
        "markdown",
        "tags",
        "instructions",
        "models",
        "metrics",
        "cache",
        "logs",
    )
    return Config.model_validate(
        {"paths": {"knowledge": str(KNOWLEDGE), **{n: str(tmp / n) for n in names}}, **merged(TINY_TEXT, sections)}
    )


@pytest.fixture(scope="session")
def serve_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny untrained checkpoints for the server tests, built once per session: a Llama
    folder, a LoRA adapter on it (non-zero B matrices, so it really changes the answers),
    a Qwen2.5-VL folder and a small PNG with a bright square on dark ground."""
    from peft import LoraConfig, get_peft_model
    from PIL import Image

    from semilens.config import TinyLLMConfig, TinyVLMConfig
    from semilens.llm.prepare import build_tiny as build_llm
    from semilens.tokenizer import general_corpus
    from semilens.vlm.qwen2_5_vl import build_tiny as build_vlm

    tmp = tmp_path_factory.mktemp("serve")
    model, tokenizer = build_llm(
        TinyLLMConfig(vocab_size=512, hidden_size=32, intermediate_size=64, heads=2, kv_heads=1), seed=0
    )
    model.save_pretrained(tmp / "llm")
    tokenizer.save_pretrained(tmp / "llm")
    peft = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft.save_pretrained(tmp / "adapter")
    tokenizer.save_pretrained(tmp / "adapter")
    adapter_cfg = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
    adapter_cfg["base_model_name_or_path"] = str(tmp / "llm")
    (tmp / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_cfg))

    vlm, processor = build_vlm(
        TinyVLMConfig(vocab_size=600, hidden_size=32, heads=2, kv_heads=1, layers=1, vision_hidden=32, vision_depth=1),
        general_corpus(),
    )
    vlm.save_pretrained(tmp / "vlm")
    processor.save_pretrained(tmp / "vlm")
    picture = Image.new("RGB", (96, 80), (30, 30, 30))
    picture.paste((220, 220, 220), (20, 10, 60, 50))
    picture.save(tmp / "sem.png")
    return {"llm": tmp / "llm", "adapter": tmp / "adapter", "vlm": tmp / "vlm", "png": tmp / "sem.png"}


@pytest.fixture(autouse=True, scope="session")
def _no_judge_from_the_shell() -> Iterator[None]:
    """A judge exported in the developer's shell must not be called by the tests (nor turn
    the report's ``configured: false`` into true); tests that want one set it themselves."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("SEMILENS_JUDGE_URL", "SEMILENS_JUDGE_MODEL", "SEMILENS_JUDGE_API_KEY"):
            mp.delenv(name, raising=False)
        yield


class ChatStub:
    """``POST /v1/chat/completions`` on 127.0.0.1 (``url`` ends in ``/v1``), in a thread.

    ``script`` maps a marker that appears in the prompt to the replies for successive
    requests about it: a string (the assistant's content), an int (that HTTP status), or
    ``("sleep", seconds, reply)`` or a function of the request body returning the
    content. Markers are looked for in every user turn. A prompt
    with no marker gets ``default``; a marker whose
    replies are used up gets HTTP 418. Every request is kept in ``requests``."""

    def __init__(self, script: dict[str, list[Any]] | None = None, default: Any = 418):
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    return self.send(404, {"error": "not found"})
                with stub.lock:
                    stub.requests.append({"body": body, "authorization": self.headers.get("Authorization")})
                    # every user turn: a re-ask appends one, the marker stays in the first
                    user = " ".join(str(m["content"]) for m in body["messages"] if m["role"] == "user")
                    marker = next((k for k in stub.script if k in user), None)
                    replies = stub.script.get(marker, [default])
                    reply = replies.pop(0) if replies else 418
                if isinstance(reply, tuple):
                    time.sleep(reply[1])
                    reply = reply[2]
                if callable(reply):
                    reply = reply(body)
                if isinstance(reply, int):
                    return self.send(reply, {"error": {"message": "scripted failure"}})
                self.send(
                    200,
                    {
                        "id": f"chatcmpl-{len(stub.requests)}",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    },
                )

            def send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (the timeout case)

        class Server(ThreadingHTTPServer):
            # the default backlog of 5 overflows when a concurrent client opens more
            # connections than that while the machine is busy: a connect then times out
            # without the stub ever seeing the request
            request_queue_size = 128

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> ChatStub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
