"""Open a page in Debian's headless Chromium and report what a user's browser would: console
errors, uncaught exceptions, failed loads, which images decoded, and a screenshot.

Talks the DevTools protocol over ``--remote-debugging-pipe`` (JSON messages separated by
NUL bytes on file descriptors 3 and 4 of the browser), so no websocket library and no
browser download is needed: ``apt-get install chromium`` is the whole set-up.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


@dataclass
class PageCheck:
    title: str
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    images: list[dict[str, Any]] = field(default_factory=list)  # {src, complete, width, height}
    screenshot: bytes = b""
    text: str = ""  # the page's visible text (document.body.innerText)


class _Pipe:
    def __init__(self, proc: subprocess.Popen, write_fd: int, read_fd: int):
        self.proc, self.write_fd, self.read_fd = proc, write_fd, read_fd
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply from Chromium")
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if ready:
                chunk = os.read(self.read_fd, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the pipe (exit code {self.proc.poll()})")
                self.buffer += chunk
        raw, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(raw)

    def call(
        self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30
    ) -> dict[str, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.write_fd, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for i, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(i)
        while True:
            event = self._read_message(deadline)
            if event.get("method") == method:
                return event
            self.events.append(event)


def _high_fd(fd: int) -> int:
    new = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return new


def check_page(url: str, width: int = 1280, height: int = 900, timeout: float = 60) -> PageCheck:
    """Load ``url`` in headless Chromium; collect errors, image state, text and a screenshot."""
    exe = chromium_path()
    if exe is None:
        raise RuntimeError("no Chromium on PATH; `make test` installs Debian's chromium (apt-get install chromium)")
    to_browser_r, to_browser_w = map(_high_fd, os.pipe())
    from_browser_r, from_browser_w = map(_high_fd, os.pipe())

    def wire() -> None:  # in the child: the browser reads commands on fd 3, writes on fd 4
        os.dup2(to_browser_r, 3)
        os.dup2(from_browser_w, 4)

    profile = tempfile.mkdtemp(prefix="semilens-chromium-")
    args = [
        exe,
        "--headless=new",
        "--remote-debugging-pipe",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--hide-scrollbars",
        f"--window-size={width},{height}",
        f"--user-data-dir={profile}",
        "about:blank",
    ]
    proc = subprocess.Popen(
        args,
        pass_fds=(3, 4, to_browser_r, from_browser_w),
        preexec_fn=wire,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(to_browser_r)
    os.close(from_browser_w)
    pipe = _Pipe(proc, to_browser_w, from_browser_r)
    try:
        target = pipe.call("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
        session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            pipe.call(f"{domain}.enable", session=session)
        pipe.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        pipe.call("Page.navigate", {"url": url}, session=session)
        pipe.wait_event("Page.loadEventFired", timeout)

        def evaluate(expr: str) -> Any:
            res = pipe.call(
                "Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True}, session=session
            )
            return res["result"].get("value")

        # every image decoded (or failed) before we look
        evaluate("Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null)))")
        check = PageCheck(title=evaluate("document.title") or "")
        check.images = (
            evaluate(
                "Array.from(document.images).map(i => ({src: i.src.slice(0, 60), complete: i.complete,"
                " width: i.naturalWidth, height: i.naturalHeight}))"
            )
            or []
        )
        check.text = evaluate("document.body ? document.body.innerText : ''") or ""
        shot = pipe.call("Page.captureScreenshot", {"format": "png"}, session=session)
        check.screenshot = base64.b64decode(shot["data"])
        pipe.call("Runtime.evaluate", {"expression": "0"}, session=session)  # flush pending events
        for event in pipe.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                check.errors.append(
                    "console: "
                    + " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                )
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                check.errors.append(
                    "exception: " + str(details.get("exception", {}).get("description") or details.get("text"))
                )
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                check.errors.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip())
            elif method == "Network.loadingFailed":
                check.errors.append(f"load failed: {params.get('errorText')}")
        return check
    finally:
        try:
            pipe.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(to_browser_w)
        os.close(from_browser_r)
        shutil.rmtree(profile, ignore_errors=True)


def file_url(path: Path) -> str:
    return Path(path).resolve().as_uri()
