"""ChatFormatter: parity with transformers' apply_chat_template, fallback, trimming, validation.

transformers is the oracle: `render` must equal `apply_chat_template(..., tokenize=False)` and
`encode` must equal tokenizing that text (upstream MiniMind's path).
"""

from __future__ import annotations

import copy
from datetime import datetime

import pytest
from conftest import hf_tokenizer

from minimind_core.chat import (
    ChatFormatter,
    prompt_messages,
    render_fallback,
    trim_history,
    validate_messages,
)
from minimind_core.tokenizer import Tokenizer

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "查询城市天气 <b>&</b>",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]

CONVS: dict[str, list[dict]] = {
    "single_user": [{"role": "user", "content": "你好，介绍一下你自己"}],
    "system_user": [{"role": "system", "content": "你是一个乐于助人的助手。"},
                    {"role": "user", "content": "What is 2+2?"}],
    "multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"}],
    "chinese_emoji": [{"role": "user", "content": "今天心情很好 😀🎉👨‍👩‍👧，讲个笑话吧！"}],
    "html_quotes": [{"role": "user", "content": "<b>&amp;</b> \"double\" 'single' \\ \n end"}],
    "assistant_think": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\n先算一算：2+2=4\n</think>\n\n答案是 4。"},
        {"role": "user", "content": "再乘以 3 呢？"}],
    "reasoning_field": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning": "two plus two"},
        {"role": "user", "content": "thanks"}],
    "tool_round_trip": [
        {"role": "system", "content": "You can check the weather."},
        {"role": "user", "content": "北京天气怎么样？"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21, "sky": "晴"}'}],
    "tool_string_args": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather",
                                              "arguments": '{"city": "Paris"}'}},
            {"type": "function", "function": {"name": "get_weather",
                                              "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "content": "18C"},
        {"role": "tool", "content": "25C"},
        {"role": "assistant", "content": "Paris 18C, Rome 25C."},
        {"role": "user", "content": "Thanks!"}],
}
TOOL_CONVS = {"tool_round_trip", "tool_string_args"}
KWARGS = {"minimind2": [{}, {"enable_thinking": False}, {"enable_thinking": True}],
          "minimind3": [{}, {"open_thinking": True}, {"open_thinking": False}]}
CASES = [(name, conv, kw) for name, kws in KWARGS.items() for conv in CONVS for kw in kws]


@pytest.fixture
def formatter(real_tokenizer):
    """formatter(name, **kw): a ChatFormatter over upstream's real tokenizer ``name``."""
    return lambda name, **kw: ChatFormatter(Tokenizer(real_tokenizer(name)), **kw)


@pytest.fixture
def plain(real_tokenizer, tmp_path) -> ChatFormatter:
    """A formatter whose tokenizer has no chat template."""
    return ChatFormatter(Tokenizer(real_tokenizer.copy(tmp_path / "plain", chat_template=None)))


# -- parity with transformers --------------------------------------------------------------


@pytest.mark.parametrize("name,conv,kw", CASES)
def test_render_and_encode_match_transformers(real_tokenizer, formatter, name, conv, kw):
    hf = hf_tokenizer(real_tokenizer(name))
    fmt = formatter(name)
    messages = CONVS[conv]
    tools = TOOLS if conv in TOOL_CONVS else None
    original = copy.deepcopy(messages)
    expected = hf.apply_chat_template(copy.deepcopy(messages), tools=tools, tokenize=False,
                                      add_generation_prompt=True, **kw)
    assert fmt.render(messages, tools=tools, **kw) == expected
    assert fmt.encode(messages, tools=tools, **kw) == hf(expected)["input_ids"]
    assert messages == original  # the caller's messages are never modified


@pytest.mark.parametrize("name", ["minimind2", "minimind3"])
def test_without_generation_prompt_and_with_tools_but_no_tool_calls(real_tokenizer, formatter,
                                                                    name):
    hf, fmt = hf_tokenizer(real_tokenizer(name)), formatter(name)
    for conv in ("multi_turn", "single_user"):
        msgs = CONVS[conv]
        expected = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
        assert fmt.render(msgs, add_generation_prompt=False) == expected
        expected = hf.apply_chat_template(msgs, tools=TOOLS, tokenize=False,
                                          add_generation_prompt=True)
        assert fmt.render(msgs, tools=TOOLS) == expected


