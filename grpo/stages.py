"""The pipeline's stages, one function each: the single core call of every Prefect task.

    from grpo import stages, tracking
    from grpo.config import load_config
    from grpo.countdown import prepare_dataset
    cfg = load_config(None, ["pipeline.rounds=1"])
    stages.preflight(cfg)                              # every mistake a user can make, up front
    uri = tracking.resolve_tracking_uri(cfg.pipeline.tracking_uri)
    ref = prepare_dataset(cfg.data)
    run_id = stages.open_run(cfg, uri)
    ckpt = stages.train_round(cfg, ref, 0, run_id, uri)
    result = stages.evaluate_checkpoint(cfg, ckpt, ref, run_id, uri)
    stages.register_elite(cfg, ckpt, result, run_id, uri)
    stages.close_run(uri, run_id)
    stages.promote(uri, cfg.pipeline.registered_model, cfg=cfg)

Pure: no Prefect here (`tasks/` wraps these functions, `flows/` sequences the tasks). Each stage
takes and returns small things (paths, ids, pydantic refs) and is safe to call again after a
crash: `train_round` resumes from the newest complete checkpoint of its run and never logs a
metric step twice; `evaluate_checkpoint` skips metrics already logged; `register_elite` finds the
version an earlier attempt registered (tag `elite_key = <run_id>:<step>`) instead of adding one.

Loading a model is the costly part, so `POLICY_CACHE` keeps the last policy of this process,
keyed by (base model, LoRA settings, checkpoint path): consecutive stages in one process reuse
it, while a retry in a fresh process loads it from disk.

Test hook: the environment variable GRPO_FAULT_ONCE="<step>:<marker file>" makes `train_round`
raise RuntimeError("injected fault ...") right after global step <step> is logged, once: the
marker file is created first, and the fault is not raised again while it exists. Tests use it to
check that a Prefect retry resumes without repeating a metric step or a registered version.

Not in the paper: this is orchestration; the algorithm is in `grpo.trainer`.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from grpo import tracking
from grpo.checkpoint import (
    CheckpointRef,
    checkpoint_path,
    checkpoint_ref,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from grpo.config import EvalConfig, RunConfig
from grpo.countdown import DatasetRef, load_rows, load_split, prepare_dataset, validate_rows
from grpo.errors import ConfigError, TrackingError
from grpo.evaluate import EvalResult, evaluate, mcnemar

FAULT_ENV = "GRPO_FAULT_ONCE"
"""Test hook, see the module docstring."""
FLOW_RUN_TAG = "prefect_flow_run_id"
"""MLflow run tag (and model version tag) holding the Prefect flow run id."""
CONFIG_ARTIFACT = "config.json"
"""The run's full config, logged with every MLflow run (promote re-evaluates with it)."""
STEP_METRIC = "reward_mean"
"""A metric the trainer logs at every step: its history says which steps are already logged."""
ACCURACY_TAG = "eval_accuracy"
"""Model-version tag with the held-out accuracy of the evaluation that made it elite."""


# ----------------------------------------------------------------------------------- model cache


class PolicyCache:
    """The last loaded policy (peft model, tokenizer) of this process, under one key.

    One entry only: a newer policy replaces the older one, so at most one model stays in memory.
    `take` removes the entry (the caller is going to change the weights); `get` leaves it.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: tuple[Any, Any] | None = None

    def get(self, key: tuple) -> tuple[Any, Any] | None:
        return self._value if self._value is not None and self._key == key else None

    def take(self, key: tuple) -> tuple[Any, Any] | None:
        hit = self.get(key)
        self.clear()
        return hit

    def put(self, key: tuple, model: Any, tokenizer: Any) -> None:
        self._key, self._value = key, (model, tokenizer)

    def clear(self) -> None:
        self._key, self._value = None, None


POLICY_CACHE = PolicyCache()


def policy_key(cfg: RunConfig, checkpoint: str | os.PathLike[str] | None) -> tuple:
    """Cache key: base model settings, LoRA settings and the checkpoint folder (None = fresh)."""
    ckpt = str(Path(checkpoint).absolute()) if checkpoint is not None else None
    return (cfg.model.model_dump_json(), cfg.lora.model_dump_json(), ckpt)


def _load_policy_at(cfg: RunConfig, checkpoint: str | os.PathLike[str] | None) -> tuple[Any, Any]:
    """A policy from disk: base + fresh LoRA (seeded by train.seed), then the checkpoint's adapter."""
    from grpo.models import load_policy
    from grpo.trainer import seed_everything

    seed_everything(cfg.train.seed)  # the fresh adapter's initial weights
    model, tokenizer = load_policy(cfg)
    if checkpoint is not None:
        load_checkpoint(checkpoint, model=model, restore_rng_state=False)
    return model, tokenizer


