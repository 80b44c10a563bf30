"""The OpenAI-compatible server over a real socket, driven by the official `openai` client.

Most tests use ScriptedEngine (tests/server_helpers.py): a real Engine whose model plays back a
chosen reply, so the expected text, reasoning split, tool calls and token counts are known in
advance and computed here independently (tokenizer.encode of hand-written strings). A tiny
random torch model checks the real path against the library's own ``engine.chat``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from server_helpers import (
    CALL,
    ENDLESS,
    MODEL,
    WEATHER,
    ScriptedEngine,
    ServerThread,
    chatml_prompt,
    make_tokenizer,
    user,
)

pytestmark = pytest.mark.serve
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from minimind_core.server import create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("server") / "model")


@pytest.fixture(scope="module")
def engine(tokenizer):
    return ScriptedEngine(tokenizer, window=4096)


@pytest.fixture
def slow(engine):
    """Each token takes 10 ms for the duration of one test."""
    engine.delay = 0.01
    yield engine
    engine.delay = 0.0


# -- chat completions -----------------------------------------------------------------------


def test_chat_non_stream(client, engine, tokenizer):
    reply = "Hello there, friend. 你好！"
    engine.replies["hi"] = reply
    r = client.chat.completions.create(model=MODEL, messages=user("hi"))
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == reply
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    # the template's prompt, written out by hand; the engine counts the EOS it generated
    assert r.usage.prompt_tokens == len(tokenizer.encode(chatml_prompt("hi")))
    assert r.usage.completion_tokens == len(tokenizer.encode(reply)) + 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_with_usage(client, engine, tokenizer):
    reply = "Streaming works, one token at a time."
    engine.replies["stream me"] = reply
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=user("stream me"), stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(texts) == reply
    assert len(texts) > 5  # really streamed, not one block
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []  # the usage chunk comes last, with no choices
    assert chunks[-1].usage.prompt_tokens == len(tokenizer.encode(chatml_prompt("stream me")))
    assert chunks[-1].usage.completion_tokens == len(tokenizer.encode(reply)) + 1
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_stream_without_usage_has_no_usage_chunk(client, engine):
    chunks = list(client.chat.completions.create(model=MODEL, messages=user("no usage"),
                                                 stream=True))
    assert all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "echo: no usage"


def test_raw_sse_wire_format(server):
    """Every event is `data: {json}` + blank line, and the stream ends with `data: [DONE]`."""
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30,
                      json={"messages": user("wire"), "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = body.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        assert json.loads(event[len("data: "):])["object"] == "chat.completion.chunk"


def test_stop_strings(client, engine):
    engine.replies["count"] = "one two three four five"
    r = client.chat.completions.create(model=MODEL, messages=user("count"), stop=["three", "zzz"])
    assert r.choices[0].message.content == "one two "
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=MODEL, messages=user("count"), stop="four")
    assert r.choices[0].message.content == "one two three "
    chunks = client.chat.completions.create(model=MODEL, messages=user("count"), stop=["thr"],
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one two "


def test_max_tokens_gives_length(client, engine, tokenizer):
    engine.replies["long"] = "a b c d e f g h i j k l m n o p"
    r = client.chat.completions.create(model=MODEL, messages=user("long"), max_tokens=4)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4
    assert r.choices[0].message.content == tokenizer.decode(tokenizer.encode("a b c d e f g h i j k l m n o p")[:4])
    r = client.chat.completions.create(model=MODEL, messages=user("long"),
                                       max_completion_tokens=3)
    assert r.usage.completion_tokens == 3


def test_reasoning_split(client, engine):
    engine.replies["why"] = "<think>\nThe user asks why.\nI explain.\n</think>\n\nBecause <b>so</b>."
    r = client.chat.completions.create(model=MODEL, messages=user("why"))
    message = r.choices[0].message.model_dump()
    assert message["reasoning_content"] == "The user asks why.\nI explain."
    assert message["content"] == "Because <b>so</b>."
    chunks = list(client.chat.completions.create(model=MODEL, messages=user("why"), stream=True))
    deltas = [c.choices[0].delta.model_dump() for c in chunks if c.choices]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == \
        "The user asks why.\nI explain."
    assert "".join(d.get("content") or "" for d in deltas) == "Because <b>so</b>."
    assert not any("think>" in (d.get("content") or "") + (d.get("reasoning_content") or "")
                   for d in deltas)


def test_open_thinking_reaches_the_template(client, engine):
    """chat_template_kwargs reach the template; a prompt ending in an open <think> means the
    reply starts inside the thinking block."""
    engine.replies["think first"] = "Hmm, two plus two.\n</think>\n\nFour."
    r = client.chat.completions.create(model=MODEL, messages=user("think first"),
                                       extra_body={"chat_template_kwargs": {"open_thinking": True}})
    assert engine.generations[-1]["prompt"].endswith("<|im_start|>assistant\n<think>\n")
    message = r.choices[0].message.model_dump()
    assert message["reasoning_content"] == "Hmm, two plus two."
    assert message["content"] == "Four."
    # without the option the prompt is closed, so the same words are plain content
    r = client.chat.completions.create(model=MODEL, messages=user("think first"))
    assert engine.generations[-1]["prompt"].endswith("<|im_start|>assistant\n")
    assert r.choices[0].message.content == "Hmm, two plus two.\n</think>\n\nFour."


def test_tool_call_non_stream(client, engine):
    engine.replies["weather?"] = "Let me look.\n" + CALL
    r = client.chat.completions.create(model=MODEL, messages=user("weather?"), tools=WEATHER)
    assert "# Tools\nget_weather" in engine.generations[-1]["prompt"]  # tools reached the template
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "北京"}


def test_tool_call_stream(client, engine):
    engine.replies["weather stream"] = CALL
    chunks = list(client.chat.completions.create(model=MODEL, messages=user("weather stream"),
                                                 tools=WEATHER, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "北京"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


def test_tool_call_text_without_tools_or_when_malformed(client, engine):
    engine.replies["no tools"] = CALL
    r = client.chat.completions.create(model=MODEL, messages=user("no tools"))
    assert r.choices[0].message.content == CALL and r.choices[0].finish_reason == "stop"
    engine.replies["broken call"] = "<tool_call>{oops</tool_call>"
    r = client.chat.completions.create(model=MODEL, messages=user("broken call"), tools=WEATHER)
    assert r.choices[0].message.content == "<tool_call>{oops</tool_call>"
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=MODEL, messages=user("no tools"), tools=WEATHER,
                                       tool_choice="none")
    assert r.choices[0].message.content == CALL


def test_list_content_and_multi_turn(client, engine):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "echo: first"},
                {"role": "user", "content": [{"type": "text", "text": "sec"},
                                             {"type": "text", "text": "ond"}]}]
    r = client.chat.completions.create(model=MODEL, messages=messages)
    assert r.choices[0].message.content == "echo: second"
    assert engine.generations[-1]["prompt"] == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nfirst<|im_end|>\n"
        "<|im_start|>assistant\necho: first<|im_end|>\n" + chatml_prompt("second"))


def test_seeded_sampling_params_accepted(client, engine):
    r = client.chat.completions.create(
        model=MODEL, messages=user("params"), temperature=0.5, top_p=0.9, seed=3,
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1})
    assert r.choices[0].message.content == "echo: params"


@pytest.fixture(scope="module")
def minimind3_server(real_tokenizer):
    """A ScriptedEngine behind MiniMind-3's real tokenizer and chat template."""
    from minimind_core.tokenizer import Tokenizer

    engine = ScriptedEngine(Tokenizer.from_folder(real_tokenizer("minimind3")))
    with ServerThread(create_app(engine, model_name="minimind-3")) as s, openai.OpenAI(
            base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=30) as c:
        yield engine, c


