"""``minimind generate``: one reply to one prompt (an argument or stdin).

The chat template is applied by default, as mlx_lm's CLI does; ``--raw`` sends the prompt as
is. Streams to a terminal, prints the whole text otherwise; ``--json`` prints the
GenerationResult as a JSON object. ``-p/--prompt TEXT`` is the MLX script's spelling of the
prompt argument; ``--batch-file FILE`` generates for one prompt (or JSON conversation) a line,
a batch at a time, and prints one result a line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from ..chat import prompt_messages
from ..params import GenerationResult, SamplingParams
from . import batch, common
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
    parser.add_argument("-p", "--prompt", dest="prompt_flag", default=None, metavar="TEXT",
                        help="the prompt as a flag, as the MLX script and mlx_lm.generate take "
                             "it ('-' reads stdin)")
    b = parser.add_argument_group("batch")
    b.add_argument("--batch-file", default=None, metavar="FILE",
                   help="one prompt a line (text, or a JSON conversation: a list of messages); "
                        "'-' reads stdin; prints one result a line, in order (line breaks as "
                        "\\n; --json: one JSON object a line)")
    b.add_argument("--batch-size", type=int, default=16, metavar="N",
                   help="rows generated together with --batch-file (default 16)")
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
    """The prompt argument, or stdin when it is '-' or missing (never wait on a terminal).

    From stdin, the one line break that ``echo`` adds is dropped, no more: a raw prompt may end
    in a newline that matters (``<|im_start|>assistant\\n``)."""
    stdin = stdin or sys.stdin
    if prompt is not None and prompt != "-":
        return prompt
    if prompt is None and stdin.isatty():
        raise ValueError("no prompt: give one as an argument (minimind generate \"Hello\") or "
                         "pipe it on stdin")
    text = stdin.read()
    if not text.strip():
        raise ValueError("the prompt read from stdin is empty")
    for end in ("\r\n", "\n"):
        if text.endswith(end):
            return text[:-len(end)]
    return text


def given_prompt(args: argparse.Namespace) -> str | None:
    """The prompt from the positional argument or -p/--prompt (not both)."""
    if args.prompt is not None and args.prompt_flag is not None:
        raise ValueError("give the prompt once: as an argument or with -p/--prompt, not both")
    return args.prompt_flag if args.prompt_flag is not None else args.prompt


def main(args: argparse.Namespace) -> int:
    if args.batch_file is not None:
        return main_batch(args)
    prompt = read_prompt(given_prompt(args))
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


def main_batch(args: argparse.Namespace) -> int:
    """``--batch-file FILE``: every line's result, one a line on stdout."""
    if given_prompt(args) is not None:
        raise ValueError("--batch-file reads the prompts from FILE; drop the prompt argument")
    if args.stream:
        raise ValueError("--stream is for one prompt; --batch-file prints each result when its "
                         "batch is done")
    if args.raw and args.system is not None:
        raise ValueError("--system needs the chat template; drop --raw or --system")
    if args.batch_file == "-":
        items = batch.read_batch(sys.stdin)
    else:
        try:
            with open(args.batch_file, encoding="utf-8") as f:
                items = batch.read_batch(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"--batch-file {args.batch_file}: no such file") from None
    if not items:
        raise ValueError(f"--batch-file {args.batch_file} holds no prompts (blank lines are "
                         "skipped)")
    params = SamplingParams.from_kwargs(**common.sampling_kwargs(args))
    engine = common.load_engine(args)
    raw = args.raw if args.raw is not None else common.is_pretrain(args)
    prefix = (engine.tokenizer.bos_token or "") if raw and args.raw is None else ""
    t0 = time.perf_counter()
    results = batch.run_batch(engine, items, params, raw=raw, prefix=prefix, system=args.system,
                              template_kwargs=common.template_kwargs(args),
                              batch_size=args.batch_size, as_json=args.json)
    if not (args.quiet or args.show_speed == 0):
        tokens = sum(r.completion_tokens for r in results)
        seconds = time.perf_counter() - t0
        print(f"[{len(results)} prompts, {tokens} tokens in {seconds:.1f} s, "
              f"{tokens / seconds if seconds else 0:.1f} tok/s]", file=sys.stderr)
    return 0
