"""The deployments against real servers, as a user runs them, and both UIs in a real browser.

    pytest -q tests/test_servers.py          # ~3-5 min on 2 cores; `-m "not servers"` skips it

Once per module: `prefect server start` and `mlflow server` (sqlite + served artifacts) on
127.0.0.1 free ports, and `python deployments/serve.py` serving both deployments from a
background process; all are stopped (process-group kill) at the end, pass or fail. Then: the
nightly schedule is registered with its cron string; a run triggered through the deployments API
(`run_deployment`, what the UI's Run button calls) completes and its MLflow run is on the MLflow
server; a bad parameter fails that flow run fast with a message naming the field; headless
Chromium finds the deployment in the Prefect UI and the run in the MLflow UI (screenshots under
test-artifacts/); a 2-trial sweep with `work_pool` runs its trials on two `prefect worker`
processes of one process pool at the same time, as children of one parent MLflow run, and
promotes the better one; `deployments/prefect.yaml` deploys onto a process work pool.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
from servers import (
    ROOT,
    MlflowServer,
    PrefectServer,
    Server,
    chromium,
    chromium_available,
    clean_env,
    make_mlflow_server,
    make_prefect_server,
    serve_deployments,
    start_servers,
)

from grpo_pipeline.deployments.serve import (
    FINETUNE_DEPLOYMENT,
    NIGHTLY_CRON,
    PROMOTE_DEPLOYMENT,
    TIMEZONE,
    finetune_parameters,
)

pytestmark = [pytest.mark.servers, pytest.mark.slow]

FINETUNE = f"grpo-finetune/{FINETUNE_DEPLOYMENT}"
PROMOTE = f"grpo-promote/{PROMOTE_DEPLOYMENT}"
EXPERIMENT = "served-tiny"
ARTIFACTS = ROOT / "test-artifacts"


CUSTOM_REWARD = '''
def short_answer(completions, **columns):
    """1.0 for a completion under 40 characters, else 0.0."""
    return [float(len(c) < 40) for c in completions]
'''
CUSTOM_REWARDS = ["format", "equation", "team_rewards:short_answer"]


@dataclass
class Stack:
    prefect: PrefectServer
    mlflow: MlflowServer
    serve: Server
    work: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("servers")
    work = tmp / "work"
    work.mkdir()
    # A team's own reward, importable only by the serving process (its PYTHONPATH names the folder),
    # as docs say a worker must see it; the finetune run below names it by import path.
    (work / "team_rewards.py").write_text(CUSTOM_REWARD)
    pythonpath = os.pathsep.join([str(ROOT), str(work)])
    pf, ml = make_prefect_server(tmp / "prefect"), make_mlflow_server(tmp / "mlflow")
    with start_servers(pf, ml, timeout=150):
        env = {"MLFLOW_TRACKING_URI": ml.url, "PYTHONPATH": pythonpath}
        with serve_deployments(pf, cwd=work, env=env, timeout=120) as sv:
            yield Stack(pf, ml, sv, work)


@pytest.fixture
def api(stack: Stack) -> Iterator[None]:
    """Point this process's Prefect client at the module's server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.prefect.api_url}):
        yield


def tiny_config(stack: Stack, model_dir: Path, name: str, **train: Any) -> dict[str, Any]:
    """A run of seconds: 1 round of 2 steps, 2 prompts x 4 completions, 16 new tokens."""
    return {
        "name": name,
        "model": {"name_or_path": str(model_dir)},
        "generation": {"max_new_tokens": 16},
        "train": {"prompts_per_step": 2, "group_size": 4, "micro_batch_size": 8, **train},
        "eval": {"num_problems": 8, "batch_size": 8, "samples_logged": 4},
        "data": {"generate_rows": 200, "cache_dir": str(stack.work / "data")},
        "sft": {"enabled": False},
        "pipeline": {
            "rounds": 1,
            "steps_per_round": 2,
            "output_dir": str(stack.work / "runs"),
            "experiment": EXPERIMENT,
            "tracking_uri": stack.mlflow.url,
        },
    }