def test_minimind3_template_thinking(minimind3_server):
    engine, c = minimind3_server
    engine.replies["2+2?"] = "Add two and two.\n</think>\n\n4"
    r = c.chat.completions.create(model="minimind-3", messages=user("2+2?"),
                                  extra_body={"chat_template_kwargs": {"open_thinking": True}})
    assert engine.generations[-1]["prompt"].endswith("<|im_start|>assistant\n<think>\n")
    message = r.choices[0].message.model_dump()
    assert (message["reasoning_content"], message["content"]) == ("Add two and two.", "4")
    chunks = list(c.chat.completions.create(
        model="minimind-3", messages=user("2+2?"), stream=True,
        extra_body={"chat_template_kwargs": {"open_thinking": True}}))
    deltas = [ch.choices[0].delta.model_dump() for ch in chunks if ch.choices]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "Add two and two."
    assert "".join(d.get("content") or "" for d in deltas) == "4"
    # by default the template closes an empty thinking block itself
    engine.replies["plain"] = "Just an answer."
    r = c.chat.completions.create(model="minimind-3", messages=user("plain"))
    assert engine.generations[-1]["prompt"].endswith("<think>\n\n</think>\n\n")
    message = r.choices[0].message.model_dump()
    assert message["content"] == "Just an answer." and "reasoning_content" not in message


