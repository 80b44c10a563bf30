"""Compile one C file of this package into a shared library, once per machine, and load it.

Used by ``qkernels.c`` (quant.py) and written so ``kernels.c`` (native.py) can use it too. The
library lands in ``native/`` of minimind-core's cache (``$MINIMIND_CACHE``, default
``~/.cache/minimind-core``) named by the source's hash and the compiler, so a changed source or
compiler builds again and nothing else does. A build that fails leaves ``<name>.failed`` with
the command and its output, so later processes do not wait for a broken compiler again (delete
the file to retry). ``MINIMIND_NATIVE=0`` turns every C kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from minimind_core import paths

log = logging.getLogger(__name__)
COMPILE_TIMEOUT = 60  # seconds per attempt; our files compile in about one
BASE_FLAGS = ("-O3", "-fPIC", "-shared")


def disabled() -> bool:
    """True when ``MINIMIND_NATIVE`` switches the C kernels off (0, false, no, off)."""
    return os.environ.get("MINIMIND_NATIVE", "1").lower() in ("0", "false", "no", "off")


def build(source: Path, variants: Sequence[Sequence[str]], *, purpose: str,
          timeout: float | None = None) -> ctypes.CDLL | None:
    """``source`` compiled (cached) and loaded, or None when disabled or no compiler works.

    ``variants`` are extra flag lists tried in order (say OpenMP, then pthreads, then neither);
    the first that compiles is kept. ``purpose`` ends the log lines ("quantized matmuls use
    torch"), telling the user what runs instead.
    """
    if disabled():
        return None
    cc = shlex.split(os.environ.get("CC") or "cc")
    if not cc or shutil.which(cc[0]) is None:
        log.info("no C compiler (%s): %s", " ".join(cc), purpose)
        return None
    stem = source.stem
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    tool = hashlib.sha256(f"{cc}|{list(map(list, variants))}|{platform.machine()}|"
                          f"{sys.platform}".encode()).hexdigest()[:8]
    try:
        target = paths.cache_root() / "native" / f"{stem}-{digest}-{tool}.so"
        failed = target.with_suffix(".failed")
        if failed.exists():
            log.info("%s: building %s failed before (%s; delete it to try again)", purpose,
                     source.name, failed)
            return None
        if not target.exists() and not _compile(cc, source, target, variants, purpose,
                                                COMPILE_TIMEOUT if timeout is None else timeout):
            return None
        return ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as e:  # no home, unwritable cache, a bad .so
        log.warning("%s unavailable (%s); %s", source.name, e, purpose)
        return None


def _compile(cc: list[str], source: Path, target: Path, variants: Sequence[Sequence[str]],
             purpose: str, timeout: float) -> bool:
    """cc source -> target, atomically (the first variant that compiles); when none does,
    ``<target>.failed`` keeps every command and its output."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=target.parent)
    os.close(fd)
    report = []
    try:
        for flags in variants:
            cmd = [*cc, *BASE_FLAGS, *flags, "-o", tmp, str(source), "-lm"]
            ok, output = _run(cmd, timeout)
            if ok:
                os.replace(tmp, target)  # concurrent builds never see half a file
                prefix = target.name[:target.name.rindex("-") + 1]  # stem-digest-
                for old in target.parent.glob(f"{source.stem}-*"):  # builds of earlier sources
                    if not old.name.startswith(prefix):
                        old.unlink(missing_ok=True)
                return True
            report.append(f"{shlex.join(cmd)}\n{output}")
        target.with_suffix(".failed").write_text("\n".join(report))
        log.warning("compiling %s failed, %s:\n%s", source.name, purpose, report[-1].strip())
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _run(cmd: list[str], timeout: float) -> tuple[bool, str]:
    """Run a compiler command; on timeout kill it and its children (its process group)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=hasattr(os, "killpg"))
    try:
        output = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()
        proc.communicate()
        return False, f"no result after {timeout} s"
    return proc.returncode == 0, output
