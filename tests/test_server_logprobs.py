"""Logprobs, echo, several prompts, n > 1, the tokenizer endpoints and /metrics over a real
socket, on a tiny random MiniMind-3 model. The oracle is stock transformers on the model's
``convert --to hf`` export: its float32 log-softmax, its greedy tokens, its tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from conftest import write_checkpoint  # noqa: E402
from server_helpers import MODEL  # noqa: E402

from converters import to_hf  # noqa: E402
from minimind_core import load  # noqa: E402

TOL = 1e-4
PROMPTS = ["hello world, how are you", "The quick brown fox"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("logprobs")
    path, _, _ = write_checkpoint(root, tokenizer_dir, "minimind3", 3, scale=0.2)
    return to_hf.convert(path, root / "hf", progress=False)


@pytest.fixture(scope="module")
def engine(hf_dir):
    return load(hf_dir, backend="torch", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def hf(hf_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(hf_dir)


def hf_logprobs(model, ids: list[int]) -> np.ndarray:
    """log-softmax over the vocabulary at every position, float32 [T, vocab]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1).numpy()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(int(hf_logprobs(model, out)[-1].argmax()))
    return out[len(ids):]


def chat_ids(tok, messages) -> list[int]:
    """The chat prompt as upstream builds it: the rendered template, encoded."""
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True,
                                              tokenize=False))


def top(row: np.ndarray, k: int) -> list[int]:
    return [int(i) for i in np.argsort(-row, kind="stable")[:k]]


def test_echo_scores_prompts_alone(client, hf):
    """max_tokens 0 + echo + logprobs on a list of id lists: lm-eval's loglikelihood request."""
    model, tok = hf
    prompts = [tok.encode(p) for p in PROMPTS]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=0, echo=True,
                                  logprobs=3, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.prompt_tokens == sum(map(len, prompts)) and r.usage.completion_tokens == 0
    for ids, c in zip(prompts, r.choices):
        lp = c.logprobs
        expected = hf_logprobs(model, ids)
        assert c.text == tok.decode(ids)
        assert lp.tokens == [tok.decode([t]) for t in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        want = [float(expected[i - 1, t]) for i, t in enumerate(ids) if i]
        np.testing.assert_allclose(lp.token_logprobs[1:], want, atol=TOL, rtol=0)
        for i in range(1, len(ids)):
            best = top(expected[i - 1], 3)
            wanted = {tok.decode([t]): float(expected[i - 1, t]) for t in best}
            wanted.setdefault(tok.decode([ids[i]]), float(expected[i - 1, ids[i]]))
            got = lp.top_logprobs[i]
            assert set(got) == set(wanted)
            np.testing.assert_allclose([got[k] for k in wanted], list(wanted.values()),
                                       atol=TOL, rtol=0)
        assert lp.text_offset == list(np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]))


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_of_generated_tokens(client, hf, stream):
    model, tok = hf
    ids = tok.encode(PROMPTS[0])
    greedy = hf_greedy(model, ids, 6)
    expected = hf_logprobs(model, ids + greedy)[len(ids) - 1:-1]
    kw = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=2)
    if stream:
        tokens, values, tops, text = [], [], [], ""
        for ev in client.completions.create(stream=True, **kw):
            for c in ev.choices:
                text += c.text
                if c.logprobs is not None:
                    tokens += c.logprobs.tokens
                    values += c.logprobs.token_logprobs
                    tops += c.logprobs.top_logprobs
    else:
        c = client.completions.create(**kw).choices[0]
        tokens, values, tops, text = (c.logprobs.tokens, c.logprobs.token_logprobs,
                                      c.logprobs.top_logprobs, c.text)
    n = len(tokens)
    assert n >= 1 and tokens == [tok.decode([t]) for t in greedy[:n]]
    stops = {tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    assert n == 6 or greedy[n - 1] in stops  # all six, or stopped at a stop token
    np.testing.assert_allclose(values, [expected[i, t] for i, t in enumerate(greedy[:n])],
                               atol=TOL, rtol=0)
    for i in range(n):
        assert set(tops[i]) >= {tok.decode([t]) for t in top(expected[i], 2)}
    assert text == tok.decode(greedy[:n], skip_special_tokens=True)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs(client, hf, stream):
    model, tok = hf
    messages = [{"role": "user", "content": "hello world"}]
    ids = chat_ids(tok, messages)
    greedy = hf_greedy(model, ids, 5)
    expected = hf_logprobs(model, ids + greedy)[len(ids) - 1:-1]
    kw = dict(model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True,
              top_logprobs=3)
    if stream:
        content = []
        for ev in client.chat.completions.create(stream=True, **kw):
            for c in ev.choices:
                if c.logprobs is not None and c.logprobs.content:
                    content += c.logprobs.content
    else:
        content = client.chat.completions.create(**kw).choices[0].logprobs.content
    assert 1 <= len(content) <= 5
    for i, entry in enumerate(content):
        assert entry.token == tok.decode([greedy[i]])
        assert abs(entry.logprob - expected[i, greedy[i]]) <= TOL
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        assert [t.token for t in entry.top_logprobs] == \
            [tok.decode([t]) for t in top(expected[i], 3)]
        np.testing.assert_allclose([t.logprob for t in entry.top_logprobs],
                                   [expected[i, t] for t in top(expected[i], 3)], atol=TOL,
                                   rtol=0)


def test_n_choices_share_a_prompt(client, hf):
    _, tok = hf
    kw = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=1.0, seed=7)
    many = client.completions.create(n=3, **kw)
    one = client.completions.create(**kw)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].text == one.choices[0].text  # choice 0 samples with the seed itself
    assert many.usage.prompt_tokens == len(tok.encode(PROMPTS[1]))
    assert many.usage.completion_tokens == sum(
        len(tok.encode(c.text)) + (c.finish_reason == "stop") for c in many.choices)
    assert len({c.text for c in many.choices}) > 1  # different seeds per choice
    chat = client.chat.completions.create(model=MODEL, n=2, max_tokens=4, temperature=0,
                                          messages=[{"role": "user", "content": "hi"}])
    assert len(chat.choices) == 2 and chat.choices[0].message.content == \
        chat.choices[1].message.content  # greedy: both the same
    events = list(client.chat.completions.create(
        model=MODEL, n=2, max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True}, messages=[{"role": "user", "content": "hi"}]))
    texts = ["", ""]
    for ev in events:
        for c in ev.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in chat.choices]
    assert events[-1].usage.completion_tokens == chat.usage.completion_tokens