def cached_policy(
    cfg: RunConfig, checkpoint: str | os.PathLike[str] | None, cache: PolicyCache
) -> tuple[Any, Any]:
    """The policy at `checkpoint` from the cache, else loaded from disk (and cached)."""
    key = policy_key(cfg, checkpoint)
    hit = cache.get(key)
    if hit is not None:
        return hit
    cache.clear()
    model, tokenizer = _load_policy_at(cfg, checkpoint)
    cache.put(key, model, tokenizer)
    return model, tokenizer


# ----------------------------------------------------------------------------------- preflight


def _check_writable(folder: str, field: str) -> None:
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise ConfigError(
            f"{field}: cannot write to '{folder}' ({why}); set {field} to a writable folder"
        ) from None


def preflight(cfg: RunConfig) -> None:
    """Check everything that can fail before training; raise a one-line `UserError` naming the field.

    Covers: the generation backend is installed, reward names exist, the device exists, the
    output and cache folders are writable, the MLflow tracking URI answers, a local dataset file
    exists and has the `nums`/`target` columns, and the base model and tokenizer load (the tiny
    model is built when missing and allowed; a hub id that is not cached offline fails here).
    """
    from grpo.models import ensure_base_model, load_tokenizer, resolve_device
    from grpo.rewards import get_rewards

    if cfg.generation.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "generation.backend: vllm is not installed; install the extra "
            "(pip install 'grpo-pipeline[vllm]', GPU only) or set generation.backend=transformers"
        )
    get_rewards(cfg.train.rewards)
    resolve_device(cfg.model)
    _check_writable(cfg.pipeline.output_dir, "pipeline.output_dir")
    _check_writable(cfg.data.cache_dir, "data.cache_dir")
    tracking.check_tracking(tracking.resolve_tracking_uri(cfg.pipeline.tracking_uri))
    source = cfg.data.source
    if source != "generate" and (Path(source).expanduser().exists() or _looks_like_file(source)):
        validate_rows(load_rows(source))  # hub ids are loaded (and checked) by prepare_dataset
    name = ensure_base_model(cfg.model)
    load_tokenizer(name, cfg.model.revision)


def _looks_like_file(source: str) -> bool:
    return source.lower().endswith((".parquet", ".jsonl", ".json", ".csv")) or source.startswith(
        (".", "/", "~")
    )


# ----------------------------------------------------------------------------------- runs


def run_dir(cfg: RunConfig, run_id: str) -> Path:
    """Checkpoints of one run: `<pipeline.output_dir>/<MLflow run id>/`."""
    return Path(cfg.pipeline.output_dir).expanduser().absolute() / run_id


def open_run(cfg: RunConfig, tracking_uri: str, flow_run_id: str | None = None) -> str:
    """The MLflow run of this flow run: found by its `prefect_flow_run_id` tag (a retried flow run
    continues its run), else created with the config as params and as `config.json`."""
    exp = cfg.pipeline.experiment
    if flow_run_id:
        found = tracking.find_run(tracking_uri, exp, FLOW_RUN_TAG, str(flow_run_id))
        if found is not None:
            _set_running(tracking_uri, found)
            return found
    tags = {FLOW_RUN_TAG: str(flow_run_id or ""), "base_model": cfg.model.name_or_path}
    run_id = tracking.start_run(tracking_uri, exp, cfg.name, tags=tags, params=cfg.flat())
    tracking.log_dict(tracking_uri, run_id, cfg.model_dump(mode="json"), CONFIG_ARTIFACT)
    return run_id


