"""Wall time of a sweep on a work pool: a 2-trial grid on 2 workers against the same grid on 1 worker.

    python benchmarks/sweep_pool.py                   # 100 GRPO steps per trial: ~3 min on 2 cores
    python benchmarks/sweep_pool.py --steps 800       # ~7 min (benchmarks/LEARNING.md)

Starts its own `prefect server` and `mlflow server` (the test suite's helpers, tests/servers.py) on
free ports, creates one process work pool per setting, and runs `grpo sweep --config SPEC` (the
same grid over `train.learning_rate`, `work_pool` set) twice, each time against its own pool:
with 2 workers started with `--limit 1` (the two trials train at once) and with 1 worker (one
after the other). Everything else is the same: the tiny model, the trial configs, the dataset
(prepared once before either run), `--threads` torch threads per trial process (OMP_NUM_THREADS).
The table gives the sweep's wall time (the `grpo sweep` command, start to exit), each trial's
flow run time from the Prefect records, and the ratio of the two settings' wall times; the JSON
(`--out`) keeps the records and the load average before and after each run. Every server and
worker is stopped at the end (process-group kill), pass or fail.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from servers import (  # noqa: E402 - the test suite's server helpers
    Server,
    clean_env,
    make_mlflow_server,
    make_prefect_server,
    start_servers,
)

OUT = ROOT / "artifacts" / "sweep-pool"
LEARNING_RATES = [1.0e-4, 3.0e-4]


def base_config(work: Path, model: Path, tracking_uri: str, steps: int) -> dict[str, Any]:
    """The trials' base: the tiny model, no warm start, one round of `steps` GRPO steps, 64 held-out problems."""
    return {
        "model": {"name_or_path": str(model), "build_tiny_if_missing": False},
        "generation": {"max_new_tokens": 32},
        "train": {"prompts_per_step": 4, "group_size": 8, "micro_batch_size": 32},
        "eval": {"num_problems": 64, "batch_size": 64, "sampled_problems": 0},
        "data": {"generate_rows": 2000, "cache_dir": str(work / "data")},
        "sft": {"enabled": False},
        "pipeline": {"rounds": 1, "steps_per_round": steps, "output_dir": str(work / "runs"),
                     "experiment": "sweep-pool-bench", "tracking_uri": tracking_uri},
    }


def wait_online(client_env: dict[str, str], pool: str, n: int, workers: list[Server], timeout: float = 120) -> None:
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + timeout
    with temporary_settings(updates={PREFECT_API_URL: client_env["PREFECT_API_URL"]}):
        while True:
            for w in workers:
                w.check_alive()
            with get_client(sync_client=True) as client:
                online = [w for w in client.read_workers_for_work_pool(pool)
                          if getattr(w.status, "value", w.status) == "ONLINE"]
            if len(online) >= n:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} workers of {pool} not online after {timeout:.0f} s:\n{workers[0].log_tail()}")
            time.sleep(1)


def flow_runs(api_url: str, pool: str) -> list[dict[str, Any]]:
    """The trials' flow runs on `pool`: name, worker, start, end, seconds."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from grpo_pipeline.tasks.sweep import trial_deployment

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        name = trial_deployment(pool).split("/", 1)[1]
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))
    return sorted((
        {"name": r.name, "worker": r.labels.get("prefect.worker.name"), "state": r.state.type.value,
         "start": r.start_time.isoformat() if r.start_time else None,
         "end": r.end_time.isoformat() if r.end_time else None,
         "seconds": (r.end_time - r.start_time).total_seconds() if r.start_time and r.end_time else None}
        for r in runs), key=lambda r: r["name"])


def run_setting(label: str, n_workers: int, work: Path, env: dict[str, str], base: dict[str, Any]) -> dict[str, Any]:
    """`grpo sweep` of the grid on a fresh pool with `n_workers` workers (each `--limit 1`)."""
    pool = f"bench-{n_workers}w"
    prefect = str(Path(sys.executable).with_name("prefect"))
    subprocess.run([prefect, "--no-prompt", "work-pool", "create", pool, "--type", "process"], env=env,
                   check=True, capture_output=True, cwd=work)
    workers = [
        Server(name=f"{pool}-{i}", env=env, cwd=work, log=work / f"{pool}-{i}.log",
               cmd=[prefect, "worker", "start", "--pool", pool, "--type", "process", "--name", f"{pool}-{i}",
                    "--limit", "1"])
        for i in range(n_workers)
    ]
    spec = {"name": f"bench-{n_workers}w", "base": {**base, "pipeline": {**base["pipeline"],
            "registered_model": f"bench-{n_workers}w"}}, "parameters": {"train.learning_rate": LEARNING_RATES},
            "work_pool": pool, "promote": False}
    spec_file = work / f"{pool}.yaml"
    spec_file.write_text(json.dumps(spec))
    try:
        for w in workers:
            w.start()
        wait_online(env, pool, n_workers, workers)
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "grpo_pipeline", "sweep", "--config", str(spec_file)],
                           cwd=work, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        load_after = os.getloadavg()
    finally:
        for w in workers:
            w.stop()
    if p.returncode != 0:
        raise RuntimeError(f"{label}: grpo sweep exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return {"setting": label, "workers": n_workers, "wall_s": wall, "trials": flow_runs(env["PREFECT_API_URL"], pool),
            "load_before": load_before, "load_after": load_after}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="GRPO steps per trial (default: %(default)s).")
    parser.add_argument("--threads", type=int, default=1,
                        help="Torch threads per trial process (default: %(default)s).")
    parser.add_argument("--out", type=Path, default=OUT / "results.json", help="JSON of the records.")
    args = parser.parse_args(argv)

    from grpo.config import build_config
    from grpo.models import build_tiny_model
    from grpo.stages.data import prepare

    args.out = args.out.resolve()
    work = args.out.parent / "work"
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not (model / "config.json").exists():
        build_tiny_model(model, seed=0)
    pf, ml = make_prefect_server(work / "prefect"), make_mlflow_server(work / "mlflow")
    results = []
    with start_servers(pf, ml, timeout=180):
        base = base_config(work, model, ml.url, args.steps)
        prepare(build_config(base))  # the dataset once, outside both timings
        env = clean_env({
            **pf.client_env(), "PYTHONPATH": str(ROOT), "PREFECT_WORKER_QUERY_SECONDS": "2",
            "OMP_NUM_THREADS": str(args.threads), "MLFLOW_TRACKING_URI": ml.url,
        })
        for label, n in (("2 workers", 2), ("1 worker", 1)):
            results.append(run_setting(label, n, work, env, base))
            print(f"{label}: {results[-1]['wall_s']:.1f} s", flush=True)
    two, one = results
    ratio = two["wall_s"] / one["wall_s"]
    print(f"\n2-trial grid, {args.steps} GRPO steps per trial, {args.threads} torch thread(s) per trial, "
          f"{os.cpu_count()} CPUs")
    print("| setting | sweep wall s | trial flow runs (worker: s) | load avg before / after |")
    print("|---|---:|---|---|")
    for r in results:
        trials = ", ".join(f"{t['name']} on {t['worker']}: {t['seconds']:.0f}" for t in r["trials"])
        load = f"{r['load_before'][0]:.1f} / {r['load_after'][0]:.1f}"
        print(f"| {r['setting']} | {r['wall_s']:.1f} | {trials} | {load} |")
    print(f"wall-time ratio, 2 workers / 1 worker: {ratio:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": args.steps, "threads": args.threads, "cpus": os.cpu_count(),
                                    "ratio": ratio, "results": results}, indent=2))
    print(f"records: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