def trigger(stack: Stack, parameters: dict[str, Any], timeout: float) -> Any:
    """Create a flow run of the finetune deployment via the API and wait for a final state."""
    from prefect.deployments import run_deployment

    run = run_deployment(FINETUNE, parameters=parameters, timeout=timeout, poll_interval=2)
    if not run.state.is_final():
        pytest.fail(f"flow run {run.id} still {run.state.type} after {timeout} s; serve log:\n"
                    f"{stack.serve.log_tail()}")
    return run


@pytest.fixture(scope="module")
def finetune_run(stack: Stack, tiny_model_dir: Path) -> Any:
    """One tiny finetune run triggered through the deployment (shared by the tests below)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.prefect.api_url}):
        config = tiny_config(stack, tiny_model_dir, "served-tiny-run", rewards=CUSTOM_REWARDS)
        return trigger(stack, {"config": config}, timeout=300)


def read_deployment(name: str) -> Any:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def test_serve_stores_validated_parameters() -> None:
    """No server needed: serve.py stores nothing by default and validates a recipe before serving."""
    from grpo.errors import ConfigError

    assert finetune_parameters(None, []) == {}
    params = finetune_parameters(None, ["pipeline.rounds=1"])
    assert params["config"]["pipeline"]["rounds"] == 1
    assert params["config"]["train"]["group_size"] == 8  # the rest: embedded defaults
    with pytest.raises(ConfigError, match="group_size is 1"):
        finetune_parameters(None, ["train.group_size=1"])


def wait_for_scheduled_runs(deployment_id: Any, timeout: float) -> list[Any]:
    """Flow runs in state SCHEDULED of a deployment, polled until some exist or `timeout`."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
                ),
            )
            if runs or time.monotonic() > deadline:
                return runs
            time.sleep(2)


def test_schedule_registered_with_cron(stack: Stack, api: None) -> None:
    dep = read_deployment(FINETUNE)
    assert dep.parameters == {}  # scheduled runs use the embedded default config
    assert len(dep.schedules) == 1
    sched = dep.schedules[0]
    assert sched.active
    assert sched.schedule.cron == NIGHTLY_CRON == "0 2 * * *"
    assert sched.schedule.timezone == TIMEZONE == "UTC"
    # The config form: the flow's parameter schema exposes the RunConfig sections.
    props = dep.parameter_openapi_schema["properties"]
    assert "config" in props
    definitions = dep.parameter_openapi_schema.get("definitions", {})
    assert "task" in definitions["RunConfig"]["properties"]  # the form asks which environment
    assert set(definitions["TaskConfig"]["properties"]) == {"name", "params"}
    # The server's scheduler turns the cron into upcoming runs, each at 02:00 UTC.
    upcoming = wait_for_scheduled_runs(dep.id, timeout=60)
    assert upcoming, (
        "the Prefect server's scheduler created no scheduled runs for the nightly deployment; "
        f"server log:\n{stack.prefect.log_tail()}"
    )
    for r in upcoming:
        start = r.expected_start_time.astimezone(UTC)
        assert (start.hour, start.minute) == (2, 0), start
    promote = read_deployment(PROMOTE)
    assert promote.schedules == []
    assert {"model_name", "version", "alias", "config"} <= set(promote.parameter_openapi_schema["properties"])


