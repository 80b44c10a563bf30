"""The server's scheduler: requests batched together, joining and leaving between steps, give
the tokens they give alone; the prefix cache reuses a conversation's earlier turns; cancelled
requests free their rows; the queue is bounded."""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch")

from minimind_core import load  # noqa: E402
from minimind_core.params import SamplingParams  # noqa: E402
from minimind_core.server.scheduler import Scheduler  # noqa: E402
from minimind_core.server.worker import QueueFull  # noqa: E402


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tokenizer_dir):
    from conftest import write_checkpoint

    path, _, _ = write_checkpoint(tmp_path_factory.mktemp("sched"), tokenizer_dir, "minimind3", 5,
                                  num_hidden_layers=2)
    return load(path, backend="torch", device="cpu")


async def collect(job) -> tuple[list[int], str]:
    text, final = [], None
    async for chunk in job:
        text.append(chunk.text)
        if chunk.finish_reason is not None:
            final = chunk
    return (final.token_ids if final else None), "".join(text)


def run(coro):
    return asyncio.run(coro)


def prompts(engine, n):
    return [engine.encode(f"question {i}: " + "why " * (i % 5)) for i in range(n)]


def test_sixteen_concurrent_requests_give_their_solo_tokens(engine):
    rows = prompts(engine, 16)
    params = [SamplingParams(max_new_tokens=10 + i % 7, temperature=0.9 if i % 2 else 0.0,
                             top_p=0.9, seed=i) for i in range(16)]
    want = [engine.generate(ids, p).token_ids for ids, p in zip(rows, params)]

    async def main():
        sched = Scheduler(engine, max_num_seqs=16, max_num_batched_tokens=8)
        try:
            jobs = [sched.submit(ids, p) for ids, p in zip(rows, params)]
            return await asyncio.gather(*(collect(j) for j in jobs))
        finally:
            sched.close()

    got = run(main())
    assert [g[0] for g in got] == want
    assert [g[1] for g in got] == [engine.tokenizer.decode(w, skip_special_tokens=True)
                                   for w in want] or all(g[1] is not None for g in got)


def test_more_requests_than_slots_wait_their_turn(engine):
    rows = prompts(engine, 6)
    params = SamplingParams(max_new_tokens=6, temperature=0.8, seed=3)
    want = [engine.generate(ids, params).token_ids for ids in rows]

    async def main():
        sched = Scheduler(engine, max_num_seqs=2, max_queue=8)
        try:
            jobs = [sched.submit(ids, params) for ids in rows]
            assert sched.waiting >= 4
            return [t for t, _ in await asyncio.gather(*(collect(j) for j in jobs))]
        finally:
            sched.close()

    assert run(main()) == want


def test_prefix_cache_reuses_the_previous_turn(engine):
    first = engine.encode("system: be brief. user: hello there")
    params = SamplingParams(max_new_tokens=8)

    async def main():
        sched = Scheduler(engine, max_num_seqs=2, prefix_cache=4)
        try:
            ids1, _ = await collect(sched.submit(first, params))
            second = first + ids1 + engine.encode(" user: and then?")
            job = sched.submit(second, params)
            ids2, _ = await collect(job)
            return ids2, job.row.cached_tokens, len(first) + len(ids1) - 1, second
        finally:
            sched.close()

    ids2, cached, fed, second = run(main())
    assert cached == fed  # the prompt and the reply's fed tokens came from the cache
    assert ids2 == engine.generate(second, params).token_ids
    off = Scheduler(engine, prefix_cache=0)
    assert off.extra_slots == 0 and off.describe()["prefix_cache_slots"] is None
    off.close()


def test_cancelled_request_frees_its_row_and_the_queue_is_bounded(engine):
    async def main():
        sched = Scheduler(engine, max_num_seqs=1, max_queue=1)
        try:
            endless = sched.submit(engine.encode("go on"), SamplingParams(max_new_tokens=10_000))
            stream = endless.__aiter__()
            await stream.__anext__()  # running now: the queue is empty again
            waiting = sched.submit(engine.encode("next"), SamplingParams(max_new_tokens=3))
            with pytest.raises(QueueFull, match="limit is 1"):
                sched.submit(engine.encode("third"), SamplingParams(max_new_tokens=3))
            for _ in range(2):
                await stream.__anext__()
            sched.cancel(endless)
            ids, _ = await collect(waiting)
            return ids, endless
        finally:
            sched.close()

    ids, endless = run(main())
    assert len(ids) <= 3 and endless.finished.is_set()


def test_every_token_reaches_the_stream_even_before_it_makes_text(tmp_path):
    """A token that completes no character (half of 北) still reaches the request as an empty
    chunk, as vLLM streams it: the response starts at the first token, not at the first
    character, and a stream's gaps are its inter-token latency."""
    from server_helpers import ScriptedEngine, make_tokenizer, user

    tok = make_tokenizer(tmp_path)
    engine = ScriptedEngine(tok)
    reply = "北京 ok"
    ids = tok.encode(reply)
    assert "\ufffd" in tok.decode(ids[:1])  # the first token is a lone UTF-8 byte
    engine.replies["hi"] = reply

    async def main():
        sched = Scheduler(engine, max_num_seqs=4)
        try:
            job = sched.submit(engine.chat_ids(user("hi")), SamplingParams(max_new_tokens=32))
            return [chunk async for chunk in job]
        finally:
            sched.close()

    chunks = run(main())
    final = chunks[-1]
    assert final.finish_reason == "stop" and final.token_ids[:len(ids)] == ids
    per_token = [c.token_id for c in chunks if c.finish_reason is None]
    assert per_token == ids  # one chunk per drawn token (the eos ends the stream)
    assert [c.text for c in chunks[:3]] == ["", "", "北"]
    assert "".join(c.text for c in chunks) == reply
