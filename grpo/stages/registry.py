"""Registry stage: elite adapters registered in the MLflow Model Registry, and promotion of the
best one to an alias (default `champion`).

    from grpo.stages import registry
    reg = registry.register_elite(cfg, ckpt, result, run_id, uri)   # Registration
    cands = registry.promotion_candidates(uri, "countdown-lora")     # PromotionCandidates
    split = registry.held_out(uri, cands.model_name, cands.candidate)
    cand = registry.evaluate_version(uri, cands.model_name, cands.candidate, split.test_path, split.eval)
    decision = registry.decide_promotion(uri, cands, cand, None, split.test_path)   # PromotionDecision

The promote flow sequences the last four. Every lookup a promotion depends on either answers or
fails (retried by the task, then one line): an unreadable run config, say, never turns into
default settings.
"""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from grpo import tracking
from grpo.checkpoint import CheckpointRef
from grpo.config import EvalConfig, RunConfig
from grpo.data import DatasetRef, load_split, prepare_dataset
from grpo.envs import env_for
from grpo.errors import TrackingError, TrainingDiverged
from grpo.evaluate import EvalResult, evaluate, mcnemar
from grpo.stages.runs import FLOW_RUN_TAG, RUN_FINISHED_TAG, run_config
from grpo.stages.warm_start import with_base

ACCURACY_TAG = "eval_accuracy"
"""Model-version tag with the held-out accuracy of the evaluation that made it elite."""


class Registration(BaseModel):
    """The outcome of `register_elite` for one checkpoint."""

    version: str | None
    """The registered version (None when the checkpoint was not elite)."""
    elite: bool
    best_accuracy: float
    """The best held-out accuracy of the run's registered versions, this one included."""
    created: bool
    """False when an earlier attempt had already registered this checkpoint."""


class PromotionCandidates(BaseModel):
    model_name: str
    alias: str
    candidate: str
    champion: str | None
    """The version holding `alias` now (None when the alias is not set)."""


class HeldOutSplit(BaseModel):
    """The split a promotion compares on, and the eval settings both versions are evaluated with."""

    test_path: str
    eval: EvalConfig


class PromotionDecision(BaseModel):
    model_name: str
    alias: str
    candidate: str
    champion_before: str | None
    champion: str | None
    candidate_accuracy: float
    champion_accuracy: float | None
    n: int
    test_path: str
    moved: bool
    decision: str
    """promoted, kept (the candidate already holds the alias) or rejected."""
    reason: str
    mcnemar: dict[str, int | float] | None
    model_uri: str


def check_finite_adapter(folder: str | Path, what: str) -> None:
    """Raise `TrainingDiverged` when the adapter in `folder` holds a NaN or infinite weight."""
    from safetensors.torch import load_file

    from grpo.checkpoint import ADAPTER_WEIGHTS

    bad = sorted(k for k, v in load_file(Path(folder) / ADAPTER_WEIGHTS).items() if not bool(v.isfinite().all()))
    if bad:
        raise TrainingDiverged(
            f"{what}: the adapter holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]}); "
            "it is neither registered nor promoted. Lower train.learning_rate and train again"
        )


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
) -> Registration:
    """Register the checkpoint as a new model version when its accuracy beats every earlier
    version of this run (the first evaluation always does).

    The adapter is logged as an MLflow LoggedModel linked to the step and eval metrics, then
    registered under `pipeline.registered_model` with tags: base_model, task, dataset_hash, test_path,
    step, round, eval_accuracy, eval_format_rate, run_id, prefect_flow_run_id. A repeated call
    for the same (run, step) returns the version made the first time.
    """
    name = cfg.pipeline.registered_model
    key = elite_key(run_id, ckpt_ref.step)
    versions = tracking.run_versions(tracking_uri, run_id, name)
    accuracies = [a for v in versions if (a := _float_tag(v, ACCURACY_TAG)) is not None]
    for v in versions:
        if v.tags.get(tracking.KEY_TAG) == key:
            return Registration(version=str(v.version), elite=True, best_accuracy=max(accuracies, default=0.0),
                                created=False)
    acc = eval_result.accuracy
    best = max(accuracies) if accuracies else None
    if best is not None and acc <= best:
        return Registration(version=None, elite=False, best_accuracy=best, created=False)
    check_finite_adapter(ckpt_ref.path, f"checkpoint {ckpt_ref.path}")

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
        RUN_FINISHED_TAG: "false",  # "true" once the run finishes (runs.close_run)
        "lora_r": cfg.lora.r,
        "lora_alpha": cfg.lora.alpha,
    }
    if dataset_ref is not None:
        tags.update(dataset_hash=dataset_ref.content_hash, test_path=dataset_ref.test_path, task=dataset_ref.task)
    model_id = tracking.log_adapter_model(
        tracking_uri, run_id, ckpt_ref.path, name=f"{cfg.name}-step-{ckpt_ref.step}", step=ckpt_ref.step,
        metrics=eval_result.metrics(), tags=tags, key=key,
    )
    version, created = tracking.register_once(tracking_uri, name, model_id, tags, run_id, key=key)
    return Registration(version=version, elite=True, best_accuracy=acc, created=created)


