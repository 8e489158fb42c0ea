"""The finetune and promote flows end to end under one Prefect test harness, on the tiny model.

    pytest -q tests/test_flows.py

Checks what lands in MLflow (params, per-step metrics once each, eval metrics at round ends,
registered versions with their tags, the champion alias) and in Prefect (artifacts, tags, task
retries), that `models:/NAME@champion` loads with peft and generates, that a fault injected once
inside `train_round` (the test wraps `grpo.tracking.log_metrics`) is retried by Prefect and
resumed without a repeated metric step or a second model version, that a failed flow run marks
its MLflow run FAILED through the flow's state hook, and that a promotion whose candidate's run
config cannot be read fails instead of evaluating with default settings.
"""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

import pytest
from mlflow import MlflowClient
from pipeline_config import TINY, flow_artifacts, tiny_config

from grpo import tracking
from grpo.checkpoint import checkpoint_ref
from grpo.config import RunConfig
from grpo.stages import evaluate, runs


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))




def task_runs(flow_run_id: str) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        found = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])))
        return {t.name: t for t in found}


def test_finetune_then_promote(
    tmp_path: Path, tiny_model_dir: Path, mlflow_uri: str, prefect_harness: None, capsys: pytest.CaptureFixture
) -> None:
    from grpo_pipeline.flows.finetune import finetune
    from grpo_pipeline.flows.promote import promote

    cfg = tiny_config(tmp_path, tiny_model_dir, mlflow_uri, "e2e")
    summary = finetune(config=cfg)
    client = MlflowClient(mlflow_uri)
    run_id = summary.run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.group_size"] == "4" and run.data.params["pipeline.rounds"] == "2"
    assert run.data.tags[runs.FLOW_RUN_TAG] == summary.flow_run_id
    for key in ("reward_mean", "loss", "reward/format", "reward/equation"):
        assert metric_steps(client, run_id, key) == [1, 2, 3, 4], key
    assert metric_steps(client, run_id, "eval/accuracy") == [2, 4]
    artifacts = {f.path for f in client.list_artifacts(run_id, "eval")}
    assert artifacts == {"eval/samples_step_000002.json", "eval/samples_step_000004.json"}
    assert {f.path for f in client.list_artifacts(run_id, "plots")} == {"plots/curves.png"}

    versions = client.search_model_versions("name = 'lora-e2e'")
    assert versions and summary.versions == sorted(str(v.version) for v in versions)
    assert all(v.tags["step"] in {"2", "4"} and v.tags["run_id"] == run_id for v in versions)
    assert [r.step for r in summary.rounds] == [2, 4]

    # Prefect: the run carries the MLflow run id, the artifacts are there.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as pc:
        assert f"mlflow_run_id:{run_id}" in pc.read_flow_run(UUID(summary.flow_run_id)).tags
    arts = flow_artifacts(summary.flow_run_id)
    assert {"grpo-progress", "grpo-summary", "mlflow-run"} <= set(arts)
    table = arts["grpo-summary"][0].data
    assert "| 1 | 2 |" in table and "| 2 | 4 |" in table and run_id in table
    assert arts["grpo-progress"][0].data == 100.0
    assert "mlflow ui --backend-store-uri" in arts["mlflow-run"][0].data

    decision = promote(config=cfg)
    assert decision.moved and decision.champion_before is None
    champion = tracking.get_alias_version(mlflow_uri, "lora-e2e", "champion")
    assert champion == decision.champion == decision.candidate
    assert client.get_model_version("lora-e2e", champion).tags["promotion_decision"] == "promoted"
    assert "grpo-promotion" in flow_artifacts(str(_last_flow_run_id("grpo-promote")))

    # Promoting again: the champion keeps the alias (nothing better), the decision is recorded.
    again = promote(config=cfg)
    assert not again.moved and again.champion == champion

    # The champion's adapter loads onto its base with peft and generates.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tracking.download_model(mlflow_uri, "models:/lora-e2e@champion", tmp_path / "dl")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, str(adapter))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok("nums: 1 2 3 target: 6", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    # ... and it is the adapter of the checkpoint at the version's step.
    from safetensors.torch import load_file

    step = int(client.get_model_version("lora-e2e", champion).tags["step"])
    saved = load_file(runs.run_dir(cfg, run_id) / "checkpoints" / f"step-{step:06d}" / "adapter_model.safetensors")
    downloaded = load_file(adapter / "adapter_model.safetensors")
    assert saved.keys() == downloaded.keys() and saved
    assert all(torch.equal(saved[k], downloaded[k]) for k in saved)

    # `grpo eval` on the champion prints its held-out metrics.
    from grpo_pipeline.cli import main

    capsys.readouterr()
    assert main(["eval", "--model", "models:/lora-e2e@champion", "--set", f"pipeline.tracking_uri={mlflow_uri}",
                 *TINY]) == 0
    printed = capsys.readouterr().out
    assert '"accuracy"' in printed and f'"version": "{champion}"' in printed


