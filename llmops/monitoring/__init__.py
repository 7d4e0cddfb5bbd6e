"""Monitoring the deployed model: checkers and detectors, probes of the live endpoint, the Evidently report."""
