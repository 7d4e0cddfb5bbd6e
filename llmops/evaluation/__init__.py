"""Scoring models: answer metrics, lm-evaluation-harness tasks, bias pairs, inference, token attributions."""
