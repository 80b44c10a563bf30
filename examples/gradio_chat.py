"""A Gradio chat page on top of minimind-core, for those who prefer Gradio.

The built-in page (`minimind serve`, then open http://127.0.0.1:8000/) needs nothing extra;
this example needs `pip install gradio`.

    python examples/gradio_chat.py                                # the embedded demo model
    python examples/gradio_chat.py -m out/full_sft_768.pth --open-thinking

MiniMind-3's ``<think>`` text is shown in a collapsed <details> block; Gradio renders the reply
as Markdown with HTML sanitised.
"""

from __future__ import annotations

import argparse
import html

from minimind_core import load
from minimind_core.reasoning import ReplyParser, prompt_opens_think


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None, help="weights (default: the demo model)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--lora", default=None)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--open-thinking", action="store_true",
                        help="MiniMind-3: let the model think before answering")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args()

    import gradio as gr  # imported here so `--help` works without it

    engine = load(args.model, backend=args.backend, lora=args.lora)
    template_kwargs = {"open_thinking": True} if args.open_thinking else {}

    def respond(message: str, history: list[dict], system: str, temperature: float,
                top_p: float):
        messages = [{"role": "system", "content": system}] if system.strip() else []
        # earlier replies go back without the thinking block shown above them
        messages += [{"role": m["role"], "content": str(m["content"]).split("</details>")[-1]
                      .strip()} for m in history if m["role"] in ("user", "assistant")]
        messages.append({"role": "user", "content": message})
        prompt = engine.tokenizer.decode(engine.chat_ids(messages, **template_kwargs),
                                         skip_special_tokens=False)
        split = ReplyParser(in_think=prompt_opens_think(prompt))
        reasoning = content = ""
        for chunk in engine.stream_chat(messages, template_kwargs=template_kwargs,
                                        max_new_tokens=args.max_tokens,
                                        temperature=temperature, top_p=top_p):
            delta = split.feed(chunk.text)
            if chunk.finish_reason is not None:
                delta += split.finish()
            reasoning, content = reasoning + delta.reasoning, content + delta.content
            thought = (f"<details><summary>Thinking</summary>\n\n{html.escape(reasoning)}"
                       "\n\n</details>\n\n") if reasoning else ""
            yield thought + content

    gr.ChatInterface(
        respond, type="messages", title=f"MiniMind — {engine.name}",
        additional_inputs=[
            gr.Textbox("", label="System prompt"),
            gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature"),
            gr.Slider(0.05, 1.0, value=0.92, step=0.01, label="Top-p"),
        ],
    ).launch(server_port=args.port)


if __name__ == "__main__":
    main()
