"""requirements.lock must match pyproject.toml: regenerate with scripts/lock.sh when this fails."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"


def _pins() -> dict[str, Version]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if m:
            pins[canonicalize_name(m[1])] = Version(m[2])
    return pins


def test_lock_fingerprint_matches_pyproject():
    expected = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "lock_fingerprint.py")],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    recorded = [l for l in LOCK.read_text().splitlines() if l.startswith("# pyproject-deps-sha256: ")]
    assert recorded == [expected], (
        "pyproject.toml's dependencies changed since requirements.lock was made: run scripts/lock.sh")


def test_lock_pins_every_declared_requirement_within_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in requirements.lock: run scripts/lock.sh"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]} outside {spec!r}: run scripts/lock.sh")


def test_every_lock_entry_is_hashed():
    blocks = re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text())
    unhashed = [b.split()[0] for b in blocks if "==" in b.split("\n")[0] and "--hash=sha256:" not in b]
    assert not unhashed, unhashed