def test_template_specifics_are_really_exercised(formatter):
    # Guards the parity cases above against comparing two equally wrong renderings.
    user = CONVS["single_user"]
    m2, m3 = formatter("minimind2"), formatter("minimind3")
    assert m2.render(user).startswith("<|im_start|>system\nYou are a helpful assistant<|im_end|>")
    assert m3.render(user).startswith("<|im_start|>user\n")
    assert m2.render(user, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert m2.render(user).endswith("<|im_start|>assistant\n")
    assert m3.render(user, open_thinking=True).endswith("<|im_start|>assistant\n<think>\n")
    assert m3.render(user).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    think = m3.render(CONVS["assistant_think"])
    assert "<think>\n先算一算：2+2=4\n</think>\n\n答案是 4。<|im_end|>" in think
    assert "<think>\ntwo plus two\n</think>\n\n4<|im_end|>" in m3.render(CONVS["reasoning_field"])
    tool = m3.render(CONVS["tool_round_trip"], tools=TOOLS)
    assert '"description": "查询城市天气 <b>&</b>"' in tool  # tojson: no ASCII/HTML escaping
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>' in tool
    assert "<tool_response>\n" + '{"temp": 21, "sky": "晴"}' in tool


def test_text_parts_are_joined(formatter):
    fmt = formatter("minimind3")
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello, "},
                                          {"type": "text", "text": "世界"}]}]
    assert fmt.render(parts) == fmt.render([{"role": "user", "content": "Hello, 世界"}])
    assert validate_messages(parts)[0]["content"] == "Hello, 世界"
    assert isinstance(parts[0]["content"], list)


def test_default_system(real_tokenizer, formatter):
    hf = hf_tokenizer(real_tokenizer("minimind3"))
    fmt = formatter("minimind3", default_system="Be brief.")
    user = [{"role": "user", "content": "Hi"}]
    expected = hf.apply_chat_template([{"role": "system", "content": "Be brief."}, *user],
                                      tokenize=False, add_generation_prompt=True)
    assert fmt.render(user) == expected
    own = [{"role": "system", "content": "Mine."}, *user]
    assert "Be brief." not in fmt.render(own) and "Mine." in fmt.render(own)


def test_custom_template_features_match_transformers(real_tokenizer, tmp_path):
    # The Jinja environment itself: trim/lstrip_blocks, loopcontrols, namespace, dict(),
    # tojson options, {% generation %}, tools/documents, special tokens and extra kwargs.
    template = (
        "{%- set ns = namespace(n=0) -%}\n"
        "{{ bos_token }}|{{ image_token }}\n"
        "{% for m in messages %}\n"
        "    {% if loop.index > 2 %}{% break %}{% endif %}\n"
        "    {% set ns.n = ns.n + 1 %}\n"
        "  {% generation %}[{{ m.role }}]{{ m.content | tojson }}{% endgeneration %}\n"
        "{% endfor %}\n"
        "{{ dict(b=1, a='é') | tojson(indent=2, sort_keys=True) }}\n"
        "{{ tools | tojson }}|{{ documents | tojson }}|{{ custom }}|{{ ns.n }}|{{ eos_token }}\n"
        "{% for m in messages %}{{ 'content' in m }},{{ m.reasoning_content }};{% endfor %}\n"
        "{% if add_generation_prompt %}<gen>{% endif %}")
    folder = real_tokenizer.copy(tmp_path / "custom", chat_template=template)
    hf, fmt = hf_tokenizer(folder), ChatFormatter(Tokenizer(folder))
    msgs = [{"role": "user", "content": "<a>&\"é\""}, {"role": "assistant", "content": "x"},
            {"role": "user", "content": "never shown"},
            {"role": "assistant", "content": None, "thinking": "hmm",
             "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}]
    docs = [{"title": "T", "text": "文档"}]
    for gen in (True, False):
        expected = hf.apply_chat_template(msgs, tools=TOOLS, documents=docs, custom=[1, "z"],
                                          tokenize=False, add_generation_prompt=gen)
        got = fmt.render(msgs, tools=TOOLS, documents=docs, custom=[1, "z"],
                         add_generation_prompt=gen)
        assert got == expected
    assert "never shown" not in got and "|2|<|im_end|>" in got


@pytest.mark.parametrize("template,match", [
    ("{{ raise_exception('bad conversation') }}", "bad conversation"),
    ("{% set ns = namespace(_hidden=1) %}", "underscore"),
    ("{% set x = messages.append(1) %}", "append"),  # immutable sandbox
    ("{% for %}", "template"),  # syntax error
])
def test_template_errors_become_value_errors(real_tokenizer, tmp_path, template, match):
    fmt = ChatFormatter(Tokenizer(real_tokenizer.copy(tmp_path / "t", chat_template=template)))
    with pytest.raises(ValueError, match=match):
        fmt.render([{"role": "user", "content": "x"}])


def test_strftime_now(real_tokenizer, tmp_path):
    fmt = ChatFormatter(Tokenizer(real_tokenizer.copy(tmp_path / "t",
                                              chat_template="{{ strftime_now('%Y') }}")))
    assert fmt.render([{"role": "user", "content": "x"}]) in {
        str(datetime.now().year), str(datetime.now().year - 1)}


# -- fallback without a chat template ------------------------------------------------------


def test_fallback_exact(plain):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert plain.render(msgs) == "System: S\n\nUser: U\n\nAssistant: "
    assert plain.render(msgs, add_generation_prompt=False) == "System: S\n\nUser: U"
    long = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": None,
                                               "tool_calls": [{"function": {"name": "f"}}]},
            {"role": "tool", "content": "r"}]
    assert plain.render(long) == (
        "User: a\n\nAssistant: b\n\nUser: c\n\nAssistant: \n\nTool: r\n\nAssistant: ")
    assert plain.encode(msgs) == plain.tokenizer.encode("System: S\n\nUser: U\n\nAssistant: ")
    assert render_fallback([]) == "Assistant: "
    assert render_fallback([], add_generation_prompt=False) == ""
    with pytest.raises(ValueError, match="no chat template"):
        plain.render(msgs, tools=TOOLS)


