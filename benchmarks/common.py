"""Shared pieces of the GRPO speed benchmark: flags, workload, models, timing and the result line.

`grpo_step.py` (this project) and `trl_step.py` (TRL's GRPOTrainer) both import this module, so the
two sides run the same workload: the same Countdown-style prompts (plain strings, no chat template),
the same reward, the same LoRA, the same model folder. Each prints one final JSON line
(`emit_result`), which `run.py` reads from the subprocess's stdout.

    python benchmarks/grpo_step.py --model artifacts/bench/tiny --steps 5 --warmup 1
    python benchmarks/trl_step.py  --model artifacts/bench/tiny --steps 5 --warmup 1

Not part of the paper's algorithm: the reward is a cheap length score, because the benchmark measures
the cost of a step, not learning.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The seven projections the reference recipe adapts (same list as grpo.config.LORA_TARGETS).
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]

# Phases both sides report, in step order.
PHASES = ["generation", "reward", "reference", "forward", "backward", "optimizer"]

# Model shapes built by run.py (grpo.models.build_tiny_model: Qwen2 architecture, tied embeddings, vocabulary 512).
MODEL_SPECS: dict[str, dict[str, int]] = {
    # 107k parameters
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128},
    # 2.5M parameters
    "small": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 512},
}


def build_parser(description: str) -> argparse.ArgumentParser:
    """The flags every per-library step script accepts (defaults = the workload of the speed issue)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True, help="Local Hugging Face model folder (with its tokenizer).")
    p.add_argument("--prompts", type=int, default=10, help="B: prompts per step.")
    p.add_argument("--group", type=int, default=8, help="G: completions per prompt.")
    p.add_argument("--new-tokens", type=int, default=64, help="T: tokens per completion, exactly (EOS suppressed).")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank.")
    p.add_argument("--lora-alpha", type=int, default=64, help="LoRA alpha.")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout.")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient; > 0 runs the reference pass.")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate.")
    p.add_argument("--steps", type=int, default=5, help="Measured optimizer steps.")
    p.add_argument("--warmup", type=int, default=1, help="Steps run first and left out of the median.")
    p.add_argument("--seed", type=int, default=0, help="Seed of prompts, LoRA init and sampling.")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default).")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Exit with one line naming the flag when a value cannot run."""
    for name in ("prompts", "steps", "new_tokens", "lora_r", "lora_alpha"):
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name.replace('_', '-')} must be >= 1")
    if args.group < 2:
        sys.exit("error: --group must be >= 2 (GRPO compares completions within a group)")
    if args.warmup < 0:
        sys.exit("error: --warmup must be >= 0")
    if not Path(args.model, "config.json").is_file():
        sys.exit(f"error: --model {args.model!r} has no config.json; build it with benchmarks/run.py")


def workload_prompts(num_steps: int, prompts_per_step: int, seed: int) -> list[list[str]]:
    """Countdown-style prompts, one list of `prompts_per_step` strings per step; deterministic by seed.

    Plain text (no chat template), e.g. "nums: 93 4 68 target: 29\\n". Solvability does not matter
    for a speed measurement, so the problems are drawn directly.
    """
    rng = random.Random(seed)
    steps: list[list[str]] = []
    for _ in range(num_steps):
        batch = []
        for _ in range(prompts_per_step):
            nums = [rng.randint(1, 99) for _ in range(rng.choice((3, 4)))]
            batch.append(f"nums: {' '.join(map(str, nums))} target: {rng.randint(1, 99)}\n")
        steps.append(batch)
    return steps


def length_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """Cheap reward shared by both sides: characters of the decoded completion / 100."""
    return [len(c) / 100.0 for c in completions]


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def median(xs: Sequence[float]) -> float | None:
    """Median, or None for an empty sequence."""
    return float(statistics.median(xs)) if xs else None


