"""Ctrl-C is not lost (orchestrator/ctrlc.py): real SIGINTs to this process."""

import signal
import subprocess
import sys
import threading
import time

import pytest

from orchestrator.ctrlc import CtrlC


def test_a_swallowed_ctrl_c_is_raised_again_and_the_handler_restored():
    before = signal.getsignal(signal.SIGINT)
    with CtrlC() as ctrl_c:
        ctrl_c.check()  # nothing pressed: nothing raised
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass  # what a library catching BaseException around its I/O does
        with pytest.raises(KeyboardInterrupt):
            ctrl_c.check()
    assert signal.getsignal(signal.SIGINT) is before


def test_a_wait_on_a_process_ends_at_ctrl_c():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        threading.Timer(0.3, signal.raise_signal, (signal.SIGINT,)).start()
        t0 = time.monotonic()
        with CtrlC() as ctrl_c, pytest.raises(KeyboardInterrupt):
            ctrl_c.wait(sleeper)
        assert time.monotonic() - t0 < 5 and sleeper.poll() is None  # it stopped waiting, nothing else
        with CtrlC() as ctrl_c:
            sleeper.kill()
            assert ctrl_c.wait(sleeper) == -signal.SIGKILL  # and returns the code of one that ended
    finally:
        sleeper.kill()
        sleeper.wait()
