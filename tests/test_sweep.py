"""Sweeps: the spec's validation (one line per mistake), grid order and seeded random draws, the
results table and plot, and the `grpo-sweep` flow end to end on the tiny model under the session's
Prefect test harness: one parent MLflow run with a child run per trial, the results table, the
best trial's version promoted, a retried sweep that does not run finished trials again,
`grpo compare --parent`, `grpo sweep` with a bad spec, and the sweep deployment.

    pytest -q tests/test_sweep.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from pipeline_config import flow_artifacts, tiny_config

from grpo import tracking
from grpo.errors import ConfigError, TrackingError
from grpo.stages import sweep as stage
from grpo.stages.sweep import TrialResult
from grpo.sweep import SweepSpec, build_sweep, draws, load_sweep, trial_configs

ROOT = Path(__file__).resolve().parents[1]
LR = "train.learning_rate"


def spec_data(**fields: object) -> dict:
    return {"name": "s", "parameters": {LR: [1e-4, 3e-4]}, **fields}


# ----------------------------------------------------------------------------- the spec


BAD_SPECS = {
    "unknown field": (
        spec_data(parameters={"train.learnin_rate": [1e-4]}),
        "parameters.train.learnin_rate: train has no field 'learnin_rate'",
    ),
    "unknown section": (
        spec_data(parameters={"trian.learning_rate": [1e-4]}),
        "parameters.trian.learning_rate: the run config has no field 'trian'",
    ),
    "value, not a section": (
        spec_data(parameters={"train.learning_rate.low": [1e-4]}),
        "train.learning_rate is a value, not a section",
    ),
    "fixed field": (spec_data(parameters={"pipeline.experiment": ["a", "b"]}), "a sweep cannot vary it"),
    "empty grid": (spec_data(parameters={LR: []}), "parameters.train.learning_rate: the grid is empty"),
    "no parameters": (spec_data(parameters={}), "parameters: no field to sweep"),
    "not a list": (spec_data(parameters={LR: 0.001}), "is neither a list of values nor a range"),
    "low >= high": (
        spec_data(strategy="random", trials=2, parameters={LR: {"low": 1e-3, "high": 1e-4}}),
        "parameters.train.learning_rate: low 0.001 must be below high 0.0001",
    ),
    "log with low <= 0": (
        spec_data(strategy="random", trials=2, parameters={LR: {"low": 0, "high": 1e-3, "log": True}}),
        "log needs low > 0",
    ),
    "int range not whole": (
        spec_data(strategy="random", trials=2, parameters={"lora.r": {"low": 2.5, "high": 8, "type": "int"}}),
        "type int needs whole-number low and high",
    ),
    "range key typo": (
        spec_data(strategy="random", trials=2, parameters={LR: {"low": 1e-5, "hi": 1e-3}}),
        "parameters.train.learning_rate: high: required",
    ),
    "range in a grid": (
        spec_data(parameters={LR: {"low": 1e-5, "high": 1e-3}}), "a range {low, high} needs strategy: random",
    ),
    "pbt field": (spec_data(strategy="pbt", parameters={"train.max_grad_norm": [0.5]}),
                  "parameters.train.max_grad_norm: strategy pbt mutates only"),
    "unknown strategy": (spec_data(strategy="bayes"), "strategy: 'bayes' is not a strategy; use grid, random or pbt"),
    "random without trials": (spec_data(strategy="random"), "trials: strategy random needs the number of trials"),
    "concurrency without a work pool": (
        spec_data(max_concurrency=2), "max_concurrency: 2 trials at once need a work pool",
    ),
    "empty work pool": (spec_data(work_pool=""), "work_pool: String should have at least 1 character"),
    "zero concurrency": (spec_data(work_pool="cpu", max_concurrency=0), "max_concurrency: Input should be"),
    "spec key typo": (spec_data(trails=3), "trails: unknown key"),
    "bad name": (spec_data(name="my sweep"), "name: 'my sweep' is not a usable run name"),
    "bad trial config": (
        spec_data(parameters={"train.group_size": [1, 4]}),
        "trial 0 (train.group_size=1): train.group_size: group_size is 1",
    ),
    "bad base": (spec_data(base={"train": {"bogus": 1}}), "base: invalid config: train.bogus: unknown key"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_a_bad_spec_is_one_config_error_line(case: str) -> None:
    data, expected = BAD_SPECS[case]
    with pytest.raises(ConfigError) as err:
        build_sweep(data)
    message = str(err.value)
    assert "\n" not in message and expected in message, message


def test_load_sweep_reads_yaml_strictly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sweep file .* not found"):
        load_sweep(tmp_path / "nope.yaml")
    twice = tmp_path / "twice.yaml"
    twice.write_text("name: a\nname: b\nparameters: {train.learning_rate: [0.1]}\n")
    with pytest.raises(ConfigError, match="key 'name' is given twice at line 2"):
        load_sweep(twice)
    missing_base = tmp_path / "missing-base.yaml"
    missing_base.write_text(f"name: a\nbase: {tmp_path / 'base.yaml'}\nparameters: {{train.learning_rate: [0.1]}}\n")
    with pytest.raises(ConfigError, match="^base: config file .*base.yaml' not found"):
        load_sweep(missing_base)
    (tmp_path / "base.yaml").write_text("pipeline:\n  rounds: 3\ntrain:\n  group_size: 4\n")
    spec = load_sweep(missing_base)
    assert [cfg.pipeline.rounds for _, cfg in trial_configs(spec)] == [3]
    assert trial_configs(spec)[0][1].train.group_size == 4


def test_grid_is_the_cartesian_product_in_a_stable_order() -> None:
    spec = build_sweep(spec_data(
        name="g", base={"pipeline": {"rounds": 2}},
        parameters={LR: ["1e-4", 3e-4], "lora.r": [8, 16]},  # YAML reads 1e-4 as a string
    ))
    trials = trial_configs(spec)
    assert [p for p, _ in trials] == [
        {LR: 1e-4, "lora.r": 8}, {LR: 1e-4, "lora.r": 16}, {LR: 3e-4, "lora.r": 8}, {LR: 3e-4, "lora.r": 16},
    ]
    assert [cfg.name for _, cfg in trials] == ["g-0", "g-1", "g-2", "g-3"]
    assert all(cfg.pipeline.rounds == 2 for _, cfg in trials)  # the base stays under the swept values
    assert trials[2][1].train.learning_rate == 3e-4 and trials[1][1].lora.r == 16
    capped = SweepSpec.model_validate({**spec.model_dump(), "trials": 3})
    assert [p for p, _ in trial_configs(capped)] == [p for p, _ in trials[:3]]


def test_random_draws_are_seeded_and_in_range() -> None:
    data = spec_data(strategy="random", trials=12, seed=7, base={"train": {"micro_batch_size": 16}}, parameters={
        LR: {"low": 1e-5, "high": 1e-3, "log": True},
        "lora.r": [8, 16, 32],
        "train.group_size": {"low": 2, "high": 6, "type": "int"},
        "lora.dropout": {"low": 0.0, "high": 0.2},
    })
    spec = build_sweep(data)
    first = draws(spec)
    assert first == draws(build_sweep(data))  # same seed, same trials
    assert first != draws(build_sweep({**data, "seed": 8}))
    assert len(first) == 12
    for d in first:
        assert 1e-5 <= d[LR] <= 1e-3 and d["lora.r"] in (8, 16, 32) and 0.0 <= d["lora.dropout"] <= 0.2
        assert isinstance(d["train.group_size"], int) and 2 <= d["train.group_size"] <= 6
    # log-uniform: about as many draws below 1e-4 as above (a uniform draw puts ~9% below it)
    assert sum(d[LR] < 1e-4 for d in first) >= 3
    params = [p for p, _ in trial_configs(spec)]
    assert params == first


def test_the_example_spec_and_its_docs() -> None:
    spec = load_sweep(ROOT / "configs" / "sweep-tiny.yaml")
    trials = trial_configs(spec)
    assert [p[LR] for p, _ in trials] == [1e-4, 3e-4]
    assert [cfg.name for _, cfg in trials] == ["tiny-lr-0", "tiny-lr-1"]
    cfg = trials[0][1]
    assert (cfg.pipeline.rounds, cfg.pipeline.steps_per_round, cfg.sft.max_steps) == (1, 10, 50)
    doc = (ROOT / "docs" / "sweeps.md").read_text()
    assert (ROOT / "configs" / "sweep-tiny.yaml").read_text() in doc  # the doc shows the file as it is
    for block in re.findall(r"```yaml\n(.*?)```", doc, re.DOTALL):
        data = yaml.safe_load(block)
        if isinstance(data.get("base"), str):  # relative to the repository root
            data["base"] = str(ROOT / data["base"])
        build_sweep(data)
    assert "work pool's workers" not in doc.split("Not built yet")[-1]  # built: section 2
    assert (ROOT / "configs" / "pbt-tiny.yaml").read_text() in doc and "refused" not in doc.split("Not built yet")[-1]
    assert load_sweep(ROOT / "configs" / "pbt-tiny.yaml").strategy == "pbt"


def test_the_docs_python_example_runs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(ROOT)
    (block,) = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "sweeps.md").read_text(), re.DOTALL)
    exec(compile(block, "docs/sweeps.md", "exec"), {"__name__": "__docs__"})
    out = capsys.readouterr().out.splitlines()
    assert out == ["tiny-lr-0 {'train.learning_rate': 0.0001} 1", "tiny-lr-1 {'train.learning_rate': 0.0003} 1"]


def test_a_work_pool_spec_and_its_errors(tmp_path: Path) -> None:
    """`work_pool` with any concurrency validates; without a Prefect server it is one line."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from grpo_pipeline.tasks.sweep import check_work_pool_api, trial_deployment

    assert build_sweep(spec_data()).max_concurrency is None and build_sweep(spec_data()).work_pool is None
    spec = build_sweep(spec_data(work_pool="cpu", max_concurrency=3))
    assert (spec.work_pool, spec.max_concurrency) == ("cpu", 3)
    assert build_sweep(spec_data(max_concurrency=1)).max_concurrency == 1  # 1 needs no pool
    assert trial_deployment("cpu") == "grpo-finetune/sweep-cpu"
    assert check_work_pool_api(build_sweep(spec_data())) is None  # no pool: nothing to check
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(ConfigError) as err:
            check_work_pool_api(spec)
    message = str(err.value)
    assert "\n" not in message and message.startswith("work_pool: 'cpu' needs a Prefect server"), message
    assert "prefect server start" in message and "PREFECT_API_URL" in message


