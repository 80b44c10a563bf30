"""The OpenAI wire format: request parsing with OpenAI-shaped errors, and response bodies.

Requests are checked by hand rather than with pydantic models so that every error names the
parameter and says what to send instead, in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``. Statuses: 400 for a bad value, a missing
parameter, malformed JSON or a prompt longer than the context (``context_length_exceeded``),
422 for a value of the wrong JSON type, 401/404/413/415/503 for their usual meanings.
Unknown fields are ignored, as OpenAI-compatible servers do, unless ignoring them would silently
change the answer (JSON ``response_format``, a forced ``tool_choice``, ``best_of``).

Bodies are strict JSON: NaN and Infinity (which Python's ``json`` accepts), numbers too large
for a float, lone UTF-16 surrogates and nesting deeper than ``MAX_JSON_DEPTH`` are a 400, so no
later step (the tokenizer, a template's ``tojson``) can fail on them.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..chat import ROLES, validate_messages
from ..params import SamplingParams

__all__ = ["GREEDY_BELOW", "MAX_JSON_DEPTH", "APIError", "ChatRequest", "CompletionRequest",
           "chat_chunk", "choice", "chat_completion", "completion", "completion_chunk", "error_body",
           "model_card", "new_id", "parse_chat_request", "parse_completion_request",
           "parse_json_body", "usage_body"]

MAX_LOGPROBS = 20  # vLLM's default max_logprobs (OpenAI's legacy completions stop at 5)
MAX_N = 64  # choices per request; the scheduler's --max-num-seqs is the real bound
MAX_JSON_DEPTH = 64  # objects/arrays inside each other; tool schemas need a handful
GREEDY_BELOW = 1e-5  # a smaller temperature is greedy (as vLLM): dividing by it overflows
SEED_RANGE = (-2**63, 2**63)  # int64, as vLLM; mapped onto uint64 for the samplers


class APIError(Exception):
    """An error answered to the client in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- the JSON body ---------------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON; send finite numbers")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large for a 64-bit float")
    return value


def _invalid_json(message: str) -> APIError:
    return APIError(400, message, code="invalid_json")


def _check_tree(body: Any) -> None:
    """Depth and text checks over the parsed body, without recursion."""
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as e:
                    bad = value[e.start]
                    raise _invalid_json(
                        f"the JSON body contains a lone surrogate (\\u{ord(bad):04x}), which is "
                        "not text; send the character itself or a complete surrogate pair") from e
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise _invalid_json(f"the JSON body is nested more than {MAX_JSON_DEPTH} levels "
                                "deep; flatten it")
        if isinstance(value, dict):
            for key, item in value.items():
                stack.append((key, depth))
                stack.append((item, depth + 1))
        else:
            stack.extend((item, depth + 1) for item in value)


def parse_json_body(raw: bytes) -> Any:
    """The parsed request body; raises APIError (400) for anything but strict JSON text."""
    if not raw.strip():
        raise APIError(400, "the request body is empty; send a JSON object", code="invalid_body")
    try:
        body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise _invalid_json(f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep; "
                            "flatten it") from None
    except ValueError as e:  # also UnicodeDecodeError: the bytes are not UTF-8
        raise _invalid_json(f"could not parse the JSON body: {e}") from e
    _check_tree(body)
    return body


# -- field readers ---------------------------------------------------------------------------

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               dict: "an object", list: "an array"}


def _wrong_type(name: str, want: str, value: Any) -> APIError:
    return APIError(422, f"'{name}' must be {want}, got {type(value).__name__} {value!r:.60}",
                    param=name, code="invalid_type")


def _get(body: dict, name: str, kind: type, default: Any = None) -> Any:
    """body[name] checked against a JSON type (null = default); ints count as numbers."""
    value = body.get(name)
    if value is None:
        return default
    if kind in (int, float) and isinstance(value, bool):
        raise _wrong_type(name, _TYPE_NAMES[kind], value)
    if kind is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, kind):
        raise _wrong_type(name, _TYPE_NAMES[kind], value)
    return value


def _bad(name: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=name, code=code)


def _max_tokens(body: dict, default: int, cap: int | None, window: int, least: int = 1) -> int:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    value = _get(body, name, int)
    if value is None:
        return default
    if value < least:
        hint = " (0 scores the prompt alone, with echo: true on /v1/completions)" \
            if value == 0 else ""
        raise _bad(name, f"'{name}' must be at least {least}, got {value}{hint}")
    if cap is not None and value > cap:
        raise _bad(name, f"'{name}' is {value}, more than this server allows ({cap}); "
                         f"ask for at most {cap} tokens")
    if value >= window:
        raise _bad(name, f"'{name}' is {value}, but the model's context window is {window} "
                         "tokens (prompt included); ask for fewer tokens")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _wrong_type("stop", "a string or an array of strings", stop)
    if any(not s for s in stop):
        raise _bad("stop", "'stop' strings must not be empty")
    return tuple(stop)


