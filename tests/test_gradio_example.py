"""examples/gradio_chat.py on the installed Gradio (the `[gradio]` extra; skipped without it):
the interface builds and answers one turn through gradio_client, with no browser. The seed's
`gr.ChatInterface(..., type="messages")` crashed on Gradio 6."""

from __future__ import annotations

import os
import socket
import sys

import pytest
from cli_helpers import ROOT, needs_demo, needs_torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

sys.path.insert(0, str(ROOT / "examples"))
import demo_corpus as corpus  # noqa: E402
import gradio_chat  # noqa: E402

pytestmark = [needs_torch, needs_demo, pytest.mark.slow]  # importing gradio takes seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_interface_builds_and_answers_one_turn():
    from minimind_core import load

    ui = gradio_chat.build_interface(load(backend="torch"))
    assert isinstance(ui, gr.ChatInterface)
    _, url, _ = ui.launch(prevent_thread_lock=True, server_name="127.0.0.1",
                          server_port=_free_port(), quiet=True)
    try:
        client = gradio_client.Client(url, verbose=False)
        names = client.view_api(return_format="dict")["named_endpoints"]
        endpoint = "/respond" if "/respond" in names else "/chat"  # Gradio 6 / Gradio 5
        # message, then the additional inputs: system prompt, temperature, top-p
        reply = client.predict("你是谁", "", 0.0, 0.92, api_name=endpoint)
    finally:
        ui.close()
    assert reply == corpus.IDENTITY_ZH  # the demo's training answer, greedy


def test_history_content_parts_are_read_as_text():
    assert gradio_chat.text_of([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) \
        == "ab"
    assert gradio_chat.text_of("plain") == "plain" and gradio_chat.text_of({"path": "x"}) == ""
