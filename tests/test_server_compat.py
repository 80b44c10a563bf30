"""Issue 20's server items over HTTP: upstream MiniMind's ``POST /chat`` client as its guide
writes it, 404s that name the real endpoints, and what the chat page reads from the server (its
defaults, the favicon, the API-key message). The page itself runs in a browser in
tests/test_web.py; here only what it is served is checked."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from server_helpers import MODEL, ScriptedEngine, ServerThread, make_tokenizer, user

pytestmark = pytest.mark.serve
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from minimind_core.params import SamplingParams  # noqa: E402
from minimind_core.server import create_app  # noqa: E402


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return ScriptedEngine(make_tokenizer(tmp_path_factory.mktemp("compat") / "model"))


def test_upstream_chat_client_as_the_guide_writes_it(server, engine):
    """The seed's client, verbatim but for the URL: ``requests.post(".../chat", json=...)``."""
    requests = pytest.importorskip("requests")
    engine.replies["你好"] = "你好！我是 MiniMind。"
    response = requests.post(
        server.url + "/chat",
        json={
            "messages": [{"role": "user", "content": "你好"}],
            "max_tokens": 512,
            "temperature": 0.85
        }
    )
    assert response.json()["response"] == "你好！我是 MiniMind。"
    assert set(response.json()) == {"response"}


def test_chat_compat_limits_and_errors(server, engine):
    engine.replies["long"] = "word " * 50
    r = httpx.post(server.url + "/chat", json={"messages": user("long"), "max_tokens": 3},
                   timeout=30)
    ids = engine.tokenizer.encode("word " * 50)[:3]
    assert r.json() == {"response": engine.tokenizer.decode(ids)}
    r = httpx.post(server.url + "/chat", json={"messages": user("x"), "stream": True})
    assert r.status_code == 400 and "/v1/chat/completions" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/chat", json={"max_tokens": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_chat_compat_needs_the_key_when_one_is_set(engine):
    with ServerThread(create_app(engine, model_name=MODEL, api_key="k")) as s:
        assert httpx.post(s.url + "/chat", json={"messages": user("a")}).status_code == 401
        r = httpx.post(s.url + "/chat", json={"messages": user("a")},
                       headers={"Authorization": "Bearer k"}, timeout=30)
        assert r.json() == {"response": "echo: a"}


@pytest.mark.parametrize("method, path", [("GET", "/nope"), ("POST", "/v1/chat"),
                                          ("GET", "/static/missing.js"), ("DELETE", "/chat")])
def test_unknown_paths_name_the_real_endpoints(server, method, path):
    r = httpx.request(method, server.url + path, json={} if method != "GET" else None)
    assert r.status_code in (404, 405)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == ("not_found" if r.status_code == 404 else "method_not_allowed")
    assert f"{method} {path}" in error["message"]
    for endpoint in ("POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models",
                     "GET /health", "POST /chat"):
        assert endpoint in error["message"]


def test_health_gives_the_page_its_defaults(engine):
    defaults = SamplingParams(max_new_tokens=300, temperature=0.3, top_p=0.8)
    app = create_app(engine, model_name=MODEL, defaults=defaults, think=True)
    with ServerThread(app) as s:
        assert httpx.get(s.url + "/health").json()["defaults"] == {
            "temperature": 0.3, "top_p": 0.8, "max_tokens": 300, "think": True}
    with ServerThread(create_app(engine, model_name=MODEL, max_tokens_cap=64)) as s:
        assert httpx.get(s.url + "/health").json()["defaults"] == {
            "temperature": 0.7, "top_p": 0.92, "max_tokens": 64, "think": False}


def test_serve_flags_reach_the_defaults():
    import argparse

    from minimind_core.server import configure_parser

    args = configure_parser(argparse.ArgumentParser()).parse_args(
        ["--temperature", "0.2", "--top-p", "0.5", "--think"])
    assert (args.temperature, args.top_p, args.think) == (0.2, 0.5, True)


def test_page_reads_the_defaults_and_names_the_key_field(server):
    page = httpx.get(server.url + "/").text
    assert '<link rel="icon" href="static/favicon.svg"' in page
    js = httpx.get(server.url + "/static/app.js").text
    assert 'fetch("health")' in js and "health.defaults" in js
    for field in ("defaults.temperature", "defaults.top_p", "defaults.max_tokens",
                  "defaults.think"):
        assert field in js
    assert "response.status === 401" in js and "API key" in js
    node = shutil.which("node")
    if node:  # the served script at least parses (the browser test runs it)
        subprocess.run([node, "--check", "-"], input=js, text=True, check=True)


def test_favicon(server):
    for path in ("/favicon.ico", "/static/favicon.svg"):
        r = httpx.get(server.url + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml")
        assert r.text.startswith("<svg") and "</svg>" in r.text


def test_401_message_names_the_key_field(engine):
    with ServerThread(create_app(engine, model_name=MODEL, api_key="k")) as s:
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": user("a")})
        assert r.status_code == 401 and "API key field" in r.json()["error"]["message"]
