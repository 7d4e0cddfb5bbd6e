#!/usr/bin/env bash
# Regenerate requirements.lock (every transitive pin, with sha256 hashes) from pyproject.toml.
# Run after changing dependencies in pyproject.toml. Existing pins are kept where pyproject.toml
# still allows them; `scripts/lock.sh --upgrade` (or `-P transformers`) moves them on purpose.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=.lock-tools
[ -x "$tools/bin/pip-compile" ] || { python3.11 -m venv "$tools" && "$tools/bin/pip" install -q pip==26.3 pip-tools==7.6.2; }
CUSTOM_COMPILE_COMMAND="scripts/lock.sh" "$tools/bin/pip-compile" -q --generate-hashes --allow-unsafe \
    --strip-extras --extra test --output-file requirements.lock "$@" pyproject.toml
python3.11 scripts/lock_fingerprint.py >> requirements.lock
