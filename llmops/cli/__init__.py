"""The `llmops` command (main) and its verbs."""
