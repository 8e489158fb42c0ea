"""The finetune flow (`grpo-finetune`): prepare data, then per round train, evaluate and register
the elite checkpoint; the MLflow run holds params, per-step metrics, eval tables and curves.

    from flows.finetune import finetune
    summary = finetune(config=RunConfig())     # or `grpo run` on the command line

The run config is the only parameter, so the Prefect UI shows it as a form. One MLflow run per
flow run, tagged `prefect_flow_run_id`; the Prefect run carries the MLflow run id as a tag
(`mlflow_run_id:<id>`) and as a link/markdown artifact. Artifacts: a progress bar updated each
round and, at the end, a markdown table with one row per round. A retried flow run (same flow
run id) finds its MLflow run again, and its tasks resume from the checkpoints on disk.
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

from grpo import stages, tracking
from grpo.config import RunConfig
from tasks.data import prepare_dataset, preflight
from tasks.evaluate import evaluate, evaluate_baseline, learning_report
from tasks.registry import close_run, open_run, register_elite
from tasks.train import train_round, warm_start


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


@flow(name="grpo-finetune")
def finetune(config: RunConfig = RunConfig()) -> dict[str, Any]:
    """GRPO fine-tuning of a LoRA adapter, round by round, with elite adapters registered in MLflow."""
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
    run_id = open_run(cfg, uri, flow_run_id)
    experiment_id = tracking.make_experiment(uri, cfg.pipeline.experiment)
    _tag_flow_run(flow_run_id, [f"mlflow_run_id:{run_id}"])
    url, note = stages.mlflow_pointer(uri, experiment_id, run_id)
    if url:
        create_link_artifact(link=url, link_text=f"MLflow run {run_id}", key="mlflow-run")
    else:
        create_markdown_artifact(markdown=note, key="mlflow-run", description="Where the MLflow run is")
    logger.info("MLflow run %s (experiment %s, %s)", run_id, cfg.pipeline.experiment, uri)

    rounds = cfg.pipeline.rounds
    progress_id = create_progress_artifact(
        progress=0.0, key="grpo-progress", description=f"rounds done of {rounds}"
    )
    rows: list[dict[str, Any]] = []
    results = []
    baseline = None
    try:
        train_cfg = cfg
        if cfg.sft.enabled:
            train_cfg = stages.with_base(cfg, warm_start(cfg, dataset, run_id, uri))
            baseline = evaluate_baseline(train_cfg, dataset, run_id, uri)
        for r in range(rounds):
            ckpt = train_round(train_cfg, dataset, r, run_id, uri)
            result = evaluate(train_cfg, ckpt, dataset, run_id, uri)
            results.append(result)
            reg = register_elite(train_cfg, ckpt, result, run_id, uri, flow_run_id, dataset)
            row = stages.round_row(uri, run_id, ckpt, cfg.pipeline.steps_per_round, result, reg)
            rows.append(row)
            logger.info(
                "round %d/%d: step %d, eval accuracy %.3f%s",
                r + 1, rounds, ckpt.step, result.accuracy,
                f", registered version {reg['version']}" if reg["elite"] else "",
            )
            update_progress_artifact(progress_id, progress=100.0 * (r + 1) / rounds)
        if baseline is not None:
            create_markdown_artifact(
                markdown=learning_report(uri, run_id, baseline, results, cfg.name),
                key="grpo-learning",
                description="Warm-start baseline vs the GRPO rounds: accuracy, wall clock, McNemar",
            )
    except BaseException:
        try:
            close_run(uri, run_id, "FAILED")
        except Exception as e:  # noqa: BLE001 - keep the original error
            logger.warning("could not mark MLflow run %s FAILED: %s", run_id, e)
        raise
    close_run(uri, run_id, "FINISHED", cfg.name)
    create_markdown_artifact(
        markdown=stages.summary_markdown(rows, f"GRPO run {cfg.name} ({run_id})") + "\n" + note,
        key="grpo-summary",
        description="One row per round",
    )
    versions = [row["version"] for row in rows if row["version"] is not None]
    return {
        "run_id": run_id,
        "experiment": cfg.pipeline.experiment,
        "experiment_id": experiment_id,
        "tracking_uri": uri,
        "flow_run_id": flow_run_id,
        "registered_model": cfg.pipeline.registered_model,
        "versions": versions,
        "rounds": rows,
        "final_step": rows[-1]["step"] if rows else 0,
    }
