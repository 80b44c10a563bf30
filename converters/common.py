"""What every converter shares: the guards that keep a user's files safe, tokenizer copying,
hashing, progress lines and the command-line exit status.

Every writer (to_hf, to_mlx, merge_lora, to_gguf, the MLX cache) keeps the same promises
(README, "Safety"), each kept by one function that it calls from here:

- inputs are never touched: ``check_paths`` / ``guard_output`` refuse a DST that is an input,
  holds one, or lies inside one, on resolved paths (symlinks and ``..`` followed, hard links and
  case-insensitive names caught by ``os.path.samefile``);
- ``--force`` replaces only an earlier output of ours (``check_destination``, our ``MANIFEST``);
- writes are atomic (``atomic_dir`` / ``atomic_file``), and SIGTERM, SIGHUP or Ctrl-C remove the
  temporary and exit 143/129/130 (``handle_signals``, ``exit_status``); what a SIGKILL left is
  removed by the next write to the same DST (``remove_stale_temps``);
- a failed write (disk full, file-size limit) raises ``WriteError`` naming DST and the cause,
  and leaves the previous output byte-identical with nothing beside it.

The output half (destination, manifest, atomic writing, signals) lives in ``output.py`` and is
re-exported here. A new writer does::

    src, dst = check_paths(src, dst, force, inputs=(tokenizer_input(src, tokenizer), lora),
                           folder=False)            # before reading anything
    ...read, convert...
    guard_output(dst, [src, tok, lora], force=force, folder=False)  # inputs found on the way
    with atomic_file(dst, force) as tmp:            # or atomic_dir(dst, force, writer=...)
        write(tmp)
    # and its main(): return exit_status(lambda: convert(...))
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from minimind_core.paths import sha256_file
from minimind_core.tokenizer import TEMPLATE_DIR, TOKENIZER_FILES

from .output import (  # noqa: F401  (re-exported: writers import everything from common)
    MANIFEST,
    DestinationExistsError,
    Interrupted,
    RefusedError,
    WriteError,
    atomic_dir,
    atomic_file,
    check_destination,
    display_path,
    foreign,
    handle_signals,
    remove_stale_temps,
    write_manifest,
)

EXIT_FAILED = 1   # the conversion ran and could not finish (a failed write, a missing package)
EXIT_REFUSED = 2  # the input was refused before anything was written


# --- inputs and destinations -----------------------------------------------------------------

def _same(a: Path, b: Path) -> bool:
    """One file or folder under two names (hard links, case-insensitive disks), or equal paths."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a == b


def guard_output(dst: str | Path, inputs: Iterable[str | Path | None], *, force: bool,
                 folder: bool = True) -> Path:
    """Check DST against every input before anything is read or written; return DST resolved.

    ``inputs``: every path the conversion reads (SRC, the tokenizer folder, a LoRA; None entries
    are skipped). ``folder``: whether the writer writes a folder (False: one file). Raises
    RefusedError when DST is an input, holds one or lies inside one, and whatever
    ``check_destination`` raises.
    """
    raw = Path(dst).expanduser()
    target = raw.resolve()
    for item in inputs:
        if item is None:
            continue
        src = Path(getattr(item, "path", item)).expanduser().resolve()
        if _same(target, src):
            raise RefusedError(f"destination {display_path(raw)} is the input {display_path(src)};"
                               f" write the output somewhere else")
        if any(_same(target, p) for p in src.parents):
            raise RefusedError(f"destination {display_path(raw)} holds the input "
                               f"{display_path(src)}, which replacing it would delete; write the "
                               f"output somewhere else")
        if any(_same(p, src) for p in target.parents):
            raise RefusedError(f"destination {display_path(raw)} lies inside the input "
                               f"{display_path(src)}; write the output somewhere else")
    return check_destination(raw, force, folder=folder)


def check_paths(src: str | Path, dst: str | Path, force: bool,
                inputs: Iterable[str | Path | None] = (), *, folder: bool = True
                ) -> tuple[Path, Path]:
    """The checks every converter makes before reading anything: SRC exists, and DST passes
    ``guard_output`` against SRC and the other ``inputs`` (a tokenizer, a LoRA); ``folder``:
    whether DST is a folder (False: one file). Returns both expanded (``~``)."""
    src = Path(src).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"source not found: {display_path(src)} (expected a "
                                f".pth/.safetensors file or a model folder)")
    guard_output(dst, [src, *inputs], force=force, folder=folder)
    return src, Path(dst).expanduser()


