"""Flags shared by the ``minimind`` commands, and turning them into an Engine.

Every command that runs a model takes the same model flags (``add_model_args``), sampling flags
(``add_sampling_args``) and architecture overrides (one flag per ModelConfig field), plus
upstream ``eval_llm.py``'s flag names, so ``--top_p`` and ``--top-p`` are the same flag.
``load_engine(args)`` is the one place those flags become ``minimind_core.load(...)``; the
server uses it too.

Defaults follow mlx-lm, not upstream's eval_llm.py: greedy decoding (temperature 0) and at most
512 new tokens. Upstream's flags keep their meaning but not their defaults (0.85 / 0.95 / 8192):
pass ``--temperature 0.85 --top_p 0.95 --top-k 50`` to sample as eval_llm.py does (top_k 50 is
transformers' default there).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ..config import ModelConfig
from .upstream import (
    DEFAULT_HIDDEN,
    DEFAULT_SAVE_DIR,
    DEFAULT_WEIGHT,
    UpstreamPaths,
    resolve_upstream,
)

if TYPE_CHECKING:
    from ..engine import Engine

PROG = "minimind"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag ends with one line (``minimind: error: ...``), not a usage block."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see '{self.prog} --help')"
        self.exit(2, f"{PROG}: error: {message}{hint}\n")


# ---- architecture overrides (one flag per ModelConfig field) -------------------------------

# Fields the weights alone decide or that are not architecture (special ids live in the tokenizer).
_NOT_OVERRIDABLE = {"extra", "generation", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                    "pad_token_id", "inference_rope_scaling"}
_FIELD_HELP = {
    "hidden_size": "hidden size",
    "num_hidden_layers": "number of layers",
    "num_attention_heads": "query heads (MiniMind2 files cannot tell it; default 8)",
    "num_key_value_heads": "key/value heads",
    "head_dim": "width of one attention head",
    "intermediate_size": "FFN width",
    "vocab_size": "vocabulary size",
    "rms_norm_eps": "RMSNorm epsilon (MiniMind2 1e-5, MiniMind-3 1e-6)",
    "rope_theta": "RoPE base (1e6 in every release)",
    "max_position_embeddings": "context window in tokens",
    "num_experts": "routed experts of a MoE model",
    "num_experts_per_tok": "experts each token is routed to (MiniMind2-MoE 2, MiniMind-3-MoE 1)",
    "n_shared_experts": "shared experts of a MiniMind2-MoE model",
    "norm_topk_prob": "renormalise the router's top-k weights (true/false)",
    "rope_scaling": "RoPE scaling as JSON, e.g. '{\"type\": \"yarn\", \"factor\": 16}'",
}
# Where upstream's path flags exist, --hidden_size also names the file (out/{weight}_{hidden}.pth).
_HIDDEN_PICKS_FILE = (" (also picks upstream's file: out/{weight}_{hidden}.pth with "
                      "--save_dir/--weight; without --model, out/full_sft_{hidden}.pth as in "
                      "eval_llm.py)")


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def seed(text: str) -> int:
    """An argparse type: a sampling seed, 0 to 2**64-1 (what numpy, torch and MLX all take)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**64-1, got {value}")
    return value


def override_fields() -> list[tuple[str, Any]]:
    """(name, type) of every ModelConfig field a user may override from the command line."""
    out = []
    for f in fields(ModelConfig):
        if f.name in _NOT_OVERRIDABLE:
            continue
        default = f.default if f.default is not MISSING else None
        kind = {bool: _bool, int: int, float: float}.get(type(default), _json_object)
        out.append((f.name, kind))
    return out


def add_arch_args(parser: argparse.ArgumentParser, *, upstream_paths: bool = True) -> None:
    """--inference-rope-scaling and one ``--<field>`` flag per ModelConfig field (default: the file's).

    Every flag has its upstream underscore spelling too (``--num-attention-heads`` and
    ``--num_attention_heads``). ``upstream_paths`` says whether the command also has upstream's
    --save_dir/--weight (then --hidden_size picks the file, which the help says).
    """
    group = parser.add_argument_group("architecture overrides (default: what the checkpoint says)")
    group.add_argument("--inference-rope-scaling", "--inference_rope_scaling", action="store_true",
                       default=None, help="YaRN RoPE extrapolation: upstream's switch, factor 16 "
                       "over 2048 positions as its current model code has it (the inference "
                       "guide's '4x' is an older revision; --rope-scaling JSON sets another)")
    for name, kind in override_fields():
        dashed = "--" + name.replace("_", "-")
        flags = [dashed] if dashed == "--" + name else [dashed, "--" + name]
        metavar = "JSON" if kind is _json_object else ("BOOL" if kind is _bool else "N")
        help_text = _FIELD_HELP.get(name, f"override {name}")
        if name == "hidden_size" and upstream_paths:
            help_text += _HIDDEN_PICKS_FILE
        group.add_argument(*flags, dest=name, type=kind, default=None, metavar=metavar,
                           help=help_text)


