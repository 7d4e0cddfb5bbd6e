"""Running the pipeline: stages (declared in dvc.yaml), DVC, workspaces, preflight, Prefect flows and setup,
triggers, approval, corrections (monitoring feeding retraining) and erasure (reaching every store)."""
