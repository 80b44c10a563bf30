"""The tokenizer endpoints, in vLLM's shapes (its ``serving_tokenization``), also under /v1:

- ``POST /tokenize`` ``{model, prompt, add_special_tokens=true}`` or ``{model, messages,
  add_generation_prompt=true, add_special_tokens=false, tools, chat_template_kwargs}`` ->
  ``{count, max_model_len, tokens, token_strs}`` (``token_strs`` with ``return_token_strs``);
- ``POST /detokenize`` ``{model, tokens}`` -> ``{prompt}`` (special tokens kept);
- ``GET /tokenizer_info`` -> the tokenizer's config, with ``eos_token``, ``bos_token`` and
  ``pad_token`` as strings and the chat template (lm-eval's remote tokenizer reads these).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .routes import ServerState, _read_json
from .schema import APIError, _bad, _get, _messages, _object, _wrong_type

if TYPE_CHECKING:
    from fastapi import Request

__all__ = ["detokenize", "tokenize", "tokenizer_info"]


def _tokenize(state: ServerState, body: dict) -> dict[str, Any]:
    engine = state.ready()
    state.check_model(_get(body, "model", str))
    if "messages" in body and body["messages"] is not None:
        messages = _messages(body)
        kwargs = dict(_get(body, "chat_template_kwargs", dict, {}))
        try:
            text = engine.formatter.render(
                messages, add_generation_prompt=_get(body, "add_generation_prompt", bool, True),
                tools=_get(body, "tools", list), **kwargs)
        except (TypeError, ValueError) as e:
            raise _bad("messages", f"could not render the chat template: {e}") from e
        special = _get(body, "add_special_tokens", bool, False)
    elif "prompt" in body and body["prompt"] is not None:
        text = body["prompt"]
        if not isinstance(text, str):
            raise _wrong_type("prompt", "a string", text)
        special = _get(body, "add_special_tokens", bool, True)
    else:
        raise APIError(400, "Missing required parameter: 'prompt' (text) or 'messages' (a "
                            "chat)", param="prompt", code="missing_required_parameter")
    tokens = engine.tokenizer.encode(text, add_special_tokens=special)
    strs = [engine.tokenizer.id_to_token(t) for t in tokens] \
        if _get(body, "return_token_strs", bool, False) else None
    return {"count": len(tokens), "max_model_len": engine.config.max_position_embeddings,
            "tokens": tokens, "token_strs": strs}


def _detokenize(state: ServerState, body: dict) -> dict[str, Any]:
    engine = state.ready()
    state.check_model(_get(body, "model", str))
    if "tokens" not in body or body["tokens"] is None:
        raise APIError(400, "Missing required parameter: 'tokens' (a list of token ids)",
                       param="tokens", code="missing_required_parameter")
    tokens = body["tokens"]
    if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise _wrong_type("tokens", "an array of token ids", tokens)
    vocab = len(engine.tokenizer)
    bad = next((t for t in tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise _bad("tokens", f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
    return {"prompt": engine.tokenizer.decode(tokens, skip_special_tokens=False)}


async def tokenize(state: ServerState, request: Request) -> dict[str, Any]:
    """POST /tokenize and /v1/tokenize."""
    from fastapi.concurrency import run_in_threadpool

    body = _object(await _read_json(request))
    return await run_in_threadpool(_tokenize, state, body)


async def detokenize(state: ServerState, request: Request) -> dict[str, Any]:
    """POST /detokenize and /v1/detokenize."""
    body = _object(await _read_json(request))
    return _detokenize(state, body)


def _plain(value: Any) -> Any:
    """A config value as JSON (AddedToken-style dicts become their text)."""
    if isinstance(value, dict) and "content" in value and len(value) > 1:
        return value["content"]
    return value


def tokenizer_info(state: ServerState) -> dict[str, Any]:
    """GET /tokenizer_info and /v1/tokenizer_info."""
    engine = state.ready()
    tok = engine.tokenizer
    info = {k: _plain(v) for k, v in tok.config.items()
            if k not in ("added_tokens_decoder", "chat_template")}
    info.update({"tokenizer_class": info.get("tokenizer_class", "PreTrainedTokenizerFast"),
                 "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                 "pad_token": tok.pad_token, "chat_template": tok.chat_template,
                 "model_max_length": engine.config.max_position_embeddings,
                 "vocab_size": len(tok)})
    return info
