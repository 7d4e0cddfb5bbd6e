"""One module per stage of dvc.yaml (llmops.pipeline.stage says what each defines)."""
