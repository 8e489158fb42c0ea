"""Does the embedded default learn on reasoning-gym tasks? One `grpo run` per dataset, then a table.

    python benchmarks/learning_envs.py                       # the three datasets below, ~30 min on 2 cores
    python benchmarks/learning_envs.py --tasks reasoning_gym:chain_sum --set pipeline.rounds=1

Each run is the embedded default (`grpo run`: the task's own tiny model, warm start on reference
completions, GRPO rounds, evaluations, registry, promotion) with the task and the time budget
below, in its own MLflow store (`artifacts/learning-envs/mlflow.db`) and output folders. The table
(markdown, printed and written to `artifacts/learning-envs/results.md`) reads what the runs logged:
greedy accuracy after the warm start (step 0) and after the last round on the same held-out
problems, the paired McNemar test between them, sampled accuracy and wall time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "artifacts" / "learning-envs"

# One arithmetic, one string manipulation, one logic task; parameters keep them within reach of a
# 1M-parameter model trained for minutes (the datasets' defaults are much harder).
TASKS = {
    "reasoning_gym:chain_sum": "{min_terms: 2, max_terms: 3, min_digits: 1, max_digits: 2}",
    "reasoning_gym:spell_backward": "{min_word_len: 3, max_word_len: 5}",
    "reasoning_gym:syllogism": "{}",
}
# The embedded default within ~10 minutes on 2 cores: a warm start of 1000 steps (a step budget, so
# the result does not depend on the machine's speed), 4 rounds x 150 GRPO steps.
BUDGET = [
    "sft.max_steps=1000",
    "pipeline.steps_per_round=150",
    "eval.num_problems=1000",
    "eval.sampled_problems=500",
]


def run(task: str, params: str, extra: list[str]) -> tuple[str, float]:
    """`grpo run` for one task; returns (its MLflow experiment, wall minutes)."""
    slug = task.split(":")[-1]
    args = [
        sys.executable, "-m", "grpo_pipeline", "run",
        "--set", f"task.name={task}", f"task.params={params}",
        f"pipeline.tracking_uri=sqlite:///{OUT / 'mlflow.db'}", f"pipeline.output_dir={OUT / 'runs'}",
        f"data.cache_dir={OUT / 'data'}", f"model.name_or_path={OUT / ('tiny-model-' + slug)}",
        f"pipeline.experiment=learning-{slug}", f"pipeline.registered_model=learning-{slug}-lora",
        *BUDGET, *extra,
    ]
    print("$", " ".join(args[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(args, check=True, cwd=ROOT)
    return f"learning-{slug}", (time.perf_counter() - start) / 60


def row(task: str, experiment: str, minutes: float) -> str:
    """One table row from the newest run of `experiment`."""
    from grpo import tracking

    uri = f"sqlite:///{OUT / 'mlflow.db'}"
    latest = tracking.experiment_runs(uri, experiment)[0]
    run_id = latest.info.run_id

    def values(key: str) -> list[float]:
        return [m.value for m in sorted(tracking.metric_history(uri, run_id, key), key=lambda m: m.step)]

    acc, sampled = values("eval/accuracy"), values("eval/sampled_accuracy")
    n = int(latest.data.params.get("eval.num_problems", 0))
    z, gained, lost = values("compare/mcnemar_z"), values("compare/gained"), values("compare/lost")
    return (f"| {task} | {acc[0]:.1%} -> {acc[-1]:.1%} | {int(gained[-1])} / {int(lost[-1])}, z = {z[-1]:.2f} "
            f"| {sampled[0]:.1%} -> {sampled[-1]:.1%} | {n} | {minutes:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), help="task names (default: %(default)s)")
    parser.add_argument("--set", dest="extra", nargs="+", default=[], help="more config overrides")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    lines = ["| task | greedy accuracy (warm start -> GRPO) | McNemar gained / lost | sampled accuracy "
             "| held-out problems | minutes |", "|---|---|---|---|---|---|"]
    for task in args.tasks:
        experiment, minutes = run(task, TASKS.get(task, "{}"), args.extra)
        lines.append(row(task, experiment, minutes))
        print("\n".join(lines), flush=True)
    (OUT / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
