"""The Prefect flows: build_model (the pipeline) and monitor. flows/ at the top holds their entry points."""