def arch_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The architecture overrides the user set (ModelConfig field → value)."""
    out = {name: getattr(args, name) for name, _ in override_fields()
           if getattr(args, name, None) is not None}
    if getattr(args, "inference_rope_scaling", None):
        out["inference_rope_scaling"] = True
    return out


# ---- model flags -----------------------------------------------------------------------------

def add_model_args(parser: argparse.ArgumentParser, *, runtime: bool = True,
                   skip: set[str] | frozenset[str] = frozenset()) -> None:
    """Flags that pick the model: --model, --tokenizer, --lora, upstream's flags, overrides.

    ``runtime`` adds the flags that only matter when running it (--backend, --device, --dtype,
    --q-bits). Flags whose option strings are in ``skip`` (e.g. ones a caller already defined)
    are left out.
    """
    def add(group: argparse._ActionsContainer, *names: str, **kw: Any) -> None:
        kept = [n for n in names if n not in skip]
        if not kept:
            return
        if len(kept) < len(names):  # e.g. the caller has --model but not -m: alias the same dest
            long = next(n for n in names if n.startswith("--"))
            kw.setdefault("dest", long[2:].replace("-", "_"))
            kw["default"] = argparse.SUPPRESS  # the caller's flag sets the default
        group.add_argument(*kept, **kw)

    # One "model" group even when the caller (the server) already opened one.
    g = next((grp for grp in parser._action_groups if grp.title == "model"), None) \
        or parser.add_argument_group("model")
    add(g, "-m", "--model", default=None, metavar="PATH",
        help="a .pth / .safetensors file, or a transformers or MLX folder (default: the embedded "
             "demo model)")
    add(g, "--tokenizer", default=None, metavar="DIR",
        help="tokenizer folder (default: beside the weights, or upstream's ../model)")
    add(g, "--lora", default=None, metavar="PATH", help="an upstream LoRA file to apply")
    if runtime:
        add(g, "--backend", default="auto",
            help="torch, mlx or auto (MLX on Apple silicon when installed, else torch)")
        add(g, "--device", default=None,
            help="cpu, cuda, cuda:N, mps or auto (default: cuda, then mps, then cpu)")
        add(g, "--dtype", default=None,
            help="float32, float16 or bfloat16 (default: bf16/fp16 on a GPU, fp32 on CPU)")
        add(g, "--decode", default="auto", choices=("auto", "eager", "native", "compiled"),
            help="the decode-step implementation: eager (plain ops), native (CPU float32, small "
                 "ops in C), compiled (torch.compile; a CUDA graph on CUDA) or auto (default: "
                 "compiled on CUDA, native on CPU float32, else eager)")
        add(g, "--merge-lora", action="store_true", default=None,
            help="fold the LoRA into the weights (faster; no hot swap)")
        add(g, "--q-bits", type=int, default=None, metavar="BITS",
            help="quantize the weights to 8 or 4 bits at load (torch: int8/int4 CPU decode "
                 "kernels; MLX default on Apple silicon: 4 for your models, full precision for "
                 "the demo; 0 = full precision)")
        add(g, "--q-group-size", type=int, default=None, metavar="N",
            help="quantization group size: 32, 64 or 128 (default 64)")

    u = parser.add_argument_group(
        "upstream eval_llm.py flags (same meaning: --save_dir out --weight full_sft "
        "--hidden_size 512 --use_moe 1 reads out/full_sft_512_moe.pth)")
    add(u, "--load_from", default=None, metavar="PATH",
        help="'model' = native .pth from --save_dir (upstream's default); else a transformers folder")
    add(u, "--save_dir", default=None, metavar="DIR", help="folder of the .pth files (default out)")
    add(u, "--weight", default=None, metavar="NAME",
        help="weight prefix: pretrain, full_sft, rlhf, reason, ... (default full_sft)")
    add(u, "--lora_weight", default=None, metavar="NAME",
        help="LoRA name: reads {save_dir}/lora/NAME_{hidden}.pth; None = no LoRA")
    add(u, "--use_moe", type=int, choices=(0, 1), default=None,
        help="1 = the _moe weights (without --model: out/full_sft_{hidden}_moe.pth)")
    add_arch_args(parser)


def apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def demo_weights() -> Path:
    """The embedded demo model's weights (FileNotFoundError, with the fix, when it is absent)."""
    if importlib.util.find_spec("minimind_core.demo") is None:
        raise FileNotFoundError("no --model given and the embedded demo model is not installed "
                                "here; pass --model PATH (e.g. out/full_sft_512.pth)")
    from ..demo import demo_model_path

    return Path(demo_model_path())


