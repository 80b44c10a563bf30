"""The chat page in headless Chromium, driven over the DevTools protocol.

Chromium talks CDP over a pipe (``--remote-debugging-pipe``: commands in on fd 3, replies out on
fd 4, each a NUL-terminated JSON message), so no websocket library or driver is needed. The page
is served by a real uvicorn with a ScriptedEngine, so the test knows the exact reply: it must
appear in the DOM while it streams, model HTML must stay text, thinking must sit in a closed
<details>, and the stop button must cancel the server's generation. Skipped where Debian's
``chromium`` is not installed (``.ci/run`` installs it when CI=true).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import subprocess
import time
from pathlib import Path

import pytest
from server_helpers import ENDLESS, ScriptedEngine, ServerThread, make_tokenizer

pytestmark = pytest.mark.serve
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from minimind_core.server import create_app  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("headless browser test needs Debian's chromium at /usr/bin/chromium "
                "(apt-get install chromium)", allow_module_level=True)

REPLY = ("<think>\nThe user greets me.\n</think>\n\n"
         "Hello <b>there</b>! Here is `code` and **bold**.\n\n```python\nprint(1 < 2)\n```")


def _high_fd(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Browser:
    """Headless Chromium with one page, controlled over the CDP pipe."""

    def __init__(self, profile: Path, timeout: float = 30.0) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Move the child's ends above 9 so redirecting them onto fds 3 and 4 cannot clobber them.
        to_browser_r, from_browser_w = (_high_fd(to_browser_r), _high_fd(from_browser_w))
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage", "--window-size=1100,820",
                 f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        # bash puts our pipe ends on fds 3 and 4, where Chromium expects them (dash cannot
        # redirect fds above 9).
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_browser_r} 4>&{from_browser_w}',
             str(CHROMIUM), *flags],
            pass_fds=(to_browser_r, from_browser_w), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.timeout, self._next_id, self._buffer = timeout, 0, b""
        self.session: str | None = None

    def send(self, method: str, params: dict | None = None, session: bool = True) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _read(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError("no reply from Chromium")
            data = os.read(self._from_browser, 1 << 20)
            if not data:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += data
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": url}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget",
                                 {"targetId": target, "flatten": True}, session=False)["sessionId"]
        # the new tab starts on about:blank; wait until our page has loaded
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while not (value := self.js(expression)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never satisfied: {expression}")
            time.sleep(0.05)
        return value

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


# The last assistant message as the page shows it.
LAST = """(() => {
  const all = document.querySelectorAll('#messages .message.assistant');
  const m = all[all.length - 1];
  if (!m) return null;
  const d = m.querySelector('details.thinking');
  return {state: document.body.dataset.state, chunks: Number(m.dataset.chunks),
          finish: m.dataset.finish || null, content: m.querySelector('.content').innerText,
          reasoning: d.querySelector('.reasoning').textContent, thinkingHidden: d.hidden,
          thinkingOpen: d.open, meta: m.querySelector('.meta').textContent,
          bold: [...m.querySelectorAll('.content strong')].map(e => e.textContent),
          code: [...m.querySelectorAll('.content code')].map(e => e.textContent),
          injected: m.querySelectorAll('.content b').length};
})()"""


def last_where(condition: str) -> str:
    """JS: the last assistant message's snapshot ``s`` once ``condition`` holds, else null."""
    return f"(() => {{ const s = {LAST}; return s && ({condition}) ? s : null; }})()"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    engine = ScriptedEngine(make_tokenizer(tmp_path_factory.mktemp("web") / "model"), delay=0.03)
    engine.replies["hello"] = REPLY
    engine.replies["forever"] = ENDLESS
    return engine


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine, model_name="minimind-web")) as s:
        yield s


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path / "profile")
    yield b
    b.close()


def test_page_streams_a_reply_safely(server, engine, browser, tmp_path):
    browser.open(server.url + "/?autosend=hello")
    # while the reply streams, part of it is already in the DOM
    partial = browser.wait_for(last_where("s.state === 'streaming' && s.content.length > 0"))
    done = browser.wait_for(last_where("s.finish"))
    assert done["state"] == "idle" and done["finish"] == "stop"
    assert len(partial["content"]) < len(done["content"])
    assert done["chunks"] > 10  # many deltas, each painted as it came
    # model HTML is shown as text; the Markdown subset became real elements
    assert "Hello <b>there</b>! Here is code and bold." in done["content"]
    assert "print(1 < 2)" in done["content"]
    assert done["injected"] == 0
    assert done["bold"] == ["bold"] and done["code"] == ["code", "print(1 < 2)\n"]
    # the thinking is there, collapsed
    assert done["reasoning"] == "The user greets me."
    assert done["thinkingHidden"] is False and done["thinkingOpen"] is False
    assert "tokens" in done["meta"]  # usage from stream_options.include_usage
    assert browser.js("document.getElementById('model-name').textContent") == "minimind-web"
    shot = browser.screenshot(tmp_path / "chat.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_page_history_settings_stop_and_clear(server, engine, browser, tmp_path):
    browser.open(server.url + "/")
    browser.wait_for("document.body.dataset.state === 'idle'")
    browser.js("""(() => {
        document.getElementById('system').value = 'Be kind.';
        document.getElementById('max-tokens').value = '40';
        document.getElementById('input').value = 'first question';
        document.getElementById('composer').requestSubmit();
    })()""")
    browser.wait_for(last_where("s.finish"))
    browser.js("document.getElementById('input').value = 'second question';"
               "document.getElementById('composer').requestSubmit()")
    second = browser.wait_for(last_where("s.finish && s.content.includes('second')"))
    assert second["content"] == "echo: second question"
    # the second request carried the system prompt and the whole conversation
    assert engine.generations[-1]["prompt"] == (
        "<|im_start|>system\nBe kind.<|im_end|>\n"
        "<|im_start|>user\nfirst question<|im_end|>\n"
        "<|im_start|>assistant\necho: first question<|im_end|>\n"
        "<|im_start|>user\nsecond question<|im_end|>\n<|im_start|>assistant\n")

    # stop: the page aborts the fetch and the server cancels the generation
    browser.js("document.getElementById('max-tokens').value = '3000';"
               "document.getElementById('input').value = 'forever';"
               "document.getElementById('composer').requestSubmit()")
    browser.wait_for(last_where("s.chunks >= 3"))
    browser.js("document.getElementById('stop').click()")
    stopped = browser.wait_for(last_where("s.finish"))
    assert stopped["meta"].startswith("(stopped)") and stopped["state"] == "idle"
    record = next(g for g in engine.generations if g["prompt"].endswith(
        "<|im_start|>user\nforever<|im_end|>\n<|im_start|>assistant\n"))
    time.sleep(0.5)
    tokens = record["tokens"]
    time.sleep(0.5)
    assert record["tokens"] == tokens < 300  # stopped, far from its 3000 tokens (90 s)
    browser.screenshot(tmp_path / "stopped.png")

    browser.js("document.getElementById('clear').click()")
    assert browser.js("document.querySelectorAll('#messages .message').length") == 0


def test_page_respects_the_server_cap(engine, browser):
    """With `--max-tokens 5` the page asks for at most 5 tokens instead of getting a 400."""
    with ServerThread(create_app(engine, model_name="capped", max_tokens_cap=5)) as s:
        browser.open(s.url + "/?autosend=hello")
        done = browser.wait_for(last_where("s.finish"))
    assert done["finish"] == "length" and "cut at max tokens" in done["meta"]
    assert browser.js("document.getElementById('max-tokens').value") == "5"
