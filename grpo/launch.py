"""Data-parallel GRPO training in several processes, one rank per process (CPU: gloo; GPUs: NCCL).

    torchrun --nproc_per_node 2 -m grpo.launch --config configs/tiny-cpu.yaml \
        --set train.prompts_per_step=4 --run-dir runs/dp --steps 10
    accelerate launch --num_processes 4 -m grpo.launch ...     # several GPUs (after `accelerate config`)

Every rank loads the same policy (same seed, so the same fresh adapter) and the same data order;
at each step rank r samples for its own B prompts (global positions (step * W + r) * B ...),
gradients are averaged across ranks before clipping, so the W ranks together train on W * B
prompts per step and keep identical adapters. Rank 0 alone writes the checkpoint
(`<run-dir>/checkpoints/step-NNNNNN`, the layout `grpo.checkpoint` loads and `train_round`
resumes from), the global metrics (`<run-dir>/metrics.jsonl`, one line per step, averaged over the
ranks) and, given `--tracking-uri` and `--run-id`, the same metrics to that MLflow run. Every
rank writes `<run-dir>/ranks/rank-R.jsonl` (per step: the prompt indices it generated for) and
`rank-R.json` (at the end: the sha256 of its adapter); the ranks' adapters are checked to be
identical before exiting.

A second launch with the same --run-dir resumes from the newest complete checkpoint there; keep
the number of processes the same to keep the data order (a step's prompts depend on it).

The Prefect flow's `train_round` runs this entry point through torchrun when
`pipeline.processes` > 1 (`launch_ranks`); otherwise it trains in its own process.
Not in the paper: the paper does not discuss distribution (see `grpo.distributed`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from grpo import distributed as dp
from grpo.config import RunConfig, load_config
from grpo.errors import UserError

METRICS_FILE = "metrics.jsonl"
RANKS_DIR = "ranks"
STEP_METRIC = "reward_mean"
"""A metric logged at every step: its MLflow history says which steps are already logged."""


def adapter_digest(model: torch.nn.Module) -> str:
    """sha256 over the trainable parameters (names, shapes and exact bytes), in name order."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _logged_lines(path: Path) -> set[int]:
    if not path.is_file():
        return set()
    return {int(json.loads(line)["step"]) for line in path.read_text().splitlines() if line.strip()}


def _same_on_all_ranks(value: str) -> bool:
    if dp.world_size() == 1:
        return True
    values: list[Any] = [None] * dp.world_size()
    torch.distributed.all_gather_object(values, value)
    return len(set(values)) == 1


