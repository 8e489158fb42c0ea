"""Run configs for pipeline tests (the tiny model, a few steps, outputs in a temp folder), and the
Prefect artifacts a flow run left (`flow_artifacts`)."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

from grpo.config import RunConfig, load_config

TINY = [
    "generation.max_new_tokens=16",
    "train.prompts_per_step=2",
    "train.group_size=4",
    "train.micro_batch_size=8",
    "eval.num_problems=8",
    "eval.batch_size=8",
    "eval.samples_logged=4",
    "data.generate_rows=200",
    "pipeline.rounds=2",
    "pipeline.steps_per_round=2",
    "sft.enabled=false",
]


def tiny_config(tmp_path: Path, model_dir: Path, uri: str, name: str, *extra: str) -> RunConfig:
    return load_config(None, [
        *TINY,
        f"model.name_or_path={model_dir}",
        "model.build_tiny_if_missing=false",
        f"pipeline.output_dir={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'data'}",
        f"pipeline.tracking_uri={uri}",
        f"pipeline.experiment=exp-{name}",
        f"pipeline.registered_model=lora-{name}",
        *extra,
    ])


def flow_artifacts(flow_run_id: str) -> dict[str, list]:
    """The Prefect artifacts of a flow run, by key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)]))
        )
    out: dict[str, list] = {}
    for a in found:
        out.setdefault(a.key or "", []).append(a)
    return out
