"""Who is acting: the identity that the audit trail records and the access policy judges.

Nothing a user can just set. The CLI acts as the OS account that runs it (the kernel's user id, looked
up in the password database; not $USER, $LOGNAME or git's user.name, which anyone sets), or, where
LLMOPS_TOKEN holds one of the project's keys, as `key:<name>`: a CI runner's or a Prefect worker's
service identity, or a person's own key. Keys are made by an admin (`llmops serve keygen NAME`,
audited) and kept hashed in the project's keys file; LLMOPS_API_KEY_HASHES, which a server also reads,
names no CLI identity, since anyone could set it. The server's identity is the calling key's name
(`llmops.serving.callers`). LLMOPS_USER, once the identity itself, is refused, saying so.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from llmops.core.errors import LlmopsError
from llmops.core import git

TOKEN_ENV = "LLMOPS_TOKEN"
RETIRED_ENV = "LLMOPS_USER"


class IdentityError(LlmopsError):
    """The identity cannot be established; the message says why and what to do."""


def current(root: str | os.PathLike = ".") -> str:
    """`key:<name>` for LLMOPS_TOKEN's key (one of `root`'s), else the OS account.

    Raises:
        IdentityError: LLMOPS_USER is set, or LLMOPS_TOKEN is no key of this project.
    """
    if os.environ.get(RETIRED_ENV):
        raise IdentityError(f"{RETIRED_ENV} names no identity any more (anyone can set a variable): you act as your "
                            f"OS account, or as a key with {TOKEN_ENV}=<key> (an admin makes one: `llmops serve "
                            f"keygen NAME`); unset {RETIRED_ENV}")
    token = os.environ.get(TOKEN_ENV)
    if token:
        from llmops.governance import apikeys

        name = apikeys.from_file(Path(root) / apikeys.DEFAULT_FILE).get(apikeys.hash_key(token.strip()))
        if name is None:
            raise IdentityError(f"{TOKEN_ENV} is not a key of this project ({Path(root) / apikeys.DEFAULT_FILE}): "
                                "it may have been revoked; ask an admin for one, or unset it to act as your OS account")
        return f"key:{name}"
    return pwd.getpwuid(os.geteuid()).pw_name


def check_named(root: str | os.PathLike, named: str | None) -> str:
    """The identity acting, where a command also names who acts (`--reviewer`): it must name that identity.

    Raises:
        IdentityError: another name; nobody may act, or decide, in another's name.
    """
    who = current(root)
    if named is not None and named != who:
        raise IdentityError(f"--reviewer {named!r} is not you ({who!r}): a decision is recorded under the identity "
                            f"that makes it; leave --reviewer out, or act as {named!r} (its {TOKEN_ENV})")
    return who


def git_user() -> str | None:
    """git's configured user.name, if any (a commit's author; never an identity)."""
    return git.answer(".", "config", "user.name") or None