def test_run_deployment_completes_and_logs_to_mlflow_server(stack: Stack, finetune_run: Any) -> None:
    from mlflow import MlflowClient

    run = finetune_run
    assert run.state.is_completed(), f"{run.state.type}: {run.state.message}\n{stack.serve.log_tail()}"
    client = MlflowClient(stack.mlflow.url, registry_uri=stack.mlflow.url)
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None, "the experiment is not on the MLflow server"
    found = client.search_runs([exp.experiment_id], f"tags.prefect_flow_run_id = '{run.id}'")
    assert len(found) == 1, [r.data.tags for r in client.search_runs([exp.experiment_id])]
    mrun = found[0]
    assert mrun.info.status == "FINISHED"
    assert mrun.info.run_name == "served-tiny-run"
    assert mrun.data.params["train.group_size"] == "4"
    steps = [m.step for m in client.get_metric_history(mrun.info.run_id, "reward_mean")]
    assert sorted(steps) == [1, 2]
    # The reward named by import path was imported on the serving process and logged per step.
    custom = client.get_metric_history(mrun.info.run_id, "reward/short_answer")
    assert sorted(m.step for m in custom) == [1, 2] and all(0.0 <= m.value <= 1.0 for m in custom)
    assert json.loads(mrun.data.params["train.rewards"]) == CUSTOM_REWARDS
    assert client.get_metric_history(mrun.info.run_id, "eval/accuracy")
    # Artifacts went through the server (served artifacts), e.g. the curves image.
    names = {f.path for f in client.list_artifacts(mrun.info.run_id, "plots")}
    assert "plots/curves.png" in names