def _set_running(uri: str, run_id: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(uri).update_run(run_id, status="RUNNING")


def close_run(tracking_uri: str, run_id: str, status: str = "FINISHED", title: str | None = None) -> None:
    """Log the run's curves (train reward, eval accuracy) as plots/curves.png and end the run."""
    if status == "FINISHED":
        from grpo.compare import run_curves_from_mlflow

        fig = run_curves_from_mlflow(tracking_uri, run_id, title=title)
        tracking.log_figure(tracking_uri, run_id, fig, "plots/curves.png")
    tracking.end_run(tracking_uri, run_id, status)


def run_config(tracking_uri: str, run_id: str) -> RunConfig | None:
    """The config a run was started with (its `config.json` artifact), or None when absent."""
    import mlflow

    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=CONFIG_ARTIFACT, tracking_uri=tracking_uri, dst_path=tmp
            )
            data = json.loads(Path(local).read_text())
    except Exception:
        return None
    try:
        return RunConfig.model_validate(data)
    except ValueError:
        return None


# ----------------------------------------------------------------------------------- warm start


def warm_start(cfg: RunConfig, dataset_ref: DatasetRef, run_id: str, tracking_uri: str) -> str:
    """Supervised warm start (`sft.enabled`): fine-tune the base on solver-written completions
    and save it as `<run dir>/sft`, a plain model folder that becomes the base of GRPO.

    A folder already saved there (a retry, a resumed flow) is reused. Logs `sft/*` metrics."""
    from grpo.models import ensure_base_model, load_base_model, load_tokenizer
    from grpo.sft import save_sft, train_sft
    from grpo.trainer import seed_everything

    out = run_dir(cfg, run_id) / "sft"
    if (out / "config.json").is_file():
        return str(out)
    seed_everything(cfg.train.seed)
    tokenizer = load_tokenizer(ensure_base_model(cfg.model), cfg.model.revision)
    model = load_base_model(cfg.model)
    model.requires_grad_(True)
    rows = load_split(dataset_ref.train_path)
    logged = tracking.logged_steps(tracking_uri, run_id, "sft/loss")

    def on_step(metrics: dict[str, float]) -> None:
        step = int(metrics["step"])
        if step not in logged:
            values = {k: v for k, v in metrics.items() if k != "step"}
            tracking.log_metrics(tracking_uri, run_id, values, step=step)

    summary = train_sft(model, tokenizer, rows, cfg, on_step=on_step)
    tracking.set_tags(tracking_uri, run_id, {f"sft.{k}": v for k, v in summary.items()})
    return str(save_sft(model, tokenizer, out))


def with_base(cfg: RunConfig, base: str) -> RunConfig:
    """`cfg` with `model.name_or_path = base` (e.g. the warm-started model folder)."""
    model = cfg.model.model_copy(update={"name_or_path": base, "build_tiny_if_missing": False})
    return cfg.model_copy(update={"model": model})


# ----------------------------------------------------------------------------------- training


def _fault_hook(environ: dict[str, str] | os._Environ) -> tuple[int, Path] | None:
    spec = environ.get(FAULT_ENV)
    if not spec:
        return None
    step, _, marker = spec.partition(":")
    return int(step), Path(marker)


