"""MiniMind's tokenizer as llama.cpp's GGUF tokenizer metadata (``tokenizer.ggml.*``).

Both generations use a byte-level BPE whose pre-tokenizer is GPT-2's regex. llama.cpp picks its
pre-tokenizer by a hash of known tokenizers, and MiniMind's is not among them, so the GGUF names
``gpt-2`` explicitly (``default``, ``qwen2`` and ``llama-bpe`` split digits and punctuation
differently). A tokenizer that splits with Qwen2's regex first (our embedded demo model's) gets
``qwen2``; any other pre-tokenizer is refused rather than tokenized differently. Special added tokens are CONTROL (parsed only as special text, dropped from
replies); other added tokens (MiniMind-3's ``<think>``, ``<tool_call>`` …) are USER_DEFINED, or
llama.cpp's decoder would make them vanish from replies. bos/eos/eot/pad/unk ids are written
explicitly (llama.cpp's gpt2 defaults point at a wrong token), and no BOS/EOS is ever added.

Known and documented: llama.cpp's decoder drops the space in " ?", " !", " .", " ," and " 's"
for this pre-tokenizer (its clean_spaces); no metadata changes it. Token ids are unaffected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import gguf

from minimind_core.tokenizer import Tokenizer

TOKENIZER_MODEL = "gpt2"
PRE_TOKENIZER = "gpt-2"  # tokenizer.json: ByteLevel(add_prefix_space=False, use_regex=True)
# llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2 regex; tokenizer.json: Split(this, Isolated) + ByteLevel
# without its own regex
QWEN2_PRE_TOKENIZER = "qwen2"
QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
               "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
END_OF_TURN = "<|im_end|>"  # ChatML's end of turn, both generations


@dataclass
class GGUFVocab:
    """Everything ``tokenizer.ggml.*`` holds for one tokenizer, padded to the model's vocab."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    eot_id: int
    pad_id: int | None
    unk_id: int | None
    chat_template: str | None
    pre_tokenizer: str = PRE_TOKENIZER

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(TOKENIZER_MODEL)
        writer.add_tokenizer_pre(self.pre_tokenizer)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        writer.add_bos_token_id(self.bos_id)
        writer.add_eos_token_id(self.eos_id)
        writer.add_eot_token_id(self.eot_id)
        if self.pad_id is not None:
            writer.add_pad_token_id(self.pad_id)
        if self.unk_id is not None:
            writer.add_unk_token_id(self.unk_id)
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def build_vocab(tok: Tokenizer, vocab_size: int) -> GGUFVocab:
    """The GGUF vocabulary of ``tok`` for a model with ``vocab_size`` embedding rows.

    Ids the tokenizer does not use (the model's vocab is larger) become UNUSED ``[PADn]`` tokens,
    as convert_hf_to_gguf.py writes them. Raises ValueError for a tokenizer llama.cpp's gpt2 BPE
    would not reproduce, or one larger than the model.
    """
    data = json.loads((tok.path / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model") or {}
    pre = pre_tokenizer(tok, data)
    n = tok.vocab_size
    if n > vocab_size:
        raise ValueError(f"the tokenizer in {tok.path} has {n} tokens but the model only "
                         f"{vocab_size} embedding rows; pass the model's own tokenizer (--tokenizer)")
    special = tok.special_token_ids
    added = {int(t["id"]) for t in data.get("added_tokens", [])}
    base_vocab = set(model.get("vocab", {}).values())
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        text = tok.id_to_token(i) if i < n else None
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in special:
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL)
        elif i in added or i not in base_vocab:
            tokens.append(text)
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    def required(name: str, token: str | None) -> int:
        token_id = tok.token_to_id(token) if token is not None else None
        if token_id is None:
            raise ValueError(f"{tok.path}: tokenizer_config.json names no {name} token in the "
                             f"vocabulary; llama.cpp needs one")
        return token_id

    bos = required("bos", tok.bos_token)
    eos = required("eos", tok.eos_token)
    eot = tok.token_to_id(END_OF_TURN)
    unk = tok.special_tokens_map.get("unk_token")
    return GGUFVocab(tokens=tokens, token_types=[int(t) for t in types], merges=merges,
                     bos_id=bos, eos_id=eos, eot_id=eos if eot is None else eot,
                     pad_id=tok.pad_token_id,
                     unk_id=tok.token_to_id(unk) if unk is not None else None,
                     chat_template=tok.chat_template, pre_tokenizer=pre)


def pre_tokenizer(tok: Tokenizer, data: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer; ValueError for one it does not have."""
    model = data.get("model") or {}
    if model.get("type") != "BPE" or data.get("normalizer") is not None:
        raise ValueError(f"{tok.path}: only a byte-level BPE without a normalizer (MiniMind's) "
                         f"maps onto llama.cpp's gpt2 tokenizer; this one is "
                         f"{model.get('type')!r} with normalizer {data.get('normalizer')!r}")
    pre = data.get("pre_tokenizer") or {}
    if _byte_level(pre, use_regex=True):
        return PRE_TOKENIZER
    steps = pre.get("pretokenizers") or []
    if (pre.get("type") == "Sequence" and len(steps) == 2 and steps[0].get("type") == "Split"
            and (steps[0].get("pattern") or {}).get("Regex") == QWEN2_REGEX
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
            and _byte_level(steps[1], use_regex=False)):
        return QWEN2_PRE_TOKENIZER
    raise ValueError(f"{tok.path}: the pre-tokenizer is {pre!r}; llama.cpp's gpt-2 pre-tokenizer "
                     f"equals only ByteLevel(add_prefix_space=False, use_regex=True) (MiniMind's), "
                     f"its qwen2 one only Qwen2's regex split then ByteLevel")


def _byte_level(step: dict, use_regex: bool) -> bool:
    return (step.get("type") == "ByteLevel" and bool(step.get("use_regex", True)) == use_regex
            and not step.get("add_prefix_space"))
