"""Fault injection for the crash tests: SIGKILL this process at a named point, once.

``Faults(settings).reach(point)`` kills the process with SIGKILL the first time any request
reaches ``point`` when it is the configured ``crash_at``. A marker file beside the database
records that it happened (created with O_EXCL, so only one request fires it), so the restarted
service on the same database does not crash again.
"""

from __future__ import annotations

import os
import signal

from .settings import CRASH_POINTS, Settings

__all__ = ["Faults"]


class Faults:
    def __init__(self, settings: Settings) -> None:
        self._point = settings.crash_at
        self._marker = None if self._point is None else settings.crash_marker(self._point)

    def reach(self, point: str) -> None:
        """Die here, unless this is not the crash point or it already fired."""
        assert point in CRASH_POINTS, point
        if point != self._point or self._marker is None:
            return
        try:
            fd = os.open(self._marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