def test_minimind3_tool_round_trip(minimind3_server):
    """A tool call from the model, then its result sent back: the agent loop OpenAI clients run."""
    engine, c = minimind3_server
    engine.replies["weather in Beijing?"] = CALL
    messages = user("weather in Beijing?")
    r = c.chat.completions.create(model="minimind-3", messages=messages, tools=WEATHER)
    prompt = engine.generations[-1]["prompt"]
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt
    assert r.choices[0].finish_reason == "tool_calls"
    call = r.choices[0].message.tool_calls[0]
    messages += [r.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "晴，25°C"}]
    r = c.chat.completions.create(model="minimind-3", messages=messages, tools=WEATHER)
    prompt = engine.generations[-1]["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>' \
        in prompt
    assert "<tool_response>\n晴，25°C\n</tool_response>" in prompt
    assert r.choices[0].finish_reason == "stop"


# -- completions, models, health ------------------------------------------------------------


def test_completions(client, engine, tokenizer):
    engine.replies["Once upon a time"] = ", there was a tiny model."
    r = client.completions.create(model=MODEL, prompt="Once upon a time")
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == ", there was a tiny model."
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(tokenizer.encode("Once upon a time"))
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ", there was a tiny model."
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    r = client.completions.create(model=MODEL, prompt="Once upon a time", echo=True)
    assert r.choices[0].text == "Once upon a time, there was a tiny model."
    r = client.completions.create(model=MODEL, prompt=tokenizer.encode("Once upon a time"))
    assert r.choices[0].text == ", there was a tiny model."


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_lora_is_listed_and_accepted(tokenizer):
    engine = ScriptedEngine(tokenizer)
    engine.lora_path = "/models/out/lora/lora_medical_64.pth"
    with ServerThread(create_app(engine, model_name=MODEL)) as s:
        data = httpx.get(s.url + "/v1/models").json()["data"]
        assert [m["id"] for m in data] == [MODEL, "lora_medical_64"]
        assert data[0]["lora"] == engine.lora_path and data[1]["parent"] == MODEL
        r = httpx.post(s.url + "/v1/chat/completions", timeout=30,
                       json={"model": "lora_medical_64", "messages": user("x")})
        assert r.status_code == 200 and r.json()["model"] == "lora_medical_64"


# -- concurrency, disconnects, shutdown -----------------------------------------------------


def test_sixteen_concurrent_streams(server, engine):
    engine.delay = 0.002
    barrier = threading.Barrier(16)

    def one(k: int) -> str:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                           timeout=60) as c:
            barrier.wait()
            stream = c.chat.completions.create(model=MODEL, messages=user(f"client {k}"),
                                               stream=True)
            return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

    try:
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(one, range(16)))  # re-raises any client's error
    finally:
        engine.delay = 0.0
    assert replies == [f"echo: client {k}" for k in range(16)]


def _stream_events(r):
    for line in r.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def test_disconnect_mid_stream_frees_the_worker(server, slow, client):
    slow.replies["endless stream"] = ENDLESS
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/chat/completions",
                         json={"messages": user("endless stream"), "stream": True,
                               "max_tokens": 3000}) as r:
            seen = 0
            for event in _stream_events(r):
                seen += bool(event["choices"] and event["choices"][0]["delta"].get("content"))
                if seen == 5:
                    break  # leaving the block closes the connection mid-stream
    t0 = time.monotonic()
    r = client.chat.completions.create(model=MODEL, messages=user("next"), max_tokens=20)
    waited = time.monotonic() - t0
    assert r.choices[0].message.content == "echo: next"
    # at 10 ms a token the abandoned generation would hold the engine for 30 s
    assert waited < 3.0
    assert slow.generation_for("endless stream")["tokens"] < 25


def test_disconnect_non_stream_stops_generation(server, slow, client):
    slow.replies["endless non-stream"] = ENDLESS
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", timeout=1.0,
                   json={"messages": user("endless non-stream"), "max_tokens": 3000})
    r = client.chat.completions.create(model=MODEL, messages=user("after"), max_tokens=20)
    assert r.choices[0].message.content == "echo: after"
    tokens = slow.generation_for("endless non-stream")["tokens"]
    assert 0 < tokens < 300  # it ran, and stopped long before its 3000 tokens