class PhaseClock:
    """Seconds per phase, accumulated within a step and closed into one record per step."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.step_seconds: list[float] = []
        self.step_cpu_seconds: list[float] = []

    def add(self, phase: str, seconds: float) -> None:
        self.current[phase] += seconds

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` wrapped so that each call adds its wall time to phase `name`."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return fn(*args, **kwargs)

        return wrapper

    def close_step(self, wall_seconds: float, cpu_seconds: float) -> None:
        """End a step: its wall time, and its process CPU time (all threads; less sensitive to
        other processes on a shared machine than the wall time)."""
        self.steps.append(dict(self.current))
        self.step_seconds.append(wall_seconds)
        self.step_cpu_seconds.append(cpu_seconds)
        self.current = defaultdict(float)


def summarize(
    *,
    library: str,
    version: str,
    args: argparse.Namespace,
    clock: PhaseClock,
    completion_tokens: Sequence[int],
    params: int,
    trainable_params: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The result record: medians over the steps after the warmup ones, plus every raw step time."""
    measured = slice(args.warmup, None)
    step_seconds = clock.step_seconds[measured]
    phase_names = list(PHASES) + sorted({k for s in clock.steps for k in s} - set(PHASES))
    phases = {
        name: median([s.get(name, 0.0) for s in clock.steps[measured]]) for name in phase_names
    }
    sec = median(step_seconds)
    tokens = median(list(completion_tokens[measured]))
    import torch  # imported late: keeps `python benchmarks/run.py --help` fast

    out: dict[str, Any] = {
        "library": library,
        "version": version,
        "model": str(args.model),
        "params": params,
        "trainable_params": trainable_params,
        "prompts": args.prompts,
        "group": args.group,
        "new_tokens": args.new_tokens,
        "beta": args.beta,
        "steps": args.steps,
        "warmup": args.warmup,
        "torch_threads": torch.get_num_threads(),
        "seconds_per_step_median": sec,
        "seconds_per_step_all": clock.step_seconds,
        "cpu_seconds_per_step_median": median(clock.step_cpu_seconds[measured]),
        "cpu_seconds_per_step_all": clock.step_cpu_seconds,
        "completion_tokens_per_step": tokens,
        "completion_tokens_per_second": (tokens / sec) if sec and tokens else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "phases_median": phases,
        "phases_all": clock.steps,
    }
    out.update(extra or {})
    return out


def emit_result(result: dict[str, Any]) -> None:
    """Print the result as the last line of stdout (run.py reads the last line that parses as JSON)."""
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


def count_params(model: Any) -> tuple[int, int]:
    """(all unique parameters, trainable parameters)."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


# --------------------------------------------------------------------------------------------------
# Benchmark models


def _spec_matches(out_dir: Path, spec: dict[str, int]) -> bool:
    cfg_path = out_dir / "config.json"
    if not cfg_path.is_file() or not (out_dir / "tokenizer_config.json").is_file():
        return False
    cfg = json.loads(cfg_path.read_text())
    return (
        cfg.get("hidden_size") == spec["hidden_size"]
        and cfg.get("num_hidden_layers") == spec["num_layers"]
        and cfg.get("num_attention_heads") == spec["num_heads"]
        and cfg.get("num_key_value_heads") == spec["num_kv_heads"]
        and cfg.get("intermediate_size") == spec["intermediate_size"]
    )


def build_bench_model(out_dir: str | Path, spec: dict[str, int], seed: int = 0) -> tuple[Path, str]:
    """Build (or reuse, when its shape matches) a benchmark model with its tokenizer at `out_dir`.

    The model is the project's tiny Qwen2-architecture model (`grpo.models.build_tiny_model`, byte-level
    BPE tokenizer of 512 entries, tied embeddings) at the shape `spec`. Returns (folder, "built" | "existing").
    """
    out = Path(out_dir)
    if _spec_matches(out, spec):
        return out, "existing"
    from grpo.models import build_tiny_model

    return Path(build_tiny_model(out, seed=seed, **spec)), "built"
