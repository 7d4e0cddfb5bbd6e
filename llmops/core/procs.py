"""Child processes that do not outlive the process that started them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Exited(Exception):
    """The process being waited for has exited: it will never be ready."""

    def __init__(self, returncode: int) -> None:
        super().__init__(f"exited with {returncode}")
        self.returncode = returncode


def wait_until(ready: Callable[[], T], timeout_s: float, interval_s: float = 0.3,
               proc: subprocess.Popen | None = None) -> T | None:
    """`ready()`'s first truthy value, asked every `interval_s` for up to `timeout_s`; None if it never came. The
    project's one polling loop (tenacity's). An exception from `ready` ends the wait and propagates.

    Raises:
        Exited: `proc` exited meanwhile (a server that died while starting), at once rather than at the timeout.
    """
    from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

    def once() -> T:
        if proc is not None and proc.poll() is not None:
            raise Exited(proc.returncode)
        return ready()

    return Retrying(stop=stop_after_delay(timeout_s), wait=wait_fixed(interval_s),
                    retry=retry_if_result(lambda value: not value), retry_error_callback=lambda state: None)(once)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent dies (Linux; elsewhere a no-op).

    For children in a session of their own (torchrun's workers, our Prefect server): a
    signal to the parent's process group never reaches them, and a SIGKILLed parent
    cannot stop them, so without this they would run on as orphans.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before we asked
        os._exit(1)
