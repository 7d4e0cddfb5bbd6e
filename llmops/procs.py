"""Child processes that do not outlive the process that started them."""

from __future__ import annotations

import os
import signal
import sys


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
