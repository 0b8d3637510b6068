"""One writer per training directory: an advisory lock file held for as long as a run writes there.

``moge train`` takes ``DIR/.moge-train.lock`` with ``flock`` before it repairs, verifies or writes
anything in ``DIR``. The kernel drops the lock when its process ends, however it ends, so a lock file
left by a killed run (a *stale* lock: its pid is gone) is simply taken over; a second live run on the
same directory fails at once with an error naming the first one's pid. The file holds the holder's
pid and host name for that message; it is never deleted (deleting a lock file races with its next
taker).
"""

from __future__ import annotations

import errno
import os
import socket
import warnings
from pathlib import Path

from ..errors import MoGEWarning
from .io import CheckpointError, writing

LOCK_FILE = ".moge-train.lock"


class DirectoryInUseError(CheckpointError):
    """Another live process holds the directory's lock; the message names its pid."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirectoryLock:
    """An exclusive, non-blocking lock on ``directory`` (see the module docstring).

    ``acquire`` raises :class:`DirectoryInUseError` naming the holder; ``release`` (also on garbage
    collection) lets the next run in. ``previous`` is the pid a stale lock file named, if any.
    """

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_FILE
        self._fd: int | None = None
        self.previous: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _read_holder(self, fd: int) -> tuple[int | None, str]:
        try:
            text = os.pread(fd, 256, 0).decode(errors="replace").split()
        except OSError:
            return None, ""
        pid = int(text[0]) if text and text[0].isdigit() else None
        return pid, text[1] if len(text) > 1 else ""

    def acquire(self) -> "DirectoryLock":
        import fcntl

        if self._fd is not None:
            return self
        with writing("the lock file", self.path):
            # O_NOFOLLOW: a lock "file" that is a link (to somewhere else) is refused, never written through.
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise CheckpointError(f"{self.path} is a symbolic link; refusing to use it as a lock file") from None
                raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, host = self._read_holder(fd)
            os.close(fd)
            who = f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "") if pid else \
                "another process"
            raise DirectoryInUseError(f"{self.path.parent} is in use by another moge train run ({who}; lock file "
                                      f"{self.path}); wait for it to finish or choose another --out") from None
        except OSError as e:  # a filesystem without flock (some network mounts): run unlocked, say so
            warnings.warn(f"cannot lock {self.path} ({e.strerror}); two runs on this directory would not be "
                          f"detected", MoGEWarning, stacklevel=2)
        pid, _ = self._read_holder(fd)
        self.previous = pid if pid is not None and pid != os.getpid() else None
        with writing("the lock file", self.path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def stale_note(self) -> str | None:
        """A line about the stale lock taken over (its pid is gone), or None."""
        if self.previous is not None and not _pid_alive(self.previous):
            return f"took over the stale lock of pid {self.previous} (no longer running) in {self.path}"
        return None

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
