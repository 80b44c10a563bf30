"""The reply parser: <think> and <tool_call> split out of a reply, whole or streamed in pieces."""

from __future__ import annotations

import json

import pytest

from minimind_core.reasoning import ReplyParser, prompt_opens_think, split_reply

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'


@pytest.mark.parametrize("text, in_think, tools, content, reasoning, calls", [
    ("plain answer", False, False, "plain answer", "", []),
    ("<think>\nidea\n</think>\n\nanswer", False, False, "answer", "idea", []),
    ("idea\n</think>\n\nanswer", True, False, "answer", "idea", []),
    ("idea cut short", True, False, "", "idea cut short", []),
    ("ok <b>bold</b> and < 3", False, False, "ok <b>bold</b> and < 3", "", []),
    ("ends with space ", False, False, "ends with space ", "", []),
    (CALL, False, True, "", "", [("get_weather", {"city": "北京"})]),
    ("Let me check.\n" + CALL, False, True, "Let me check.", "", [("get_weather", {"city": "北京"})]),
    (CALL, False, False, CALL, "", []),  # no tools offered: the block stays text
    ("<tool_call>not json</tool_call>", False, True, "<tool_call>not json</tool_call>", "", []),
    ("<tool_call>\n{\"name\": \"f\"", False, True, "<tool_call>\n{\"name\": \"f\"", "", []),
    ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', False, True, "", "",
     [("f", {"a": 1})]),
])
def test_split_reply(text, in_think, tools, content, reasoning, calls):
    out = split_reply(text, in_think=in_think, parse_tools=tools)
    assert out.content == content
    assert out.reasoning == reasoning
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == calls


@pytest.mark.parametrize("text", [
    "<think>\nstep one\nstep two\n</think>\n\nThe answer is 4.",
    "Sure.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"上海\"}}\n"
    "</tool_call>\n<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>",
    "a <thin b </thi c <tool d",
])
@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_streamed_split_matches_whole(text, size):
    """Fed in pieces of every size (tags cut anywhere), the parser gives the whole-text split."""
    whole = split_reply(text, parse_tools=True)
    parser = ReplyParser(parse_tools=True)
    content = reasoning = ""
    names = []
    for i in range(0, len(text), size):
        d = parser.feed(text[i:i + size])
        content, reasoning = content + d.content, reasoning + d.reasoning
        names += [c.name for c in d.tool_calls]
    d = parser.finish()
    content, reasoning = content + d.content, reasoning + d.reasoning
    names += [c.name for c in d.tool_calls]
    assert (content, reasoning, names) == (whole.content, whole.reasoning,
                                           [c.name for c in whole.tool_calls])
    assert "<think>" not in content + reasoning and "</think>" not in content + reasoning


def test_prompt_opens_think():
    assert prompt_opens_think("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_think(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # an earlier turn's open tag does not count, only the final turn
    assert not prompt_opens_think("<|im_start|>user\n<think><|im_end|>\n<|im_start|>assistant\n")