# -- history trimming ----------------------------------------------------------------------

SYS = {"role": "system", "content": "S"}
T1 = [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"}]
T2 = [{"role": "user", "content": "u2"},
      {"role": "assistant", "content": None,
       "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
      {"role": "tool", "content": "r2"}, {"role": "assistant", "content": "a2"}]
T3 = [{"role": "user", "content": "u3"}, {"role": "assistant", "content": "a3"}]
FINAL = {"role": "user", "content": "final"}
HISTORY = [SYS, *T1, *T2, *T3, FINAL]


@pytest.mark.parametrize("n,expected", [
    (0, [SYS, FINAL]),
    (1, [SYS, *T3, FINAL]),
    (2, [SYS, *T2, *T3, FINAL]),
    (3, HISTORY),
    (10, HISTORY),
    (None, HISTORY),
])
def test_trim_history(n, expected):
    assert trim_history(HISTORY, n) == expected
    assert trim_history(HISTORY[1:], n) == [m for m in expected if m is not SYS]


def test_trim_history_keeps_the_turn_in_progress():
    # An agent loop ending in tool results: the question that started it stays.
    agent = [SYS, *T1, *T2[:3]]
    assert trim_history(agent, 0) == [SYS, *T2[:3]]
    assert trim_history([{"role": "assistant", "content": "hi"}, FINAL], 0) == [FINAL]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_history"):
            trim_history(HISTORY, bad)


def test_encode_with_max_history_matches_transformers(real_tokenizer, formatter):
    hf, fmt = hf_tokenizer(real_tokenizer("minimind3")), formatter("minimind3")
    text = hf.apply_chat_template([SYS, *T3, FINAL], tokenize=False, add_generation_prompt=True)
    assert fmt.encode(HISTORY, max_history=1) == hf(text)["input_ids"]
    assert fmt.render(HISTORY, max_history=1) == text


def test_context_window_drops_oldest_turns_keeping_system(formatter):
    fmt = formatter("minimind3")
    full = len(fmt.encode(HISTORY))
    without_t1 = fmt.encode([SYS, *T2, *T3, FINAL])
    minimal = fmt.encode([SYS, FINAL])
    assert len(minimal) < len(without_t1) < full
    assert fmt.encode(HISTORY, max_prompt_tokens=full) == fmt.encode(HISTORY)
    assert fmt.encode(HISTORY, max_prompt_tokens=full - 1) == without_t1
    assert fmt.encode(HISTORY, max_prompt_tokens=len(minimal)) == minimal
    windowed = formatter("minimind3", context_window=full)
    assert windowed.encode(HISTORY) == fmt.encode(HISTORY)
    assert windowed.encode(HISTORY, reserve_tokens=1) == without_t1
    assert windowed.encode(HISTORY, reserve_tokens=full - len(minimal)) == minimal
    assert windowed.encode(HISTORY, max_prompt_tokens=full - 1, reserve_tokens=0) == without_t1


def test_prompt_too_long(formatter):
    n = len(formatter("minimind3").encode([SYS, FINAL]))
    fmt = formatter("minimind3", context_window=n + 5)
    with pytest.raises(ValueError) as err:
        fmt.encode(HISTORY, reserve_tokens=10)
    msg = str(err.value)
    assert f"prompt is {n} tokens, longer than the context window of {n - 5} tokens" in msg
    assert "shorten the input" in msg and "history" in msg
    with pytest.raises(ValueError, match=f"prompt is {n} tokens.*window of 3 tokens"):
        fmt.encode(HISTORY, max_prompt_tokens=3)
    with pytest.raises(ValueError, match="no room"):
        fmt.encode(HISTORY, reserve_tokens=n + 5)
    assert len(fmt.encode(HISTORY, reserve_tokens=5)) == n  # fits once history is dropped


def test_long_history_fits_like_dropping_one_turn_at_a_time(real_tokenizer, formatter):
    """The fitted prompt equals the plain rule (drop the oldest turn until it fits), written
    out here with transformers' renderer, and costs a few renders, not one per dropped turn."""
    hf, fmt = hf_tokenizer(real_tokenizer("minimind3")), formatter("minimind3")
    turns = [[{"role": "user", "content": f"question {i} " + "x" * (i % 7)},
              {"role": "assistant", "content": f"answer {i}"}] for i in range(64)]
    final = {"role": "user", "content": "the last one"}
    calls = []
    encode = fmt.tokenizer.encode
    fmt.tokenizer.encode = lambda text: calls.append(1) or encode(text)
    try:
        for limit in (60, 137, 600):
            calls.clear()
            got = fmt.encode([SYS, *(m for t in turns for m in t), final],
                             max_prompt_tokens=limit)
            kept = list(turns)
            while True:  # the oracle: one turn at a time
                ids = hf(hf.apply_chat_template([SYS, *(m for t in kept for m in t), final],
                                                tokenize=False, add_generation_prompt=True)
                         )["input_ids"]
                if len(ids) <= limit:
                    break
                kept = kept[1:]
            assert got == ids and len(kept) < len(turns)
            assert len(calls) <= 2 * len(turns).bit_length() + 2  # ~10 renders, not ~60
    finally:
        fmt.tokenizer.encode = encode


def test_malformed_tool_call_is_a_value_error(formatter):
    # The template serialises missing arguments with tojson, which fails with TypeError.
    msgs = [{"role": "user", "content": "x"},
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}]
    with pytest.raises(ValueError, match="chat template"):
        formatter("minimind3").render(msgs)


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("messages,match", [
    ("hello", "non-empty list"),
    ([], "non-empty list"),
    (None, "non-empty list"),
    (["hello"], r"messages\[0\] must be a dict"),
    ([{"content": "x"}], r"messages\[0\] has no 'role'"),
    ([SYS, {"role": "bot", "content": "x"}], r"messages\[1\] has unknown role 'bot'"),
    ([{"role": "user", "content": 5}], r"messages\[0\] \(user\): content must be a string"),
    ([{"role": "user", "content": None}], r"messages\[0\] \(user\) has no content"),
    ([{"role": "user"}], "has no content"),
    ([{"role": "assistant", "content": None}], "only an assistant message with tool_calls"),
    ([{"role": "tool", "content": None, "tool_calls": [{}]}], r"\(tool\) has no content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "part 0 has type 'image_url'; only text parts"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"}]}],
     "part 1 needs a string 'text'"),
    ([{"role": "user", "content": ["raw string part"]}], "part 0 has type 'str'"),
    ([{"role": "assistant", "content": "x", "tool_calls": "f()"}], "tool_calls must be a list"),
])
def test_bad_messages(formatter, messages, match):
    fmt = formatter("minimind3")
    with pytest.raises(ValueError, match=match):
        fmt.render(messages)
    with pytest.raises(ValueError, match=match):
        fmt.encode(messages)


def test_bad_tools_and_documents(formatter):
    fmt = formatter("minimind3")
    user = CONVS["single_user"]
    with pytest.raises(ValueError, match="tools must be a list of dicts"):
        fmt.render(user, tools="get_weather")
    with pytest.raises(ValueError, match="documents must be a list of dicts"):
        fmt.render(user, documents=["text"])


def test_prompt_messages(real_tokenizer, formatter):
    assert prompt_messages("hi") == [{"role": "user", "content": "hi"}]
    assert prompt_messages("hi", "S") == [{"role": "system", "content": "S"},
                                          {"role": "user", "content": "hi"}]
    hf = hf_tokenizer(real_tokenizer("minimind2"))
    assert formatter("minimind2").render(prompt_messages("hi", "S")) == hf.apply_chat_template(
        prompt_messages("hi", "S"), tokenize=False, add_generation_prompt=True)
