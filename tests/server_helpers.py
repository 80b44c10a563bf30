"""Shared by the server and web-page tests: a scripted Engine and a uvicorn server in a thread.

``ScriptedEngine`` is a real ``Engine`` — prompts go through the real chat template and
tokenizer, and replies through the shared token loop (TextAssembler, stop strings, usage) —
whose "model" plays back a scripted reply, token by token, chosen by the last user message.
So the tests can ask for replies a random tiny model could never write (``<think>`` blocks,
``<tool_call>`` JSON) and still exercise every layer between the socket and the token loop.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
from conftest import CHATML, build_tokenizer, tiny_config

from minimind_core.engine import Engine
from minimind_core.slots import Slots
from minimind_core.tokenizer import Tokenizer

# ChatML plus the two template features the server relies on: tool definitions and
# MiniMind-3's `open_thinking` (the prompt then ends inside an open <think> block).
TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n{% for t in tools %}"
    "{{ t.function.name }}\n{% endfor %}<|im_end|>\n{% endif %}"
    + CHATML
    + "{% if add_generation_prompt and open_thinking is defined and open_thinking %}"
      "{{ '<think>\\n' }}{% endif %}"
)

ENDLESS = object()  # a reply that never ends (only max_tokens or a cancel stops it)

MODEL = "minimind-test"
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def chatml_prompt(text: str) -> str:
    """The prompt the test template renders for one user message, written out by hand."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def make_tokenizer(folder: Path) -> Tokenizer:
    return Tokenizer.from_folder(build_tokenizer(folder, chat_template=TEMPLATE))


def last_user_text(prompt: str) -> str:
    """The content of the last ChatML user message, or the whole prompt for raw completions."""
    start = prompt.rfind("<|im_start|>user\n")
    if start < 0:
        return prompt
    start += len("<|im_start|>user\n")
    return prompt[start:prompt.find("<|im_end|>", start)]


class ScriptedEngine(Engine):
    """An Engine whose next tokens come from ``replies[last user text]`` (default: an echo).

    Every generation is recorded in ``generations`` as ``{"prompt": text, "tokens": n}``, where
    n counts the tokens the token loop actually asked for — the test's measure of wasted work.
    ``delay`` seconds pass before each token, like a slow model.
    """

    backend = "scripted"

    def __init__(self, tokenizer: Tokenizer, *, window: int = 4096, delay: float = 0.0) -> None:
        config = tiny_config("minimind3", max_position_embeddings=window,
                             vocab_size=max(512, len(tokenizer)))
        super().__init__(config, tokenizer, name="scripted-minimind")
        self.replies: dict[str, object] = {}
        self.delay = delay
        self.generations: list[dict] = []

    def generation_for(self, user_text: str) -> dict:
        """The one recorded generation whose last user message was ``user_text``."""
        (record,) = [g for g in self.generations if last_user_text(g["prompt"]) == user_text]
        return record

    def reply_for(self, prompt_text: str) -> object:
        user = last_user_text(prompt_text)
        return self.replies.get(user, f"echo: {user}")

    def _new_cache(self, slots, max_len):
        # what each slot holds (prefix reuse, chunks); kept when the cache grows, slot for slot
        self.scripts: dict[int, tuple] = getattr(self, "scripts", {})
        self.slot_ids: dict[int, list[int]] = getattr(self, "slot_ids", {})
        return Slots(slots, max_len)

    def _copy_cache(self, src, dst):  # no keys to copy: the scripts live in self.slot_ids
        pass

    def _prefill(self, cache, slot, ids):
        eos = self.tokenizer.eos_token_id
        start = int(cache.lengths[slot])  # > 0: a cached prefix or an earlier chunk
        full = self.slot_ids.get(slot, [])[:start] + list(ids)
        self.slot_ids[slot] = full
        cache.lengths[slot] = len(full)
        text = self.tokenizer.decode(full, skip_special_tokens=False)
        reply = self.reply_for(text)
        record = {"prompt": text, "tokens": 0}
        if start and self.generations and self.generations[-1].get("slot") == slot \
                and not self.generations[-1]["tokens"]:
            self.generations[-1] = record  # the same prompt, one more chunk in
        else:
            self.generations.append(record)
        record["slot"] = slot
        self.scripts[slot] = (self._script(reply, eos), record)
        return self._next(slot)

    def _script(self, reply, eos):
        if reply is ENDLESS:
            return itertools.cycle(self.tokenizer.encode(" la"))
        return itertools.chain(self.tokenizer.encode(reply), itertools.repeat(eos))

    def _copy_prefix(self, cache, src, dst, n):
        # a fork (n > 1): the twin plays the same script, its first token already drawn
        self.slot_ids[dst] = list(self.slot_ids[src][:n])
        text = self.tokenizer.decode(self.slot_ids[dst], skip_special_tokens=False)
        record = {"prompt": text, "tokens": 1, "slot": dst}
        self.generations.append(record)
        script = self._script(self.reply_for(text), self.tokenizer.eos_token_id)
        next(script)
        self.scripts[dst] = (script, record)

    def _next(self, slot):
        if self.delay:
            time.sleep(self.delay)
        script, record = self.scripts[slot]
        record["tokens"] += 1
        logits = np.zeros(self.config.vocab_size, np.float32)
        logits[next(script)] = 1.0
        return logits

    def _decode_step(self, cache, slots, tokens):
        cache.lengths[slots] += 1
        for slot, token in zip(slots.tolist(), tokens.tolist()):
            self.slot_ids[slot].append(token)
        return np.stack([self._next(s) for s in slots])

    def _sample(self, logits, rows):  # the script's token, whatever the sampling parameters
        return np.asarray(logits).argmax(axis=-1)

    def _logits(self, ids):  # pragma: no cover
        raise NotImplementedError


