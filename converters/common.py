"""What every converter shares: the guards that keep a user's files safe, atomic writing,
tokenizer copying, hashing, progress lines and the command-line exit status.

Every writer (to_hf, to_mlx, merge_lora, to_gguf, the MLX cache) keeps the same promises, each
kept by one function here (README, "Safety"):

- inputs are never touched: ``guard_output`` refuses a DST that is an input, holds one, or lies
  inside one, on resolved paths (symlinks and ``..`` followed, hard links and case-insensitive
  names caught by ``os.path.samefile``);
- ``--force`` replaces only an earlier output of ours (``check_destination``): a folder whose
  manifest (``MANIFEST``, written by ``atomic_dir``) lists exactly what is in it, or, for a
  single-file writer, a regular file; anything else is refused and never emptied;
- writes are atomic (``atomic_dir`` / ``atomic_file``): a hidden temporary sibling
  (``.DST.minimind-tmp-PID-XXXX``) is written, fsynced and renamed into place; on SIGTERM,
  SIGHUP or Ctrl-C the temporary is removed and the command exits 143/129/130
  (``handle_signals``, ``exit_status``); temporaries a SIGKILL left behind are removed by the
  next write to the same DST (``remove_stale_temps``: name pattern + dead pid or age);
- a failed write (disk full, file-size limit, read-only disk) raises ``WriteError`` naming DST
  and the cause, and leaves the previous output byte-identical with nothing beside it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

# Files a tokenizer folder may hold (transformers' names); model weights and configs never match.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "vocab.json", "merges.txt", "tokenizer.model")
TEMPLATE_DIR = "additional_chat_templates"

# Our marker: every folder atomic_dir writes lists its files (name -> size) here.
MANIFEST = "minimind-manifest.json"
MANIFEST_WRITER = "minimind-core"
# Outputs of versions before the manifest: these names only, plus our config.json block.
_LEGACY_NAMES = re.compile(r"^(config\.json|generation_config\.json|README\.md|model\.safetensors"
                           r"|model-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index\.json"
                           r"|adapters\.safetensors|adapter_config\.json|" +
                           "|".join(re.escape(n) for n in TOKENIZER_FILES) +
                           rf"|{TEMPLATE_DIR}/[^/]+\.jinja)$")

# A temporary sibling that outlives its writer's pid, or this age, was left by a killed run.
MAX_TEMP_AGE_S = 12 * 3600
# Temporaries of versions before the pid in the name: removed once this old.
LEGACY_TEMP_AGE_S = 3600
# errno values that mean "the disk refused the bytes", reported as WriteError.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES,
                 errno.EPERM, errno.ENAMETOOLONG}

EXIT_FAILED = 1   # the conversion ran and could not finish (a failed write, a missing package)
EXIT_REFUSED = 2  # the input was refused before anything was written


class RefusedError(ValueError):
    """An input or destination a converter refuses; nothing was read or written (exit 2)."""


class DestinationExistsError(RefusedError, FileExistsError):
    """DST exists and ``force`` was not given (a RefusedError and a FileExistsError)."""


class WriteError(OSError):
    """The output could not be written (disk full, ...); the previous output is unchanged."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived while a converter ran (Ctrl-C stays a plain KeyboardInterrupt)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def display_path(path: str | Path) -> str:
    """A path as text that prints and serialises anywhere: bytes that are not UTF-8 (which
    Python keeps as lone surrogates) become ``\\xNN`` escapes instead of an encoding error."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


# --- inputs and destinations -----------------------------------------------------------------

def _same(a: Path, b: Path) -> bool:
    """One file or folder under two names (hard links, case-insensitive disks), or equal paths."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a == b


def _chain(path: Path) -> list[Path]:
    return [path, *path.parents]


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