def train_round(
    cfg: RunConfig,
    dataset_ref: DatasetRef,
    round_index: int,
    run_id: str,
    tracking_uri: str,
    *,
    cache: PolicyCache = POLICY_CACHE,
    progress: bool = True,
) -> CheckpointRef:
    """Train until global step (round_index + 1) * steps_per_round and save a checkpoint there.

    Starts from the newest complete checkpoint of the run (a fresh adapter when there is none),
    so a retry after a crash resumes where it stopped and a retry after a finished round returns
    that round's checkpoint without training. Per-step metrics go to the MLflow run at the global
    step; steps already logged (by a failed attempt) are not logged again.
    """
    from grpo.trainer import GRPOTrainer

    folder = run_dir(cfg, run_id)
    target = (round_index + 1) * cfg.pipeline.steps_per_round
    done = dict(list_checkpoints(folder))
    if target in done:
        return checkpoint_ref(done[target])
    latest = latest_checkpoint(folder)
    if latest is not None and checkpoint_ref(latest).step >= target:
        return checkpoint_ref(latest)

    hit = cache.take(policy_key(cfg, latest))
    if hit is not None:
        model, tokenizer = hit
    else:
        model, tokenizer = _load_policy_at(cfg, None)
    rows = load_split(dataset_ref.train_path)
    trainer = GRPOTrainer(cfg, model, tokenizer, rows, total_steps=cfg.total_steps)
    if latest is not None:
        state = load_checkpoint(latest, model=model, optimizer=trainer.optimizer, scheduler=trainer.scheduler)
        trainer.load_state(state)

    logged = tracking.logged_steps(tracking_uri, run_id, STEP_METRIC)
    fault = _fault_hook(os.environ)

    def on_step(metrics: dict[str, float]) -> None:
        step = int(metrics["step"])
        if step not in logged:
            values = {k: v for k, v in metrics.items() if k != "step"}
            tracking.log_metrics(tracking_uri, run_id, values, step=step)
            logged.add(step)
        if fault is not None and step == fault[0] and not fault[1].exists():
            fault[1].parent.mkdir(parents=True, exist_ok=True)
            fault[1].write_text(f"fault injected after step {step}\n")
            raise RuntimeError(f"injected fault after step {step} ({FAULT_ENV})")

    trainer.train(target - trainer.step_count, on_step=on_step, progress=progress)
    state = {**trainer.state(), "round": round_index, "run_id": run_id}
    path = save_checkpoint(
        checkpoint_path(folder, trainer.step_count), model=model, tokenizer=tokenizer,
        optimizer=trainer.optimizer, scheduler=trainer.scheduler, state=state,
    )
    cache.put(policy_key(cfg, path), model, tokenizer)
    return checkpoint_ref(path)


# ----------------------------------------------------------------------------------- evaluation


def samples_artifact(step: int) -> str:
    """Artifact path of the sample-completions table of the evaluation at `step`."""
    return f"eval/samples_step_{step:06d}.json"


def evaluate_checkpoint(
    cfg: RunConfig,
    ckpt_ref: CheckpointRef,
    dataset_ref: DatasetRef,
    run_id: str,
    tracking_uri: str,
    *,
    cache: PolicyCache = POLICY_CACHE,
    progress: bool = True,
) -> EvalResult:
    """Greedy held-out evaluation of a checkpoint; logs `eval/*` metrics at its step (once) and
    a table of sample completions (`eval/samples_step_000010.json`)."""
    model, tokenizer = cached_policy(cfg, ckpt_ref.path, cache)
    rows = load_split(dataset_ref.test_path)
    result = evaluate(model, tokenizer, rows, cfg, step=ckpt_ref.step, progress=progress)
    tracking.log_metrics(tracking_uri, run_id, result.metrics(), step=ckpt_ref.step, skip_logged=True)
    if result.samples:
        table = [{"step": ckpt_ref.step, **s} for s in result.samples]
        tracking.log_table(tracking_uri, run_id, table, samples_artifact(ckpt_ref.step))
    return result


def evaluate_baseline(
    cfg: RunConfig, dataset_ref: DatasetRef, run_id: str, tracking_uri: str, *, progress: bool = True
) -> EvalResult:
    """Held-out evaluation at step 0 of the policy GRPO starts from (e.g. the warm-started base
    with its fresh adapter, whose LoRA B is zero): the baseline the GRPO rounds are compared with.
    Logs `eval/*` at step 0 (once) and its sample table."""
    from grpo.models import load_policy

    model, tokenizer = load_policy(cfg)
    result = evaluate(model, tokenizer, load_split(dataset_ref.test_path), cfg, step=0, progress=progress)
    tracking.log_metrics(tracking_uri, run_id, result.metrics(), step=0, skip_logged=True)
    if result.samples:
        table = [{"step": 0, **s} for s in result.samples]
        tracking.log_table(tracking_uri, run_id, table, samples_artifact(0))
    return result


