"""`pipeline.processes` > 1: a training round of the pipeline runs in that many ranks through
torchrun (`grpo.launch.launch_ranks`), into the run's own checkpoints and MLflow run, and the next
round resumes from it. Two CPU ranks (gloo) on the tiny model, with the dapo loss and dynamic
sampling (whose data position the ranks agree on; `grpo.launch` checks their adapters are equal).

    pytest -q tests/test_launched_rounds.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from grpo import tracking
from grpo.checkpoint import list_checkpoints, read_state
from grpo.config import load_config
from grpo.data import prepare_dataset
from grpo.envs import env_for
from grpo.stages import train

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def test_rounds_in_two_ranks_land_in_the_runs_checkpoints_and_mlflow(tiny_model_dir: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, [
        f"model.name_or_path={tiny_model_dir}", "model.build_tiny_if_missing=false", "model.device=cpu",
        f"data.cache_dir={tmp_path / 'data'}", "data.generate_rows=64", f"pipeline.output_dir={tmp_path / 'runs'}",
        "pipeline.processes=2", "pipeline.rounds=2", "pipeline.steps_per_round=1",
        "train.prompts_per_step=2", "train.group_size=2", "train.micro_batch_size=4", "generation.max_new_tokens=6",
        "train.loss_type=dapo", "train.dynamic_sampling.enabled=true",
        "train.dynamic_sampling.max_generation_batches=2",
    ])
    ref = prepare_dataset(cfg.data, env_for(cfg))
    run_id = tracking.start_run(uri, "launched", "two-ranks")

    first = train.train_round(cfg, ref, 0, run_id, uri)
    assert first.step == 1
    second = train.train_round(cfg, ref, 1, run_id, uri)  # resumes from step 1
    assert second.step == 2
    folder = tmp_path / "runs" / run_id
    assert [step for step, _ in list_checkpoints(folder)] == [1, 2]
    state = read_state(Path(second.path))
    # two ranks of B = 2 per generation batch, one or two batches a step (dynamic sampling: the most any rank used)
    assert state["world_size"] == 2 and state["data_position"] in range(2 * 2 * 2, 2 * 2 * 2 * 2 + 1, 4)
    assert sorted(tracking.logged_steps(uri, run_id, "reward_mean")) == [1, 2]  # rank 0 logged each step once
    assert train.train_round(cfg, ref, 1, run_id, uri).path == second.path  # a retry of a finished round
