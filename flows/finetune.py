"""The finetune flow (`grpo-finetune`): prepare data, then per round train, evaluate and register
the elite checkpoint; the MLflow run holds params, per-step metrics, eval tables and curves.

    from grpo_pipeline.flows.finetune import finetune
    summary = finetune(config=RunConfig())     # RunSummary; or `grpo run` on the command line

The run config is the only parameter, so the Prefect UI shows it as a form. One MLflow run per
flow run, tagged `prefect_flow_run_id`; the Prefect run carries the MLflow run id as a tag
(`mlflow_run_id:<id>`) and as a link/markdown artifact. Artifacts: a progress bar updated each
round and, at the end, a markdown table with one row per round. A retried flow run (same flow
run id) finds its MLflow run again, and its tasks resume from the checkpoints on disk; a new flow
run with `resume_run_id` does the same for a run whose process was killed (`grpo run --resume`).
When the flow fails or crashes, its state hooks mark the MLflow run FAILED.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run

from grpo import reports, tracking
from grpo.config import RunConfig
from grpo.errors import UserError
from grpo.stages import runs
from grpo.stages.runs import RunSummary
from grpo.stages.warm_start import with_base
from grpo_pipeline.tasks.data import preflight, prepare_dataset
from grpo_pipeline.tasks.evaluate import evaluate, evaluate_baseline, learning_report
from grpo_pipeline.tasks.registry import close_run, open_run, register_elite, round_summary
from grpo_pipeline.tasks.train import train_round, warm_start


def _tag_flow_run(flow_run_id: str | None, tags: list[str]) -> None:
    """Add tags to the running flow run (best effort: a missing API never fails the run)."""
    if not flow_run_id:
        return
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            current = client.read_flow_run(flow_run_id)
            merged = sorted(set(current.tags or []) | set(tags))
            client.update_flow_run(flow_run_id, tags=merged)
    except Exception as e:  # noqa: BLE001 - tagging is cosmetic
        get_run_logger().warning("could not tag the flow run: %s", e)


def mark_mlflow_run_failed(flow: Any, run: Any, state: Any) -> None:
    """State hook (on failure, on crash): the flow run's MLflow run ends FAILED."""
    from prefect.logging import get_logger

    logger = get_logger("grpo-finetune")
    cfg = RunConfig.model_validate(run.parameters.get("config") or {})
    try:
        run_id = runs.fail_flow_run(cfg, str(run.id))
    except UserError as e:
        logger.warning("flow run %s %s; its MLflow run could not be marked FAILED: %s", run.id, state.type.value, e)
        return
    if run_id is not None:
        logger.info("MLflow run %s marked FAILED (flow run %s)", run_id, state.type.value)


EMBEDDED_DEFAULT = RunConfig()
"""The flow's default parameter: the embedded default run (configs/tiny-cpu.yaml spells it out)."""


@flow(name="grpo-finetune", on_failure=[mark_mlflow_run_failed], on_crashed=[mark_mlflow_run_failed])
def finetune(config: RunConfig = EMBEDDED_DEFAULT, resume_run_id: str | None = None) -> RunSummary:
    """GRPO fine-tuning of a LoRA adapter, round by round, with elite adapters registered in MLflow.

    `resume_run_id` continues an interrupted run (same config): its MLflow run, its checkpoints,
    no step repeated."""
    cfg = config
    logger = get_run_logger()
    flow_run_id = str(flow_run.id) if flow_run.id else None
    uri = tracking.resolve_tracking_uri(cfg.pipeline.tracking_uri)

    preflight(cfg)
    dataset = prepare_dataset(cfg)
    logger.info(
        "dataset: %d train / %d test rows (%s, hash %s)",
        dataset.train_rows, dataset.test_rows, "reused" if dataset.reused else "built",
        dataset.content_hash[:12],
    )
    run = open_run(cfg, uri, flow_run_id, resume_run_id, dataset)
    run_id = run.run_id
    _tag_flow_run(flow_run_id, [f"mlflow_run_id:{run_id}"])
    url, note = reports.mlflow_pointer(uri, run.experiment_id, run_id)
    if url:
        create_link_artifact(link=url, link_text=f"MLflow run {run_id}", key="mlflow-run")
    else:
        create_markdown_artifact(markdown=note, key="mlflow-run", description="Where the MLflow run is")
    logger.info("MLflow run %s (experiment %s, %s)", run_id, cfg.pipeline.experiment, uri)

    rounds = cfg.pipeline.rounds
    progress_id = create_progress_artifact(
        progress=0.0, key="grpo-progress", description=f"rounds done of {rounds}"
    )
    train_cfg, baseline = cfg, None
    if cfg.sft.enabled:
        train_cfg = with_base(cfg, warm_start(cfg, dataset, run_id, uri))
        baseline = evaluate_baseline(train_cfg, dataset, run_id, uri)
    rows, results = [], []
    for r in range(rounds):
        ckpt = train_round(train_cfg, dataset, r, run_id, uri)
        result = evaluate(train_cfg, ckpt, dataset, run_id, uri)
        reg = register_elite(train_cfg, ckpt, result, run_id, uri, flow_run_id, dataset)
        rows.append(round_summary(uri, run_id, ckpt, cfg.pipeline.steps_per_round, result, reg))
        results.append(result)
        logger.info(
            "round %d/%d: step %d, eval accuracy %.3f%s", r + 1, rounds, ckpt.step, result.accuracy,
            f", registered version {reg.version}" if reg.elite else "",
        )
        update_progress_artifact(progress_id, progress=100.0 * (r + 1) / rounds)
    if baseline is not None:
        create_markdown_artifact(
            markdown=learning_report(uri, run_id, baseline, results, cfg.name),
            key="grpo-learning",
            description="Warm-start baseline vs the GRPO rounds: accuracy, wall clock, McNemar",
        )
    close_run(uri, run_id, "FINISHED", cfg.name)
    summary = RunSummary(
        name=cfg.name, run_id=run_id, experiment=cfg.pipeline.experiment, experiment_id=run.experiment_id,
        tracking_uri=uri, flow_run_id=flow_run_id, registered_model=cfg.pipeline.registered_model, rounds=rows,
    )
    create_markdown_artifact(
        markdown=reports.summary_markdown(summary) + "\n" + note, key="grpo-summary", description="One row per round"
    )
    return summary