@pytest.mark.parametrize("prefix", ["", "/v1"])
def test_tokenizer_endpoints(server, hf, prefix):
    _, tok = hf
    url = server.url + prefix
    text = "hello world, 你好"
    r = httpx.post(url + "/tokenize", json={"model": MODEL, "prompt": text,
                                            "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode(text) and r["count"] == len(r["tokens"])
    assert r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])
    assert r["max_model_len"] > 0
    messages = [{"role": "user", "content": "hi"}]
    r = httpx.post(url + "/tokenize", json={"messages": messages}).json()
    assert r["tokens"] == chat_ids(tok, messages)
    r = httpx.post(url + "/detokenize", json={"model": MODEL, "tokens": [1, 5, 77, 2]}).json()
    assert r == {"prompt": tok.decode([1, 5, 77, 2])}
    info = httpx.get(url + "/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["chat_template"] == tok.chat_template
    bad = httpx.post(url + "/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]
    assert httpx.post(url + "/tokenize", json={}).status_code == 400


def test_lm_eval_remote_tokenizer_probe(server):
    utils = pytest.importorskip("lm_eval.utils")
    assert utils.check_remote_tokenizer_support(server.url + "/v1/completions")


def _samples(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_metrics(server, client, hf):
    pytest.importorskip("prometheus_client")
    _, tok = hf
    before = _samples(httpx.get(server.url + "/metrics").text)
    prompt = "1 + 2 = 3, 10 + 20 = 30 and the quick brown fox"
    outs = [client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0)
            for _ in range(2)]
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = _samples(r.text)

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    generated = sum(o.usage.completion_tokens for o in outs)
    n_prompt = len(tok.encode(prompt))
    assert grew("minimind:generation_tokens_total") == generated
    assert grew("minimind:prompt_tokens_total") == 2 * n_prompt
    assert grew("minimind:time_to_first_token_seconds_count") == 2
    assert grew("minimind:inter_token_latency_seconds_count") == generated - 2
    assert grew("minimind:prefix_cache_hits_total") >= n_prompt - 1  # the 2nd reuses the 1st
    assert after["minimind:num_requests_running"] == 0
    assert 0 < after["minimind:prefix_cache_hit_rate"] <= 1
    health = httpx.get(server.url + "/health").json()
    assert health["running"] == 0 and health["waiting"] == 0
    json.dumps(health)