def train_data_parallel(
    cfg: RunConfig,
    run_dir: str | os.PathLike[str],
    steps: int,
    *,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train until global step `steps` on every rank of the process group; see the module doc.

    Call on every rank (after `dp.get_accelerator()`). Returns this rank's summary: rank,
    world_size, step, adapter_sha256, checkpoint (on rank 0 the path of the checkpoint holding
    the final state, None elsewhere) and saved (whether this call wrote it).
    """
    from grpo import tracking
    from grpo.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, save_checkpoint
    from grpo.data import load_split, prepare_dataset
    from grpo.envs import env_for
    from grpo.models import ensure_model_for, load_policy
    from grpo.trainer import GRPOTrainer, seed_everything

    rank, world = dp.rank(), dp.world_size()
    folder = Path(run_dir).expanduser().absolute()
    ranks_dir = folder / RANKS_DIR
    log_mlflow = bool(tracking_uri and run_id)
    if log_mlflow and dp.is_main():  # only rank 0 talks to MLflow
        tracking.check_tracking(tracking_uri)
    with dp.main_first():  # rank 0 fills the data cache and builds the tiny model, the others reuse
        ref = prepare_dataset(cfg.data, env_for(cfg))
        ensure_model_for(cfg)
        ranks_dir.mkdir(parents=True, exist_ok=True)

    seed_everything(cfg.train.seed)  # the fresh adapter: identical on every rank
    model, tokenizer = load_policy(cfg)
    rows = load_split(ref.train_path)
    total = max(steps, cfg.total_steps)  # the schedule spans the run, whichever step this launch stops at
    trainer = GRPOTrainer(cfg, model, tokenizer, rows, total_steps=total, rank=rank, world_size=world)
    latest = latest_checkpoint(folder)
    if latest is not None:
        state = load_checkpoint(latest, model=model, optimizer=trainer.optimizer, scheduler=trainer.scheduler)
        trainer.load_state(state)
        if int(state.get("world_size", world)) != world and dp.is_main():
            print(f"note: {latest} was trained with world_size {state['world_size']}, now {world}: "
                  "the data order continues with the new count", file=sys.stderr)

    start = trainer.step_count
    metrics_path = folder / METRICS_FILE
    done = _logged_lines(metrics_path) if dp.is_main() else set()
    logged: set[int] = set()
    if log_mlflow and dp.is_main():
        logged = tracking.logged_steps(tracking_uri, run_id, STEP_METRIC)
    while trainer.step_count < steps:
        metrics = trainer.step()  # averaged over the ranks
        indices = trainer.sampled_indices  # the prompts this rank sampled for in this step
        step = int(metrics["step"])
        _append_jsonl(ranks_dir / f"rank-{rank}.jsonl", {"step": step, "rank": rank, "indices": indices})
        if dp.is_main():
            if step not in done:
                _append_jsonl(metrics_path, {**metrics, "world_size": world})
            if log_mlflow and step not in logged:
                values = {k: v for k, v in metrics.items() if k != "step"}
                tracking.log_metrics(tracking_uri, run_id, values, step=step)
            if progress:
                print(f"step {step}/{steps}  reward {metrics['reward_mean']:.3f}  loss {metrics['loss']:.4f}",
                      flush=True)

    saved = None
    if dp.is_main() and trainer.step_count > start:
        state = {**trainer.state(), "round": 0, "run_id": run_id or "", "world_size": world}
        saved = save_checkpoint(
            checkpoint_path(folder, trainer.step_count), model=model, tokenizer=tokenizer,
            optimizer=trainer.optimizer, scheduler=trainer.scheduler, state=state,
        )
    dp.barrier()  # no rank exits (or reads the checkpoint) before it is complete
    digest = adapter_digest(model)
    final = saved or (latest if dp.is_main() else None)  # rank 0: the checkpoint holding this state
    summary = {
        "rank": rank, "world_size": world, "step": trainer.step_count, "adapter_sha256": digest,
        "checkpoint": str(final) if final else None, "saved": saved is not None,
    }
    (ranks_dir / f"rank-{rank}.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not _same_on_all_ranks(digest):
        raise RuntimeError(f"rank {rank}: adapters differ across ranks after step {trainer.step_count}")
    return summary


def launch_ranks(
    cfg: RunConfig, run_dir: str | os.PathLike[str], steps: int, processes: int, *,
    tracking_uri: str | None = None, run_id: str | None = None,
) -> Path:
    """Train until global step `steps` in `processes` ranks on this machine: `torchrun
    --nproc_per_node N -m grpo.launch` as a child process, given `cfg` as `<run_dir>/launch.yaml`;
    returns the newest checkpoint. How the pipeline's `train_round` grows past one process
    (`pipeline.processes`); a failed launch raises `RuntimeError` with its exit status (its output
    went to this process's stdout/stderr), and a retry resumes from the newest checkpoint."""
    import socket
    import subprocess

    import yaml

    from grpo.checkpoint import latest_checkpoint

    folder = Path(run_dir).expanduser().absolute()
    folder.mkdir(parents=True, exist_ok=True)
    recipe = folder / "launch.yaml"
    recipe.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
        "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "grpo.launch",
        "--config", str(recipe), "--run-dir", str(folder), "--steps", str(steps),
    ]
    if tracking_uri and run_id:
        command += ["--tracking-uri", tracking_uri, "--run-id", run_id]
    code = subprocess.run(command, check=False).returncode
    if code != 0:
        raise RuntimeError(f"torchrun with {processes} ranks exited with status {code}; its output is above")
    latest = latest_checkpoint(folder)
    if latest is None:
        raise RuntimeError(f"torchrun with {processes} ranks left no checkpoint in {folder}")
    return latest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m grpo.launch",
        description="Data-parallel GRPO training; start it with torchrun or accelerate launch.",
    )
    p.add_argument(
        "--config", metavar="FILE", default=None, help="YAML recipe (default: the embedded default)."
    )
    p.add_argument(
        "--set", metavar="KEY=VALUE", dest="overrides", action="extend", nargs="+", default=[],
        help="Override a config field, e.g. --set train.prompts_per_step=4 (repeatable).",
    )
    p.add_argument("--run-dir", required=True, help="Checkpoints, metrics.jsonl and per-rank records.")
    p.add_argument(
        "--steps", type=int, default=None, help="Train until this global step (default: the config's total)."
    )
    p.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI; with --run-id, rank 0 logs metrics there."
    )
    p.add_argument("--run-id", default=None, help="MLflow run to log the per-step metrics to.")
    p.add_argument("--no-progress", action="store_true", help="No per-step line on rank 0.")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m grpo.launch` on every rank; returns the exit status."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        cfg = load_config(args.config, args.overrides)
        steps = args.steps if args.steps is not None else cfg.total_steps
        if steps < 1:
            raise UserError(f"--steps is {steps}; train at least 1 step")
        if bool(args.tracking_uri) != bool(args.run_id):
            raise UserError("--tracking-uri and --run-id go together; pass both to log to MLflow, or neither")
        dp.get_accelerator()  # joins the process group started by torchrun / accelerate launch
        summary = train_data_parallel(
            cfg, args.run_dir, steps, tracking_uri=args.tracking_uri, run_id=args.run_id,
            progress=not args.no_progress,
        )
    except UserError as e:
        print(f"error (rank {dp.rank()}): {e}", file=sys.stderr)
        code = 2
    else:
        code = 0
    finally:
        from grpo.engines import close_engines

        close_engines()  # an in-process vLLM engine holds process groups of its own: it goes first
        dp.shutdown()
    if code == 0 and summary["checkpoint"]:
        print(f"checkpoint: {summary['checkpoint']}")
    return _leave(code, several)


def _leave(code: int, several: bool) -> int:
    """`code`; a rank of a launched group ends here without the interpreter's teardown, all its
    work saved and its output flushed: gloo's worker threads can still be joinable during that
    teardown and abort the process ("terminate called without an active exception", SIGABRT)
    although the process group was destroyed."""
    if several:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
