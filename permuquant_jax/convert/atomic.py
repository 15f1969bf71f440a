"""Write a directory all at once, and stop cleanly on SIGINT / SIGTERM.

The output is built in a temporary directory beside the target (marked as ours by a file holding our
pid) and renamed into place at the end, so an interrupted or failed run leaves no output, and an
existing output it replaces stays whole until the new one is complete. Temporary directories of
processes that died without cleaning up (SIGKILL, power loss) are removed by the next run.

Signals: Python runs a signal handler between two bytecodes of the main thread, wherever that is,
including inside a garbage-collection callback (JAX has one) or a `__del__`, where an exception it
raises is printed and swallowed. So the handler here records the signal and raises :class:`Interrupted`,
and keeps re-raising it every `RETRY_S` seconds (SIGALRM) until the program acknowledges it (a dropped
one is not printed: `sys.unraisablehook` is wrapped while the handlers are installed); code that must
not be cut short (the save, the final renames, the cleanup) runs with signals deferred, and checks
for a pending one when it ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

OWNER_FILE = ".permuquant-owner"  # inside a temporary directory: {"pid": ..., "host": ...}
METADATA_FILE = "permuquant.json"  # what makes a directory a previous output of this tool
RETRY_S = 0.25


class OutputError(ValueError):
    """The output path cannot be written (exists, unwritable parent, ...)."""


# ----------------------------------------------------------------------------- signals


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error
    """SIGINT or SIGTERM arrived; `exit_code` is 128 + the signal number (130, 143)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum
        self.name = signal.Signals(signum).name


class _State:
    signum: int | None = None
    mode = "raise"  # "raise" | "defer" (record only, raise at the end of the section) | "hold" (record only)
    installed = False
    swallowed = 0  # raises that landed where Python drops exceptions (gc callbacks, __del__): retried
    lock = threading.Lock()  # guards `critical` and `abandoned` (see `abandon`)
    critical = 0  # deferred sections open (a save, a commit, a cleanup): not to be abandoned midway
    abandoned: set[int] = set()  # threads whose run was given up by the main thread: they stop at a safe point
    temp_dirs: set[Path] = set()  # temporary outputs being built (removed by `abandon`)


_state = _State()


def _arm_retry() -> None:
    with contextlib.suppress(ValueError, OSError):
        signal.setitimer(signal.ITIMER_REAL, RETRY_S)


def _on_signal(signum: int, frame) -> None:
    if _state.signum is None:
        _state.signum = signum
    if _state.mode == "raise":
        _arm_retry()
        raise Interrupted(_state.signum)


def _on_retry(signum: int, frame) -> None:
    if _state.signum is not None and _state.mode == "raise":
        _arm_retry()
        raise Interrupted(_state.signum)


@contextlib.contextmanager
def interrupt_handlers() -> Iterator[None]:
    """Install the SIGINT / SIGTERM handlers for the duration of the block (main thread only;
    elsewhere, or nested, a no-op). The previous handlers are put back afterwards."""
    if _state.installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.signum, _state.mode, _state.installed, _state.swallowed = None, "raise", True, 0
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)
    old = {s: signal.getsignal(s) for s in sigs}
    old_hook = sys.unraisablehook

    def quiet(u):  # an Interrupted dropped by a callback is raised again by the retry timer: no noise
        if isinstance(u.exc_value, Interrupted):
            _state.swallowed += 1
            return
        old_hook(u)

    sys.unraisablehook = quiet
    signal.signal(signal.SIGALRM, _on_retry)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        yield
    finally:
        acknowledge()
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        sys.unraisablehook = old_hook
        _state.installed = False
        _state.signum, _state.mode = None, "raise"


def check_interrupt() -> None:
    """A safe point: raise :class:`Interrupted` if a signal arrived (its first raise may have been
    swallowed by a callback), or if the main thread gave this thread's run up (`abandon`)."""
    if threading.get_ident() in _state.abandoned:
        raise Interrupted(_state.signum or signal.SIGINT)
    if _state.signum is not None and _state.mode != "hold":
        raise Interrupted(_state.signum)


def abandon(worker: threading.Thread) -> bool:
    """Give up the run of `worker` (a thread stuck in a long call, e.g. one XLA program, after a signal):
    remove every temporary output now, so nothing is written, and make `worker` stop at its next safe
    point (`check_interrupt`) should it ever get there. Refused (False) while `worker` is inside a
    deferred section (a save or the final renames): wait for it and try again."""
    with _state.lock:
        if _state.critical:
            return False
        if worker.ident is not None:
            _state.abandoned.add(worker.ident)
        dirs = list(_state.temp_dirs)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    return True


def was_abandoned() -> bool:
    """Whether the main thread gave up the current thread's run (its result no longer matters)."""
    return threading.get_ident() in _state.abandoned