def assert_error(r, status: int, code: str | None, words: str = "", param: str | None = None,
                 kind: str | None = None) -> dict:
    """The response is exactly OpenAI's error shape with this status, code and param."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error = body["error"]
    assert error["type"] == (kind or ("invalid_request_error" if status < 500
                                      else "server_error"))
    assert error["code"] == code and error["param"] == param
    assert words in error["message"]
    return error


def ServerThread(app, shutdown_timeout: float = 2.0):  # noqa: N802 (kept: reads like a class)
    """``with ServerThread(app) as s:`` — the library's BackgroundServer on 127.0.0.1."""
    from minimind_core.server import BackgroundServer

    return BackgroundServer(app, shutdown_timeout=shutdown_timeout)


def raw_http(url: str, request: bytes, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """Send ``request`` (bytes, as written) to the server at ``url`` and read the whole answer
    until the server closes or the body ends: (status, lower-cased headers, body). For what
    HTTP clients will not send: lying lengths, unfinished chunked bodies, odd Host headers."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            if not more:
                break
            data += more
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = dict((k.strip().lower(), v.strip()) for k, _, v in
                       (line.partition(":") for line in lines[1:]))
        length = int(headers.get("content-length", -1))
        while length < 0 or len(body) < length:
            more = sock.recv(65536)
            if not more:
                break
            body += more
    return status, headers, body


def main(argv: list[str] | None = None) -> None:
    """``python tests/server_helpers.py PORT SHUTDOWN_TIMEOUT``: serve a ScriptedEngine (10 ms a
    token; "endless" never ends, "slow" is 40 words; one request at a time) with the library's
    own ``serve``, so a test can send it real signals."""
    import sys
    import tempfile

    from minimind_core.server import create_app, serve

    port, shutdown_timeout = int((argv or sys.argv)[1]), float((argv or sys.argv)[2])
    with tempfile.TemporaryDirectory() as folder:
        engine = ScriptedEngine(make_tokenizer(Path(folder) / "model"), delay=0.01)
        engine.replies.update({"endless": ENDLESS, "slow": "word " * 40})
        # one request at a time, so the others queue (what the shutdown tests look at)
        serve(create_app(engine, model_name=MODEL, max_num_seqs=1), port=port,
              log_level="warning", shutdown_timeout=shutdown_timeout)


if __name__ == "__main__":
    main()
