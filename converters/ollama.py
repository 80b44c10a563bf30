"""The Ollama ``Modelfile`` written beside an exported ``.gguf``.

``TEMPLATE`` is a Go template equivalent to upstream's Jinja chat template for the generation:
ChatML turns; MiniMind2 inserts "You are a helpful assistant" when no system prompt is given;
MiniMind-3 gives every assistant turn a ``<think>…</think>`` block and closes an empty one after
the generation prompt unless thinking is asked for (Ollama's ``think``, like upstream's
``open_thinking``). Tool definitions are not rendered (Ollama's tool calling is left out).
``PARAMETER stop`` holds the end-of-turn tokens; temperature and top_p are our library defaults.
"""

from __future__ import annotations

from minimind_core.config import MINIMIND2, ModelConfig
from minimind_core.params import SamplingParams

MINIMIND2_SYSTEM = "You are a helpful assistant"  # upstream MiniMind2 template's default

_TURNS = """\
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
ASSISTANT_BODY{{ if not $last }}<|im_end|>
{{ end }}
{{- else if eq .Role "tool" }}<|im_start|>user
<tool_response>
{{ .Content }}
</tool_response><|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
GENERATION_PROMPT{{ end }}
{{- end }}"""

MINIMIND2_TEMPLATE = ("""\
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ else }}<|im_start|>system
""" + MINIMIND2_SYSTEM + """<|im_end|>
{{ end }}
""" + _TURNS.replace("ASSISTANT_BODY", "{{ .Content }}").replace("GENERATION_PROMPT", ""))

MINIMIND3_TEMPLATE = ("""\
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
""" + _TURNS.replace("ASSISTANT_BODY", "<think>\n{{ .Thinking }}\n</think>\n\n{{ .Content }}")
    .replace("GENERATION_PROMPT", "{{ if and $.IsThinkSet $.Think }}<think>\n"
                                  "{{ else }}<think>\n\n</think>\n\n{{ end }}"))


def chat_template(config: ModelConfig) -> str:
    """The Go template for ``config``'s generation."""
    return MINIMIND2_TEMPLATE if config.generation == MINIMIND2 else MINIMIND3_TEMPLATE


def modelfile(gguf_name: str, config: ModelConfig, stop_tokens: list[str]) -> str:
    """The Modelfile text: ``FROM ./<gguf_name>``, TEMPLATE, stop tokens, sampling defaults."""
    defaults = SamplingParams()
    lines = [f"# Ollama Modelfile for a {config.kind} model, written by minimind-core.",
             f"# ollama create <name> -f {gguf_name.removesuffix('.gguf')}.Modelfile",
             f"FROM ./{gguf_name}",
             f'TEMPLATE """{chat_template(config)}"""']
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens]
    lines += [f"PARAMETER temperature {defaults.temperature}", f"PARAMETER top_p {defaults.top_p}"]
    return "\n".join(lines) + "\n"