def acknowledge() -> int | None:
    """Stop raising: the program is shutting down. Returns the signal that arrived, if any."""
    _state.mode = "hold"
    with contextlib.suppress(ValueError, OSError):
        signal.setitimer(signal.ITIMER_REAL, 0)
    return _state.signum


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Run the block to its end even if a signal arrives; raise :class:`Interrupted` after it."""
    with _state.lock:
        if threading.get_ident() in _state.abandoned:
            raise Interrupted(_state.signum or signal.SIGINT)
        _state.critical += 1
    prev = _state.mode
    if prev == "raise":
        _state.mode = "defer"
    try:
        yield
    finally:
        if prev == "raise" and _state.mode == "defer":
            _state.mode = "raise"
        with _state.lock:
            _state.critical -= 1
    check_interrupt()


# ----------------------------------------------------------------------------- the output path


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no other way to read it; set back at once
    os.umask(mask)
    return mask


def is_previous_output(path: Path) -> bool:
    """Whether `path` is a directory this tool wrote (it holds permuquant.json)."""
    return path.is_dir() and (path / METADATA_FILE).is_file()


def check_output_dir(dst: str | os.PathLike, *, overwrite: bool) -> Path:
    """Validate `dst` before any long work starts, so a bad path fails in the first second.

    Refuses an existing `dst` unless `overwrite`; with `overwrite`, anything but an empty directory or
    a previous output of this tool (one holding permuquant.json); a parent that is missing, a file or
    not writable. Removes stale temporary directories of dead runs beside `dst`.
    """
    dst = Path(dst).absolute()
    parent = dst.parent
    if not parent.is_dir():
        anc = parent
        while not anc.exists() and anc != anc.parent:
            anc = anc.parent
        if anc.exists() and not anc.is_dir():
            raise OutputError(f"--out {dst}: {anc} is a file, not a directory; choose an output in a directory")
        raise OutputError(f"--out {dst}: parent directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"--out {dst}: parent directory {parent} is not writable (permission denied)")
    remove_stale_temp_dirs(dst)
    if dst.is_symlink() and not dst.exists():
        raise OutputError(f"--out {dst} is a dangling symbolic link; remove it or choose another --out")
    if dst.exists():
        if not dst.is_dir():
            raise OutputError(f"--out {dst} exists and is a file, not a directory; choose another --out")
        if not overwrite:
            raise OutputError(f"--out {dst} already exists; pass --overwrite to replace it")
        try:
            empty = not any(dst.iterdir())
        except OSError as e:
            raise OutputError(f"--out {dst}: cannot list the existing directory ({e.strerror})") from None
        if not empty and not is_previous_output(dst):
            raise OutputError(
                f"--out {dst} exists and is not a permuquant-jax output (no {METADATA_FILE}); --overwrite "
                "replaces only a previous output of this tool: choose another --out")
    return dst


def _temp_dirs(dst: Path) -> Iterator[Path]:
    for kind in ("tmp", "old"):
        yield from dst.parent.glob(f".{dst.name}.{kind}-*")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_dirs(dst: str | os.PathLike) -> list[Path]:
    """Remove temporary directories beside `dst` left by runs of this tool that died (marked with the
    pid of a process of this host that no longer exists). Returns what was removed."""
    dst = Path(dst).absolute()
    removed = []
    for d in _temp_dirs(dst):
        try:
            owner = json.loads((d / OWNER_FILE).read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours (or not readable): leave it alone
        if host != socket.gethostname() or pid == os.getpid() or _pid_alive(pid):
            continue
        kept = d / "x"  # an `.old-` directory holds the output it was replacing
        if kept.is_dir() and not dst.exists():
            os.rename(kept, dst)  # the run died between its two renames: put the previous output back
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _mark(d: Path) -> None:
    (d / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _commit(tmp: Path, dst: Path) -> None:
    """Put the complete `tmp` at `dst`; an existing `dst` is removed only once `tmp` is in place."""
    (tmp / OWNER_FILE).unlink(missing_ok=True)
    if not dst.exists():
        os.rename(tmp, dst)
        return
    if _exchange(tmp, dst):  # one step: dst is never missing
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    _mark(old)
    os.rename(dst, old / "x")
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old / "x", dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(
    dst: str | os.PathLike, *, overwrite: bool = False, sources: Sequence[tuple[str, str | os.PathLike]] = ()
) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `dst`, on any error it is deleted.

    The temporary directory sits in `dst`'s parent so the final step is a rename on one filesystem:
    an interrupted or failed run leaves no `dst` (and an existing `dst` untouched until the end). It
    gets the permissions of the user's umask (not mkdtemp's 0700). `sources` (label, path) are input
    paths `dst` must not be, contain or lie inside (see `validate.check_not_source`).
    """
    from permuquant_jax.convert.validate import UsageError, check_not_source

    try:
        check_not_source(dst, sources)
    except UsageError as e:
        raise OutputError(str(e)) from None
    dst = check_output_dir(dst, overwrite=overwrite)
    with deferred_signals():
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
        _state.temp_dirs.add(tmp)
        _mark(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        with deferred_signals():
            check_interrupt()
            _commit(tmp, dst)
            _state.temp_dirs.discard(tmp)
            _state.mode = "hold"  # DST is complete: a signal from now on changes nothing
    except BaseException:
        _state.temp_dirs.discard(tmp)
        if was_abandoned():  # the main thread has removed it already (and answers the signal)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        acknowledge_if_interrupted()
        with deferred_signals():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def acknowledge_if_interrupted() -> None:
    """In cleanup code: once a signal has arrived, stop raising so the cleanup runs to its end."""
    if _state.signum is not None:
        acknowledge()