def _n(body: dict) -> int:
    n = _get(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise _bad("n", f"'n' must be from 1 to {MAX_N}, got {n}")
    return n


def _top(body: dict, name: str) -> int | None:
    value = _get(body, name, int)
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise _bad(name, f"'{name}' must be from 0 to {MAX_LOGPROBS}, got {value}")
    return value


def _chat_logprobs(body: dict) -> int | None:
    """Chat's ``logprobs: true`` + ``top_logprobs: N`` as the core's ``logprobs`` (None = off)."""
    want = _get(body, "logprobs", bool, False)
    top = _top(body, "top_logprobs")
    if top is not None and not want:
        raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    return (top or 0) if want else None


def _sampling(body: dict, defaults: SamplingParams, cap: int | None, window: int, *,
              logprobs: int | None = None, least: int = 1) -> SamplingParams:
    values = {
        "logprobs": logprobs,
        "max_new_tokens": _max_tokens(body, defaults.max_new_tokens, cap, window, least),
        "temperature": _get(body, "temperature", float),
        "top_p": _get(body, "top_p", float),
        "top_k": _get(body, "top_k", int),
        "min_p": _get(body, "min_p", float),
        "repetition_penalty": _get(body, "repetition_penalty", float),
        "stop": _stop(body) or defaults.stop,
        "seed": _get(body, "seed", int),
    }
    temperature = values["temperature"]
    if temperature is not None and not 0 <= temperature <= 2:
        raise _bad("temperature", f"'temperature' must be between 0 and 2, got {temperature}")
    if temperature is not None and temperature < GREEDY_BELOW:
        values["temperature"] = 0.0
    seed = values["seed"]
    if seed is not None:
        if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
            raise _bad("seed", f"'seed' must be a 64-bit integer (from -2**63 to 2**63-1), "
                               f"got {seed}")
        values["seed"] = seed % 2**64  # numpy, torch and MLX all take seeds in [0, 2**64)
    if values["top_p"] == 0:  # OpenAI accepts 0 and means "only the most likely token"
        values["top_p"], values["temperature"] = None, 0.0
    try:
        return SamplingParams.from_kwargs(defaults, **values)
    except ValueError as e:  # messages start with the field's name
        message = str(e)
        raise _bad(message.split()[0], message) from e


# -- requests --------------------------------------------------------------------------------


@dataclass
class ChatRequest:
    """A checked POST /v1/chat/completions body."""

    model: str | None
    messages: list[dict[str, Any]]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    tools: list[dict[str, Any]] | None = None
    parse_tools: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    n: int = 1


@dataclass
class CompletionRequest:
    """A checked POST /v1/completions body; each prompt is text or token ids (one choice per
    prompt, times ``n``); ``params.logprobs`` is the request's ``logprobs``."""

    model: str | None
    prompts: list[str | list[int]]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    n: int = 1


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got "
                            f"{type(body).__name__}", code="invalid_body")
    return body


def _common(body: dict) -> tuple[str | None, bool, bool]:
    model = _get(body, "model", str)
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, {})
    include_usage = _get(options, "include_usage", bool, False)
    return model, stream, include_usage


def _messages(body: dict) -> list[dict[str, Any]]:
    if "messages" not in body or body["messages"] is None:
        raise APIError(400, "Missing required parameter: 'messages' (a list of "
                            "{'role': ..., 'content': ...} objects)", param="messages",
                       code="missing_required_parameter")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise _wrong_type("messages", "an array of message objects", messages)
    if not messages:
        raise _bad("messages", "'messages' is empty; send at least one message")
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") is not None and m["role"] not in ROLES:
            raise _bad(f"messages[{i}].role", f"messages[{i}] has unknown role {m['role']!r}; "
                                              f"expected one of {', '.join(ROLES)}")
    try:
        return validate_messages(messages)
    except ValueError as e:
        raise _bad("messages", str(e)) from e


def _tools(body: dict) -> tuple[list[dict] | None, bool]:
    tools = _get(body, "tools", list)
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("auto", "none"):
        raise _bad("tool_choice", f"tool_choice {choice!r} is not supported; use 'auto' or "
                                  "'none' (the model decides whether to call a tool)")
    if not tools:
        return None, False
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad(f"tools[{i}]", f"tools[{i}] must look like {{'type': 'function', "
                                      "'function': {'name': ..., 'parameters': {...}}}")
        if tool.get("type", "function") != "function":
            raise _bad(f"tools[{i}].type", f"tools[{i}] has type {tool['type']!r}; only "
                                           "'function' tools are supported")
    return tools, choice != "none"


