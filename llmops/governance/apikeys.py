"""API keys: made once, kept only as their sha256 under a name, revoked by name; both audited.

A keys file holds one key per line, `<sha256 hex> <name>` (`#` starts a comment; a line with no
name, as older files have, is named after its hash). The name is the key's identity: the access
policy says which models it may call, and the audit trail and the request log name it; the key
itself is shown once, when it is made, and is never written anywhere.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from pathlib import Path

from llmops.core import layout
from llmops.core.errors import LlmopsError
from llmops.core.fs import write_text

DEFAULT_FILE = layout.API_KEYS

KEYS_ENV = "LLMOPS_API_KEY_HASHES"  # comma-separated sha256 hex digests of accepted keys (`hash` or `hash:name`)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_HASH = re.compile(r"^[0-9a-f]{64}$")


class ApiKeyError(LlmopsError):
    """A key that cannot be made, revoked or read; the message says why. Nothing was changed."""


def new_key() -> str:
    """A random API key: 256 bits, URL-safe."""
    return "sk-llmops-" + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    # sha256, not a slow password hash: keys are 256-bit random tokens (`llmops serve keygen`), not guessable words
    return hashlib.sha256(key.encode()).hexdigest()


def load(path: str | os.PathLike | None) -> dict[str, str]:
    """The accepted keys, hash -> name: from KEYS_ENV and from the keys file (if there is one).

    Raises:
        ApiKeyError: a line that is not `<sha256> [name]`, named by file and line number.
    """
    keys = {}
    for entry in filter(None, (e.strip() for e in os.environ.get(KEYS_ENV, "").split(","))):
        digest, _, name = entry.partition(":")
        keys[_checked(digest, KEYS_ENV)] = name or f"key-{digest[:8]}"
    return keys | from_file(path)


def from_file(path: str | os.PathLike | None) -> dict[str, str]:
    """The keys of the keys file alone, hash -> name (an admin made each; KEYS_ENV's, which anyone can set, are not
    among them: the CLI's identities come from here, llmops/governance/identity.py).

    Raises:
        ApiKeyError: a line that is not `<sha256> [name]`, named by file and line number.
    """
    keys = {}
    if path is not None and Path(path).is_file():
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            fields = line.split("#")[0].split()
            if not fields:
                continue
            if len(fields) > 2:
                raise ApiKeyError(f"{path}:{number}: expected `<sha256> [name]`, got {len(fields)} fields")
            keys[_checked(fields[0], f"{path}:{number}")] = fields[1] if len(fields) == 2 else f"key-{fields[0][:8]}"
    return keys


def _checked(digest: str, where: str) -> str:
    if not _HASH.match(digest):
        raise ApiKeyError(f"{where}: {digest[:12]!r}... is not a sha256 hex digest")
    return digest


def create(root: str | os.PathLike, path: str | os.PathLike, name: str) -> str:
    """Make a key named `name`, keep its hash in `path`, and return the key (the one time it is seen). Audited.

    Raises:
        ApiKeyError: a bad or taken name, or a keys file that cannot be read.
    """
    from llmops.governance import audit

    path = Path(path)
    if not _NAME.match(name):
        raise ApiKeyError(f"key name {name!r}: use 1-64 letters, digits, '.', '_', '@' or '-'")
    with audit.recorded(root, "serve.keygen", f"key:{name}", allow=("manage", "keys"), keys_file=str(path)):
        if name in load(path).values():
            raise ApiKeyError(f"a key named {name!r} exists in {path}; revoke it first or pick another name")
        key = new_key()
        _rewrite(path, [*_lines(path), f"{hash_key(key)} {name}"])
    return key


def revoke(root: str | os.PathLike, path: str | os.PathLike, name: str) -> None:
    """Remove the key named `name` from `path` (servers drop it on their next reload). Audited.

    Raises:
        ApiKeyError: no key of that name in the file.
    """
    from llmops.governance import audit

    path = Path(path)
    with audit.recorded(root, "serve.revoke", f"key:{name}", allow=("manage", "keys"), keys_file=str(path)):
        lines = _lines(path)
        kept = [line for line in lines if line.split("#")[0].split()[1:2] != [name]]
        if len(kept) == len(lines):
            raise ApiKeyError(f"no key named {name!r} in {path} (`llmops serve keys` lists them)")
        _rewrite(path, kept)


def _lines(path: Path) -> list[str]:
    load(path)  # a malformed file is refused before it is changed
    return path.read_text().splitlines() if path.is_file() else []


def _rewrite(path: Path, lines: list[str]) -> None:
    """Atomically, readable by its owner only: a crash leaves the old file, never half of a new one."""
    write_text(path, "".join(f"{line}\n" for line in lines), private=True)