def learning_report(
    tracking_uri: str, run_id: str, baseline: EvalResult, rounds: list[EvalResult], title: str = ""
) -> str:
    """Compare the final adapter with the baseline on the same problems (paired McNemar test),
    log `compare/*` metrics and an accuracy-against-wall-clock image; return markdown."""
    from mlflow import MlflowClient

    from grpo.plots import plot_accuracy_vs_time

    final = rounds[-1]
    paired = mcnemar(baseline.correct, final.correct)
    tracking.log_metrics(tracking_uri, run_id, {
        "compare/accuracy_gain": final.accuracy - baseline.accuracy,
        "compare/mcnemar_z": paired["z"], "compare/gained": paired["gained"], "compare/lost": paired["lost"],
        **({"compare/sampled_accuracy_gain": final.sampled_accuracy - baseline.sampled_accuracy}
           if final.sampled_accuracy is not None and baseline.sampled_accuracy is not None else {}),
    }, step=final.step, skip_logged=True)
    start = MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.start_time / 1000.0
    points = [
        {"minutes": (r.finished_at - start) / 60.0, "accuracy": r.accuracy,
         "sampled_accuracy": r.sampled_accuracy, "label": label}
        for label, r in [("baseline", baseline)] + [(f"step {r.step}", r) for r in rounds]
    ]
    tracking.log_figure(tracking_uri, run_id, plot_accuracy_vs_time(points, title=title),
                        "plots/accuracy_vs_time.png")

    def fmt(r: EvalResult) -> str:
        sampled = f"{r.sampled_accuracy:.3f} ± {r.sampled_accuracy_se:.3f}" if r.sampled_accuracy is not None else "-"
        return f"| {r.step} | {(r.finished_at - start) / 60:.1f} | {r.accuracy:.3f} ± {r.accuracy_se:.3f} | {sampled} |"

    lines = [
        f"## Learning: baseline vs final adapter {title}".rstrip(), "",
        "| step | minutes | greedy accuracy | sampled accuracy |", "|---:|---:|---:|---:|",
        fmt(baseline), *(fmt(r) for r in rounds), "",
        f"Paired (McNemar) on {final.n} held-out problems: {paired['gained']} gained, "
        f"{paired['lost']} lost, z = {paired['z']:.2f} (z > 2: a real gain).",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- registry


def _run_versions(uri: str, name: str, run_id: str) -> list[Any]:
    """Registered versions of `name` created from MLflow run `run_id` ([] when `name` is new)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        found = MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions(
            f"name = '{name}' and run_id = '{run_id}'"
        )
    except MlflowException as e:
        raise TrackingError(f"MLflow registered model {name!r}: {e.message}".splitlines()[0]) from None
    return list(found)


def _float_tag(version: Any, key: str) -> float | None:
    try:
        return float(version.tags[key])
    except (KeyError, ValueError):
        return None


def elite_key(run_id: str, step: int) -> str:
    """The unique tag value of the version registered for (run, step)."""
    return f"{run_id}:{step}"


def register_elite(
    cfg: RunConfig,
    ckpt_ref: CheckpointRef,
    eval_result: EvalResult,
    run_id: str,
    tracking_uri: str,
    flow_run_id: str | None = None,
    dataset_ref: DatasetRef | None = None,
) -> dict[str, Any]:
    """Register the checkpoint as a new model version when its accuracy beats every earlier
    version of this run (the first evaluation always does).

    The adapter is logged as an MLflow LoggedModel linked to the step and eval metrics, then
    registered under `pipeline.registered_model` with tags: base_model, dataset_hash, test_path,
    step, round, eval_accuracy, eval_format_rate, run_id, prefect_flow_run_id. A repeated call
    for the same (run, step) returns the version made the first time.
    Returns {"version": str | None, "elite": bool, "best_accuracy": float, "created": bool}.
    """
    name = cfg.pipeline.registered_model
    key = elite_key(run_id, ckpt_ref.step)
    versions = _run_versions(tracking_uri, name, run_id)
    for v in versions:
        if v.tags.get(tracking.KEY_TAG) == key:
            best = max((a for x in versions if (a := _float_tag(x, ACCURACY_TAG)) is not None), default=0.0)
            return {"version": str(v.version), "elite": True, "best_accuracy": best, "created": False}
    earlier = [a for v in versions if (a := _float_tag(v, ACCURACY_TAG)) is not None]
    acc = eval_result.accuracy
    best = max(earlier) if earlier else None
    if best is not None and acc <= best:
        return {"version": None, "elite": False, "best_accuracy": best, "created": False}

    base = cfg.model.name_or_path
    if Path(base).expanduser().is_dir():
        base = str(Path(base).expanduser().absolute())
    tags: dict[str, Any] = {
        "base_model": base,
        "step": ckpt_ref.step,
        "round": ckpt_ref.round,
        ACCURACY_TAG: acc,
        "eval_accuracy_se": eval_result.accuracy_se,
        "eval_format_rate": eval_result.format_rate,
        "eval_mean_reward": eval_result.mean_reward,
        "eval_n": eval_result.n,
        "run_id": run_id,
        FLOW_RUN_TAG: flow_run_id or "",
        "lora_r": cfg.lora.r,
        "lora_alpha": cfg.lora.alpha,
    }
    if dataset_ref is not None:
        tags.update(dataset_hash=dataset_ref.content_hash, test_path=dataset_ref.test_path)
    model_id = tracking.log_adapter_model(
        tracking_uri, run_id, ckpt_ref.path, name=f"{cfg.name}-step-{ckpt_ref.step}", step=ckpt_ref.step,
        metrics=eval_result.metrics(), tags=tags, key=key,
    )
    version, created = tracking.register_once(tracking_uri, name, model_id, tags, run_id, key=key)
    return {"version": version, "elite": True, "best_accuracy": acc, "created": created}


# ----------------------------------------------------------------------------------- promotion


def promotion_candidates(
    tracking_uri: str,
    model_name: str,
    version: int | str | None = None,
    alias: str = "champion",
    metric: str = ACCURACY_TAG,
) -> dict[str, Any]:
    """The candidate (the named version, else the best by tag `metric`) and the current champion."""
    if version is not None:
        tracking.get_version(tracking_uri, model_name, version)  # TrackingError when absent
        candidate = str(version)
    else:
        candidate = tracking.best_version(tracking_uri, model_name, metric)
        if candidate is None:
            raise TrackingError(
                f"registered model {model_name!r}: no version has a numeric {metric!r} tag; "
                "register one with `grpo run` or name one with --version"
            )
    champion = tracking.get_alias_version(tracking_uri, model_name, alias)
    return {"model_name": model_name, "alias": alias, "candidate": candidate, "champion": champion}


def version_config(
    tracking_uri: str, model_name: str, version: str | int, fallback: RunConfig | None = None
) -> tuple[RunConfig, dict[str, str]]:
    """(config, tags) of a version: its run's config with the version's `base_model` as base."""
    mv = tracking.get_version(tracking_uri, model_name, version)
    tags = dict(mv.tags)
    cfg = (run_config(tracking_uri, mv.run_id) if mv.run_id else None) or fallback or RunConfig()
    if tags.get("base_model"):
        cfg = with_base(cfg, tags["base_model"])
    return cfg, tags


def held_out(
    tracking_uri: str, model_name: str, version: str | int, cfg: RunConfig | None = None
) -> tuple[str, EvalConfig]:
    """(held-out split, eval settings) for a promotion with `version` as the candidate.

    The split is the one the candidate was evaluated on (its `test_path` tag), rebuilt from its
    run's data config when that file is gone (prepared splits are deterministic by their inputs).
    The eval settings are `cfg.eval`, else those of the candidate's run."""
    vcfg, tags = version_config(tracking_uri, model_name, version, cfg)
    path = tags.get("test_path")
    if not (path and Path(path).is_file()):
        path = prepare_dataset(vcfg.data).test_path
    return path, (cfg.eval if cfg is not None else vcfg.eval)


def evaluate_version(
    tracking_uri: str,
    model_name: str,
    version: str | int,
    test_path: str,
    eval_cfg: EvalConfig | None = None,
    fallback: RunConfig | None = None,
    progress: bool = True,
) -> EvalResult:
    """Download version `version` and evaluate it greedily on `test_path`, with its run's model,
    prompt and generation settings and `eval_cfg` (default: its run's eval section)."""
    from grpo.models import load_policy

    cfg, tags = version_config(tracking_uri, model_name, version, fallback)
    if eval_cfg is not None:
        cfg = cfg.model_copy(update={"eval": eval_cfg})
    with tempfile.TemporaryDirectory() as tmp:
        adapter = tracking.download_model(tracking_uri, f"models:/{model_name}/{version}", tmp)
        model, tokenizer = load_policy(cfg, adapter_dir=str(adapter))
    rows = load_split(test_path)
    step = int(tags.get("step", 0) or 0)
    return evaluate(model, tokenizer, rows, cfg, step=step, progress=progress)


def decide_promotion(
    tracking_uri: str,
    candidates: dict[str, Any],
    candidate_result: EvalResult,
    champion_result: EvalResult | None,
    test_path: str,
) -> dict[str, Any]:
    """Move the alias to the candidate when it is at least as accurate as the champion on the same
    split (or there is no champion); record the decision as tags on both versions."""
    name, alias = candidates["model_name"], candidates["alias"]
    cand, champ = candidates["candidate"], candidates["champion"]
    cand_acc = candidate_result.accuracy
    champ_acc = champion_result.accuracy if champion_result is not None else None
    if champ is None:
        moved, decision = True, "promoted"
        reason = "no champion yet"
    elif champ == cand:
        moved, decision = False, "kept"
        reason = f"version {cand} already holds @{alias}"
    elif champ_acc is not None and cand_acc >= champ_acc:
        moved, decision = True, "promoted"
        reason = f"{cand_acc:.4f} >= champion v{champ} {champ_acc:.4f}"
    else:
        moved, decision = False, "rejected"
        reason = f"{cand_acc:.4f} < champion v{champ} {champ_acc:.4f}"
    paired = None
    if champion_result is not None and champ != cand:
        paired = mcnemar(champion_result.correct, candidate_result.correct)
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    if moved:
        tracking.set_alias(tracking_uri, name, alias, cand)
    cand_tags: dict[str, Any] = {
        "promotion_decision": decision,
        "promotion_checked_at": now,
        "promotion_reeval_accuracy": cand_acc,
        "promotion_reason": reason,
        "promotion_compared_to": champ or "",
    }
    if moved:
        cand_tags["promoted_at"] = now
    tracking.set_version_tags(tracking_uri, name, cand, cand_tags)
    if champ is not None and champ != cand and champ_acc is not None:
        tracking.set_version_tags(tracking_uri, name, champ, {"promotion_reeval_accuracy": champ_acc})
    return {
        "model_name": name,
        "alias": alias,
        "candidate": cand,
        "champion_before": champ,
        "champion": cand if moved else champ,
        "candidate_accuracy": cand_acc,
        "champion_accuracy": champ_acc,
        "n": candidate_result.n,
        "test_path": test_path,
        "moved": moved,
        "decision": decision,
        "reason": reason,
        "mcnemar": paired,
        "model_uri": f"models:/{name}@{alias}",
    }


def promote(
    tracking_uri: str,
    model_name: str,
    version: int | str | None = None,
    alias: str = "champion",
    metric: str = ACCURACY_TAG,
    cfg: RunConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Pick the candidate, re-evaluate it and the champion on the candidate's held-out split with
    one eval config (`cfg.eval`, else the candidate run's), and move the alias if it is at least
    as good. Returns the decision (see `decide_promotion`)."""
    cands = promotion_candidates(tracking_uri, model_name, version, alias, metric)
    test_path, eval_cfg = held_out(tracking_uri, model_name, cands["candidate"], cfg)
    cand_result = evaluate_version(
        tracking_uri, model_name, cands["candidate"], test_path, eval_cfg, cfg, progress
    )
    champ_result = None
    if cands["champion"] is not None and cands["champion"] != cands["candidate"]:
        champ_result = evaluate_version(
            tracking_uri, model_name, cands["champion"], test_path, eval_cfg, cfg, progress
        )
    return decide_promotion(tracking_uri, cands, cand_result, champ_result, test_path)


# ----------------------------------------------------------------------------------- summaries


def round_row(
    tracking_uri: str,
    run_id: str,
    ckpt_ref: CheckpointRef,
    steps_per_round: int,
    eval_result: EvalResult,
    registration: dict[str, Any],
) -> dict[str, Any]:
    """One row of the run summary: round, step, mean train reward over the round's steps (read
    back from MLflow), eval accuracy and format rate, elite or not, registered version."""
    from mlflow import MlflowClient

    first = ckpt_ref.step - steps_per_round + 1
    history = MlflowClient(tracking_uri).get_metric_history(run_id, STEP_METRIC)
    values = [m.value for m in history if first <= m.step <= ckpt_ref.step]
    return {
        "round": ckpt_ref.round + 1,
        "step": ckpt_ref.step,
        "train_reward": sum(values) / len(values) if values else None,
        "eval_accuracy": eval_result.accuracy,
        "eval_format_rate": eval_result.format_rate,
        "elite": bool(registration.get("elite")),
        "version": registration.get("version"),
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def summary_markdown(rows: list[dict[str, Any]], title: str = "GRPO run") -> str:
    """A markdown table, one row per round: step, train reward, eval accuracy, elite, version."""
    lines = [
        f"## {title}",
        "",
        "| round | step | train reward | eval accuracy | format rate | elite | version |",
        "|---:|---:|---:|---:|---:|:---:|---:|",
    ]
    for r in rows:
        lines.append(
            "| " + " | ".join(_fmt(r.get(k)) for k in (
                "round", "step", "train_reward", "eval_accuracy", "eval_format_rate", "elite", "version"
            )) + " |"
        )
    return "\n".join(lines) + "\n"


def promotion_markdown(decision: dict[str, Any]) -> str:
    """The promotion decision as markdown."""
    d = decision
    champ = "none" if d["champion_before"] is None else f"v{d['champion_before']}"
    lines = [
        f"## Promotion of `{d['model_name']}` @{d['alias']}: {d['decision']}",
        "",
        "| | version | held-out accuracy |",
        "|---|---:|---:|",
        f"| candidate | v{d['candidate']} | {_fmt(d['candidate_accuracy'])} |",
        f"| champion before | {champ} | {_fmt(d['champion_accuracy'])} |",
        "",
        f"{d['reason']}; {d['n']} problems from `{d['test_path']}`.",
        f"Now `{d['model_uri']}` -> v{d['champion']}.",
    ]
    if d.get("mcnemar"):
        m = d["mcnemar"]
        lines.append(f"Paired: gained {m['gained']}, lost {m['lost']}, z = {m['z']:.2f}.")
    return "\n".join(lines) + "\n"


def mlflow_pointer(tracking_uri: str, experiment_id: str, run_id: str) -> tuple[str | None, str]:
    """(UI URL of the run when the tracking URI is a server, else None; a markdown note)."""
    if tracking_uri.startswith(("http://", "https://")):
        url = f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
        return url, f"MLflow run [{run_id}]({url})"
    note = (
        f"MLflow run `{run_id}` (experiment id {experiment_id}) in `{tracking_uri}`.\n\n"
        f"Open it with:\n\n```\nmlflow ui --backend-store-uri {tracking_uri}\n```\n"
    )
    return None, note
