"""Side-by-side GRPO step speed: this project against TRL's GRPOTrainer, on identical work (`make bench`).

    python benchmarks/run.py                      # tiny (~106k) and small (~2.5M) models, 3 rounds
    python benchmarks/run.py --quick              # 1 round of 2 steps + 1 warmup: a smoke test
    python benchmarks/run.py --models tiny --libraries trl --rounds 1

Builds the benchmark models under --model-dir (reused when their shape matches), then, per model,
runs benchmarks/trl_step.py and benchmarks/grpo_step.py in --rounds alternating rounds (TRL first,
then ours first, ...), each run in its own subprocess so that each peak RSS is its own. A machine
that speeds up or slows down during the benchmark then weighs on both libraries alike. Prints a
markdown table (seconds per step = median over the rounds of each run's median over its measured
steps, speed-up = TRL / ours, and the speed-up of each round) and writes every run to --out
(benchmarks/results.json).
Workload (both sides): 10 prompts x group 8, exactly 64 new tokens, LoRA r=16 alpha=64 on all seven
projections, beta 0.04 (reference = adapter disabled), one optimizer step per batch, float32, CPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

SCRIPTS = {"trl": HERE / "trl_step.py", "ours": HERE / "grpo_step.py"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,small", help=f"Comma list of {sorted(common.MODEL_SPECS)}.")
    p.add_argument("--libraries", default="trl,ours", help="Comma list of trl, ours.")
    p.add_argument(
        "--quick", action="store_true", help="2 measured steps + 1 warmup, 1 round unless --rounds (smoke test)."
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="Runs per library and model, alternating the order (default 3)."
    )
    p.add_argument("--steps", type=int, default=5, help="Measured steps per run.")
    p.add_argument("--warmup", type=int, default=1, help="Unmeasured first steps.")
    p.add_argument("--prompts", type=int, default=10)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=64)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads in each run (0 = default).")
    p.add_argument("--model-dir", default="artifacts/bench", help="Where the benchmark models are built.")
    p.add_argument(
        "--out", default="artifacts/bench/results.json", help="JSON file with every result (default: %(default)s)."
    )
    p.add_argument("--timeout", type=float, default=3600, help="Seconds allowed per run.")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 2, 1
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in common.MODEL_SPECS]
    if unknown or not models:
        p.error(f"--models: unknown {unknown}; choose from {sorted(common.MODEL_SPECS)}")
    libs = [x for x in args.libraries.split(",") if x]
    if not libs or any(x not in SCRIPTS for x in libs):
        p.error(f"--libraries: {args.libraries!r}; choose from {sorted(SCRIPTS)}")
    args.model_list, args.library_list = models, libs
    return args


def step_flags(args: argparse.Namespace, model_dir: Path) -> list[str]:
    """The flags passed identically to both step scripts."""
    return [
        "--model", str(model_dir),
        "--prompts", str(args.prompts),
        "--group", str(args.group),
        "--new-tokens", str(args.new_tokens),
        "--lora-r", str(args.lora_r),
        "--lora-alpha", str(args.lora_alpha),
        "--beta", str(args.beta),
        "--lr", str(args.lr),
        "--steps", str(args.steps),
        "--warmup", str(args.warmup),
        "--seed", str(args.seed),
        "--threads", str(args.threads),
    ]


def last_json_line(text: str) -> dict[str, Any] | None:
    """The last stdout line that parses as a JSON object (the step scripts print it last)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def run_one(script: Path, flags: list[str], timeout: float) -> dict[str, Any]:
    """Run one step script in a fresh process; its result, or {"error": ...}."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, str(script), *flags]
    print(f"$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    result = last_json_line(proc.stdout)
    if proc.returncode != 0 or result is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return result


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One library's rounds as one record: medians over the rounds of each run's medians, the
    largest peak RSS, and every run under "runs". A failed round makes the record an error."""
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        return {"error": errors[0], "runs": runs}
    phases = sorted({k for r in runs for k in r.get("phases_median", {})})
    return {
        **runs[0],
        "seconds_per_step_median": common.median([r["seconds_per_step_median"] for r in runs]),
        "seconds_per_step_rounds": [r["seconds_per_step_median"] for r in runs],
        "cpu_seconds_per_step_median": common.median([r["cpu_seconds_per_step_median"] for r in runs]),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "phases_median": {
            name: common.median([r["phases_median"][name] for r in runs if name in r["phases_median"]])
            for name in phases
        },
        "runs": runs,
    }


