"""``minimind chat``: a REPL with multi-turn history.

``--auto`` asks upstream eval_llm.py's preset questions instead of reading input. ``clear`` or
``/clear`` resets the history; ``quit``, ``exit``, ``q`` or Ctrl-D leaves; Ctrl-C
during a reply stops that reply only (what was shown stays in the history). Replies stream by
default; thinking (``<think>…</think>``) is shown dimmed on a terminal; after each reply one
short line on stderr gives tokens and tok/s (``--quiet`` turns it off).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ..demo import DEMO_HISTORY, is_demo
from ..params import SamplingParams
from . import common
from .render import ReplyStats, ThinkStyler, ends_in_think, print_stats, print_stream, use_color
from .upstream import PRESET_QUESTIONS, historys_to_turns

if TYPE_CHECKING:
    from ..engine import Engine

QUIT = {"quit", "exit", "q", "/quit", "/exit", "/q", "/bye"}
CLEAR = {"clear", "/clear", "/reset"}
HELP = {"/help", "/?", "help"}
BANNER = "Type a message. 'clear' resets the history; 'quit' or Ctrl-D leaves; Ctrl-C stops a reply."


@dataclass
class ChatSession:
    """What the REPL needs besides the engine: options and the running history."""

    params: SamplingParams = field(default_factory=SamplingParams)
    system: str | None = None
    max_history: int | None = None  # turns kept; None = all that fit the context window
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    stream: bool = True
    quiet: bool = False
    raw: bool = False  # pretrain weights: each line is continued as text, no template, no history
    prefix: str = ""  # prepended to raw prompts (upstream's bos for pretrain weights)
    messages: list[dict[str, Any]] = field(default_factory=list)

    def conversation(self, text: str) -> list[dict[str, Any]]:
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return [*head, *self.messages, {"role": "user", "content": text}]


def reply(engine: Engine, session: ChatSession, text: str, out: TextIO, err: TextIO) -> ReplyStats:
    """Answer one user line, print it, and extend the session's history."""
    if session.raw:
        prompt = session.prefix + text
        chunks = engine.stream(prompt, session.params)
        prompt_text = prompt
    else:
        messages = session.conversation(text)
        chunks = engine.stream_chat(messages, session.params, max_history=session.max_history,
                                    template_kwargs=session.template_kwargs)
        prompt_text = engine.formatter.render(messages, max_history=session.max_history,
                                              **session.template_kwargs)
    styler = ThinkStyler(use_color(out), inside=ends_in_think(prompt_text))
    if session.stream:
        answer, stats = print_stream(chunks, out, styler)
    else:
        answer, stats = print_stream(chunks, _Buffer(), ThinkStyler(False))
        out.write(styler.feed(answer) + styler.finish())
    out.write("\n")
    out.flush()
    if stats.interrupted:
        err.write("(reply stopped)\n")
        # the final chunk (and its usage) never came: count the prompt the engine was given
        stats.prompt_tokens = len(engine.encode(prompt) if session.raw else engine.chat_ids(
            messages, max_history=session.max_history,
            max_new_tokens=session.params.max_new_tokens, **session.template_kwargs))
    if not session.raw:
        session.messages += [{"role": "user", "content": text},
                             {"role": "assistant", "content": answer}]
    if not session.quiet:
        print_stats(stats, err)
    return stats