def promotion_candidates(
    tracking_uri: str,
    model_name: str,
    version: int | str | None = None,
    alias: str = "champion",
    metric: str = ACCURACY_TAG,
) -> PromotionCandidates:
    """The candidate (the named version, else the best by tag `metric` among the versions of
    finished runs: an interrupted run's versions wait for it to finish or to be named) and the
    current champion."""
    tracking.check_tracking(tracking_uri)
    if version is not None:
        tracking.get_version(tracking_uri, model_name, version)  # TrackingError when absent
        candidate = str(version)
    else:
        candidate = tracking.best_version(tracking_uri, model_name, metric, skip_tag=(RUN_FINISHED_TAG, "false"))
        if candidate is None:
            raise TrackingError(
                f"registered model {model_name!r}: no version of a finished run has a numeric {metric!r} "
                "tag; register one with `grpo run` or name one with --version"
            )
    champion = tracking.get_alias_version(tracking_uri, model_name, alias)
    return PromotionCandidates(model_name=model_name, alias=alias, candidate=candidate, champion=champion)


def version_config(
    tracking_uri: str, model_name: str, version: str | int, fallback: RunConfig | None = None
) -> tuple[RunConfig, dict[str, str]]:
    """(config, tags) of a version: its run's config with the version's `base_model` as base.

    `fallback` (else the defaults) stands in only when the version has no run or its run has no
    config; a config that cannot be read raises (see `runs.run_config`)."""
    mv = tracking.get_version(tracking_uri, model_name, version)
    tags = dict(mv.tags)
    cfg = (run_config(tracking_uri, mv.run_id) if mv.run_id else None) or fallback or RunConfig()
    if tags.get("base_model"):
        cfg = with_base(cfg, tags["base_model"])
    return cfg, tags


def held_out(
    tracking_uri: str, model_name: str, version: str | int, cfg: RunConfig | None = None
) -> HeldOutSplit:
    """The held-out split and eval settings of a promotion with `version` as the candidate.

    The split is the one the candidate was evaluated on (its `test_path` tag), rebuilt from its
    run's data config when that file is gone (prepared splits are deterministic by their inputs).
    The eval settings are `cfg.eval`, else those of the candidate's run."""
    vcfg, tags = version_config(tracking_uri, model_name, version, cfg)
    path = tags.get("test_path")
    if not (path and Path(path).is_file()):
        path = prepare_dataset(vcfg.data, env_for(vcfg)).test_path
    return HeldOutSplit(test_path=path, eval=cfg.eval if cfg is not None else vcfg.eval)


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
        check_finite_adapter(adapter, f"registered model {model_name!r} version {version}")
        model, tokenizer = load_policy(cfg, adapter_dir=str(adapter))
    rows = load_split(test_path)
    step = int(tags.get("step", 0) or 0)
    return evaluate(model, tokenizer, rows, cfg, step=step, progress=progress)


def decide_promotion(
    tracking_uri: str,
    candidates: PromotionCandidates,
    candidate_result: EvalResult,
    champion_result: EvalResult | None,
    test_path: str,
) -> PromotionDecision:
    """Move the alias to the candidate when it is more accurate than the champion on the same split
    (or there is no champion); record the decision as tags on both versions.

    A tie keeps the champion: an adapter that is no better is not worth a change, and two
    adapters that both solve nothing (accuracy 0) tie. A candidate that solves no held-out problem
    is only promoted when there is no champion at all, and its reason then says so."""
    name, alias = candidates.model_name, candidates.alias
    cand, champ = candidates.candidate, candidates.champion
    cand_acc = candidate_result.accuracy
    champ_acc = champion_result.accuracy if champion_result is not None else None
    if champ is None:
        moved, decision = True, "promoted"
        reason = "no champion yet"
    elif champ == cand:
        moved, decision = False, "kept"
        reason = f"version {cand} already holds @{alias}"
    elif champ_acc is not None and cand_acc > champ_acc:
        moved, decision = True, "promoted"
        reason = f"{cand_acc:.4f} > champion v{champ} {champ_acc:.4f}"
    elif champ_acc is not None and cand_acc == champ_acc:
        moved, decision = False, "rejected"
        reason = f"{cand_acc:.4f} ties champion v{champ}; a tie keeps the champion"
    else:
        moved, decision = False, "rejected"
        reason = f"{cand_acc:.4f} < champion v{champ} {champ_acc:.4f}"
    if cand_acc == 0.0:
        reason += f"; warning: the candidate solves none of the {candidate_result.n} held-out problems"
    paired = None
    if champion_result is not None and champ != cand:
        paired = mcnemar(champion_result.correct, candidate_result.correct)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
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
    return PromotionDecision(
        model_name=name,
        alias=alias,
        candidate=cand,
        champion_before=champ,
        champion=cand if moved else champ,
        candidate_accuracy=cand_acc,
        champion_accuracy=champ_acc,
        n=candidate_result.n,
        test_path=test_path,
        moved=moved,
        decision=decision,
        reason=reason,
        mcnemar=paired,
        model_uri=f"models:/{name}@{alias}",
    )