def test_grpo_sweep_on_a_work_pool_without_a_prefect_server_is_one_line(
    tmp_path: Path, tiny_model_dir: Path, mlflow_uri: str, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from grpo_pipeline.cli import main

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / ".prefect"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    spec = _spec(tmp_path, tiny_model_dir, mlflow_uri, "swnoserver", work_pool="cpu")
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(spec.model_dump(mode="json")))
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["sweep", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: work_pool: 'cpu' needs a Prefect server"), err
    assert MlflowClient(mlflow_uri).get_experiment_by_name("exp-swnoserver") is None  # nothing started


def test_a_missing_work_pool_is_one_line(tmp_path: Path, tiny_model_dir: Path, mlflow_uri: str,
                                         prefect_harness: None) -> None:
    from grpo_pipeline.tasks.sweep import deploy_trials

    spec = _spec(tmp_path, tiny_model_dir, mlflow_uri, "swnopool", work_pool="nope")
    with pytest.raises(ConfigError, match="^work_pool: no work pool 'nope' on the Prefect server at .*; create "
                                          "it with `prefect work-pool create nope --type process`"):
        deploy_trials.fn(spec)


def test_trial_flow_runs_are_waited_for_and_taken_over(
    tmp_path: Path, tiny_model_dir: Path, mlflow_uri: str, prefect_harness: None
) -> None:
    """`wait_for_trials` returns the ended runs (a failure as one line); `submit_trial` takes over
    a trial's flow run that is still in flight instead of submitting a second one."""
    from prefect import get_client
    from prefect.states import Completed, Failed, Scheduled

    from grpo_pipeline.tasks.sweep import TRIAL_RUN_TAG, submit_trial, wait_for_trials

    spec = _spec(tmp_path, tiny_model_dir, mlflow_uri, "swwait", work_pool="cpu")
    trial = stage.plan(spec, preflight=False)[0]
    with get_client(sync_client=True) as client:
        done = client.create_flow_run(flow=_named_flow("swwait-flow"), name="swwait-0", state=Completed())
        bad = client.create_flow_run(flow=_named_flow("swwait-flow"), name="swwait-1",
                                     state=Failed(message="Flow run encountered an exception: ConfigError: boom"))
        live = client.create_flow_run(flow=_named_flow("swwait-flow"), name="swwait-2", state=Scheduled(),
                                      tags=[f"{TRIAL_RUN_TAG}:child-run-2"])
    ended = wait_for_trials.fn([str(done.id), str(bad.id), str(live.id)], poll_seconds=0.1)
    assert ended == {str(done.id): None, str(bad.id): "flow run swwait-1 FAILED: ConfigError: boom"}
    # The in-flight run is returned as the trial's; no deployment is touched (this one does not exist).
    assert submit_trial.fn("grpo-finetune/nope", trial, "child-run-2", mlflow_uri, str(tmp_path)) == str(live.id)


def _named_flow(name: str) -> object:
    from prefect import flow

    @flow(name=name)
    def f() -> None:
        return None

    return f


def test_resuming_may_change_where_the_trials_run(tmp_path: Path, tiny_model_dir: Path, mlflow_uri: str) -> None:
    """A sweep begun in one process may be resumed on a work pool (and the other way): `work_pool`
    and `max_concurrency` are not part of what must match; the trials' fields are."""
    spec = _spec(tmp_path, tiny_model_dir, mlflow_uri, "swmove")
    parent = stage.open_parent(spec, mlflow_uri)
    moved = SweepSpec.model_validate({**spec.model_dump(), "work_pool": "cpu", "max_concurrency": 2})
    stage.check_resumable(moved, mlflow_uri, parent.run_id, parent.experiment_id)
    other = SweepSpec.model_validate({**moved.model_dump(), "seed": 3})
    with pytest.raises(ConfigError, match="the spec's seed is 3 here but 0"):
        stage.check_resumable(other, mlflow_uri, parent.run_id, parent.experiment_id)


# ----------------------------------------------------------------------------- results, pure


def _result(index: int, best: float | None, status: str = "FINISHED", **params: object) -> TrialResult:
    return TrialResult(
        index=index, run_name=f"s-{index}", run_id=f"{index:032x}", params=params or {LR: 10.0 ** -(index + 3)},
        status=status, best=best, best_step=None if best is None else 2, final=best, wall_s=1.5,
        versions=["1"] if best is not None else [], best_version="1" if best is not None else None, model_name="m",
    )


def test_best_trial_rows_and_plot(tmp_path: Path) -> None:
    results = [_result(0, 0.25), _result(1, 0.5), _result(2, 0.5), _result(3, 0.9, "FAILED"), _result(4, None)]
    assert stage.best_trial(results).index == 1  # a tie goes to the lower index; failed trials never win
    assert stage.best_trial([_result(0, None)]) is None
    rows = stage.results_rows(results, "eval/accuracy")
    assert [r["trial"] for r in rows] == [0, 1, 2, 3, 4]
    assert set(rows[0]) >= {"trial", LR, "best eval/accuracy", "final eval/accuracy", "wall_s", "versions", "status"}
    assert rows[0]["versions"] == "m v1" and rows[4]["best eval/accuracy"] is None
    fig = stage.plot_sweep(results, [LR], "eval/accuracy")
    assert fig.axes[0].get_xscale() == "log"  # the values span 10,000x
    fig.savefig(tmp_path / "a.png")
    cats = [_result(0, 0.1, **{"train.loss_type": "grpo"}), _result(1, 0.2, **{"train.loss_type": "dapo"})]
    fig = stage.plot_sweep(cats, ["train.loss_type"], "eval/accuracy")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["grpo", "dapo"]
    fig.savefig(tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 5000


# ----------------------------------------------------------------------------- the flow


def _spec(tmp_path: Path, model_dir: Path, uri: str, name: str, **fields: object) -> SweepSpec:
    base = tiny_config(tmp_path, model_dir, uri, name, "pipeline.rounds=1").model_dump(mode="json")
    return build_sweep({"name": name, "base": base, "parameters": {LR: [1e-4, 3e-4]}, **fields})




def _parents(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return list(client.search_runs([exp.experiment_id], filter_string=f"tags.`{stage.SWEEP_TAG}` = 'parent'"))


def test_grid_sweep_end_to_end(
    tmp_path: Path, tiny_model_dir: Path, mlflow_uri: str, prefect_harness: None,
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from grpo_pipeline.cli import main
    from grpo_pipeline.flows.sweep import sweep

    spec = _spec(tmp_path, tiny_model_dir, mlflow_uri, "swe2e")
    summary = sweep(spec=spec)
    client = MlflowClient(mlflow_uri)

    (parent,) = _parents(client, "exp-swe2e")  # one parent run ...
    assert parent.info.run_id == summary.parent_run_id and parent.info.run_name == "swe2e"
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.strategy"] == "grid"
    assert parent.data.params[f"sweep.parameters.{LR}"] == "[0.0001, 0.0003]"
    children = tracking.child_runs(mlflow_uri, summary.parent_run_id)  # ... and a child run per trial
    assert [c.info.run_name for c in children] == ["swe2e-0", "swe2e-1"]
    assert [c.data.tags[stage.TRIAL_TAG] for c in children] == ["0", "1"]
    assert all(c.data.tags[tracking.PARENT_RUN_TAG] == summary.parent_run_id for c in children)
    assert all(c.info.status == "FINISHED" for c in children)
    assert [c.data.params[LR] for c in children] == ["0.0001", "0.0003"]
    assert all(c.data.tags["prefect_flow_run_id"] for c in children)  # each trial is a finetune flow run
    runs_in_experiment = client.search_runs([parent.info.experiment_id])
    assert len(runs_in_experiment) == 3

    table = tracking.read_json_artifact(mlflow_uri, summary.parent_run_id, stage.RESULTS_TABLE)
    assert len(table["data"]) == 2 and LR in table["columns"] and "best eval/accuracy" in table["columns"]
    files = {f.path for f in client.list_artifacts(summary.parent_run_id, "sweep")}
    assert stage.PLOT_FILE in files
    stored_spec = tracking.read_json_artifact(mlflow_uri, summary.parent_run_id, stage.SPEC_ARTIFACT)
    assert stored_spec == spec.model_dump(mode="json")
    assert sorted(m.step for m in client.get_metric_history(summary.parent_run_id, stage.BEST_METRIC)) == [0, 1]

    assert [t.index for t in summary.trials] == [0, 1] and not any(t.reused for t in summary.trials)
    assert all(t.best is not None and t.versions and t.wall_s > 0 for t in summary.trials)
    best = summary.best
    assert best is not None and best.best == max(t.best for t in summary.trials)
    # The best trial's best version went through the promote flow and holds the alias now.
    assert summary.promotion is not None and summary.promotion.moved
    assert summary.promotion.candidate == best.best_version
    assert tracking.get_alias_version(mlflow_uri, "lora-swe2e", "champion") == best.best_version
    assert client.get_run(summary.parent_run_id).data.tags["sweep.promotion"] == f"promoted v{best.best_version}"

    arts = flow_artifacts(summary.flow_run_id)
    assert {"grpo-sweep", "grpo-sweep-progress", "mlflow-run"} <= set(arts)
    table_md = arts["grpo-sweep"][0].data
    assert "swe2e-0" in table_md and "swe2e-1" in table_md and "promoted" in table_md

    # `grpo compare --parent` lists the two trials, not the parent, and plots them.
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / ".prefect"))
    capsys.readouterr()
    png = tmp_path / "trials.png"
    assert main(["compare", "--parent", summary.parent_run_id, "--tracking-uri", mlflow_uri, "--out", str(png)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "swe2e-0" in out[1] and "swe2e-1" in out[2] and LR in out[0] and not any(" swe2e " in line for line in out)
    assert out[3] == f"curves: {png}" and png.stat().st_size > 5000


def test_a_retried_sweep_does_not_rerun_finished_trials(
    tmp_path: Path, tiny_model_dir: Path, mlflow_uri: str, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial 1 fails once inside its finetune flow: trial 0 is not stopped, the flow fails, and
    Prefect's retry of the flow run reopens the same parent, leaves trial 0 alone and continues
    trial 1 in its own MLflow run. A later `resume_run_id` of the finished sweep trains nothing."""
    from grpo.stages import train
    from grpo_pipeline.flows.sweep import sweep

    trained: list[str] = []
    train_round = train.train_round

    def fail_trial_1_once(cfg, *args, **kwargs):
        trained.append(cfg.name)
        if cfg.name == "swretry-1" and trained.count("swretry-1") == 1:
            raise ConfigError("injected: trial 1 fails once")
        return train_round(cfg, *args, **kwargs)

    monkeypatch.setattr(train, "train_round", fail_trial_1_once)
    spec = _spec(tmp_path, tiny_model_dir, mlflow_uri, "swretry", promote=False)
    summary = sweep.with_options(retries=1)(spec=spec)
    assert trained == ["swretry-0", "swretry-1", "swretry-1"]  # trial 0 trained once, trial 1 resumed

    client = MlflowClient(mlflow_uri)
    (parent,) = _parents(client, "exp-swretry")
    assert parent.info.run_id == summary.parent_run_id and parent.info.status == "FINISHED"
    children = tracking.child_runs(mlflow_uri, summary.parent_run_id)
    assert [c.data.tags[stage.TRIAL_TAG] for c in children] == ["0", "1"]  # no second run for trial 1
    assert all(c.info.status == "FINISHED" for c in children)
    assert [t.reused for t in summary.trials] == [True, False]
    assert [t.run_id for t in summary.trials] == [c.info.run_id for c in children]
    assert summary.promotion is None and tracking.get_alias_version(mlflow_uri, "lora-swretry", "champion") is None

    # A new flow run resuming the finished sweep: nothing is trained again, the results are the same.
    again = sweep(spec=spec, resume_run_id=summary.parent_run_id)
    assert trained == ["swretry-0", "swretry-1", "swretry-1"]
    assert again.parent_run_id == summary.parent_run_id and [t.reused for t in again.trials] == [True, True]
    assert [t.best for t in again.trials] == [t.best for t in summary.trials]
    assert len(tracking.child_runs(mlflow_uri, summary.parent_run_id)) == 2

    # Resuming needs the same spec and the parent run's id.
    uri, exp_id = mlflow_uri, parent.info.experiment_id
    other = SweepSpec.model_validate({**spec.model_dump(), "seed": 5})
    with pytest.raises(ConfigError, match=f"^--resume {summary.parent_run_id}: the spec's seed is 5 here but 0"):
        stage.check_resumable(other, uri, summary.parent_run_id, exp_id)
    with pytest.raises(ConfigError, match="not the parent run of a sweep"):
        stage.check_resumable(spec, uri, children[0].info.run_id, exp_id)


def test_a_failed_trial_fails_the_sweep_in_one_line_after_the_others(
    tmp_path: Path, tiny_model_dir: Path, mlflow_uri: str, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from grpo.stages import train
    from grpo.stages.sweep import TrialsFailed
    from grpo_pipeline.cli import _call_flow
    from grpo_pipeline.flows.sweep import sweep

    def always_fail(cfg, *args, **kwargs):
        raise ConfigError(f"injected: {cfg.name} fails")

    monkeypatch.setattr(train, "train_round", always_fail)
    spec = _spec(tmp_path, tiny_model_dir, mlflow_uri, "swfail")
    with pytest.raises(TrialsFailed) as err:
        _call_flow(sweep, spec=spec)
    message = str(err.value)
    assert "\n" not in message and message.startswith("sweep swfail: 2 of 2 trials failed (trial 0: injected")
    client = MlflowClient(mlflow_uri)
    (parent,) = _parents(client, "exp-swfail")
    assert parent.info.status == "FAILED" and f"--resume {parent.info.run_id}" in message
    children = tracking.child_runs(mlflow_uri, parent.info.run_id)
    assert [c.info.status for c in children] == ["FAILED", "FAILED"]  # both trials were tried
    table = tracking.read_json_artifact(mlflow_uri, parent.info.run_id, stage.RESULTS_TABLE)
    assert [row[table["columns"].index("status")] for row in table["data"]] == ["FAILED", "FAILED"]


# ----------------------------------------------------------------------------- CLI, compare, deployments


@pytest.mark.parametrize(("text", "expected"), [
    ("name: s\nparameters: {train.learnin_rate: [0.1]}\n", "error: invalid sweep: parameters.train.learnin_rate:"),
    ("name: s\nstrategy: pbt\nparameters: {train.learning_rate: [0.1]}\ntrials: 2\n",
     "strategy pbt trains pbt.population"),
    ("name: s\nparameters: {train.learning_rate: []}\n", "the grid is empty"),
    ("- just\n- a list\n", "must hold a mapping"),
])
def test_grpo_sweep_with_a_bad_spec_exits_2_in_one_line(
    text: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from grpo_pipeline.cli import main

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / ".prefect"))
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    assert main(["sweep", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert main(["sweep", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.startswith("error: sweep file")


def test_compare_parent_errors_are_one_line(mlflow_uri: str) -> None:
    from grpo.compare import compare_runs

    lonely = tracking.start_run(mlflow_uri, "exp-lonely", "lonely")
    with pytest.raises(TrackingError, match=f"MLflow run {lonely} has no child runs"):
        compare_runs(mlflow_uri, None, parent_run_id=lonely)
    with pytest.raises(TrackingError, match="^MLflow run 0123456789abcdef0123456789abcdef: ") as err:
        compare_runs(mlflow_uri, None, parent_run_id="0123456789abcdef0123456789abcdef")
    assert "\n" not in str(err.value)


def test_the_sweep_deployment_is_served_and_in_prefect_yaml() -> None:
    from grpo_pipeline.deployments.serve import SWEEP_DEPLOYMENT, build_deployments

    deployments = {(d.flow_name, d.name): d for d in build_deployments(cron=None)}
    dep = deployments[("grpo-sweep", SWEEP_DEPLOYMENT)]
    assert not dep.schedules and dep.parameters == {}
    from prefect.utilities.callables import parameter_schema

    from grpo_pipeline.flows.sweep import sweep

    schema = parameter_schema(sweep.fn).model_dump_for_openapi()  # the UI's form
    assert schema["required"] == ["spec"] and "parameters" in json.dumps(schema)
    assert {("grpo-finetune", "nightly"), ("grpo-promote", "on-demand")} <= set(deployments)
    file = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    (entry,) = [d for d in file["deployments"] if d["entrypoint"] == "flows/sweep.py:sweep"]
    assert entry["name"] == SWEEP_DEPLOYMENT and entry["schedules"] == [] and entry["work_pool"]["name"] == "cpu"


def test_resume_last_skips_a_failed_sweep_parent(tmp_path: Path) -> None:
    """`grpo run --resume last` resumes the newest failed training run, never a sweep's parent."""
    from grpo import tracking
    from grpo.config import RunConfig
    from grpo.stages.runs import SWEEP_TAG, last_interrupted

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = RunConfig()
    training = tracking.start_run(uri, cfg.pipeline.experiment, "a-training")
    tracking.end_run(uri, training, "FAILED")
    parent = tracking.start_run(uri, cfg.pipeline.experiment, "a-sweep", tags={SWEEP_TAG: "parent"})
    tracking.end_run(uri, parent, "FAILED")
    assert last_interrupted(cfg, uri) == training
