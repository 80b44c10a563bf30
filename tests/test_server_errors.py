"""The server's answers to bad requests (status, OpenAI error shape, message), API keys, the
max-tokens cap and CORS, over a real socket."""

from __future__ import annotations

import httpx
import pytest
from server_helpers import (
    MODEL,
    ScriptedEngine,
    ServerThread,
    make_tokenizer,
    user,
)

pytestmark = pytest.mark.serve
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from minimind_core.server import create_app  # noqa: E402


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return ScriptedEngine(make_tokenizer(tmp_path_factory.mktemp("errors") / "model"), window=4096)


LONG = "hello world " * 3000  # far past the 4096-token window

CHAT_ERRORS = [
    # (body, status, param, words in the message)
    (b"{not json", 400, None, "JSON"),
    (b"", 400, None, "empty"),
    ([1, 2], 400, None, "JSON object"),
    ({}, 400, "messages", "Missing required parameter: 'messages'"),
    ({"messages": "hi"}, 422, "messages", "must be an array"),
    ({"messages": []}, 400, "messages", "empty"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role",
     "unknown role 'wizard'"),
    ({"messages": [{"content": "x"}]}, 400, "messages", "has no 'role'"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages", "content must be"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages",
     "only text parts"),
    ({"messages": user("x"), "n": 0}, 400, "n", "from 1 to"),
    ({"messages": user("x"), "n": 17}, 400, "n", "--max-num-seqs"),
    ({"messages": user("x"), "max_tokens": -5}, 400, "max_tokens", "at least 1"),
    ({"messages": user("x"), "max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ({"messages": user("x"), "max_tokens": 10**9}, 400, "max_tokens", "context window"),
    ({"messages": user("x"), "max_tokens": "ten"}, 422, "max_tokens", "must be an integer"),
    ({"messages": user("x"), "max_tokens": True}, 422, "max_tokens", "must be an integer"),
    ({"messages": user("x"), "max_completion_tokens": -1}, 400, "max_completion_tokens",
     "at least 1"),
    ({"messages": user("x"), "temperature": 5}, 400, "temperature", "between 0 and 2"),
    ({"messages": user("x"), "temperature": "hot"}, 422, "temperature", "must be a number"),
    ({"messages": user("x"), "top_p": 1.5}, 400, "top_p", "top_p must be in (0, 1]"),
    ({"messages": user("x"), "top_k": -1}, 400, "top_k", "top_k must be"),
    ({"messages": user("x"), "stop": [""]}, 400, "stop", "must not be empty"),
    ({"messages": user("x"), "stop": 5}, 422, "stop", "a string or an array"),
    ({"messages": user("x"), "model": "gpt-4"}, 404, "model", "'gpt-4' does not exist"),
    ({"messages": user(LONG)}, 400, "messages", "context window"),
    ({"messages": user("x"), "tool_choice": "required"}, 400, "tool_choice", "not supported"),
    ({"messages": user("x"), "tools": [{"type": "function"}]}, 400, "tools[0]", "must look like"),
    ({"messages": user("x"), "stream_options": "yes"}, 422, "stream_options", "an object"),
    ({"messages": user("x"), "chat_template_kwargs": "x"}, 422, "chat_template_kwargs",
     "an object"),
    ({"messages": user("x"), "chat_template_kwargs": {"tools": 1}}, 400, "chat_template_kwargs",
     "tools"),
    ({"messages": user("x"), "top_logprobs": 3}, 400, "top_logprobs", "needs 'logprobs'"),
    ({"messages": user("x"), "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs",
     "from 0 to 20"),
    ({"messages": user("x"), "response_format": {"type": "json_object"}}, 400,
     "response_format", "not supported"),
]

COMPLETION_ERRORS = [
    ({}, 400, "prompt", "Missing required parameter: 'prompt'"),
    ({"prompt": ""}, 400, "prompt", "empty"),
    ({"prompt": ["a", 5]}, 400, "prompt", "not a mix"),
    ({"prompt": ["a", ""]}, 400, "prompt", "prompt[1] is empty"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs", "from 0 to 20"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "echo: true"),
    ({"prompt": 5}, 422, "prompt", "a string or an array of token ids"),
    ({"prompt": [99999]}, 400, "prompt", "outside the vocabulary"),
    ({"prompt": LONG}, 400, "prompt", "context window"),
    ({"prompt": "x", "model": "nope"}, 404, "model", "'nope' does not exist"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens", "at least 1"),
]


def _check_error(r, status, param, words):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == param
    assert words in body["error"]["message"]


@pytest.mark.parametrize("body, status, param, words", CHAT_ERRORS)
def test_chat_bad_input(server, body, status, param, words):
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} \
        if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30, **kw)
    _check_error(r, status, param, words)


@pytest.mark.parametrize("body, status, param, words", COMPLETION_ERRORS)
def test_completion_bad_input(server, body, status, param, words):
    _check_error(httpx.post(server.url + "/v1/completions", json=body, timeout=30),
                 status, param, words)


def test_errors_reach_the_openai_client_and_server_survives(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=user("x"), n=0)
    assert e.value.status_code == 400 and "'n' must be from 1" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=user("x"))
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(server.url + "/v1/chat/completions").status_code == 405
    # after all the bad requests above, the server still answers
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert client.chat.completions.create(model=MODEL, messages=user("alive")).choices[0] \
        .message.content == "echo: alive"


def test_api_key(engine):
    with ServerThread(create_app(engine, model_name=MODEL, api_key="sekret")) as s:
        url = s.url + "/v1/chat/completions"
        r = httpx.post(url, json={"messages": user("k")})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(url, json={"messages": user("k")}, headers={"Authorization": "Bearer no"})
        assert r.status_code == 401 and "Incorrect API key" in r.json()["error"]["message"]
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/health").status_code == 200  # health and the page stay open
        assert httpx.get(s.url + "/").status_code == 200
        with openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.chat.completions.create(model=MODEL, messages=user("k"))
        with openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0) as good:
            r = good.chat.completions.create(model=MODEL, messages=user("k"))
            assert r.choices[0].message.content == "echo: k"


def test_max_tokens_cap(engine):
    with ServerThread(create_app(engine, model_name=MODEL, max_tokens_cap=8)) as s:
        r = httpx.post(s.url + "/v1/chat/completions",
                       json={"messages": user("x"), "max_tokens": 9})
        _check_error(r, 400, "max_tokens", "more than this server allows (8)")
        engine.replies["cap default"] = "word " * 40
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": user("cap default")},
                       timeout=30)
        assert r.json()["usage"]["completion_tokens"] == 8  # the cap is the default too


def test_cors(engine):
    with ServerThread(create_app(engine, model_name=MODEL, cors=["http://example.com"])) as s:
        r = httpx.options(s.url + "/v1/chat/completions", headers={
            "Origin": "http://example.com", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://example.com"
        r = httpx.get(s.url + "/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_factory_loads_at_startup(engine):
    """create_app(factory): the model loads when the server starts, before it accepts requests."""
    calls = []

    def factory():
        calls.append(1)
        return engine

    app = create_app(factory, model_name=MODEL)
    assert calls == []
    with ServerThread(app) as s:
        assert calls == [1]
        assert httpx.get(s.url + "/health").json()["status"] == "ok"
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": user("f")}, timeout=30)
        assert r.json()["choices"][0]["message"]["content"] == "echo: f"
