"""One writer per output directory: an exclusive, non-blocking lock taken before anything is written.

Every run that writes an output directory (the merge job, ``write_export``/``save_merge``, ``MergedModule.export``
and the ``export`` command) holds ``output_lock(dest)`` for its whole run::

    from freemerge_pl.io import output_lock

    with output_lock(dest):       # OutputLockedError at once if another process is writing dest
        ...stage, resume, publish...

- The lock is a POSIX ``flock`` on ``.<name>.lock`` beside ``dest`` (in its parent, so it outlives the renames
  of the staging directory ``.<name>.partial`` and of ``dest``). Once held, the file records the holder: pid,
  host, command line and start time; a second process is refused with one line naming ``dest`` and that
  process (``OutputLockedError``, a ``FreeMergeError``: ``python cli.py`` prints it, exit status 2).
- The kernel releases a ``flock`` when its process dies, so the lock of a killed run is simply taken over by
  the next one (logged, naming the dead run). A clean exit removes the lock file.
- Re-entrant within a process: a writer called inside a run that already holds the lock (the ``export``
  command around ``MergedModule.export``) does not refuse itself.
- Not POSIX (no ``fcntl``): no lock (the context manager only yields).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from freemerge_pl.errors import FreeMergeError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("freemerge_pl.io")

#: locks this process holds: lock-file path -> nesting depth
_HELD: dict[str, int] = {}


class OutputLockedError(FreeMergeError):
    """Another process is writing the output directory (it holds its lock)."""


def lock_path(dest) -> Path:
    """The lock file of the output directory ``dest``: ``.<name>.lock`` beside it."""
    dest = Path(dest)
    return dest.parent / f".{dest.name}.lock"


def _holder_record() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join([sys.executable, *sys.argv]),
            "started": time.time()}


def _read_record(fd: int) -> dict[str, Any] | None:
    """The holder record a lock file holds (None when empty, i.e. not yet written, or unreadable)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 1 << 16)
        record = json.loads(data.decode()) if data.strip() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def describe_holder(record: dict[str, Any] | None) -> str:
    """``pid N on host (cmd) since HH:MM:SS``, or what is known of it."""
    if not record:
        return "another process (it has not recorded itself yet)"
    command = str(record.get("command", "?"))
    if len(command) > 200:
        command = command[:197] + "..."
    try:
        since = time.strftime("%H:%M:%S", time.localtime(float(record["started"])))
    except (KeyError, TypeError, ValueError):
        since = "?"
    host = record.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return f"pid {record.get('pid', '?')}{where} ({command}) since {since}"


def _open_locked(path: Path, dest: Path) -> int:
    """An fd of ``path`` holding its exclusive flock; the file at ``path`` is that fd's (a holder that
    removed it on release between our open and our lock leaves us an orphan: open again)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(_read_record(fd))
            os.close(fd)
            raise OutputLockedError(f"{dest} is being written by {holder}; wait for it to finish or choose "
                                    f"another output directory (lock {path})") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextmanager
def output_lock(dest) -> Iterator[Path]:
    """Hold the exclusive lock of the output directory ``dest`` for the block (yields the lock file's path).

    Refused at once with ``OutputLockedError`` (naming ``dest`` and the holder's pid, command line and start
    time) while another process holds it; a lock left by a killed process is taken over (logged)."""
    dest = Path(os.path.abspath(dest))  # one key per directory however it is spelled (``..``, relative)
    path = lock_path(dest)
    key = str(path)
    if fcntl is None or _HELD.get(key):
        _HELD[key] = _HELD.get(key, 0) + 1
        try:
            yield path
        finally:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_locked(path, dest)
    try:
        stale = _read_record(fd)
        if stale:
            log.warning("%s: took over the lock of a run that ended without releasing it (%s)", dest,
                        describe_holder(stale))
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(_holder_record()).encode())
        _HELD[key] = 1
        try:
            yield path
        finally:
            del _HELD[key]
            try:  # removed while still held: a process waiting on the old file opens again (_open_locked)
                path.unlink()
            except FileNotFoundError:
                pass
    finally:
        os.close(fd)


__all__ = ["OutputLockedError", "describe_holder", "lock_path", "output_lock"]
