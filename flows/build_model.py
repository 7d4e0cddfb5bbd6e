"""Entry point of the build-model flow for Prefect deployments (deployments/prefect.yaml); its code is
llmops/pipeline/flows/build_model.py."""

from llmops.pipeline.flows.build_model import build_model

__all__ = ["build_model"]