def check_destination(dst: str | Path, force: bool, *, folder: bool = True) -> Path:
    """DST may be written: it does not exist, or ``force`` is set and it is ours to replace.

    Ours: for a folder writer, an empty folder or one our manifest describes (``foreign``); for a
    file writer, a regular file. A symlink is never replaced. Returns DST resolved. Raises
    DestinationExistsError (no force) or RefusedError (not ours, saying why).
    """
    raw = Path(dst).expanduser()
    shown = display_path(raw)
    if raw.is_symlink():
        raise RefusedError(f"destination {shown} is a symbolic link (to {display_path(os.readlink(raw))});"
                           f" give the real path, or remove the link")
    target = raw.resolve()
    if not target.name:
        raise RefusedError(f"destination {shown} is a filesystem root; pick a folder inside it")
    if not target.exists():
        return target
    if not force:
        raise DestinationExistsError(f"{shown} exists; pass force=True (CLI: --force) to replace it")
    if folder:
        if not target.is_dir():
            raise RefusedError(f"destination {shown} is a file, not a folder we wrote; --force "
                               f"replaces only an earlier output of ours; remove it yourself or "
                               f"pick another name")
        why = foreign(target)
        if why:
            raise RefusedError(f"destination {shown} was not written by this converter ({why}); "
                               f"--force replaces only an earlier output of ours and never empties"
                               f" another folder: remove it yourself or pick another name")
    elif not target.is_file():
        raise RefusedError(f"destination {shown} is a folder (or not a regular file); --force "
                           f"replaces only a file; pick a file name")
    return target


def _entries(folder: Path) -> dict[str, int]:
    """Every file and link under ``folder`` (relative POSIX path -> size), links not followed."""
    def fail(error: OSError) -> None:
        raise error  # a folder we cannot read is never taken for an empty one

    out = {}
    for root, dirs, files in os.walk(folder, onerror=fail):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            full = Path(root, name)
            out[full.relative_to(folder).as_posix()] = full.lstat().st_size
    return out


def foreign(folder: str | Path) -> str | None:
    """Why ``folder`` is not an output of ours, or None when it is (so --force may replace it).

    Ours: empty, or our manifest lists every file in it with its size (nothing added, removed or
    changed since); or, for outputs of versions before the manifest, only the names our writers
    write plus config.json's ``minimind`` block (an mlx_lm adapter folder: its two files).
    """
    folder = Path(folder)
    try:
        found = _entries(folder)
    except OSError as e:
        return f"it cannot be read: {e.strerror or e}"
    if not found:
        return None
    manifest = folder / MANIFEST
    if manifest.is_file() and not manifest.is_symlink():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            listed = data["files"]
            ok = (isinstance(listed, dict) and str(data.get("writer", "")).startswith(MANIFEST_WRITER))
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            return f"its {MANIFEST} is not one of ours"
        for name, size in sorted(found.items()):
            if name == MANIFEST:
                continue
            if name not in listed:
                return f"it holds {name}, which we did not write"
            if listed[name] != size:
                return f"{name} changed since we wrote it"
        return None
    strange = sorted(n for n in found if not _LEGACY_NAMES.match(n))
    if strange:
        return f"it holds {strange[0]}, which we did not write"
    if set(found) >= {"adapters.safetensors", "adapter_config.json"} and "config.json" not in found:
        return None
    try:
        block = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("minimind")
        if str(block.get("converter", "")).startswith(MANIFEST_WRITER):
            return None
    except (OSError, ValueError, AttributeError):
        pass
    return f"no {MANIFEST} and no minimind block in its config.json"


def write_manifest(folder: Path, writer: str) -> None:
    """List what ``folder`` holds, so a later ``--force`` knows the folder is ours."""
    files = {n: s for n, s in sorted(_entries(folder).items()) if n != MANIFEST}
    data = {"writer": f"{MANIFEST_WRITER} {writer}".strip(), "files": files}
    (folder / MANIFEST).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


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


# --- signals ------------------------------------------------------------------------------------

