"""Output written whole or not at all, and never at the cost of a user's files.

Every file and directory we write is built beside its target under a name that says
what it is, ``.<name>.clada-tmp-<pid>``, and renamed over the target only once it is
complete, so a crash or a kill never leaves half an output where the user looks. A
temporary left by a run that died (SIGKILL, power loss: its pid is gone) is recognised
by that name and removed by the next run to the same target.

An existing directory is replaced only with ``force`` and only if it is one of our
outputs (``is_ours``); the current directory, its parents, the home directory and the
filesystem root are never replaced. The old output is removed last, after the new one
has taken its name. Files are created with the user's umask, like any other program's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from clada_export.errors import UserError

TMP_TAG = ".clada-tmp-"
_OLD = "-old"  # an output moved aside during the swap, removed once the new one is in place


def temp_path(target: Path, suffix: str = "") -> Path:
    """This process's temporary name for ``target``: ``.<name>.clada-tmp-<pid><suffix>``."""
    return target.parent / f".{target.name}{TMP_TAG}{os.getpid()}{suffix}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale(target: Path) -> list[Path]:
    """Remove temporaries of ``target`` left by runs whose process is gone; returns them.
    An old output that a dead run had moved aside but not yet replaced is put back."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern = re.compile(re.escape(f".{target.name}{TMP_TAG}") + r"(\d+)(" + re.escape(_OLD) + r")?$")
    removed = []
    for entry in target.parent.iterdir():
        m = pattern.match(entry.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        if m.group(2) and not target.exists() and not target.is_symlink():
            os.rename(entry, target)  # the dead run had moved the old output aside: restore it
            continue
        _remove(entry)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM wait until the block ends (the two renames of a swap)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# -- files ----------------------------------------------------------------------------------
@contextlib.contextmanager
def replaced_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; write it, and on a clean exit it is renamed
    over ``path``. On any exception (KeyboardInterrupt, SIGTERM in the CLI) it is removed.
    The parent directory must exist."""
    path = Path(path)
    remove_stale(path)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` into ``path`` atomically, with the umask's permissions (0644 for 022)."""
    with replaced_file(path) as tmp:
        # os.open's mode goes through the umask (mkstemp's 0600 would not)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 1) -> None:
    """``json.dump(obj)`` into ``path`` atomically (the parent directory must exist)."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")


# -- directories ----------------------------------------------------------------------------
def _protected(path: Path) -> str | None:
    """Why ``path`` may never be replaced, or None."""
    real = path.resolve()
    cwd = Path.cwd().resolve()
    if real == Path(real.anchor):
        return "the filesystem root"
    if real == Path.home().resolve():
        return "your home directory"
    if real == cwd:
        return "the current directory"
    if real in cwd.parents:
        return "a parent of the current directory"
    return None


def check_replaceable(target: Path, force: bool, is_ours: Callable[[Path], bool], what: str,
                      flag: str = "-o") -> None:
    """UserError unless ``target`` may be written: it does not exist, or it is a directory
    that ``is_ours`` recognises as ``what`` (e.g. "a clada-export output") and ``force`` is set.
    Fails before any slow work, and again inside :func:`staging_dir` before the swap."""
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir():
        raise UserError(f"{flag} {target} is a file; {flag} must name a directory")
    if not force:
        raise UserError(f"{flag} {target} already exists; choose another {flag} or pass --force to replace it")
    reason = _protected(target)
    if reason:
        raise UserError(f"{flag} {target} is {reason}, which --force never replaces; name a new directory")
    if not is_ours(target):
        raise UserError(f"{flag} {target} is not {what}, so --force will not replace it (it may hold your "
                        f"files); choose another {flag} or remove it yourself")


@contextlib.contextmanager
def staging_dir(target: str | os.PathLike, force: bool = False,
                is_ours: Callable[[Path], bool] = lambda _p: False, what: str = "a clada-export output",
                flag: str = "-o") -> Iterator[Path]:
    """Build a directory output: yields an empty ``.<name>.clada-tmp-<pid>`` beside
    ``target``; on a clean exit it takes ``target``'s name (an old output, checked with
    :func:`check_replaceable`, is moved aside first and removed last). On any exception the
    temporary and any parent directories this created are removed: nothing is left."""
    target = Path(target)
    check_replaceable(target, force, is_ours, what, flag)
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    try:
        remove_stale(target)
        tmp.mkdir()  # mode 0777 minus the umask
        yield tmp
        check_replaceable(target, force, is_ours, what, flag)  # it may have appeared meanwhile
        _swap(tmp, target)
    except BaseException:
        _remove(tmp)
        for p in created:  # innermost first
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def _swap(new: Path, target: Path) -> None:
    old = temp_path(target, _OLD)
    with _signals_deferred():
        if target.exists():
            os.rename(target, old)
            try:
                os.rename(new, target)
            except BaseException:
                os.rename(old, target)
                raise
        else:
            os.rename(new, target)
    _remove(old)
