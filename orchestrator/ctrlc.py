"""Ctrl-C that is not lost. Python turns SIGINT into a KeyboardInterrupt wherever the main
thread happens to be, and library code that catches BaseException around its I/O (database and
MLflow calls, Ray's client) can swallow it: the command then runs on as if nothing was pressed.
Measured: `orch scale` interrupted right after a model's end finished the next model and exited
0 in 1 of 2 runs of the test suite; `orch ui`, waiting on its server, ignored it.

``CtrlC`` remembers the press: its handler records it and raises KeyboardInterrupt as Python's
does, and ``check()``, called by a loop between steps, raises it again if it was swallowed.
Waits are bounded (``wait``) so that a signal the kernel delivered to another thread is seen.
"""

from __future__ import annotations

import signal
import threading

#: How often a wait wakes to look at a recorded Ctrl-C (seconds).
POLL_S = 0.5


class CtrlC:
    def __init__(self):
        self.pressed = False
        self._active = threading.current_thread() is threading.main_thread()
        self._previous = None

    def _handler(self, signum, frame):
        self.pressed = True
        raise KeyboardInterrupt

    def __enter__(self) -> "CtrlC":
        if self._active:
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> bool:
        if self._active:
            signal.signal(signal.SIGINT, self._previous)
        return False

    def check(self) -> None:
        """Raise KeyboardInterrupt if Ctrl-C was pressed (again, if something swallowed it)."""
        if self.pressed:
            raise KeyboardInterrupt

    def wait(self, proc) -> int:
        """Wait for the process ``proc`` (a Popen) to end, waking every POLL_S to check."""
        import subprocess

        while True:
            self.check()
            try:
                return proc.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                continue
