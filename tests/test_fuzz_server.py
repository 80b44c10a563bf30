"""Random JSON bodies against every generating endpoint: the answer is always a 2xx or a 4xx in
OpenAI's error shape, never a 5xx, a hang, or a 200 stream that turns into an error event.

Bodies are drawn as arbitrary JSON (NaN, Infinity, lone surrogates and deep nesting included)
or as objects with the real field names and arbitrary values, so most examples get past the
first check and exercise the sampling, message and template paths. The engine is the scripted
one (tests/server_helpers.py), so a generation costs milliseconds.
"""

from __future__ import annotations

import json

import pytest
from server_helpers import ScriptedEngine, make_tokenizer

pytestmark = pytest.mark.serve
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

FIELDS = ["messages", "prompt", "model", "max_tokens", "max_completion_tokens", "temperature",
          "top_p", "top_k", "min_p", "repetition_penalty", "stop", "seed", "n", "stream",
          "stream_options", "tools", "tool_choice", "chat_template_kwargs", "response_format",
          "logprobs", "echo", "best_of"]

text = st.text(st.characters(codec=None) | st.characters(min_codepoint=0xD800,
                                                          max_codepoint=0xDFFF), max_size=20)
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | text)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(text, inner, max_size=4), max_leaves=12)
clean = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20)
plain = st.one_of(clean, clean, clean, text.filter(bool))  # now and then a lone surrogate
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                 "content": plain})
# plausible values, so that many bodies pass the checks and reach the generation...
PLAUSIBLE = {
    "messages": st.lists(message, min_size=1, max_size=4),
    "prompt": plain | st.lists(st.integers(0, 399), min_size=1, max_size=6),
    "max_tokens": st.integers(1, 64), "max_completion_tokens": st.integers(1, 64),
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(0, 50),
    "min_p": st.floats(0, 0.99), "repetition_penalty": st.floats(0.5, 2),
    "stop": st.lists(plain, max_size=3) | plain, "seed": st.integers(-2**63, 2**63 - 1),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries(
        {}, optional={"include_usage": st.booleans()}),
    "chat_template_kwargs": st.dictionaries(plain, scalars, max_size=2),
    "echo": st.booleans(), "n": st.just(1), "tool_choice": st.sampled_from(["auto", "none"]),
}
# ...and, for any field, anything at all (one time in four)
field = {name: st.one_of(*[PLAUSIBLE.get(name, json_values)] * 3, json_values)
         for name in FIELDS}


def _body(required: str) -> st.SearchStrategy:
    """``required`` plus a few other fields, each plausible or wild."""
    others = st.sets(st.sampled_from([f for f in FIELDS if f != required]), max_size=4)
    return others.flatmap(lambda names: st.fixed_dictionaries(
        {required: field[required], **{n: field[n] for n in names}}))


# bytes that are not what a JSON encoder writes: deep nesting, random bytes
raw_bytes = (st.integers(1, 5000).map(lambda n: b'{"messages": ' + b"[" * n + b"]" * n + b"}")
             | st.binary(max_size=64))
# mostly bodies of the endpoint's own kind, some of the other kind, some anything at all
BODIES = {path: st.one_of(json_values, raw_bytes, _body(own), _body(own), _body(other))
          for path, own, other in [("/v1/chat/completions", "messages", "prompt"),
                                   ("/v1/completions", "prompt", "messages"),
                                   ("/chat", "messages", "prompt")]}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return ScriptedEngine(make_tokenizer(tmp_path_factory.mktemp("fuzz") / "model"), window=512)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=20) as client:
        yield client


def check(http, path: str, body) -> None:
    # NaN/Infinity are written as such, surrogates as \\udxxx; bytes are sent as they are
    payload = body if isinstance(body, bytes) else json.dumps(body)
    with http.stream("POST", path, content=payload,
                     headers={"Content-Type": "application/json"}) as r:
        raw = r.read()
    hypothesis.event(f"HTTP {r.status_code}")  # shown by --hypothesis-show-statistics
    assert 200 <= r.status_code < 500, (r.status_code, raw[:500])
    if r.status_code >= 400:
        error = json.loads(raw)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        lines = [line for line in raw.decode().split("\n") if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert all("error" not in json.loads(line[6:]) for line in lines[:-1])
    else:
        json.loads(raw)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/chat"])
@hypothesis.settings(max_examples=100, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture,
                                            hypothesis.HealthCheck.too_slow])
@hypothesis.given(data=st.data())
def test_random_bodies_get_2xx_or_4xx(http, path, data):
    check(http, path, data.draw(BODIES[path], label="body"))
