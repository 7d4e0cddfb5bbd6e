"""Who is acting: the identity that the audit trail records and the access policy judges.

The CLI's identity comes from the environment a team already has: LLMOPS_USER where a team
configures one (a CI runner, a Prefect worker's service identity), else git's user.name, else the OS
login. The server's identity is the API key's name (`llmops.server`).
"""

from __future__ import annotations

import getpass
import os
import subprocess


def current() -> str:
    """LLMOPS_USER, else the git user, else the login name."""
    return os.environ.get("LLMOPS_USER") or git_user() or getpass.getuser()


def git_user() -> str | None:
    """git's configured user.name, if any."""
    proc = subprocess.run(["git", "config", "user.name"], capture_output=True, text=True)
    return proc.stdout.strip() or None
