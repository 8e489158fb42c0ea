"""Serve the finetune, promote and sweep deployments from one local process (no work pool, no worker).

    prefect server start                        # another terminal; UI at http://127.0.0.1:4200
    python deployments/serve.py                 # grpo-finetune/nightly, grpo-promote/on-demand, grpo-sweep/on-demand
    prefect deployment run grpo-finetune/nightly --param config='{"pipeline": {"rounds": 1}}'
    prefect deployment run grpo-sweep/on-demand --param spec='{"name": "rank", "parameters": {"lora.r": [8, 16]}}'

`grpo-finetune/nightly` runs the embedded default config (no stored parameters) every night at
02:00 UTC (`--cron`, `--timezone`, `--no-schedule` change that); `--config FILE` and
`--set key=value` store a recipe as the deployment's default parameters instead. Parameters given
when a run is triggered (UI form, `prefect deployment run --param`, `run_deployment`) replace the
stored ones. Flow runs execute in child processes of this one, in its working directory, with its
environment (set MLFLOW_TRACKING_URI here to send runs to an MLflow server). Stopping the process
(Ctrl-C) pauses the schedules. `grpo-sweep/on-demand` has no schedule and no stored parameters:
each run is given its sweep spec (the UI's form, docs/sweeps.md). `deployments/prefect.yaml`
describes the same three deployments for `prefect deploy` and a worker on a process work pool.
"""

from __future__ import annotations

import argparse
from typing import Any

FINETUNE_DEPLOYMENT = "nightly"
PROMOTE_DEPLOYMENT = "on-demand"
SWEEP_DEPLOYMENT = "on-demand"
NIGHTLY_CRON = "0 2 * * *"
TIMEZONE = "UTC"


def finetune_parameters(config_path: str | None, overrides: list[str] | None) -> dict[str, Any]:
    """Stored default parameters of the finetune deployment: {} = the embedded default config.

    A recipe or overrides are validated here, so a bad value stops the server before serving.
    """
    if config_path is None and not overrides:
        return {}
    from grpo.config import load_config

    return {"config": load_config(config_path, overrides).model_dump(mode="json")}


def build_deployments(
    *,
    cron: str | None = NIGHTLY_CRON,
    timezone: str = TIMEZONE,
    parameters: dict[str, Any] | None = None,
    finetune_name: str = FINETUNE_DEPLOYMENT,
    promote_name: str = PROMOTE_DEPLOYMENT,
    sweep_name: str = SWEEP_DEPLOYMENT,
) -> list[Any]:
    """The three `RunnerDeployment`s: finetune (on `cron` in `timezone`; None = unscheduled),
    promote and sweep (both on demand)."""
    from prefect.schedules import Cron

    from grpo_pipeline.flows.finetune import finetune
    from grpo_pipeline.flows.promote import promote
    from grpo_pipeline.flows.sweep import sweep

    schedules = [Cron(cron, timezone=timezone)] if cron else None
    return [
        finetune.to_deployment(
            name=finetune_name,
            schedules=schedules,
            parameters=parameters or {},
            description="GRPO fine-tuning run; the form is the run config (defaults = embedded default).",
            tags=["grpo", "train"],
        ),
        promote.to_deployment(
            name=promote_name,
            description="Move the champion alias to the best (or a named) registered adapter version.",
            tags=["grpo", "registry"],
        ),
        sweep.to_deployment(
            name=sweep_name,
            description="Hyper-parameter sweep: one finetune run per trial under a parent MLflow run, then "
            "promote the best; the form is the sweep spec (docs/sweeps.md).",
            tags=["grpo", "sweep"],
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python deployments/serve.py", description=__doc__.splitlines()[0])
    parser.add_argument("--cron", default=NIGHTLY_CRON,
                        help="Schedule of the finetune deployment (default: %(default)s).")
    parser.add_argument("--timezone", default=TIMEZONE, help="IANA timezone of --cron (default: %(default)s).")
    parser.add_argument("--no-schedule", action="store_true", help="Serve without a schedule (manual runs only).")
    parser.add_argument("--config", default=None, help="YAML recipe stored as the default parameters.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Config override stored in the default parameters (repeatable).")
    parser.add_argument("--limit", type=int, default=None, help="Most flow runs at once (default: no limit).")
    args = parser.parse_args(argv)

    from prefect import serve

    from grpo.errors import UserError

    try:
        params = finetune_parameters(args.config, args.overrides)
    except UserError as e:
        parser.exit(2, f"error: {e}\n")
    serve(*build_deployments(cron=None if args.no_schedule else args.cron, timezone=args.timezone,
                             parameters=params), limit=args.limit)


if __name__ == "__main__":
    main()
