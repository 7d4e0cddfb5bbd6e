"""Where llmops keeps its own state in a checkout, named once: everything under .llmops/ (git ignores it).

Each part reads its paths from here, so a part lower down (the audit trail naming a workspace's checkout, erasure
reaching every store) needs no import of the part that writes them.
"""

from pathlib import Path

STATE = Path(".llmops")
RUN_LOCK = STATE / "run.lock"  # one pipeline run per checkout
WORKSPACES = STATE / "workspaces"  # a run's own git worktree
PREFECT = STATE / "prefect"  # the project's own Prefect server
SERVE = STATE / "serve"  # local `llmops serve` instances
API_KEYS = SERVE / "api_keys"  # in the project: its policy and audit trail speak of these keys
REQUESTS = SERVE / "requests"  # the servers' request log
FEEDBACK_DB = SERVE / "feedback.db"  # user feedback, when no database URL is set
MONITOR = STATE / "monitor"  # the monitor's reports, alerts and review queue
EXPLAIN = STATE / "explain"  # `llmops explain` outputs
