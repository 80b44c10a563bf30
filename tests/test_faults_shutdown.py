"""Issue 15, item 9: graceful shutdown on SIGTERM, on a real server process
(``tests/server_helpers.py`` run as a script), so real signals reach it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from server_helpers import assert_error, user

pytestmark = pytest.mark.serve
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[1]
CHAT = "/v1/chat/completions"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(shutdown_timeout: float) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "server_helpers.py"),
                             str(port), str(shutdown_timeout)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.1)


def _wait_waiting(url: str, n: int) -> None:
    deadline = time.monotonic() + 20
    while httpx.get(url + "/health").json()["waiting"] < n:
        assert time.monotonic() < deadline, "requests never queued"
        time.sleep(0.02)


def _sse_lines(r) -> list[str]:
    return [line for line in r.iter_lines() if line.startswith("data: ")]


@pytest.mark.slow  # a real process: ~5 s
@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")
def test_sigterm_ends_the_running_stream_and_503s_the_queue():
    proc, url = _start(shutdown_timeout=3.0)
    try:
        results: dict[str, object] = {}

        def queued(name: str, stream: bool) -> None:
            with httpx.stream("POST", url + CHAT, timeout=60, json={
                    "messages": user(name), "stream": stream, "max_tokens": 50}) as r:
                r.read()
                results[name] = r

        with httpx.Client(timeout=60) as http, http.stream("POST", url + CHAT, json={
                "messages": user("endless"), "stream": True, "max_tokens": 3000}) as running:
            lines = running.iter_lines()
            assert next(lines).startswith("data: ")  # generating
            waiters = [threading.Thread(target=queued, args=(name, stream))
                       for name, stream in (("queued plain", False), ("queued stream", True))]
            for w in waiters:
                w.start()
            _wait_waiting(url, 2)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]  # to the body's end
        for w in waiters:
            w.join(30)
        for name in ("queued plain", "queued stream"):  # 503 in OpenAI's shape, never a 200
            assert_error(results[name], 503, "server_shutting_down", "shutting down")
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2][6:])
        assert last["error"]["code"] == "server_shutting_down"  # the stream says why it ended
        assert all(json.loads(line[6:]).get("choices") for line in rest[:-2])
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
        assert proc.returncode in (0, -signal.SIGTERM), err
        assert took < 3.0 + 2.0, f"took {took:.1f} s to exit with --shutdown-timeout 3"
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.slow  # a real process: ~4 s
@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")
def test_sigterm_lets_a_short_stream_finish():
    """A reply that ends before the deadline is sent whole (finish_reason, usage, [DONE])."""
    proc, url = _start(shutdown_timeout=30.0)
    try:
        with httpx.Client(timeout=60) as http, http.stream("POST", url + CHAT, json={
                "messages": user("slow"), "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        events = [json.loads(line[6:]) for line in rest[:-1]]
        assert rest[-1] == "data: [DONE]"
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                       if e["choices"])
        assert text == ("word " * 40).strip() or text == "word " * 40
        assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "stop"
        assert events[-1]["usage"]["completion_tokens"] > 0
        proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 10  # it did not wait out the 30 s
        with pytest.raises(httpx.ConnectError):  # and no longer listens
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


