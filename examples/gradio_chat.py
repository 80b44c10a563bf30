"""A Gradio chat page on top of minimind-core, for those who prefer Gradio.

The built-in page (`minimind serve`, then open http://127.0.0.1:8000/) needs nothing extra;
this example needs Gradio 5.50 or 6 (`pip install 'minimind-core[gradio]'`).

    python examples/gradio_chat.py                                # the embedded demo model
    python examples/gradio_chat.py -m out/full_sft_768.pth --open-thinking

MiniMind-3's ``<think>`` text is shown in a collapsed <details> block; Gradio renders the reply
as Markdown with HTML sanitised. ``build_interface(engine)`` returns the page without launching
it (tests drive it through gradio_client).
"""

from __future__ import annotations

import argparse
import html
import inspect
from typing import Any

from minimind_core import load
from minimind_core.demo import DEMO_HISTORY, DEMO_TEMPERATURE, is_demo
from minimind_core.reasoning import ReplyParser, prompt_opens_think

THINK_END = "</details>"


def text_of(content: Any) -> str:
    """A history message's text: Gradio 6 may give a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if isinstance(content.get("text"), str) else ""
    if isinstance(content, (list, tuple)):
        return "".join(text_of(part) for part in content)
    return ""


def build_interface(engine: Any, *, max_tokens: int = 512, open_thinking: bool = False,
                    temperature: float | None = None, top_p: float = 0.92):
    """The gr.ChatInterface chatting with ``engine`` (not launched). Sampling defaults: greedy
    and no history for the demo model (what it was trained for), else temperature 0.7."""
    import gradio as gr  # imported here so `--help` works without it

    demo = is_demo(engine.info.get("path"))
    if temperature is None:
        temperature = DEMO_TEMPERATURE if demo else 0.7
    max_history = DEMO_HISTORY if demo else None
    template_kwargs = {"open_thinking": True} if open_thinking else {}

    def respond(message: str, history: list[dict], system: str, temperature: float,
                top_p: float):
        messages = [{"role": "system", "content": system}] if system.strip() else []
        # earlier replies go back without the thinking block shown above them
        messages += [{"role": m["role"], "content": text_of(m["content"]).split(THINK_END)[-1]
                      .strip()} for m in history if m.get("role") in ("user", "assistant")]
        messages.append({"role": "user", "content": message})
        prompt = engine.tokenizer.decode(
            engine.chat_ids(messages, max_history=max_history, **template_kwargs),
            skip_special_tokens=False)
        split = ReplyParser(in_think=prompt_opens_think(prompt))
        reasoning = content = ""
        for chunk in engine.stream_chat(messages, template_kwargs=template_kwargs,
                                        max_history=max_history, max_new_tokens=max_tokens,
                                        temperature=temperature, top_p=top_p):
            delta = split.feed(chunk.text)
            if chunk.finish_reason is not None:
                delta += split.finish()
            reasoning, content = reasoning + delta.reasoning, content + delta.content
            thought = (f"<details><summary>Thinking</summary>\n\n{html.escape(reasoning)}"
                       f"\n\n{THINK_END}\n\n") if reasoning else ""
            yield thought + content

    options: dict[str, Any] = {}
    if "type" in inspect.signature(gr.ChatInterface).parameters:
        options["type"] = "messages"  # Gradio 5; Gradio 6 has only this format and no `type`
    return gr.ChatInterface(
        respond, title=f"MiniMind — {engine.name}", **options,
        additional_inputs=[
            gr.Textbox("", label="System prompt"),
            gr.Slider(0.0, 2.0, value=temperature, step=0.05, label="Temperature"),
            gr.Slider(0.05, 1.0, value=top_p, step=0.01, label="Top-p"),
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None, help="weights (default: the demo model)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--lora", default=None)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=None,
                        help="the slider's start (default 0.7; 0 for the demo model)")
    parser.add_argument("--top-p", type=float, default=0.92)
    parser.add_argument("--open-thinking", action="store_true",
                        help="MiniMind-3: let the model think before answering")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args()

    engine = load(args.model, backend=args.backend, lora=args.lora)
    build_interface(engine, max_tokens=args.max_tokens, open_thinking=args.open_thinking,
                    temperature=args.temperature, top_p=args.top_p
                    ).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
