"""POST /v1/completions: raw prompts (no chat template), as OpenAI's legacy endpoint and vLLM.

``prompt`` is a string, a list of strings, a list of token ids or a list of lists of ids; each
prompt is its own request through the scheduler, with ``n`` choices each (choice index
``prompt * n + j``). ``echo`` puts the prompt text in front of each choice's text; with
``logprobs: N`` it also scores the prompt (``Engine.prompt_logprobs``: the first token ``null``),
and ``max_tokens: 0`` scores the prompt alone — what lm-evaluation-harness's loglikelihood asks.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from ..params import StreamChunk, TokenLogprob
from .logprobs import TokenText, completion_logprobs
from .routes import (
    ServerState,
    _cut_short,
    _event_stream,
    _read_json,
    _rest,
    _sse,
    cancel_all,
    collect_all,
    first_chunks,
    log,
    merged,
)
from .schema import (
    APIError,
    CompletionRequest,
    choice,
    completion,
    completion_chunk,
    error_body,
    new_id,
    parse_completion_request,
    usage_body,
)
from .worker import Job

if TYPE_CHECKING:
    from fastapi import Request

    from ..engine import Engine

__all__ = ["completions"]


@dataclass
class _Prompt:
    """One prompt of a request: its ids, echo text and (echo + logprobs) prompt logprobs."""

    ids: list[int]
    echo: str
    scored: list[TokenLogprob | None] | None


def _prompt(engine: Engine, req: CompletionRequest, i: int) -> _Prompt:
    """Encode and check prompt ``i`` (runs off the event loop: scoring is a forward pass)."""
    prompt = req.prompts[i]
    param = "prompt" if len(req.prompts) == 1 else f"prompt[{i}]"
    try:
        ids = engine.encode(prompt)
    except ValueError as e:
        raise APIError(400, str(e), param="prompt") from e
    window = engine.config.max_position_embeddings
    if len(ids) >= window + (req.params.max_new_tokens == 0):
        raise APIError(400, f"{param} is {len(ids)} tokens, longer than the context window of "
                            f"{window} tokens; shorten the prompt", param="prompt",
                       code="context_length_exceeded")
    echo = ""
    scored = None
    if req.echo:
        echo = prompt if isinstance(prompt, str) else engine.tokenizer.decode(ids)
        if req.params.logprobs is not None:
            scored = engine.prompt_logprobs(ids, req.params.logprobs)
    return _Prompt(ids, echo, scored)


async def completions(state: ServerState, request: Request):
    """POST /v1/completions."""
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    engine = state.ready()
    req = parse_completion_request(await _read_json(request), defaults=state.defaults,
                                   window=engine.config.max_position_embeddings,
                                   max_tokens_cap=state.max_tokens_cap)
    model = state.check_model(req.model)
    prompts = [await run_in_threadpool(_prompt, engine, req, i) for i in range(len(req.prompts))]
    jobs: list[Job] = []
    try:
        for p in prompts:
            jobs += state.submit(p.ids, req.params, req.n)
    except BaseException:
        cancel_all(state, jobs)
        raise
    firsts = await first_chunks(state, jobs, request)
    of_choice = [prompts[i // req.n] for i in range(len(jobs))]
    names = state.token_text() if req.params.logprobs is not None else None
    n_prompt = sum(len(p.ids) for p in prompts)
    rid, created = new_id("cmpl"), int(time.time())
    if req.stream:
        events = _events([_rest(f, j) for f, j in zip(firsts, jobs)], jobs, of_choice, names,
                         rid, created, model, req.include_usage, n_prompt)
        return _event_stream(events, partial(cancel_all, state, jobs))
    choices, n_out = [], 0
    for i, (p, (text, final, logprobs)) in enumerate(
            zip(of_choice, await collect_all(state, jobs, request, firsts))):
        n_out += final.usage.completion_tokens
        lp = None if names is None else completion_logprobs(names, p.scored, p.ids, logprobs)
        choices.append(choice(i, final.finish_reason, lp, text=p.echo + text))
    return JSONResponse(completion(rid, created, model, None, None,
                                   usage_body(n_prompt, n_out), choices=choices))


async def _events(streams: list[AsyncIterator[StreamChunk]], jobs: list[Job],
                  prompts: list[_Prompt], names: TokenText | None, rid: str, created: int,
                  model: str, include_usage: bool, n_prompt: int) -> AsyncIterator[str]:
    chunk_of = partial(completion_chunk, rid, created, model, include_usage=include_usage)
    sent = [0] * len(jobs)  # characters so far per choice: the next text_offset

    def logprobs_of(i: int, generated: list[TokenLogprob], prompt: _Prompt | None = None
                    ) -> dict[str, Any] | None:
        if names is None:
            return None
        out = completion_logprobs(names, None if prompt is None else prompt.scored,
                                  [] if prompt is None else prompt.ids, generated, sent[i])
        sent[i] += sum(map(len, out["tokens"]))
        return out

    for i, p in enumerate(prompts):
        if p.echo:
            yield _sse(chunk_of(p.echo, index=i, logprobs=logprobs_of(i, [], p)))
    finished, n_out = set(), 0
    try:
        async for i, chunk in merged(streams):
            # every token gets an event, "" when it completes no character (as vLLM's)
            yield _sse(chunk_of(chunk.text, chunk.finish_reason, index=i,
                                logprobs=logprobs_of(i, chunk.logprobs or [])))
            if chunk.finish_reason is not None:
                finished.add(i)
                n_out += chunk.usage.completion_tokens
        if len(finished) < len(jobs):
            yield _cut_short(next(j for i, j in enumerate(jobs) if i not in finished))
        elif include_usage:
            yield _sse(completion_chunk(rid, created, model, None, include_usage=True,
                                        usage=usage_body(n_prompt, n_out)))
    except Exception as e:
        log.exception("generation failed")
        yield _sse(error_body(str(e), type="server_error"))
    yield "data: [DONE]\n\n"
