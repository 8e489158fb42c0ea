"""The `grpo` command: run the pipeline, promote, evaluate, prepare data, build the tiny model.

    grpo run                                  # the embedded default: tiny model, CPU, offline
    grpo run --config configs/qwen2.5-0.5b-countdown.yaml --set pipeline.rounds=5
    grpo promote [--model NAME] [--version N] [--alias champion]
    grpo eval --model models:/countdown-lora@champion
    grpo data [--config FILE] [--show 3]      # prepare (or reuse) the splits, show prompts + references
    grpo tiny-model DIR [--seed 0]
    grpo compare [--experiment grpo-countdown]
    grpo sweep --config configs/sweep-tiny.yaml [--resume PARENT_RUN_ID]
    grpo compare --parent PARENT_RUN_ID       # the trials of a sweep

The application's entry point (the library `grpo` never imports it). `grpo run` runs the finetune
flow, then the promote flow, against Prefect (its temporary local server unless PREFECT_API_URL
is set) and MLflow (sqlite:///mlflow.db here unless MLFLOW_TRACKING_URI or
pipeline.tracking_uri says otherwise), and prints where to look. `grpo sweep` runs the sweep
flow the same way (one finetune flow per trial, here or on the spec's `work_pool`, then promote
the best: docs/sweeps.md).

Every mistake a user can make (config, data, paths, model, servers) ends as one line
`error: <message>` on stderr with exit status 2, before any training: the config is validated
and the preflight checks run before Prefect is even imported. Prefect is imported lazily inside
the commands that need it, so `grpo --help` is fast; the environment defaults below are set first.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from grpo.errors import ConfigError, UserError, disk_problem

PREFECT_HEALTH_TIMEOUT_S = 5.0
"""How long a configured Prefect server may take to answer /health before `grpo` gives up."""
ENV_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # offline, the temporary server stalls on telemetry
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def set_env_defaults(environ: MutableMapping[str, str], cwd: Path) -> None:
    """Quiet, offline-safe defaults, and a project-local PREFECT_HOME (<cwd>/.prefect), unless set."""
    for key, value in ENV_DEFAULTS.items():
        environ.setdefault(key, value)
    environ.setdefault("PREFECT_HOME", str(cwd / ".prefect"))


# ----------------------------------------------------------------------------------- parser


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="FILE", default=None,
        help="YAML recipe (default: the embedded default, spelled out in configs/tiny-cpu.yaml).",
    )
    p.add_argument(
        "--set", metavar="KEY=VALUE", dest="overrides", action="extend", nargs="+", default=[],
        help="Override a config field, e.g. --set train.group_size=4 pipeline.rounds=1 (repeatable).",
    )


def build_parser() -> argparse.ArgumentParser:
    from grpo.envs import environment_help

    parser = argparse.ArgumentParser(
        prog="grpo",
        description="GRPO fine-tuning of LoRA adapters as Prefect flows with MLflow tracking and registry.",
        epilog="environments (task.name; parameters in task.params):\n" + environment_help()
        + "\n\ne.g. grpo run --set task.name=reasoning_gym:chain_sum",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "run", help="Run the finetune flow, then promote (the embedded default with no arguments).",
        description="Run the finetune flow (prepare data, train rounds, evaluate, register elite "
        "adapters), then the promote flow. With no --config: the embedded default (tiny model, CPU, "
        "offline). Config fields: see configs/tiny-cpu.yaml.",
    )
    _add_config_args(p)
    p.add_argument(
        "--resume", nargs="?", const="last", default=None, metavar="RUN_ID",
        help="Continue an interrupted run (an MLflow run id; `last` or nothing: the newest failed or "
        "killed run of the experiment): same MLflow run and checkpoints, no step repeated. Without "
        "--config/--set the run's own config is used.",
    )
    p.add_argument("--no-promote", action="store_true", help="Skip the promote flow.")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "promote", help="Move the champion alias to the best registered adapter if it is better.",
        description="Re-evaluate the best (or the named) version and the current champion on the "
        "same held-out split, and move the alias only when the candidate is more accurate.",
    )
    p.add_argument("--model", default=None, help="Registered model (default: pipeline.registered_model).")
    p.add_argument("--version", type=int, default=None, help="Candidate version (default: best by eval accuracy).")
    p.add_argument("--alias", default=None, help="Alias to move (default: pipeline.champion_alias).")
    _add_config_args(p)
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser(
        "eval", help="Evaluate a registered adapter on its held-out split.",
        description="Download a registered adapter and evaluate it greedily on the held-out split it "
        "was evaluated on, with its run's settings (or --config/--set).",
    )
    p.add_argument("--model", required=True, metavar="URI", help="models:/NAME@ALIAS or models:/NAME/VERSION.")
    _add_config_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "data", help="Prepare (or reuse) the train/test splits; show a few prompts and reference completions.",
        description="Prepare (or reuse) the task's train/test splits, print where they are, and show a "
        "few training prompts as the model sees them with their reference completions: the first check "
        "that a prompt template is right (e.g. grpo data --set task.name=reasoning_gym:chain_sum).",
    )
    _add_config_args(p)
    p.add_argument("--show", type=int, default=3, metavar="N", help="Prompts to show (default: %(default)s).")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("tiny-model", help="Build the tiny offline model (weights + tokenizer) in DIR.")
    p.add_argument("dir", metavar="DIR", help="Output folder.")
    p.add_argument("--seed", type=int, default=0, help="Seed of weights and tokenizer corpus (default: 0).")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser(
        "sweep", help="Run a hyper-parameter sweep (the grpo-sweep flow) from a spec file.",
        description="Run one finetune flow per trial of a sweep spec (grid or random over run-config "
        "fields) under one parent MLflow run, log a results table and plot on it, then promote the best "
        "trial's best version if it beats the champion. See docs/sweeps.md and configs/sweep-tiny.yaml.",
    )
    p.add_argument("--config", metavar="FILE", required=True,
                   help="Sweep spec (YAML): name, base, strategy, parameters, trials, work_pool, metric, seed, ...")
    p.add_argument(
        "--resume", metavar="RUN_ID", default=None,
        help="Continue the sweep whose parent MLflow run is RUN_ID (same spec): finished trials are not "
        "run again, unfinished ones continue from their checkpoints.",
    )
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "compare", add_help=False,
        help="Compare the runs of an MLflow experiment, or a sweep's trials with --parent or --sweep (table + plot).",
    )
    p.set_defaults(func=cmd_compare)  # main() hands `grpo compare ...` to grpo.compare's parser
    return parser


# ----------------------------------------------------------------------------------- helpers


def _config(args: argparse.Namespace) -> Any:
    from grpo.config import load_config

    return load_config(args.config, args.overrides)


def _call_flow(flow: Any, **params: Any) -> Any:
    """Run a flow in this process; a `UserError` raised inside comes out as itself (one line)."""
    state = flow(**params, return_state=True)
    if state.is_failed() or state.is_crashed() or state.is_cancelled():
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as e:  # noqa: BLE001 - the result itself may fail to load
            exc = e
        if isinstance(exc, BaseException):
            raise exc
        raise RuntimeError(f"flow {flow.name} ended {state.type.value}: {state.message}")
    return state.result()


def check_prefect_api(timeout_s: float = PREFECT_HEALTH_TIMEOUT_S) -> None:
    """When a Prefect server is configured (PREFECT_API_URL or the active profile), it must answer
    /health within `timeout_s`; without one, Prefect starts a temporary local server itself."""
    import urllib.error
    import urllib.request

    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        return
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout_s) as resp:
            status, why = resp.status, f"HTTP {resp.status}"
    except urllib.error.HTTPError as e:
        status, why = e.code, f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        status, why = None, str(getattr(e, "reason", e)) or type(e).__name__
    if status != 200:
        raise ConfigError(
            f"PREFECT_API_URL: the Prefect server at {url} does not answer ({why}); start it with "
            "`prefect server start`, or unset PREFECT_API_URL to run on a temporary local server"
        )


def _version_of(uri: str, model_uri: str) -> tuple[str, str]:
    """(name, version) of `models:/NAME@ALIAS` or `models:/NAME/VERSION`."""
    from grpo import tracking
    rest = model_uri.removeprefix("models:/")
    if rest == model_uri or not rest:
        raise ConfigError(f"--model {model_uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        version = tracking.get_alias_version(uri, name, alias)
        if version is None:
            raise ConfigError(f"--model {model_uri!r}: alias {alias!r} is not set; run `grpo promote` first")
        return name, version
    name, _, version = rest.rpartition("/")
    if not name or not version.isdigit():
        raise ConfigError(f"--model {model_uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return name, version


# ----------------------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    from grpo import reports, tracking
    from grpo.stages import data, runs

    cfg = _config(args)
    uri = tracking.resolve_tracking_uri(cfg.pipeline.tracking_uri)
    resume = None
    def mark_stale() -> None:
        for stale in runs.mark_stale_runs(cfg, uri):
            print(f"note: MLflow run {stale} was left RUNNING by a process that is gone; marked KILLED")

    if args.resume is not None:  # the run to resume decides the config: find it first
        tracking.check_tracking(uri)
        mark_stale()
        resume = runs.last_interrupted(cfg, uri) if args.resume == "last" else args.resume
        if resume is None:
            raise ConfigError(f"--resume last: experiment {cfg.pipeline.experiment!r} has no failed or killed run")
        if not (args.config or args.overrides):
            cfg = runs.run_config(uri, resume) or cfg
    data.preflight(cfg)  # one line on any bad input, before Prefect starts
    check_prefect_api()
    mark_stale()
    if resume is not None:
        runs.check_resumable(cfg, uri, resume)
    elif (interrupted := runs.interrupted_previous_run(cfg, uri)) is not None:
        print(f"note: the previous run of this config, {interrupted}, was interrupted; "
              f"`grpo run --resume {interrupted}` continues it. Starting a new run.")
    from grpo_pipeline.flows.finetune import finetune
    from grpo_pipeline.flows.promote import promote

    try:
        summary = _call_flow(finetune, config=cfg, resume_run_id=resume)
    except BaseException:  # a signal too: the MLflow run ends FAILED even if the crash hook did not run
        runs.fail_opened_runs()
        raise
    decision = None
    if not args.no_promote and summary.versions:
        decision = _call_flow(promote, config=cfg)
    uri = summary.tracking_uri
    print()
    if resume is not None:
        print(f"resumed run {resume}")
    print(f"finished run {summary.run_id}: {len(summary.rounds)} rounds, step {summary.final_step}, "
          f"registered versions {summary.versions or 'none'}")
    for row in summary.rounds:
        print(f"  round {row.round}: step {row.step}, eval accuracy {row.eval_accuracy:.3f}"
              + (f", version {row.version}" if row.version else ""))
    if decision is not None:
        print(f"promotion: {decision.decision} v{decision.candidate} ({decision.reason})")
    print("where to look:")
    url, _ = reports.mlflow_pointer(uri, summary.experiment_id, summary.run_id)
    print(f"  MLflow UI:  {url or reports.mlflow_ui_command(uri)}")
    print(f"  run id:     {summary.run_id} (experiment {summary.experiment})")
    if decision is not None and decision.champion is not None:
        print(f"  model:      {decision.model_uri} (version {decision.champion})")
    elif summary.versions:
        print(f"  model:      models:/{summary.registered_model}/{summary.versions[-1]}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    cfg = _config(args) if (args.config or args.overrides) else None
    from grpo import tracking
    from grpo.config import RunConfig
    from grpo.stages import registry

    pipe = (cfg or RunConfig()).pipeline
    uri = tracking.resolve_tracking_uri(pipe.tracking_uri)
    # A missing model or version ends in one line here, not after a flow run's traceback.
    registry.promotion_candidates(uri, args.model or pipe.registered_model, args.version)
    check_prefect_api()
    from grpo_pipeline.flows.promote import promote

    decision = _call_flow(promote, model_name=args.model, version=args.version, alias=args.alias, config=cfg)
    print(decision.model_dump_json(indent=2))
    print(f"{decision.model_uri} -> version {decision.champion}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from grpo import tracking
    from grpo.stages import registry

    cfg = _config(args) if (args.config or args.overrides) else None
    uri = tracking.resolve_tracking_uri(cfg.pipeline.tracking_uri if cfg else None)
    tracking.check_tracking(uri)
    name, version = _version_of(uri, args.model)
    split = registry.held_out(uri, name, version, cfg)
    result = registry.evaluate_version(uri, name, version, split.test_path, split.eval, cfg)
    print(json.dumps({"model": args.model, "version": version, "test_path": split.test_path,
                      **result.metrics(prefix="")}, indent=2))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from grpo.data import load_split
    from grpo.envs import env_for
    from grpo.models import ensure_model_for, load_tokenizer
    from grpo.stages import data

    cfg = _config(args)
    ref = data.prepare(cfg)
    print(ref.model_dump_json(indent=2))
    if args.show <= 0:
        return 0
    env = env_for(cfg)
    tokenizer = load_tokenizer(ensure_model_for(cfg), cfg.model.revision)
    rows = load_split(ref.train_path)
    print(f"\ntask {env.name}: {min(args.show, len(rows))} of {len(rows)} training rows as the model sees them")
    for i, row in enumerate(rows.select(range(min(args.show, len(rows))))):
        reference = env.reference_completion(row)
        print(f"\n--- prompt {i + 1} ---\n{env.prompt(tokenizer, cfg.data.conversation, row)}")
        print(f"--- reference completion ---\n{reference if reference is not None else '(none)'}")
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from grpo.models import build_tiny_model

    print(build_tiny_model(args.dir, seed=args.seed))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from grpo import reports, tracking
    from grpo.stages import sweep as stage
    from grpo.sweep import load_sweep

    spec = load_sweep(args.config)
    trials = stage.plan(spec)  # every trial config validated and preflighted: one line, before Prefect
    if spec.strategy == "pbt":
        from grpo.stages.pbt import check_population

        check_population(spec, trials)
    first = trials[0].config
    uri = tracking.resolve_tracking_uri(first.pipeline.tracking_uri)
    if args.resume is not None:
        tracking.check_tracking(uri)
        stage.check_resumable(spec, uri, args.resume, tracking.make_experiment(uri, str(first.pipeline.experiment)))
    check_prefect_api()
    from grpo_pipeline.flows.sweep import sweep
    from grpo_pipeline.tasks.sweep import check_work_pool_api

    check_work_pool_api(spec)  # a work pool needs a Prefect server: one line, before the flow starts

    summary = _call_flow(sweep, spec=spec, resume_run_id=args.resume)
    print()
    print(f"sweep {summary.name}: {len(summary.trials)} trials under parent run {summary.parent_run_id} "
          f"(experiment {summary.experiment})")
    print(stage.results_text(summary))
    best = summary.best
    if best is not None:
        print(f"best: trial {best.index} ({stage.describe(best.params)}), best {summary.metric} {best.best:.4f}, "
              f"version {best.best_version or '-'} of {best.model_name}")
    if summary.promotion is not None:
        p = summary.promotion
        print(f"promotion: {p.decision} v{p.candidate} ({p.reason})")
    print("where to look:")
    url, _ = reports.mlflow_pointer(summary.tracking_uri, summary.experiment_id, summary.parent_run_id)
    print(f"  MLflow UI:  {url or reports.mlflow_ui_command(summary.tracking_uri)} (the trials nest under "
          f"run {summary.name})")
    print(f"  compare:    grpo compare --parent {summary.parent_run_id}")
    return 0


def cmd_compare(args: argparse.Namespace, argv: list[str]) -> int:
    from grpo.compare import main_compare  # its own parser: `grpo compare --help`

    return main_compare(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `grpo` / `python -m grpo_pipeline`; returns the exit status."""
    set_env_defaults(os.environ, Path.cwd())
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["compare"]:  # grpo.compare parses its own options
            return int(cmd_compare(argparse.Namespace(), argv[1:]) or 0)
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if (line := disk_problem(e)) is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2


def exit_on_sigterm() -> None:
    """Make SIGTERM end the process as an exception does (exit status 143), not by the default
    action: Prefect first marks the flow run crashed (its hooks mark the MLflow run FAILED), then
    re-sends the signal, and this handler lets the interpreter's exit handlers stop the temporary
    Prefect server instead of leaving it orphaned."""

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def entry() -> int:
    """The `grpo` console script and `python -m grpo_pipeline`: `main` with the SIGTERM handler."""
    exit_on_sigterm()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
