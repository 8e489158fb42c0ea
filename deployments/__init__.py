"""Prefect deployments of the pipeline, installed as `grpo_pipeline.deployments`: `serve.py` (one
local process) and `prefect.yaml` (work pool)."""