def parse_chat_request(body: Any, *, defaults: SamplingParams, window: int,
                       max_tokens_cap: int | None = None) -> ChatRequest:
    """Check a chat completion body; raises APIError naming the bad parameter."""
    body = _object(body)
    model, stream, include_usage = _common(body)
    messages = _messages(body)
    fmt = _get(body, "response_format", dict, {})
    if fmt.get("type", "text") != "text":
        raise _bad("response_format", f"response_format {fmt.get('type')!r} is not supported; "
                                      "only 'text'")
    tools, parse_tools = _tools(body)
    template_kwargs = dict(_get(body, "chat_template_kwargs", dict, {}))
    return ChatRequest(model=model, messages=messages,
                       params=_sampling(body, defaults, max_tokens_cap, window,
                                        logprobs=_chat_logprobs(body)),
                       stream=stream, include_usage=include_usage, tools=tools,
                       parse_tools=parse_tools, template_kwargs=template_kwargs, n=_n(body))


def parse_completion_request(body: Any, *, defaults: SamplingParams, window: int,
                             max_tokens_cap: int | None = None) -> CompletionRequest:
    """Check a (legacy) completion body; one prompt, as text or token ids."""
    body = _object(body)
    model, stream, include_usage = _common(body)
    if "prompt" not in body or body["prompt"] is None:
        raise APIError(400, "Missing required parameter: 'prompt'", param="prompt",
                       code="missing_required_parameter")
    prompts = _prompts(body["prompt"])
    if _get(body, "best_of", int, 1) != 1:
        raise _bad("best_of", "best_of > 1 is not supported; use n for several choices")
    echo = _get(body, "echo", bool, False)
    params = _sampling(body, defaults, max_tokens_cap, window, logprobs=_top(body, "logprobs"),
                       least=0 if echo else 1)
    return CompletionRequest(model=model, prompts=prompts, params=params, stream=stream,
                             include_usage=include_usage, echo=echo, n=_n(body))


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def _prompts(prompt: Any) -> list[str | list[int]]:
    """``prompt`` as OpenAI takes it: a string, a list of strings, a list of token ids or a list
    of lists of ids; one entry per prompt."""
    if isinstance(prompt, str) or _is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or _is_ids(p) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt:
        raise _bad("prompt", "'prompt' must be a string, a list of strings, a list of token ids "
                             "or a list of lists of token ids (not a mix, no empty lists)")
    elif isinstance(prompt, list):
        prompts = [""]
    else:
        raise _wrong_type("prompt", "a string or an array of token ids", prompt)
    for i, p in enumerate(prompts):
        if not p:
            where = "'prompt'" if len(prompts) == 1 else f"prompt[{i}]"
            raise _bad("prompt", f"{where} is empty; give some text or token ids")
    return prompts


# -- responses -------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(index: int, finish_reason: str | None, logprobs: dict[str, Any] | None = None,
           **content: Any) -> dict[str, Any]:
    """One entry of ``choices`` (``content``: ``message=``, ``delta=`` or ``text=``)."""
    return {"index": index, **content, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_completion(id: str, created: int, model: str, message: dict[str, Any] | None,
                    finish_reason: str | None, usage: dict[str, int], *,
                    choices: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A ``chat.completion``: one choice from ``message``, or the ``choices`` given."""
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": choices if choices is not None else [
                choice(0, finish_reason, message=message)],
            "usage": usage}


def _chunk(obj: str, id: str, created: int, model: str, content: dict[str, Any] | None,
           finish_reason: str | None, include_usage: bool, usage: dict[str, int] | None,
           index: int = 0, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    choices = [] if content is None else [choice(index, finish_reason, logprobs, **content)]
    out = {"id": id, "object": obj, "created": created, "model": model,
           "system_fingerprint": None, "choices": choices}
    if include_usage:
        out["usage"] = usage
    return out


def chat_chunk(id: str, created: int, model: str, delta: dict[str, Any] | None,
               finish_reason: str | None = None, *, include_usage: bool = False,
               usage: dict[str, int] | None = None, index: int = 0,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``delta=None`` gives the usage-only last chunk."""
    return _chunk("chat.completion.chunk", id, created, model,
                  None if delta is None else {"delta": delta}, finish_reason, include_usage, usage,
                  index, logprobs)


def completion(id: str, created: int, model: str, text: str | None, finish_reason: str | None,
               usage: dict[str, int], *,
               choices: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A ``text_completion``: one choice from ``text``, or the ``choices`` given."""
    return {"id": id, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": choices if choices is not None else [
                choice(0, finish_reason, text=text)],
            "usage": usage}


def completion_chunk(id: str, created: int, model: str, text: str | None,
                     finish_reason: str | None = None, *, include_usage: bool = False,
                     usage: dict[str, int] | None = None, index: int = 0,
                     logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed ``text_completion``; ``text=None`` gives the usage-only last chunk."""
    return _chunk("text_completion", id, created, model,
                  None if text is None else {"text": text}, finish_reason, include_usage, usage,
                  index, logprobs)


def model_card(id: str, *, created: int | None = None, owned_by: str = "minimind-core",
               **extra: Any) -> dict[str, Any]:
    return {"id": id, "object": "model", "created": int(created or time.time()),
            "owned_by": owned_by, **extra}
