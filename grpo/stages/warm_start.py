"""Warm-start stage: supervised fine-tuning of the base model on the environment's reference
completions before GRPO (`sft.enabled`), so that a tiny model learns the answer format first.

    from grpo.stages import warm_start
    folder = warm_start.warm_start(cfg, dataset_ref, run_id, uri)   # <run dir>/sft
    train_cfg = warm_start.with_base(cfg, folder)                    # GRPO starts from it
"""

from __future__ import annotations

from grpo import tracking
from grpo.config import RunConfig
from grpo.data import DatasetRef, load_split
from grpo.stages.runs import run_dir


def warm_start(cfg: RunConfig, dataset_ref: DatasetRef, run_id: str, tracking_uri: str) -> str:
    """Fine-tune the base on the environment's reference completions and save it as `<run dir>/sft`, a plain
    model folder that becomes the base of GRPO.

    A folder already saved there (a retry, a resumed flow) is reused. Logs `sft/*` metrics, each
    step once."""
    from grpo.models import ensure_model_for, load_base_model, load_tokenizer
    from grpo.sft import save_sft, train_sft
    from grpo.trainer import seed_everything

    out = run_dir(cfg, run_id) / "sft"
    if (out / "config.json").is_file():
        return str(out)
    seed_everything(cfg.train.seed)
    tokenizer = load_tokenizer(ensure_model_for(cfg), cfg.model.revision)
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
