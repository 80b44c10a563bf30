"""Tokenizer loading and discovery, built on the Rust `tokenizers` library.

`transformers` is deliberately not imported here: it takes seconds to import, and startup must
stay under a second. `Tokenizer` reproduces what `AutoTokenizer.from_pretrained(folder)` does for
a fast tokenizer (special tokens named in tokenizer_config.json, clean_up_tokenization_spaces),
so `encode`/`decode` return exactly what transformers returns. As in transformers 5, BOS/EOS
insertion comes from tokenizer.json's post-processor: with a tokenizer.json present, transformers
ignores tokenizer_config.json's add_bos_token/add_eos_token, and so does this class.

`find_tokenizer` locates the tokenizer for a checkpoint: a `.pth` holds none, and upstream keeps
it in `model/`, a sibling of `out/` where the weights live.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

__all__ = ["Tokenizer", "TokenizerNotFoundError", "candidate_folders", "check_vocab",
           "find_tokenizer"]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
# Every file a tokenizer folder may hold (transformers' names), what converters copy.
TOKENIZER_FILES = (TOKENIZER_FILE, CONFIG_FILE, "special_tokens_map.json", "added_tokens.json",
                   TEMPLATE_FILE, "chat_template.json", "vocab.json", "merges.txt",
                   "tokenizer.model")

# The named special tokens transformers knows (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES).
_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")
# ChatML ends a turn with <|im_end|>; <|endoftext|> ends a document. Both stop generation.
_EXTRA_STOPS = ("<|im_end|>", "<|endoftext|>")
_SLOW_ONLY_NOTE = ("(a folder holding only a slow tokenizer, e.g. vocab.json/merges.txt or "
                   "tokenizer.model, is not supported: save it once with transformers' "
                   "save_pretrained to get tokenizer.json)")


class TokenizerNotFoundError(FileNotFoundError):
    """No tokenizer could be found for a checkpoint; the message lists every path tried."""


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or a dict with "content"."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _added_token(value: Any) -> AddedToken | None:
    """The AddedToken transformers builds for a special token named in tokenizer_config.json."""
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip", "normalized")
                 if k in value}
        flags.setdefault("normalized", False)
        return AddedToken(value["content"], special=True, **flags)
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    except RecursionError:
        raise ValueError(f"{path} is not a tokenizer file: its JSON is nested too deeply") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from None


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (only applied to non-BPE models, as there)."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                     (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                     (" 're", "'re")):
        text = text.replace(old, new)
    return text


class Tokenizer:
    """A fast tokenizer loaded from a folder holding tokenizer.json (+ tokenizer_config.json).

    Args:
        path: the folder. Use `Tokenizer.from_folder` or `find_tokenizer` for friendlier input.
    """

    def __init__(self, path: str | Path) -> None:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            if folder.exists():
                raise FileNotFoundError(f"tokenizer path {folder} is not a folder")
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
        tok_file = folder / TOKENIZER_FILE
        if not tok_file.is_file():
            raise FileNotFoundError(
                f"expected {TOKENIZER_FILE} in {folder}, but it is not there {_SLOW_ONLY_NOTE}")
        self.path: Path = folder
        try:
            self._backend = _Backend.from_file(str(tok_file))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # a bare Exception on bad input; a Rust panic is a BaseException
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise ValueError(f"could not load {tok_file}: {first}") from None
        cfg_file = folder / CONFIG_FILE
        config = _read_json(cfg_file) if cfg_file.is_file() else {}
        if not isinstance(config, dict):
            raise ValueError(f"{cfg_file} should hold a JSON object")
        self.config: dict[str, Any] = config
        self._setup_special_tokens(config)
        self._backend.no_truncation()
        self._backend.no_padding()
        self._backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(self._backend.model).__name__ != "BPE"
            or bool(config.get(
                "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")))
        self._templates = self._load_templates(folder, config)
        empty = sorted(name for name, text in self._templates.items() if not text.strip())
        if empty:
            raise ValueError(f"{folder}: the chat template {empty[0]!r} is empty; give a template, "
                             f"or remove the chat_template key (then the plain 'User: ...' "
                             f"prompt is used)")

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer in `path` (a folder holding tokenizer.json).

        Raises:
            FileNotFoundError: the folder, or tokenizer.json in it, is missing.
            ValueError: tokenizer.json or tokenizer_config.json is corrupt.
        """
        return cls(path)

    # -- loading ---------------------------------------------------------------------------

    def _setup_special_tokens(self, config: dict[str, Any]) -> None:
        # transformers treats every config key ending in "_token" with a token value as a named
        # special token (image_token, ...) and passes all of them to chat templates.
        named: dict[str, Any] = {}
        for key, value in config.items():
            if key in _NAMED_SPECIAL or (key.endswith("_token") and _token_content(value)):
                if _token_content(value) is not None:
                    named[key] = value
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens")
        if isinstance(extra, dict):
            named.update({k: v for k, v in extra.items() if _token_content(v) is not None})
            extra = []
        extra_list = [v for v in (extra or []) if _token_content(v) is not None]
        self.special_tokens_map: dict[str, str] = {
            k: str(_token_content(v)) for k, v in named.items()}

        # Tokens listed in the config's added_tokens_decoder but absent from tokenizer.json.
        decoder = config.get("added_tokens_decoder") or {}
        missing = []
        for _, spec in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            content = _token_content(spec)
            if content is not None and self._backend.token_to_id(content) is None:
                flags = {k: bool(spec[k]) for k in ("single_word", "lstrip", "rstrip",
                                                     "normalized", "special") if k in spec}
                missing.append(AddedToken(content, **flags))
        if missing:
            self._backend.add_tokens(missing)
        # As transformers does: named/extra special tokens that are not yet added tokens are
        # added as special ones (a token already added keeps its flags, as it does there).
        existing = {str(t.content) for t in self._backend.get_added_tokens_decoder().values()}
        to_add = []
        for value in [*named.values(), *extra_list]:
            token = _added_token(value)
            if token is not None and str(token.content) not in existing:
                existing.add(str(token.content))
                to_add.append(token)
        if to_add:
            self._backend.add_special_tokens(to_add)

    @staticmethod
    def _load_templates(folder: Path, config: dict[str, Any]) -> dict[str, str]:
        """Named chat templates; transformers 5 saves them as .jinja files beside the config."""
        raw = config.get("chat_template")
        templates: dict[str, str] = {}
        if isinstance(raw, str):
            templates["default"] = raw
        elif isinstance(raw, dict):
            templates.update({str(k): v for k, v in raw.items() if isinstance(v, str)})
        elif isinstance(raw, list):
            for item in raw:
                if isinstance(item, dict) and isinstance(item.get("template"), str):
                    templates[str(item.get("name", "default"))] = item["template"]
        # As in transformers, template files override the config's chat_template.
        files: dict[str, str] = {}
        if (folder / TEMPLATE_FILE).is_file():
            files["default"] = _read_text(folder / TEMPLATE_FILE)
        if (folder / TEMPLATE_DIR).is_dir():
            for file in sorted((folder / TEMPLATE_DIR).glob("*.jinja")):
                files[file.stem] = _read_text(file)
        return files or templates

    # -- special tokens --------------------------------------------------------------------

    def _special(self, name: str) -> str | None:
        return self.special_tokens_map.get(name)

    @property
    def bos_token(self) -> str | None:
        """The beginning-of-sequence token string, if the config names one."""
        return self._special("bos_token")

    @property
    def eos_token(self) -> str | None:
        """The end-of-sequence token string, if the config names one."""
        return self._special("eos_token")

    @property
    def pad_token(self) -> str | None:
        """The padding token string, if the config names one."""
        return self._special("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        """Id of `bos_token` (None when there is none)."""
        return self._id_or_none(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        """Id of `eos_token` (None when there is none)."""
        return self._id_or_none(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        """Id of `pad_token` (None when there is none)."""
        return self._id_or_none(self.pad_token)

    def _id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self.token_to_id(token)

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """Ids that end generation: eos, plus `<|im_end|>` and `<|endoftext|>` when present."""
        ids = {self.eos_token_id, *(self.token_to_id(t) for t in _EXTRA_STOPS)}
        return frozenset(i for i in ids if i is not None)

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of every special token (the ones `decode(skip_special_tokens=True)` drops)."""
        return frozenset(i for i, t in self._backend.get_added_tokens_decoder().items()
                         if t.special)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # -- chat templates --------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The default chat template (Jinja source), or None when the tokenizer has none."""
        return self.get_chat_template()

    def get_chat_template(self, tools: Any = None) -> str | None:
        """The template transformers would pick: "tool_use" when tools are given, else "default".

        Raises:
            ValueError: several named templates and none called "default".
        """
        if not self._templates:
            return None
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        if len(self._templates) == 1:
            return next(iter(self._templates.values()))
        raise ValueError(f"{self.path} has several chat templates and none named 'default': "
                         f"{sorted(self._templates)}")

    # -- encode / decode -------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`, as `AutoTokenizer.from_pretrained(folder)(text)["input_ids"]`.

        Special tokens written in the text (e.g. `<|im_start|>`) encode to their ids;
        `add_special_tokens=False` leaves out what the post-processor adds (a BOS, if any).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text for token ids, as transformers' `decode(ids, skip_special_tokens=...)`."""
        id_list = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        text = self._backend.decode(id_list, skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def token_to_id(self, token: str) -> int | None:
        """The id of one token string (None when it is not in the vocabulary)."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of one id (None when out of range)."""
        return self._backend.id_to_token(token_id)

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size})"


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
    """Raise ValueError when the tokenizer has ids the model has no embedding for."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer in {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's "
            f"vocabulary has {vocab_size}: it belongs to another model; pass the model's own "
            f"tokenizer (tokenizer=PATH, CLI: --tokenizer PATH)")


def _tokenizer_folder(path: Path) -> Path:
    """A `tokenizer=` argument: a folder, or a tokenizer.json file (its folder is used)."""
    if path.is_file():
        if path.name != TOKENIZER_FILE:
            raise TokenizerNotFoundError(
                f"tokenizer={str(path)!r} is a file but not {TOKENIZER_FILE}; pass the folder "
                f"holding {TOKENIZER_FILE}, or that file itself")
        return path.parent
    if not path.exists():
        raise TokenizerNotFoundError(f"tokenizer={str(path)!r} does not exist")
    if not (path / TOKENIZER_FILE).is_file():
        raise TokenizerNotFoundError(
            f"tokenizer={str(path)!r}: expected {TOKENIZER_FILE} in that folder, but it is not "
            f"there {_SLOW_ONLY_NOTE}")
    return path


def candidate_folders(weights_path: str | Path) -> list[Path]:
    """Folders searched for tokenizer.json for the weights at `weights_path`, in order.

    The folder of the weights (the path itself if it is a folder), then `<ancestor>/model` for the
    weights' first three ancestors: upstream keeps `X/out/full_sft_512.pth` and
    `X/out/lora/lora_x.pth` beside the tokenizer in `X/model/`.
    """
    weights = Path(weights_path).expanduser().resolve()
    base = weights if weights.is_dir() else weights.parent
    found: list[Path] = [base]
    for ancestor in [base, *base.parents][:3]:
        if ancestor / "model" not in found:
            found.append(ancestor / "model")
    return found


def find_tokenizer(weights_path: str | Path | None,
                   tokenizer: str | Path | Tokenizer | None = None) -> Tokenizer:
    """Find and load the tokenizer for a checkpoint.

    Order: the `tokenizer` argument (a Tokenizer, a folder, or a tokenizer.json file; when given
    it must work, there is no fallback), then the folder of `weights_path`, then
    `<ancestor>/model/` for up to three ancestors of the weights (upstream's `out/` + `model/`).

    Raises:
        TokenizerNotFoundError: nothing found; the message lists every path tried.
        ValueError: a tokenizer file was found but is corrupt.
    """
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if tokenizer is not None:
        return Tokenizer(_tokenizer_folder(Path(tokenizer).expanduser()))
    how = "pass one with tokenizer=PATH (CLI: --tokenizer PATH), a folder holding tokenizer.json"
    if weights_path is None:
        raise TokenizerNotFoundError(f"no tokenizer given and no weights path to search; {how}")
    tried = []
    for folder in candidate_folders(weights_path):
        if (folder / TOKENIZER_FILE).is_file():
            return Tokenizer(folder)
        tried.append(folder / TOKENIZER_FILE)
    listing = "\n".join(f"  - {p}" for p in tried)
    raise TokenizerNotFoundError(
        f"no tokenizer found for {weights_path}; tried:\n{listing}\n{how} {_SLOW_ONLY_NOTE}")