# eval_llm.py's architecture flags: given alone (no --model), they name its default file, as there.
IMPLY_UPSTREAM = ("hidden_size", "num_hidden_layers", "use_moe")


def upstream_paths(args: argparse.Namespace) -> UpstreamPaths | None:
    """Resolve upstream flags (None when none was given); refuse a mix with --model / --lora.
    eval_llm.py's architecture flags alone resolve its default file (``_implied_upstream``)."""
    def get(name: str) -> Any:  # not every command defines every flag
        return getattr(args, name, None)

    if get("model") is not None and any(get(n) is not None for n in ("load_from", "save_dir", "weight")):
        raise ValueError("give either --model PATH or upstream's --load_from/--save_dir/--weight, "
                         "not both")
    if get("lora") is not None and get("lora_weight") not in (None, "None"):
        raise ValueError("give either --lora PATH or upstream's --lora_weight NAME, not both")
    if get("model") is not None and get("lora_weight") not in (None, "None"):
        raise ValueError("--lora_weight NAME is found through upstream's --save_dir; with --model "
                         "give the file: --lora PATH")
    up = resolve_upstream(get("load_from"), get("save_dir"), get("weight"), get("lora_weight"),
                          get("hidden_size"), get("use_moe"))
    if up is None and get("model") is None and any(get(n) is not None for n in IMPLY_UPSTREAM):
        up = _implied_upstream(get("hidden_size"), get("use_moe"), get("num_hidden_layers"))
    return up


def _implied_upstream(hidden: int | None, use_moe: int | None,
                      layers: int | None) -> UpstreamPaths:
    """eval_llm.py's defaults (--save_dir out --weight full_sft) for its architecture flags alone."""
    flags = " ".join(f"--{name} {value}" for name, value in (
        ("hidden_size", hidden), ("num_hidden_layers", layers), ("use_moe", use_moe))
        if value is not None)
    defaults = f"upstream eval_llm.py's defaults --save_dir {DEFAULT_SAVE_DIR} --weight " \
               f"{DEFAULT_WEIGHT}"
    try:
        up = resolve_upstream(save_dir=DEFAULT_SAVE_DIR, weight=DEFAULT_WEIGHT,
                              hidden_size=hidden, use_moe=use_moe)
    except FileNotFoundError:
        hiddens = (hidden,) if hidden is not None else DEFAULT_HIDDEN
        names = " or ".join(f"{DEFAULT_SAVE_DIR}/{DEFAULT_WEIGHT}_{h}{'_moe' if use_moe else ''}.pth"
                            for h in hiddens)
        raise FileNotFoundError(
            f"{flags} without --model reads {names} ({defaults}), which is not here; run from "
            f"the folder holding out/ and model/, give --save_dir/--weight, or pass --model "
            f"PATH") from None
    assert up is not None
    print(f"{PROG}: {flags} reads {up.model} ({defaults}; --model PATH for another file)",
          file=sys.stderr)
    return up


def model_location(args: argparse.Namespace) -> tuple[Path | None, Path | None, Path | None]:
    """(weights, lora, tokenizer) from --model/--lora/--tokenizer or upstream's flags.

    weights None means the embedded demo model.
    """
    up = upstream_paths(args)
    tokenizer = Path(args.tokenizer) if getattr(args, "tokenizer", None) else None
    lora = Path(args.lora) if getattr(args, "lora", None) else None
    if up is not None:
        return up.model, up.lora or lora, tokenizer or up.tokenizer
    model = Path(args.model) if getattr(args, "model", None) else None
    if model is not None and not model.exists():
        raise FileNotFoundError(f"--model {model}: no such file or folder")
    if lora is not None and not lora.exists():
        raise FileNotFoundError(f"--lora {lora}: no such file or folder")
    return model, lora, tokenizer


