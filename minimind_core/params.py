"""Validated parameter and result dataclasses shared by every backend, the CLI and the server."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from .notes import note_once

# What transformers' generate(do_sample=True) samples with when not told otherwise.
TRANSFORMERS_SAMPLING = {"temperature": 1.0, "top_k": 50}


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. Names follow transformers (``max_new_tokens``; the OpenAI /
    mlx-lm name ``max_tokens`` is accepted by ``from_kwargs``).

    temperature 0 means greedy. top_p 1.0, top_k 0, min_p 0.0 and repetition_penalty 1.0
    each switch their filter off. ``repetition_context_size`` is how many of the most recent
    tokens (prompt included) the repetition penalty looks at; None means all of them.
    """

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context_size: int | None = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: off; N >= 0: each token's logprob and the N likeliest

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and not isinstance(value, bool),
                   f"{name} must be a number, got {value!r}")
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0,
               f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        _check(self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0,
               f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        _check(0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p!r}")
        _check(self.repetition_penalty > 0,
               f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty!r}")
        _check(self.repetition_context_size is None or self.repetition_context_size > 0,
               f"repetition_context_size must be > 0 or None, got {self.repetition_context_size!r}")
        _check(self.logprobs is None or (isinstance(self.logprobs, int)
                                         and not isinstance(self.logprobs, bool)
                                         and 0 <= self.logprobs <= 20),
               f"logprobs must be an integer from 0 to 20 (or None = off), got {self.logprobs!r}")
        _check(all(isinstance(s, str) and s for s in self.stop),
               f"stop must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_kwargs(cls, base: SamplingParams | None = None, **kwargs) -> SamplingParams:
        """Build from keyword arguments, ignoring None values; unknown names raise ValueError.

        transformers' ``generate`` switches are accepted as upstream's code passes them:
        ``do_sample=False`` means greedy (temperature 0, as transformers ignores temperature
        then); ``do_sample=True`` samples with transformers' defaults for what is not given
        (temperature 1.0, top_k 50). ``use_cache`` changes nothing: the KV cache is always used.
        """
        names = {f.name for f in fields(cls)}
        aliases = {"max_tokens": "max_new_tokens"}
        do_sample = kwargs.pop("do_sample", None)
        use_cache = kwargs.pop("use_cache", None)
        if use_cache is not None and not use_cache:
            note_once("use_cache=False changes nothing: generation always uses the KV cache")
        clean = {}
        for key, value in kwargs.items():
            key = aliases.get(key, key)
            if key not in names:
                raise ValueError(f"unknown sampling parameter {key!r}; choose from {sorted(names)}")
            if value is not None:
                clean[key] = value
        params = replace(base or cls(), **clean)
        if do_sample is not None and not do_sample:
            return replace(params, temperature=0.0)
        if do_sample:
            if params.temperature == 0 and "temperature" not in clean:
                params = replace(params, temperature=TRANSFORMERS_SAMPLING["temperature"])
            if params.top_k == 0 and "top_k" not in clean:
                params = replace(params, top_k=TRANSFORMERS_SAMPLING["top_k"])
        return params


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)



@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class StreamChunk:
    """One piece of a streamed generation.

    ``text`` is the newly decodable text (never half a UTF-8 character), ``token_id`` the token
    that produced it (None on the final chunk). The final chunk has ``finish_reason`` set
    ('stop' or 'length') and carries the usage, timings and all generated token ids. ``index``
    is the row in a batch.
    """

    text: str
    token_id: int | None = None
    index: int = 0
    finish_reason: str | None = None
    usage: Usage | None = None
    time_to_first_token: float | None = None
    tokens_per_second: float | None = None
    token_ids: list[int] | None = None  # every generated id (final chunk only)
    logprobs: list[TokenLogprob] | None = None  # with SamplingParams.logprobs: per token of text


@dataclass
class TokenLogprob:
    """log-softmax of the float32 logits at one position: the token's, and the ``top`` likeliest
    ``(token id, logprob)`` pairs (most likely first)."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class GenerationResult:
    """The whole result of one generation."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token: float = 0.0
    tokens_per_second: float = 0.0
    logprobs: list[TokenLogprob] | None = None

    @property
    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens)

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "time_to_first_token": self.time_to_first_token,
            "tokens_per_second": self.tokens_per_second,
        }