class _SignalState:
    depth = 0            # nested handle_signals() contexts
    previous: dict[int, Any] = {}
    defer = 0            # inside a rename that must not be cut in two
    pending: int | None = None
    raised = False       # an interrupt is already unwinding: later signals are ignored


_STATE = _SignalState()


def _on_signal(signum: int, frame: Any) -> None:
    if _STATE.raised:
        return
    if _STATE.defer:
        _STATE.pending = _STATE.pending or signum
        return
    _STATE.raised = True
    raise KeyboardInterrupt if signum == signal.SIGINT else Interrupted(signum)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """While inside: SIGTERM and SIGHUP (when their handler is the default, which kills the
    process) and Ctrl-C raise, so ``finally`` blocks remove temporaries; nested uses are free.

    Only in the main thread (Python delivers signals there); a handler the program set itself
    (a server's) is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _STATE.depth == 0:
        _STATE.previous, _STATE.pending, _STATE.raised = {}, None, False
        for sig, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGHUP, signal.SIG_DFL),
                             (signal.SIGINT, signal.default_int_handler)):
            if signal.getsignal(sig) is default:
                _STATE.previous[sig] = signal.signal(sig, _on_signal)
    _STATE.depth += 1
    try:
        yield
    finally:
        _STATE.depth -= 1
        if _STATE.depth == 0:
            for sig, handler in _STATE.previous.items():
                signal.signal(sig, handler)
            _STATE.previous = {}


@contextlib.contextmanager
def _deferred_signals() -> Iterator[None]:
    """Hold our signals until the block ends (a swap of two renames is never cut in two)."""
    _STATE.defer += 1
    try:
        yield
    finally:
        _STATE.defer -= 1
        signum, _STATE.pending = _STATE.pending, None
        if signum is not None and not _STATE.defer and not _STATE.raised:
            _STATE.raised = True
            raise KeyboardInterrupt if signum == signal.SIGINT else Interrupted(signum)


# --- temporaries ---------------------------------------------------------------------------------

def _temp_name(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.minimind-{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or a pid we cannot ask about): assume alive
    return True


def _age(path: Path) -> float:
    """Seconds since anything in ``path`` (or its direct children) last changed."""
    stamps = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        with contextlib.suppress(OSError):
            stamps += [c.lstat().st_mtime for c in path.iterdir()]
    return time.time() - max(stamps)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale_temps(dst: str | Path) -> list[Path]:
    """Remove the temporaries of DST that a killed run left behind; return what was removed.

    ``.DST.minimind-tmp-PID-XXXX`` whose pid is gone (or older than MAX_TEMP_AGE_S) is removed;
    ``.DST.minimind-old-PID-XXXX`` (the previous output, moved aside during the swap) is renamed
    back to DST when DST is missing, else removed. Temporaries of older versions
    (``.DST.tmp-*``, ``.DST.*.tmp``) go once LEGACY_TEMP_AGE_S old. Live runs' are kept.
    """
    target = Path(dst).expanduser().resolve()
    ours = re.compile(rf"^\.{re.escape(target.name)}\.minimind-(tmp|old)-(\d+)-[0-9a-f]+$")
    legacy = re.compile(rf"^\.{re.escape(target.name)}\.(tmp-\w+|old-\w+|\w+\.tmp)$")
    removed: list[Path] = []
    try:
        siblings = [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")]
    except OSError:
        return removed
    for path in siblings:
        try:
            if m := ours.match(path.name):
                pid = int(m.group(2))
                if pid == os.getpid() or (_pid_alive(pid) and _age(path) < MAX_TEMP_AGE_S):
                    continue
                if m.group(1) == "old" and not target.exists() and not target.is_symlink():
                    os.rename(path, target)  # the swap was cut between its two renames
                    continue
            elif not (legacy.match(path.name) and _age(path) > LEGACY_TEMP_AGE_S):
                continue
            _remove(path)
            removed.append(path)
        except OSError:
            continue  # another run got there first, or it is not ours to remove
    return removed


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # a disk without fsync
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                _fsync(Path(root, name))
        _fsync(Path(root))


def _write_error(e: BaseException, target: Path, existed: bool) -> WriteError | None:
    """A write failure as one WriteError naming DST and the cause; None for any other error."""
    if isinstance(e, (WriteError, RefusedError, FileNotFoundError)):
        return None
    cause, seen, cur = None, set(), e
    while cur is not None and id(cur) not in seen and cause is None:  # torch wraps the OSError
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _WRITE_ERRNOS:
            cause = cur.strerror or str(cur)
        cur = cur.__cause__ or cur.__context__
    if cause is None and isinstance(e, RuntimeError) and "writ" in str(e).lower():  # mlx
        cause = f"{str(e).splitlines()[0][:200]} (a full disk or a file-size limit?)"
    if cause is None:
        return None
    try:
        free = f"; {shutil.disk_usage(target.parent).free / 1e6:.1f} MB free there"
    except OSError:
        free = ""
    kept = "the previous output is unchanged" if existed else "nothing was written"
    err = WriteError(f"cannot write {display_path(target)}: {cause}{free}; {kept}")
    err.errno = getattr(e, "errno", None) or errno.EIO
    return err


def _prepare(dst: str | Path, force: bool, folder: bool) -> tuple[Path, bool]:
    target = check_destination(dst, force, folder=folder)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(e, target, False) or e from None
    remove_stale_temps(target)
    return target, target.exists()


@contextlib.contextmanager
def atomic_dir(dst: str | Path, force: bool = False, writer: str = "") -> Iterator[Path]:
    """Yield a temporary folder beside ``dst``; on success it replaces ``dst`` in one rename.

    ``check_destination`` runs first (an existing ``dst`` needs ``force=True`` and must be ours).
    The folder gets our manifest (``writer`` names the converter), every file is fsynced, then
    renamed into place. On any error, Ctrl-C, SIGTERM or SIGHUP the temporary folder is removed
    and ``dst`` is left as it was; a failed write becomes a WriteError naming ``dst``.
    """
    target, existed = _prepare(dst, force, folder=True)
    with handle_signals():
        tmp = _temp_name(target, "tmp")
        try:
            os.mkdir(tmp)  # 0777 less the umask: the result is for everyone, as any new folder
        except OSError as e:
            raise _write_error(e, target, existed) or e from None
        try:
            yield tmp
            write_manifest(tmp, writer)
            _fsync_tree(tmp)
            _swap(tmp, target)
        except BaseException as e:
            _remove(tmp)
            err = _write_error(e, target, existed)
            if err is not None:
                raise err from None
            raise


@contextlib.contextmanager
def atomic_file(dst: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``dst`` (the file exists, empty); on success it
    replaces ``dst`` in one rename. The same guarantees as ``atomic_dir`` (no manifest: a file
    writer may replace any regular file the user names with ``force``)."""
    target, existed = _prepare(dst, force, folder=False)
    with handle_signals():
        tmp = _temp_name(target, "tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except OSError as e:
            raise _write_error(e, target, existed) or e from None
        try:
            yield tmp
            _fsync(tmp)
            _swap(tmp, target)
        except BaseException as e:
            _remove(tmp)
            err = _write_error(e, target, existed)
            if err is not None:
                raise err from None
            raise


def _swap(tmp: Path, target: Path) -> None:
    """Put ``tmp`` where ``target`` is; an old folder is moved aside first and removed after, so
    ``target`` never holds a mix, and a cut between the renames is repaired by the next run."""
    with _deferred_signals():
        if target.is_dir() and not target.is_symlink():
            old = _temp_name(target, "old")
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            _fsync(target.parent)
            _remove(old)
        else:
            os.replace(tmp, target)
        _fsync(target.parent)


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
            how = f" ({signal.Signals(e.signum).name})" if isinstance(e, Interrupted) else ""
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
