"""``minimind generate``: one reply to one prompt (an argument or stdin).

The chat template is applied by default, as mlx_lm's CLI does; ``--raw`` sends the prompt as
is. Streams to a terminal, prints the whole text otherwise; ``--json`` prints the
GenerationResult as a JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from ..chat import prompt_messages
from ..params import GenerationResult, SamplingParams
from . import common
from .render import ReplyStats, ThinkStyler, ends_in_think, print_stats, print_stream, use_color

if TYPE_CHECKING:
    from ..engine import Engine


def generate(engine: Engine, prompt: str, *, raw: bool = False, system: str | None = None,
             template_kwargs: dict[str, Any] | None = None, stream_to=None,
             **sampling: Any) -> GenerationResult:
    """One reply to ``prompt``: chat-formatted unless ``raw``; printed live to ``stream_to`` if given.

    Returns the GenerationResult (on Ctrl-C while streaming: the partial text, finish_reason
    "interrupted").
    """
    params = SamplingParams.from_kwargs(**sampling)
    messages = prompt_messages(prompt, system)
    template_kwargs = dict(template_kwargs or {})
    if raw and system is not None:
        raise ValueError("--system needs the chat template; drop --raw or --system")
    if stream_to is None:
        if raw:
            return engine.generate(prompt, params)
        return engine.chat(messages, params, template_kwargs=template_kwargs)
    if raw:
        chunks, prompt_text = engine.stream(prompt, params), prompt
    else:
        chunks = engine.stream_chat(messages, params, template_kwargs=template_kwargs)
        prompt_text = engine.formatter.render(messages, **template_kwargs)
    styler = ThinkStyler(use_color(stream_to), inside=ends_in_think(prompt_text))
    text, stats = print_stream(chunks, stream_to, styler)
    return GenerationResult(text=text, finish_reason="interrupted" if stats.interrupted
                            else stats.finish_reason or "length",
                            prompt_tokens=stats.prompt_tokens,
                            completion_tokens=stats.completion_tokens,
                            time_to_first_token=stats.time_to_first_token,
                            tokens_per_second=stats.tokens_per_second)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default=None,
                        help="the prompt; '-' or nothing reads it from stdin")
    out = parser.add_argument_group("output")
    out.add_argument("--raw", action="store_true", default=None,
                     help="send the prompt as is, without the chat template")
    out.add_argument("--json", action="store_true", help="print the result as a JSON object")
    out.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                     help="print tokens as they come (default: when stdout is a terminal)")
    out.add_argument("-q", "--quiet", action="store_true",
                     help="no stats line on stderr after the reply")
    out.add_argument("--show_speed", type=int, choices=(0, 1), default=None,
                     help="upstream's flag: 0 = --quiet")
    common.add_template_args(parser)
    common.add_sampling_args(parser)
    common.add_model_args(parser)


def read_prompt(prompt: str | None, stdin=None) -> str:
    """The prompt argument, or stdin when it is '-' or missing (never wait on a terminal)."""
    stdin = stdin or sys.stdin
    if prompt is not None and prompt != "-":
        return prompt
    if prompt is None and stdin.isatty():
        raise ValueError("no prompt: give one as an argument (minimind generate \"Hello\") or "
                         "pipe it on stdin")
    text = stdin.read()
    if not text.strip():
        raise ValueError("the prompt read from stdin is empty")
    return text.rstrip("\n")


def main(args: argparse.Namespace) -> int:
    prompt = read_prompt(args.prompt)
    SamplingParams.from_kwargs(**common.sampling_kwargs(args))  # bad values fail before loading
    engine = common.load_engine(args)
    raw = args.raw if args.raw is not None else common.is_pretrain(args)
    if raw and args.raw is None and engine.tokenizer.bos_token:
        prompt = engine.tokenizer.bos_token + prompt  # upstream's pretrain input: bos + text
    stream = (not args.json) and (args.stream if args.stream is not None else sys.stdout.isatty())
    result = generate(engine, prompt, raw=raw, system=args.system,
                      template_kwargs=common.template_kwargs(args),
                      stream_to=sys.stdout if stream else None, **common.sampling_kwargs(args))
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
        return 0
    if stream:
        sys.stdout.write("\n")
    else:
        print(result.text)
    if not (args.quiet or args.show_speed == 0):
        print_stats(ReplyStats(result.completion_tokens, result.prompt_tokens,
                               result.tokens_per_second, result.time_to_first_token,
                               result.finish_reason, result.finish_reason == "interrupted"))
    return 130 if result.finish_reason == "interrupted" else 0