def _last_flow_run_id(flow_name: str) -> UUID:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        found = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            sort=FlowRunSort.START_TIME_DESC, limit=1,
        )
    return found[0].id


def test_fault_in_train_round_is_retried_and_resumed(
    tmp_path: Path, tiny_model_dir: Path, mlflow_uri: str, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from grpo_pipeline.flows.finetune import finetune
    from grpo_pipeline.tasks.registry import register_elite

    faults: list[int] = []
    log_metrics = tracking.log_metrics

    def log_then_fail_once(uri: str, run_id: str, metrics: dict, step: int, **kwargs: object) -> None:
        log_metrics(uri, run_id, metrics, step, **kwargs)
        if step == 3 and "reward_mean" in metrics and not faults:
            faults.append(step)
            raise RuntimeError("injected fault after step 3")

    monkeypatch.setattr(tracking, "log_metrics", log_then_fail_once)
    cfg = tiny_config(tmp_path, tiny_model_dir, mlflow_uri, "retry")
    summary = finetune(config=cfg)
    assert faults == [3]  # the fault did happen, after step 3 was logged

    attempts = task_runs(summary.flow_run_id)
    assert attempts["train-round-1"].run_count == 2 and attempts["train-round-1"].state.is_completed()
    assert attempts["train-round-0"].run_count == 1

    client = MlflowClient(mlflow_uri)
    run_id = summary.run_id
    for key in ("reward_mean", "loss", "lr"):
        assert metric_steps(client, run_id, key) == [1, 2, 3, 4], key  # each step once
    assert metric_steps(client, run_id, "eval/accuracy") == [2, 4]
    assert summary.final_step == 4

    versions = client.search_model_versions("name = 'lora-retry'")
    keys = [v.tags[tracking.KEY_TAG] for v in versions]
    assert keys and len(keys) == len(set(keys))
    # register_elite run again for the first round: the same version, no new one.
    ckpt = checkpoint_ref(runs.run_dir(cfg, run_id) / "checkpoints" / "step-000002")
    result = evaluate.evaluate_checkpoint(cfg, ckpt, _dataset(cfg), run_id, mlflow_uri, progress=False)
    again = register_elite.fn(cfg, ckpt, result, run_id, mlflow_uri, summary.flow_run_id)
    assert again.version == summary.versions[0] and not again.created
    assert len(client.search_model_versions("name = 'lora-retry'")) == len(versions)


def _dataset(cfg: RunConfig):
    from grpo.countdown import prepare_dataset

    return prepare_dataset(cfg.data)


def test_bad_input_inside_the_flow_is_the_user_error(
    tmp_path: Path, tiny_model_dir: Path, mlflow_uri: str, prefect_harness: None
) -> None:
    import socket

    from grpo.errors import TrackingError
    from grpo_pipeline.cli import _call_flow
    from grpo_pipeline.flows.finetune import finetune

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    cfg = tiny_config(tmp_path, tiny_model_dir, dead, "dead")
    with pytest.raises(TrackingError, match=f"^pipeline.tracking_uri: MLflow at {dead} does not answer"):
        _call_flow(finetune, config=cfg)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_finetune_with_warm_start_reports_the_gain_and_promotes(
    tmp_path: Path, tiny_model_dir: Path, mlflow_uri: str, prefect_harness: None
) -> None:
    """With the warm start on: its evaluation (step 0) is the baseline, the final adapter is
    compared with it (McNemar), accuracy against wall clock is logged, versions register and
    promote moves the alias as before."""
    from grpo_pipeline.flows.finetune import finetune
    from grpo_pipeline.flows.promote import promote

    cfg = tiny_config(tmp_path, tiny_model_dir, mlflow_uri, "sft", "sft.enabled=true", "sft.max_steps=3",
                      "sft.batch_size=8", "sft.warmup_steps=0", "eval.sampled_problems=4")
    summary = finetune(config=cfg)
    client = MlflowClient(mlflow_uri)
    run_id = summary.run_id
    assert metric_steps(client, run_id, "sft/loss") == [1, 2, 3]
    assert metric_steps(client, run_id, "eval/accuracy") == [0, 2, 4]
    assert metric_steps(client, run_id, "eval/sampled_accuracy") == [0, 2, 4]
    assert metric_steps(client, run_id, "compare/mcnemar_z") == [4]
    assert "plots/accuracy_vs_time.png" in {f.path for f in client.list_artifacts(run_id, "plots")}
    report = flow_artifacts(summary.flow_run_id)["grpo-learning"][0].data
    assert "McNemar" in report and "| 0 |" in report

    versions = client.search_model_versions("name = 'lora-sft'")
    assert versions and all(v.tags["step"] in {"2", "4"} for v in versions)
    decision = promote(model_name="lora-sft")
    assert tracking.get_alias_version(mlflow_uri, "lora-sft", "champion") == str(decision.champion)


def test_failed_flow_run_marks_its_mlflow_run_failed(
    tmp_path: Path, tiny_model_dir: Path, mlflow_uri: str, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from grpo_pipeline.flows.finetune import finetune

    def store_refuses(*args: object, **kwargs: object) -> None:
        raise RuntimeError("metric store refused the batch")

    monkeypatch.setattr(tracking, "log_metrics", store_refuses)
    cfg = tiny_config(tmp_path, tiny_model_dir, mlflow_uri, "hook")
    state = finetune(config=cfg, return_state=True)
    assert state.is_failed()
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("exp-hook").experiment_id])
    assert run.info.status == "FAILED"  # by the flow's on_failure hook, not by the flow body
    flow_run_id = run.data.tags[runs.FLOW_RUN_TAG]
    assert task_runs(flow_run_id)["train-round-0"].run_count == 3  # retried, then given up