def resolve_backend(name: str) -> str:
    """A concrete backend name ("auto" resolved); ValueError/ImportError with the fix otherwise."""
    import backends

    if name == "auto":
        name = backends.auto()
    backends.get(name)  # unknown → ValueError listing choices; not installed → ImportError
    return name


def quantize_kwargs(args: argparse.Namespace, backend: str, is_demo: bool) -> dict[str, Any]:
    """``quantize=`` / ``q_group_size=`` from --q-bits / --q-group-size (both backends; on MLX
    the default on Apple silicon is 4 bits for your models)."""
    bits = getattr(args, "q_bits", None)
    group = getattr(args, "q_group_size", None)
    if backend != "mlx" and bits is None:
        if group:
            raise ValueError("--q-group-size needs --q-bits 8 or 4")
        return {}
    if bits is None:
        # As the MLX script users run today does; the tiny demo gains nothing from it.
        bits = 4 if apple_silicon() and not is_demo else 0
    if bits < 0:
        raise ValueError(f"--q-bits must be 4 or 8 (0 = full precision), got {bits}")
    out: dict[str, Any] = {}
    if bits:
        out["quantize"] = bits
        if group:
            out["q_group_size"] = group
    return out


def load_engine(args: argparse.Namespace) -> Engine:
    """Load the model the flags name (any command that runs a model, and the server)."""
    from ..loader import load

    model, lora, tokenizer = model_location(args)
    backend = resolve_backend(getattr(args, "backend", "auto") or "auto")
    is_demo = model is None
    if is_demo:
        model = demo_weights()
    extra = arch_overrides(args)
    extra.update(quantize_kwargs(args, backend, is_demo=is_demo))
    if getattr(args, "merge_lora", None):
        extra["merge_lora"] = True
    if getattr(args, "decode", "auto") not in (None, "auto"):
        extra["decode"] = args.decode
    return load(model, backend=backend, device=getattr(args, "device", None),
                dtype=getattr(args, "dtype", None), tokenizer=tokenizer, lora=lora, **extra)


# ---- sampling flags --------------------------------------------------------------------------

def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """--max-new-tokens, --temperature, --top-p, ... (upstream's underscore spellings too)."""
    g = parser.add_argument_group("sampling (defaults as mlx-lm: greedy, 512 tokens)")
    g.add_argument("--max-new-tokens", "--max_new_tokens", "--max-tokens", dest="max_new_tokens",
                   type=int, default=512, metavar="N", help="most tokens to generate (default 512)")
    g.add_argument("--temperature", "--temp", type=float, default=0.0,
                   help="0 = greedy (default); upstream's eval_llm.py uses 0.85")
    g.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=None,
                   help="nucleus sampling threshold (default 1.0 = off)")
    g.add_argument("--top-k", type=int, default=None, help="keep the k likeliest tokens (0 = off)")
    g.add_argument("--min-p", type=float, default=None, help="min-p filter (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="penalise recent tokens (1.0 = off)")
    g.add_argument("--seed", type=seed, default=None,
                   help="random seed for sampling (0 to 2**64-1)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when this text appears (repeatable)")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags as SamplingParams keyword arguments (None = library default)."""
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p,
            "repetition_penalty": args.repetition_penalty, "seed": args.seed,
            "stop": tuple(args.stop) if args.stop else None}


# ---- chat template flags ---------------------------------------------------------------------

def add_template_args(parser: argparse.ArgumentParser) -> None:
    """--system, --chat-template-args and upstream's --open_thinking."""
    g = parser.add_argument_group("chat template")
    g.add_argument("--system", "--system-prompt", dest="system", default=None,
                   help="system prompt (--system-prompt as mlx_lm and the MLX script name it)")
    g.add_argument("--chat-template-args", type=_json_object, default=None, metavar="JSON",
                   help="options for the chat template, e.g. '{\"enable_thinking\": false}'")
    g.add_argument("--open-thinking", "--open_thinking", dest="open_thinking", type=int,
                   choices=(0, 1), default=None,
                   help="MiniMind-3: 1 leaves the <think> block open for a reasoning model")


def template_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    out = dict(args.chat_template_args or {})
    if args.open_thinking is not None:
        out["open_thinking"] = bool(args.open_thinking)
    return out


def is_pretrain(args: argparse.Namespace) -> bool:
    """Upstream feeds pretrain weights ``bos + prompt`` without a chat template."""
    weight = getattr(args, "weight", None)
    return weight is not None and "pretrain" in weight