def tokenizer_input(src: str | Path, tokenizer: Any = None) -> Path | None:
    """The tokenizer folder a conversion of ``src`` will read (the one ``find_tokenizer`` picks),
    found by path alone, so DST can be checked against it before anything is read."""
    from minimind_core.tokenizer import TOKENIZER_FILE, candidate_folders

    if tokenizer is not None:
        return Path(getattr(tokenizer, "path", tokenizer)).expanduser()
    for folder in candidate_folders(src):
        if (folder / TOKENIZER_FILE).is_file():
            return folder
    return None


# --- tokenizer, hashes, progress -----------------------------------------------------------------

def copy_tokenizer(tokenizer: Any, dst: str | Path) -> list[str]:
    """Copy the tokenizer files (and chat templates) of a Tokenizer or a tokenizer folder to ``dst``.

    Returns the names copied. Raises FileNotFoundError when the folder has no tokenizer.json.
    """
    folder = Path(getattr(tokenizer, "path", tokenizer)).expanduser()
    if folder.is_file():
        folder = folder.parent
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{display_path(folder)}: no tokenizer.json to copy; pass a "
                                f"tokenizer folder")
    dst = Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, dst / name)
            copied.append(name)
    if (folder / TEMPLATE_DIR).is_dir():
        (dst / TEMPLATE_DIR).mkdir(exist_ok=True)
        for file in sorted((folder / TEMPLATE_DIR).glob("*.jinja")):
            shutil.copyfile(file, dst / TEMPLATE_DIR / file.name)
        copied.append(TEMPLATE_DIR)
    return copied


def sha256_files(paths: Sequence[str | Path]) -> str:
    """One file: its sha256. Several (shards): the sha256 of their sha256s in the given order."""
    digests = [sha256_file(p) for p in paths]
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(digests).encode()).hexdigest()


class Progress:
    """One stderr line per step of a long conversion; ``done`` adds the total time.

        progress = Progress("to_mlx")
        progress("reading out/full_sft_512.pth")
        progress("writing model.safetensors")
        progress.done("wrote out/mlx")
    """

    def __init__(self, name: str, enabled: bool = True, stream: Any = None) -> None:
        self.name, self.enabled = name, enabled
        self.stream = stream
        self._t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        self._print(f"[{self.name}] {message} …")

    def done(self, message: str) -> None:
        self._print(f"[{self.name}] {message} ({time.perf_counter() - self._t0:.1f}s)")

    def _print(self, line: str) -> None:
        if self.enabled:
            print(line, file=self.stream or sys.stderr, flush=True)


def folder_size(path: str | Path) -> int:
    """Total bytes of the files directly in a folder (what a model folder weighs on disk)."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def exit_status(call: Callable[[], Any], prog: str | None = None) -> int:
    """Run a converter for the command line; every outcome is one line on stderr, no traceback.

    Refused input (a bad path or option, an existing DST, a malformed checkpoint): exit 2. A
    failed write or a missing package: exit 1. Ctrl-C: "interrupted", 130; SIGTERM 143, SIGHUP
    129 (temporaries removed first). ``prog`` starts each line ("minimind: error: ...").
    """
    lead = f"{prog}: " if prog else ""
    with handle_signals():
        try:
            call()
        except KeyboardInterrupt as e:
            how = f" ({e.name})" if isinstance(e, Interrupted) else ""
            print(f"{lead}interrupted{how}", file=sys.stderr)
            return e.exit_code if isinstance(e, Interrupted) else 130
        except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                IsADirectoryError) as e:
            print(f"{lead}error: {e}", file=sys.stderr)
            return EXIT_REFUSED
        except (OSError, ImportError) as e:
            print(f"{lead}error: {e}", file=sys.stderr)
            return EXIT_FAILED
    return 0


def provenance(fmt: str, converter: str, config: Any, dtype: str, source: Path | None,
               files: Sequence[str | Path], lora: str | Path | None,
               config_dict: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``minimind`` block of a written config.json: what was converted, from what, by what."""
    files = [Path(f) for f in files if Path(f).is_file()]
    return {
        "format": fmt,
        "converter": converter,
        "generation": config.generation,
        "kind": config.kind,
        "dtype": dtype,
        "source": display_path(source) if source else None,
        "source_sha256": sha256_files(files) if files else None,
        "lora": display_path(lora) if lora else None,
        "config": config.to_dict() if config_dict is None else config_dict,
    }


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def add_converter_args(parser: Any, dst_help: str) -> None:
    """SRC, DST and the options every converter takes (--tokenizer, --lora, --force, --quiet)."""
    parser.add_argument("src", help="a .pth / .safetensors file or a model folder")
    parser.add_argument("dst", help=dst_help)
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder (default: beside SRC or in upstream's model/)")
    parser.add_argument("--lora", default=None, help="an upstream LoRA file to merge first")
    parser.add_argument("--force", action="store_true",
                        help="replace DST if it is an earlier output of this converter")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
