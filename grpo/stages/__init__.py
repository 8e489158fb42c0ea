"""The pipeline's stages: the one library call behind each Prefect task, a module per stage.

    from grpo import tracking
    from grpo.config import load_config
    from grpo.stages import data, evaluate, registry, runs, train
    cfg = load_config(None, ["pipeline.rounds=1"])
    data.preflight(cfg)                                  # every mistake a user can make, up front
    uri = tracking.resolve_tracking_uri(cfg.pipeline.tracking_uri)
    ref = data.prepare(cfg)                              # DatasetRef
    run = runs.open_run(cfg, uri)                        # TrackedRun
    ckpt = train.train_round(cfg, ref, 0, run.run_id, uri)                  # CheckpointRef
    result = evaluate.evaluate_checkpoint(cfg, ckpt, ref, run.run_id, uri)  # EvalResult
    reg = registry.register_elite(cfg, ckpt, result, run.run_id, uri)       # Registration
    runs.close_run(uri, run.run_id)

Modules: `data` (preflight, prepared splits), `runs` (the MLflow run of a flow run, its config,
its summary), `warm_start` (supervised warm start), `train` (one GRPO round), `evaluate`
(held-out evaluation, round summaries, the learning report), `registry` (elite registration and
promotion). Pure: no Prefect here (`tasks/` wraps these functions, `flows/` sequences the tasks).

Each stage takes and returns small things (paths, ids, typed pydantic results) and is safe to
call again after a crash: `train_round` resumes from the newest complete checkpoint of its run
and never logs a metric step twice; `evaluate_checkpoint` skips metrics already logged;
`register_elite` finds the version an earlier attempt registered instead of adding one. Every
MLflow call goes through `grpo.tracking`; markdown comes from `grpo.reports`; the policy handed
from stage to stage in one process is `grpo.models.POLICY_CACHE`.
"""
