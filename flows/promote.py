"""The promote flow (`grpo-promote`): move an alias (default `champion`) to the best adapter.

    from grpo_pipeline.flows.promote import promote
    decision = promote(model_name="countdown-lora")   # PromotionDecision; or `grpo promote`

Picks the best registered version by an eval-metric tag (or the version named), re-evaluates it
and the current champion on the same held-out split (the candidate's `test_path`) with one eval
config, and moves the alias only when the candidate is more accurate (a tie keeps the champion;
an adapter with a non-finite weight fails the flow instead of being evaluated). The decision is a
markdown artifact and tags on the versions (`promotion_decision`, `promoted_at`, ...). Then
`models:/<name>@champion` downloads an adapter that `PeftModel.from_pretrained` loads.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from grpo import reports, tracking
from grpo.config import RunConfig
from grpo.stages.registry import ACCURACY_TAG, PromotionDecision
from grpo_pipeline.tasks.evaluate import evaluate_version
from grpo_pipeline.tasks.registry import decide_promotion, held_out, promotion_candidates


@flow(name="grpo-promote")
def promote(
    model_name: str | None = None,
    version: int | None = None,
    alias: str | None = None,
    config: RunConfig | None = None,
    metric: str = ACCURACY_TAG,
) -> PromotionDecision:
    """Promote the best (or the named) version of a registered model to `alias` if it is more
    accurate than the current holder. `config` gives the tracking URI, names and the eval settings;
    without it, the defaults and the candidate run's own eval settings are used."""
    logger = get_run_logger()
    pipe = (config or RunConfig()).pipeline
    uri = tracking.resolve_tracking_uri(pipe.tracking_uri)
    name = model_name or pipe.registered_model
    alias = alias or pipe.champion_alias

    cands = promotion_candidates(uri, name, version, alias, metric)
    logger.info("candidate v%s, champion %s", cands.candidate, cands.champion or "none")
    split = held_out(uri, name, cands.candidate, config)
    cand_result = evaluate_version(uri, name, cands.candidate, split.test_path, split.eval, config)
    champ_result = None
    if cands.champion is not None and cands.champion != cands.candidate:
        champ_result = evaluate_version(uri, name, cands.champion, split.test_path, split.eval, config)
    decision = decide_promotion(uri, cands, cand_result, champ_result, split.test_path)
    create_markdown_artifact(
        markdown=reports.promotion_markdown(decision), key="grpo-promotion", description="Promotion decision"
    )
    log = logger.warning if decision.candidate_accuracy == 0.0 else logger.info
    log("%s: %s", decision.decision, decision.reason)
    return decision
