"""The chat page in headless Chromium, driven by playwright.

playwright's own browser download is not used (nor reachable here): it launches Debian's
``chromium`` through ``executable_path``. The page is served by a real uvicorn with a
ScriptedEngine, so the test knows the exact reply: it must appear in the DOM while it streams,
model HTML must stay text, thinking must sit in a closed <details>, and the stop button must
cancel the server's generation. The page is driven as a user drives it (typing, Enter, clicks).
Skipped where playwright or Debian's ``chromium`` is missing (``.ci/run`` installs chromium
when CI=true).

To add a case: take the ``page`` fixture (a fresh browser context per test, so no settings or
history leak between tests), ``page.goto(server.url + ...)``, then read the page through
``last_where`` / ``snapshot``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from server_helpers import ENDLESS, ScriptedEngine, ServerThread, make_tokenizer

pytestmark = pytest.mark.serve
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

from minimind_core.server import create_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("headless browser test needs Debian's chromium at /usr/bin/chromium "
                "(apt-get install chromium)", allow_module_level=True)

REPLY = ("<think>\nThe user greets me.\n</think>\n\n"
         "Hello <b>there</b>! Here is `code` and **bold**.\n\n```python\nprint(1 < 2)\n```")
TIMEOUT_MS = 30_000
VIEWPORT = {"width": 1100, "height": 820}
PROMPT_OF = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"

# JS: the last assistant message as the page shows it, or null before there is one.
LAST = """() => {
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
}"""


def snapshot(page) -> dict | None:
    """The last assistant message's snapshot now."""
    return page.evaluate(LAST)


def last_where(page, condition: str) -> dict:
    """Wait until the last assistant message's snapshot ``s`` satisfies the JS ``condition``."""
    handle = page.wait_for_function(
        f"() => {{ const s = ({LAST})(); return s && ({condition}) ? s : null; }}",
        polling=50, timeout=TIMEOUT_MS)
    return handle.json_value()


def wait_idle(page) -> None:
    """Wait until the page has read /health and is ready to send."""
    page.wait_for_function("() => document.body.dataset.state === 'idle'", polling=50,
                           timeout=TIMEOUT_MS)


def send(page, text: str, *, press_enter: bool = True) -> None:
    """Type ``text`` into the composer and send it with Enter (or the Send button)."""
    page.fill("#input", text)
    if press_enter:
        page.press("#input", "Enter")
    else:
        page.click("#send")


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


@pytest.fixture(scope="module")
def browser():
    """One headless Debian Chromium for the module (contexts keep the tests apart)."""
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh page in its own context; fails the test if the page's script threw."""
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert errors == [], f"uncaught errors in the page: {errors}"


def test_page_streams_a_reply_safely(server, page, tmp_path):
    page.goto(server.url + "/?autosend=hello")
    # while the reply streams, part of it is already in the DOM
    partial = last_where(page, "s.state === 'streaming' && s.content.length > 0")
    done = last_where(page, "s.finish")
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
    assert page.text_content("#model-name") == "minimind-web"
    shot = page.screenshot(path=str(tmp_path / "chat.png"))
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000


def test_page_history_settings_stop_and_clear(server, engine, page, tmp_path):
    page.goto(server.url + "/")
    wait_idle(page)
    page.fill("#system", "Be kind.")
    page.fill("#max-tokens", "40")
    send(page, "first question")
    last_where(page, "s.finish")
    send(page, "second question", press_enter=False)
    second = last_where(page, "s.finish && s.content.includes('second')")
    assert second["content"] == "echo: second question"
    # the second request carried the system prompt and the whole conversation
    assert engine.generations[-1]["prompt"] == (
        "<|im_start|>system\nBe kind.<|im_end|>\n"
        + PROMPT_OF.format("first question") + "echo: first question<|im_end|>\n"
        + PROMPT_OF.format("second question"))

    # stop: the page aborts the fetch and the server cancels the generation
    page.fill("#max-tokens", "3000")
    send(page, "forever")
    last_where(page, "s.chunks >= 3")
    page.click("#stop")
    stopped = last_where(page, "s.finish")
    assert stopped["meta"].startswith("(stopped)") and stopped["state"] == "idle"
    record = next(g for g in engine.generations
                  if g["prompt"].endswith(PROMPT_OF.format("forever")))
    time.sleep(0.5)
    tokens = record["tokens"]
    time.sleep(0.5)
    assert record["tokens"] == tokens < 300  # stopped, far from its 3000 tokens (90 s)
    page.screenshot(path=str(tmp_path / "stopped.png"))

    page.click("#clear")
    assert page.locator("#messages .message").count() == 0
    assert snapshot(page) is None


def test_page_respects_the_server_cap(engine, page):
    """With `--max-tokens 5` the page asks for at most 5 tokens instead of getting a 400."""
    with ServerThread(create_app(engine, model_name="capped", max_tokens_cap=5)) as s:
        page.goto(s.url + "/?autosend=hello")
        done = last_where(page, "s.finish")
    assert done["finish"] == "length" and "cut at max tokens" in done["meta"]
    assert page.input_value("#max-tokens") == "5"