def prefect_cli(stack: Stack, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """The `prefect` command line of this venv, pointed at the module's server, run in the repo."""
    env = {**os.environ, **stack.prefect.client_env(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    prefect = str(Path(sys.executable).with_name("prefect"))
    p = subprocess.run([prefect, "--no-prompt", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, f"prefect {' '.join(args)}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    return p


def test_bad_parameter_fails_fast_naming_the_field(
    stack: Stack, api: None, tiny_model_dir: Path
) -> None:
    """Triggered with the README's command line: `prefect deployment run --params JSON --watch`."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    params = {"config": tiny_config(stack, tiny_model_dir, "bad-group", group_size=1)}
    name = f"bad-group-size-{os.getpid()}"
    t0 = time.monotonic()
    prefect_cli(stack, "deployment", "run", FINETUNE, "--params", json.dumps(params), "--flow-run-name",
                name, "--watch", "--watch-interval", "2", "--watch-timeout", "120", check=False)
    waited = time.monotonic() - t0
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    assert len(runs) == 1, f"no flow run named {name}"
    run = runs[0]
    assert run.state.is_failed(), f"{run.state.type}: {run.state.message}\n{stack.serve.log_tail()}"
    msg = run.state.message or ""
    assert "group_size" in msg and "train" in msg, msg
    assert "2 or more" in msg, msg  # the fix, from the config's validator
    assert waited < 60, f"took {waited:.0f} s to fail"
    # Nothing ran: the flow failed on its parameters, before any MLflow run was opened.
    from mlflow import MlflowClient

    client = MlflowClient(stack.mlflow.url, registry_uri=stack.mlflow.url)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        assert not client.search_runs([exp.experiment_id], f"tags.prefect_flow_run_id = '{run.id}'")


needs_chromium = pytest.mark.skipif(
    not chromium_available(),
    reason="headless Chromium not installed (/usr/bin/chromium); install it with "
    "`make system-deps` (Debian's chromium; CI's .ci/run does)",
)


@needs_chromium
def test_prefect_ui_shows_deployments(stack: Stack, api: None) -> None:
    dep = read_deployment(FINETUNE)
    url = f"{stack.prefect.url}/deployments"
    dom = chromium(url, dump_dom=True, profile_root=stack.work)
    chromium(url, screenshot=ARTIFACTS / "prefect-deployments.png", profile_root=stack.work)
    assert "Can't connect to Server API" not in dom
    assert "grpo-finetune" in dom and FINETUNE_DEPLOYMENT in dom, dom[-2000:]
    assert "grpo-promote" in dom and PROMOTE_DEPLOYMENT in dom
    # The deployment's own page, where the UI's Run button and the schedule are.
    url = f"{stack.prefect.url}/deployments/deployment/{dep.id}"
    dom = chromium(url, dump_dom=True, profile_root=stack.work)
    chromium(url, screenshot=ARTIFACTS / "prefect-deployment-nightly.png", profile_root=stack.work)
    assert FINETUNE_DEPLOYMENT in dom and "Run" in dom
    assert (ARTIFACTS / "prefect-deployments.png").stat().st_size > 10_000


@needs_chromium
def test_mlflow_ui_shows_the_run(stack: Stack, finetune_run: Any) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(stack.mlflow.url, registry_uri=stack.mlflow.url)
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None
    url = f"{stack.mlflow.url}/#/experiments/{exp.experiment_id}/runs"
    dom = chromium(url, dump_dom=True, profile_root=stack.work)
    chromium(url, screenshot=ARTIFACTS / "mlflow-experiment.png", profile_root=stack.work)
    assert EXPERIMENT in dom
    assert "served-tiny-run" in dom, dom[-2000:]
    assert (ARTIFACTS / "mlflow-experiment.png").stat().st_size > 10_000


SWEEP_POOL = "sweep-pool"
WORKERS = ("sweep-worker-0", "sweep-worker-1")
METRIC = "completion_length_mean"


def wait_for_workers(pool: str, names: tuple[str, ...], workers: list[Server], timeout: float) -> None:
    """Poll the pool until every worker in `names` is ONLINE (a worker that exits fails at once)."""
    from prefect import get_client

    deadline = time.monotonic() + timeout
    while True:
        for w in workers:
            w.check_alive()
        with get_client(sync_client=True) as client:
            online = {w.name for w in client.read_workers_for_work_pool(pool)
                      if getattr(w.status, "value", w.status) == "ONLINE"}
        if set(names) <= online:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"workers {sorted(set(names) - online)} not online after {timeout:.0f} s; log tail:\n"
                        f"{workers[0].log_tail()}")
        time.sleep(1)


def test_a_sweep_spreads_its_trials_over_the_work_pools_workers(
    stack: Stack, api: None, tiny_model_dir: Path
) -> None:
    """`grpo sweep` with `work_pool`: 2 trials, 2 process workers (one flow run each at a time):
    the flow run records show the trials on different workers at overlapping times; both MLflow
    runs are children of one parent; the better trial's best version holds the champion alias."""
    from mlflow import MlflowClient
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    from grpo_pipeline.tasks.sweep import trial_deployment

    prefect_cli(stack, "work-pool", "create", SWEEP_POOL, "--type", "process")
    env = clean_env({
        **stack.prefect.client_env(),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(stack.work)]),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "OMP_NUM_THREADS": "1",  # two trainings on 2 cores: one thread each
    })
    prefect = str(Path(sys.executable).with_name("prefect"))
    workers = [
        Server(name=name, env=env, cwd=stack.work, log=stack.work / f"{name}.log",
               cmd=[prefect, "worker", "start", "--pool", SWEEP_POOL, "--type", "process", "--name", name,
                    "--limit", "1"])
        for name in WORKERS
    ]
    base = tiny_config(stack, tiny_model_dir, "pool-sweep")
    base["pipeline"].update(experiment="pool-sweep", registered_model="lora-pool-sweep")
    # The untrained tiny model scores 0 on Countdown whatever the trial, so the sweep maximises a
    # metric the trials differ on: trial 1 may write 16 tokens, trial 0 only 8 (it rarely stops early).
    spec = {"name": "pool-sweep", "base": base, "parameters": {"generation.max_new_tokens": [8, 16]},
            "metric": METRIC, "work_pool": SWEEP_POOL}
    (stack.work / "pool-sweep.yaml").write_text(json.dumps(spec))  # JSON is YAML
    try:
        for w in workers:
            w.start()
        wait_for_workers(SWEEP_POOL, WORKERS, workers, timeout=120)
        t0 = time.monotonic()
        p = subprocess.run(
            [sys.executable, "-m", "grpo_pipeline", "sweep", "--config", "pool-sweep.yaml"], cwd=stack.work,
            env={**env, "MLFLOW_TRACKING_URI": stack.mlflow.url}, capture_output=True, text=True, timeout=420,
        )
        wall = time.monotonic() - t0
    finally:
        for w in workers:
            w.stop()
    logs = "\n".join(f"--- {w.name}\n{w.log_tail(2000)}" for w in workers)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}\n{logs}"
    parent_run_id = re.search(r"2 trials under parent run (\w+)", p.stdout).group(1)

    client = MlflowClient(stack.mlflow.url, registry_uri=stack.mlflow.url)
    parent = client.get_run(parent_run_id)
    sweep_flow_run = parent.data.tags["prefect_flow_run_id"]
    deployment = trial_deployment(SWEEP_POOL).split("/", 1)[1]
    with get_client(sync_client=True) as prefect_client:
        runs = prefect_client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
        )
        callers = {str(prefect_client.read_task_run(r.parent_task_run_id).flow_run_id) for r in runs}
    assert sorted(r.name for r in runs) == ["pool-sweep-0", "pool-sweep-1"], [r.name for r in runs]
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state.type) for r in runs]
    assert all(r.work_pool_name == SWEEP_POOL for r in runs)
    assert callers == {sweep_flow_run}  # both are subflows of the grpo-sweep flow run
    # Two workers, each took one trial (the label a worker gives the flow runs it starts) ...
    assert sorted(r.labels.get("prefect.worker.name") for r in runs) == sorted(WORKERS), [r.labels for r in runs]
    # ... and they ran at the same time.
    starts, ends = [r.start_time for r in runs], [r.end_time for r in runs]
    assert max(starts) < min(ends), f"no overlap: {list(zip(starts, ends))}"

    children = sorted(client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'"),
                      key=lambda r: r.info.run_name)
    assert [c.info.run_name for c in children] == ["pool-sweep-0", "pool-sweep-1"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.data.tags["prefect_flow_run_id"] for c in children) == sorted(str(r.id) for r in runs)
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.work_pool"] == SWEEP_POOL
    # The better trial (the higher best value of the metric: trial 1, not the tie-break's trial 0) is promoted.
    best = [max(m.value for m in client.get_metric_history(c.info.run_id, METRIC)) for c in children]
    assert best[1] > best[0], best
    winner = 1
    assert parent.data.tags["sweep.best_trial"] == str(winner), (best, parent.data.tags)
    champion = client.get_model_version_by_alias("lora-pool-sweep", "champion")
    assert champion.version == parent.data.tags["sweep.best_version"]
    assert champion.run_id == children[winner].info.run_id
    assert parent.data.tags["sweep.promotion"] == f"promoted v{champion.version}"
    print(f"\n2-trial sweep on 2 workers: {wall:.0f} s wall; best {METRIC} per trial {best}")


def test_prefect_yaml_deploys_to_a_process_work_pool(stack: Stack, api: None) -> None:
    """`prefect deploy` of deployments/prefect.yaml (run last: it re-points the served deployments
    at the work pool). Checks the file's entrypoints, schedule and pool, not a worker run."""
    prefect_cli(stack, "work-pool", "create", "cpu", "--type", "process")
    prefect_cli(stack, "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    dep = read_deployment(FINETUNE)
    assert dep.work_pool_name == "cpu"
    assert dep.entrypoint == "flows/finetune.py:finetune"
    assert [s.schedule.cron for s in dep.schedules] == [NIGHTLY_CRON]
    assert dep.parameters == {}
    # `{{ $PWD }}` is filled in by `prefect deploy`: the worker runs flows in the deployed checkout.
    assert dep.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
    ]
    promote = read_deployment(PROMOTE)
    assert promote.work_pool_name == "cpu" and promote.entrypoint == "flows/promote.py:promote"
    json.dumps(dep.parameter_openapi_schema)  # the UI form's schema is plain JSON
