"""Print the line scripts/lock.sh appends to requirements.lock: a hash of pyproject.toml's
dependency declarations, so tests/test_lock.py can tell when the lock is stale."""
import hashlib
import json
import tomllib
from pathlib import Path

PREFIX = "# pyproject-deps-sha256: "


def fingerprint(root: Path = Path(__file__).resolve().parent.parent) -> str:
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    declared = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "test": project.get("optional-dependencies", {}).get("test", []),
    }
    return hashlib.sha256(json.dumps(declared, sort_keys=True).encode()).hexdigest()


if __name__ == "__main__":
    print(PREFIX + fingerprint())