def round_speedups(row: dict[str, Any]) -> list[float]:
    """TRL / ours seconds per step of each round."""
    trl = row["results"].get("trl", {}).get("seconds_per_step_rounds") or []
    ours = row["results"].get("ours", {}).get("seconds_per_step_rounds") or []
    return [t / o for t, o in zip(trl, ours) if t and o]


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: model | params | TRL s/step | ours s/step | speed-up | TRL peak MB | ours peak MB."""
    lines = [
        "| model | params | TRL s/step | ours s/step | speed-up | TRL peak MB | ours peak MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        trl, ours = row["results"].get("trl", {}), row["results"].get("ours", {})
        t, o = trl.get("seconds_per_step_median"), ours.get("seconds_per_step_median")
        speedup = (t / o) if t and o else None
        lines.append(
            f"| {row['model']} | {row['params']:,} | {fmt(t, '.3f')} | {fmt(o, '.3f')} | "
            f"{fmt(speedup, '.2f') + 'x' if speedup else 'n/a'} | "
            f"{fmt(trl.get('peak_rss_mb'), '.0f')} | {fmt(ours.get('peak_rss_mb'), '.0f')} |"
        )
    return "\n".join(lines)


def cpu_table(rows: list[dict[str, Any]]) -> str:
    """Median process CPU seconds per step (all threads): a second view of runs taken under load."""
    lines = ["| model | TRL cpu s/step | ours cpu s/step | ratio |", "|---|---:|---:|---:|"]
    for row in rows:
        t = row["results"].get("trl", {}).get("cpu_seconds_per_step_median")
        o = row["results"].get("ours", {}).get("cpu_seconds_per_step_median")
        ratio = (t / o) if t and o else None
        lines.append(f"| {row['model']} | {fmt(t, '.3f')} | {fmt(o, '.3f')} | {fmt(ratio, '.2f')} |")
    return "\n".join(lines)


def phase_table(rows: list[dict[str, Any]]) -> str:
    """Median seconds per phase, one line per (model, library)."""
    head = "| model | library | " + " | ".join(common.PHASES) + " |"
    lines = [head, "|---|---|" + "---:|" * len(common.PHASES)]
    for row in rows:
        for lib, res in row["results"].items():
            ph = res.get("phases_median") or {}
            cells = " | ".join(fmt(ph.get(name), ".3f") for name in common.PHASES)
            lines.append(f"| {row['model']} | {lib} | {cells} |")
    return "\n".join(lines)


def param_count(model_dir: Path) -> int:
    """Unique parameters of the base model (tied embeddings counted once)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return common.count_params(model)[0]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows: list[dict[str, Any]] = []
    for name in args.model_list:
        model_dir, how = common.build_bench_model(Path(args.model_dir) / name, common.MODEL_SPECS[name], args.seed)
        row: dict[str, Any] = {
            "model": name,
            "model_dir": str(model_dir),
            "model_built_by": how,
            "spec": common.MODEL_SPECS[name],
            "params": param_count(model_dir),
            "results": {},
        }
        runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in args.library_list}
        for round_index in range(args.rounds):
            order = args.library_list if round_index % 2 == 0 else args.library_list[::-1]
            for lib in order:
                result = run_one(SCRIPTS[lib], step_flags(args, model_dir), args.timeout)
                if "error" in result:
                    print(f"{name}/{lib} failed: {result['error']}", file=sys.stderr, flush=True)
                runs[lib].append(result)
        row["results"] = {lib: combine(runs[lib]) for lib in args.library_list}
        rows.append(row)

    print(table(rows))
    for row in rows:
        ratios = round_speedups(row)
        if len(ratios) > 1:
            print(f"{row['model']}: speed-up of each round " + ", ".join(f"{r:.2f}x" for r in ratios))
    print()
    print("Median process CPU seconds per step, all threads (a second view when the machine is shared;\n"
          "other load still inflates it through thread contention):")
    print(cpu_table(rows))
    print()
    print("Median seconds per phase:")
    print(phase_table(rows))
    report = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "workload": {k: getattr(args, k) for k in ("prompts", "group", "new_tokens", "lora_r", "lora_alpha",
                                                  "beta", "lr", "steps", "warmup", "seed", "threads")},
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    if any("error" in res for row in rows for res in row["results"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
