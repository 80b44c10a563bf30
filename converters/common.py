"""What every converter shares: atomic folder writing, tokenizer copying, hashing, progress lines.

Writers never leave a half-written folder behind: they write into a hidden temporary sibling of
the destination and rename it into place only when everything is there.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

# Files a tokenizer folder may hold (transformers' names); model weights and configs never match.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "vocab.json", "merges.txt", "tokenizer.model")
TEMPLATE_DIR = "additional_chat_templates"


def check_paths(src: str | Path, dst: str | Path, force: bool) -> tuple[Path, Path]:
    """The checks every converter makes before reading anything: SRC exists, DST is free (or
    ``force``), and DST is neither SRC nor inside it. Returns both as expanded Paths."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"source not found: {src} (expected a .pth/.safetensors file or "
                                f"a model folder)")
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists; pass force=True (CLI: --force) to replace it")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ValueError(f"destination {dst} is the source or inside it; pick another folder")
    return src, dst


@contextlib.contextmanager
def atomic_dir(dst: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``dst``; on success it replaces ``dst`` in one rename.

    An existing ``dst`` needs ``force=True`` (FileExistsError otherwise, raised before anything
    is written). On any error, or Ctrl-C, the temporary folder is removed and ``dst`` is left as
    it was.
    """
    dst = Path(dst).expanduser()
    if (dst.exists() or dst.is_symlink()) and not force:
        raise FileExistsError(f"{dst} exists; pass force=True (CLI: --force) to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; the result is for everyone
    try:
        yield tmp
        old = None
        if dst.is_symlink() or dst.is_file():
            dst.unlink()
        elif dst.exists():
            # Move the old folder aside first, so dst never holds a mix of old and new files.
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, old / dst.name)
        os.replace(tmp, dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(dst: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``dst``; on success it replaces ``dst`` in one rename.

    The file counterpart of ``atomic_dir``: an existing ``dst`` needs ``force=True``
    (FileExistsError otherwise, before anything is written), a folder at ``dst`` is refused, and
    on any error or Ctrl-C the temporary file is removed and ``dst`` is left as it was.
    """
    dst = Path(dst).expanduser()
    if dst.is_dir():
        raise ValueError(f"{dst} is a folder; pass the path of the file to write")
    if (dst.exists() or dst.is_symlink()) and not force:
        raise FileExistsError(f"{dst} exists; pass force=True (CLI: --force) to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dst.name}.tmp-", dir=dst.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; the result is for everyone
    try:
        yield tmp
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_tokenizer(tokenizer: Any, dst: str | Path) -> list[str]:
    """Copy the tokenizer files (and chat templates) of a Tokenizer or a tokenizer folder to ``dst``.

    Returns the names copied. Raises FileNotFoundError when the folder has no tokenizer.json.
    """
    folder = Path(getattr(tokenizer, "path", tokenizer)).expanduser()
    if folder.is_file():
        folder = folder.parent
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer.json to copy; pass a tokenizer folder")
    dst = Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, dst / name)
            copied.append(name)
    if (folder / TEMPLATE_DIR).is_dir():
        shutil.copytree(folder / TEMPLATE_DIR, dst / TEMPLATE_DIR, dirs_exist_ok=True)
        copied.append(TEMPLATE_DIR)
    return copied


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


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


def exit_status(call: Callable[[], Any]) -> int:
    """Run a converter; a user error (bad path, existing DST, bad option) becomes one line on
    stderr and exit status 1 instead of a traceback."""
    try:
        call()
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
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
        "source": str(source) if source else None,
        "source_sha256": sha256_files(files) if files else None,
        "lora": str(lora) if lora else None,
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
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
