"""Prefect deployments of the pipeline: `serve.py` (one local process) and `prefect.yaml` (work pool)."""