def test_queue_full_gives_503(tokenizer):
    engine = ScriptedEngine(tokenizer, delay=0.01)
    engine.replies["endless"] = ENDLESS
    with ServerThread(create_app(engine, model_name=MODEL, max_queue=1, max_num_seqs=1)) as s:
        url = s.url + "/v1/chat/completions"
        results = {}
        with httpx.Client(timeout=30) as http, http.stream(
                "POST", url, json={"messages": user("endless"), "stream": True,
                                   "max_tokens": 3000}) as first:
            events = _stream_events(first)  # kept referenced: dropping it closes the stream
            next(events)  # the first request is generating

            def second():
                results["second"] = httpx.post(url, timeout=60, json={
                    "messages": user("queued"), "max_tokens": 50})

            waiter = threading.Thread(target=second)
            waiter.start()
            deadline = time.monotonic() + 10
            while httpx.get(s.url + "/health").json()["waiting"] < 1:
                assert time.monotonic() < deadline, "the second request never queued"
                time.sleep(0.02)
            r = httpx.post(url, json={"messages": user("third")}, timeout=30)
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "server_busy"
            assert r.json()["error"]["type"] == "server_error"
        waiter.join(30)  # closing the first stream lets the queued one run
        assert results["second"].status_code == 200
        assert results["second"].json()["choices"][0]["message"]["content"] == "echo: queued"


def test_graceful_shutdown_stops_generation(tokenizer):
    engine = ScriptedEngine(tokenizer, delay=0.01)
    engine.replies["endless"] = ENDLESS
    app = create_app(engine, model_name=MODEL)
    srv = ServerThread(app, shutdown_timeout=1.0)
    with srv:
        http = httpx.Client(timeout=30)
        r = http.send(http.build_request("POST", srv.url + "/v1/chat/completions", json={
            "messages": user("endless"), "stream": True, "max_tokens": 3000}), stream=True)
        events = _stream_events(r)
        next(events)
        srv.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's SIGTERM handler does
        srv.thread.join(15)
        assert not srv.thread.is_alive(), "uvicorn did not shut down"
        r.close()
        http.close()
    worker = app.state.minimind.worker
    assert not worker._thread.is_alive()
    assert engine.generation_for("endless")["tokens"] < 1000  # cancelled, not run to the end
    assert engine._lock.acquire(blocking=False)  # the engine was released
    engine._lock.release()


# -- the real engine and the command line ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    pytest.importorskip("torch")
    from conftest import build_tokenizer, random_weights, save_pth, tiny_config

    root = tmp_path_factory.mktemp("tiny")
    build_tokenizer(root / "model")
    config = tiny_config("minimind2")
    return save_pth(random_weights(config, seed=1), root / "out" / "full_sft_64.pth")


@pytest.mark.torch
def test_real_engine_matches_library(tiny_checkpoint):
    from minimind_core import load

    engine = load(tiny_checkpoint, backend="torch")
    messages = user("hello world")
    expected = engine.chat(messages, temperature=0, max_new_tokens=12)
    with ServerThread(create_app(engine)) as s, openai.OpenAI(
            base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
        assert [m.id for m in c.models.list().data] == ["full_sft_64"]
        r = c.chat.completions.create(model="full_sft_64", messages=messages, temperature=0,
                                      max_tokens=12)
        assert r.choices[0].message.content == expected.text
        assert r.choices[0].finish_reason == expected.finish_reason
        assert r.usage.prompt_tokens == expected.prompt_tokens
        assert r.usage.completion_tokens == expected.completion_tokens
        chunks = c.chat.completions.create(model="full_sft_64", messages=messages, temperature=0,
                                           max_tokens=12, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
            expected.text
        raw = engine.generate("hello", temperature=0, max_new_tokens=8)
        r = c.completions.create(model="full_sft_64", prompt="hello", temperature=0, max_tokens=8)
        assert r.choices[0].text == raw.text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.torch
@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")
def test_python_m_server_serves_and_exits_on_sigterm(tiny_checkpoint):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "minimind_core.server", "--model", str(tiny_checkpoint),
         "--backend", "torch", "--port", str(port), "--log-level", "info",
         "--served-model-name", "tiny", "--max-tokens", "16"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        r = httpx.post(url + "/v1/chat/completions", timeout=60,
                       json={"model": "tiny", "messages": user("hi"), "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
        assert httpx.post(url + "/v1/chat/completions", json={
            "messages": user("hi"), "max_tokens": 17}).status_code == 400  # --max-tokens cap
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        # uvicorn shuts down cleanly, then re-raises the signal so the exit status says SIGTERM
        assert proc.returncode in (0, -signal.SIGTERM), err
        assert "Serving tiny" in err
        assert "Application shutdown complete" in err  # our lifespan cleanup ran
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_bad_model_path_exits_with_message(tmp_path, capsys):
    from minimind_core.server.__main__ import main

    missing = tmp_path / "nope.pth"
    assert main(["--model", str(missing), "--backend", "torch"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minimind serve: error: ") and "nope.pth" in err