class _Buffer:
    """A write-nothing stream for --no-stream (the text is printed whole afterwards)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def read_line_from(stdin: TextIO, out: TextIO, prompt: str = ">> ") -> Callable[[], str | None]:
    """A reader returning the next line (None at end of input); prompts only on a terminal."""
    interactive = stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # Windows
            pass

    def read() -> str | None:
        if interactive:
            try:
                return input(prompt)
            except EOFError:
                out.write("\n")
                return None
        line = stdin.readline()
        return None if line == "" else line.rstrip("\n")

    return read


def chat_loop(engine: Engine, session: ChatSession, read: Callable[[], str | None],
              out: TextIO, err: TextIO) -> int:
    """Run the REPL until quit / end of input; returns how many replies were given."""
    replies = 0
    while True:
        try:
            line = read()
        except KeyboardInterrupt:  # at the prompt: drop the line, keep the session
            out.write("\n")
            err.write("(Ctrl-D or 'quit' leaves)\n")
            continue
        if line is None:
            return replies
        text = line.strip()
        if not text:
            continue
        cmd = text.lower()
        if cmd in QUIT:
            return replies
        if cmd in CLEAR:
            session.messages.clear()
            err.write("(history cleared)\n")
            continue
        if cmd in HELP:
            err.write(BANNER + "\n")
            continue
        try:
            reply(engine, session, line, out, err)
        except ValueError as e:  # e.g. a prompt longer than the context: say so, keep the session
            err.write(f"minimind: error: {e}\n")
            continue
        replies += 1


def preset_reader(questions: Sequence[str], out: TextIO) -> Callable[[], str | None]:
    """A reader for ``--auto``: each preset question in turn, echoed as upstream's eval_llm.py
    does (``💬: question``), then end of input."""
    pending = iter(questions)

    def read() -> str | None:
        question = next(pending, None)
        if question is not None:
            out.write(f"💬: {question}\n")
            out.flush()
        return question

    return read


def banner(engine: Engine, session: ChatSession, *, demo: bool = False) -> str:
    """The line shown on a terminal before the first prompt: model, backend, LoRA, history."""
    desc = engine.describe()
    parts = [str(desc["kind"]), str(desc["backend"])]
    if desc.get("lora"):
        parts.append(f"LoRA {Path(str(desc['lora'])).name}")
    text = f"{desc['name']} ({', '.join(parts)})."
    if demo and session.max_history == DEMO_HISTORY:
        text += (" Demo model: each message is answered on its own (it learned single "
                 "exchanges; --history N keeps turns).")
    return f"{text} {BANNER}"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("chat")
    g.add_argument("--auto", action="store_true",
                   help="ask upstream eval_llm.py's preset questions ('[0] 自动测试') in turn, "
                        "each on its own unless --history is given, then leave")
    g.add_argument("--history", type=int, default=None, metavar="N",
                   help="earlier turns kept in the prompt (default: all that fit the context)")
    g.add_argument("--historys", type=int, default=None, metavar="N",
                   help="upstream's flag: earlier messages kept (N // 2 turns)")
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print tokens as they come (default on)")
    g.add_argument("-q", "--quiet", action="store_true", help="no stats line after each reply")
    g.add_argument("--show_speed", type=int, choices=(0, 1), default=None,
                   help="upstream's flag: 0 = --quiet")
    g.add_argument("--raw", action="store_true", default=None,
                   help="no chat template and no history: continue each line as text "
                        "(default for upstream's --weight pretrain)")
    common.add_template_args(parser)
    common.add_sampling_args(parser)
    common.add_model_args(parser)


def main(args: argparse.Namespace) -> int:
    if args.history is not None and args.historys is not None:
        raise ValueError("give either --history N (turns) or upstream's --historys N, not both")
    if args.history is not None and args.history < 0:
        raise ValueError(f"--history must be >= 0, got {args.history}")
    max_history = args.history if args.historys is None else historys_to_turns(args.historys)
    params = SamplingParams.from_kwargs(**common.sampling_kwargs(args))
    engine = common.load_engine(args)
    demo = is_demo(engine.info.get("path"))
    if max_history is None and (args.auto or demo):
        # upstream's auto test asks each question on its own (--historys 0); the demo model
        # learned single exchanges and loses the thread from the third turn
        max_history = DEMO_HISTORY if demo else 0
    raw = args.raw if args.raw is not None else common.is_pretrain(args)
    prefix = (engine.tokenizer.bos_token or "") if raw and args.raw is None else ""
    session = ChatSession(params=params, system=args.system, max_history=max_history,
                          template_kwargs=common.template_kwargs(args), stream=args.stream,
                          quiet=args.quiet or args.show_speed == 0, raw=raw, prefix=prefix)
    if args.auto:
        chat_loop(engine, session, preset_reader(PRESET_QUESTIONS, sys.stdout), sys.stdout,
                  sys.stderr)
        return 0
    if sys.stdin.isatty():
        sys.stderr.write(banner(engine, session, demo=demo) + "\n")
    chat_loop(engine, session, read_line_from(sys.stdin, sys.stdout), sys.stdout, sys.stderr)
    return 0
