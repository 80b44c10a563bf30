"""Where an output goes: the destination checks, our manifest, atomic writing and signals.

The half of the writers' promises (README, "Safety") that concerns the output; ``common.py``
re-exports everything here, so a writer imports from ``converters.common`` alone:

- ``check_destination``: ``--force`` replaces only an earlier output of ours (a folder whose
  ``MANIFEST`` lists exactly what is in it, or a regular file for a single-file writer);
- ``atomic_dir`` / ``atomic_file``: a hidden temporary sibling (``.DST.minimind-tmp-PID-XXXX``)
  written, fsynced and renamed into place; a failed write becomes a ``WriteError`` naming DST;
- ``handle_signals``: SIGTERM, SIGHUP and Ctrl-C unwind (removing the temporary) instead of
  killing the process; ``remove_stale_temps``: what a SIGKILL left is removed by the next run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from minimind_core.tokenizer import TEMPLATE_DIR, TOKENIZER_FILES

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
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def display_path(path: str | Path) -> str:
    """A path as text that prints and serialises anywhere: bytes that are not UTF-8 (which
    Python keeps as lone surrogates) become ``\\xNN`` escapes instead of an encoding error."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


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
        hup = getattr(signal, "SIGHUP", None)  # (no SIGHUP on Windows)
        for sig, default in ((signal.SIGTERM, signal.SIG_DFL), (hup, signal.SIG_DFL),
                             (signal.SIGINT, signal.default_int_handler)):
            if sig is not None and signal.getsignal(sig) is default:
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
    def make(tmp: Path) -> None:
        os.mkdir(tmp)  # 0777 less the umask: the result is for everyone, as any new folder

    def finish(tmp: Path) -> None:
        write_manifest(tmp, writer)
        _fsync_tree(tmp)

    with _atomic(dst, force, True, make, finish) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_file(dst: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``dst`` (the file exists, empty); on success it
    replaces ``dst`` in one rename. The same guarantees as ``atomic_dir`` (no manifest: a file
    writer may replace any regular file the user names with ``force``)."""
    def make(tmp: Path) -> None:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))

    with _atomic(dst, force, False, make, _fsync) as tmp:
        yield tmp


@contextlib.contextmanager
def _atomic(dst: str | Path, force: bool, folder: bool, make: Callable[[Path], None],
            finish: Callable[[Path], None]) -> Iterator[Path]:
    """What both atomic writers share: the destination checks, a temporary sibling made by
    ``make``, ``finish`` (manifest, fsync) and the rename, under the signal handlers; any
    failure removes the temporary and becomes a WriteError naming ``dst`` where it is one."""
    target, existed = _prepare(dst, force, folder=folder)
    with handle_signals():
        tmp = _temp_name(target, "tmp")
        try:
            make(tmp)
        except OSError as e:
            raise _write_error(e, target, existed) or e from None
        try:
            yield tmp
            finish(tmp)
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