def test_promotion_fails_when_the_candidates_run_config_cannot_be_read(
    tmp_path: Path, tiny_model_dir: Path, mlflow_uri: str, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store error while reading the candidate run's config is retried, then fails the promote
    flow in one line; it never re-evaluates with default settings or moves the alias."""
    import mlflow

    from grpo.errors import TrackingReadError
    from grpo_pipeline.cli import _call_flow
    from grpo_pipeline.flows.promote import promote
    from grpo_pipeline.tasks.registry import open_run, register_elite
    from grpo_pipeline.tasks.train import train_round

    cfg = tiny_config(tmp_path, tiny_model_dir, mlflow_uri, "unreadable", "pipeline.rounds=1")
    ref = _dataset(cfg)
    run_id = open_run.fn(cfg, mlflow_uri).run_id
    ckpt = train_round.fn(cfg, ref, 0, run_id, mlflow_uri)
    result = evaluate.evaluate_checkpoint(cfg, ckpt, ref, run_id, mlflow_uri, progress=False)
    version = register_elite.fn(cfg, ckpt, result, run_id, mlflow_uri, None, ref).version
    runs.close_run(mlflow_uri, run_id)  # a finished run: its version is a promotion candidate

    downloads: list[str] = []

    def store_down(**kwargs: object) -> str:
        downloads.append(str(kwargs.get("artifact_path")))
        raise OSError("connection reset by peer")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", store_down)
    with pytest.raises(TrackingReadError, match=f"^MLflow run {run_id}: artifact 'config.json' could not be read"):
        _call_flow(promote, config=cfg)
    assert downloads == ["config.json"] * 3  # the held-out-split task tried three times
    assert tracking.get_alias_version(mlflow_uri, "lora-unreadable", "champion") is None
    assert "promotion_decision" not in MlflowClient(mlflow_uri).get_model_version("lora-unreadable", version).tags
