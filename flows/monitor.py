"""Entry point of the monitor flow for Prefect deployments (deployments/prefect.yaml); its code is
llmops/pipeline/flows/monitor.py."""

from llmops.pipeline.flows.monitor import monitor_flow

__all__ = ["monitor_flow"]
