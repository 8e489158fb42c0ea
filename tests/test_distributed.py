"""Data-parallel GRPO in 2 CPU processes (torchrun, gloo) on the tiny model, against an in-process
reference of the same two ranks.

    pytest -q tests/test_distributed.py

One torchrun launch of `grpo.launch` (through a two-line script that registers a reward the tiny
model can score non-zero, so gradients are not all zero) trains 2 steps with B = 2 prompts per
rank, G = 4, and logs to a real sqlite MLflow store. The test then checks that:
- each rank generated for its own prompts: the global positions (step * 2 + rank) * B ... of the
  seeded data order, disjoint between the ranks;
- the gradients were averaged: both ranks end with bit-identical adapters, equal to a reference
  that runs the two ranks in this process and replaces each rank's gradients by their exact mean,
  and different from rank 0 trained on its own prompts without averaging;
- with loss_type "dapo" (token sum / the step's token count over both ranks), the adapter equals
  one process updating on the union of both ranks' rows, while the ranks' token counts differ, so
  that the mean of per-rank token means (the "grpo" reference above) is a different update;
- rank 0 alone wrote exactly one checkpoint, and the metrics (averaged over the ranks) were logged
  once per step to metrics.jsonl and to MLflow.
torchrun is run as `python -m torch.distributed.run` (the module behind the `torchrun` command).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from grpo import distributed as dp
from grpo import tracking
from grpo.config import load_config
from grpo.countdown import load_split, prepare_dataset
from grpo.models import load_policy
from grpo.trainer import GRPOTrainer, seed_everything

ROOT = Path(__file__).resolve().parents[1]
STEPS, B, WORLD = 2, 2, 2

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def even_tokens(completions, completion_ids, **_):
    """Share of even token ids in a completion: a reward the untrained tiny model varies on."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


SCRIPT = """\
import sys
from grpo.launch import main
from grpo.rewards import register_reward

@register_reward("even_tokens")
def even_tokens(completions, completion_ids, **_):
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]

sys.exit(main())
"""


def _overrides(model_dir: Path, data_dir: Path) -> list[str]:
    return [
        f"model.name_or_path={model_dir}", "model.build_tiny_if_missing=false",
        f"data.cache_dir={data_dir}", "data.generate_rows=64",
        f"train.prompts_per_step={B}", "train.group_size=4", "train.micro_batch_size=4",
        "generation.max_new_tokens=8", "train.learning_rate=0.01", "train.rewards=[even_tokens]",
        "train.beta=0.04",
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _adapter(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


class _Captured(Exception):
    """Stops a step right after its backward passes, its gradients captured (or, in the union
    reference, before its update, its rows captured)."""


@contextlib.contextmanager
def _replayable(t: GRPOTrainer) -> Iterator[None]:
    """A step of `t` stopped by `_Captured`, to be run again: the trainer's counters (e.g. the
    data position, advanced when the step's prompts are drawn) are put back afterwards."""
    counters = {k: v for k, v in vars(t).items() if type(v) is int and not k.startswith("_")}
    with pytest.raises(_Captured):
        yield
    for k, v in counters.items():
        setattr(t, k, v)


def _reference(cfg, rows, *, average: bool):
    """The two ranks run in this process, one thread (as each torchrun worker). With `average`,
    each step's gradients of both ranks are replaced by their exact mean before clipping; without,
    rank 0 trains alone on its own prompts. Returns (rank 0 adapter, rank 1 adapter or None,
    per-step local metrics of each rank)."""

    def trainer(rank: int) -> GRPOTrainer:
        seed_everything(cfg.train.seed)
        model, tok = load_policy(cfg)
        return GRPOTrainer(cfg, model, tok, rows, reward_fns=[("even_tokens", even_tokens)],
                           total_steps=STEPS, rank=rank, world_size=WORLD)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = trainer(0)
        if not average:
            assert dp.world_size() == 1  # no process group here: nothing is averaged
            history = [t0.step() for _ in range(STEPS)]
            return _adapter(t0.model), None, [history]
        t1 = trainer(1)
        grads: dict[int, list[torch.Tensor]] = {}
        hist: list[list[dict]] = [[], []]

        def capture(params):
            grads[1] = [p.grad.clone() for p in params]
            raise _Captured

        def mean_with(own: int, other: int):
            def hook(params):
                grads[own] = [p.grad.clone() for p in params]
                for p, mine, theirs in zip(params, grads[own], grads[other]):
                    p.grad = (mine + theirs) / 2
            return hook

        for _ in range(STEPS):
            t1.grad_hook = capture  # rank 1's gradients of this step, without stepping
            with _replayable(t1):
                t1.step()
            t1.optimizer.zero_grad(set_to_none=True)
            t0.grad_hook = mean_with(0, 1)
            hist[0].append(t0.step())
            t1.grad_hook = mean_with(1, 0)  # the same step again, now with the mean applied
            hist[1].append(t1.step())
        return _adapter(t0.model), _adapter(t1.model), hist
    finally:
        torch.set_num_threads(threads)


def _pad_cat(a: torch.Tensor, b: torch.Tensor, value: int | float, *, left: bool) -> torch.Tensor:
    """Rows of a then rows of b, the narrower one padded with `value` on the left or the right."""
    width = max(a.shape[1], b.shape[1])

    def pad(x: torch.Tensor) -> torch.Tensor:
        fill = torch.full((x.shape[0], width - x.shape[1]), value, dtype=x.dtype, device=x.device)
        return torch.cat([fill, x] if left else [x, fill], dim=1)

    return torch.cat([pad(a), pad(b)], dim=0)


def _union(first, second):
    """(rollout, advantages, ref log-probs) of rank 0's rows followed by rank 1's, one batch."""
    (ra, adv_a, ref_a), (rb, adv_b, ref_b) = first, second
    pad_id = 0  # padded positions are masked out; any id will do
    rollout = dataclasses.replace(
        ra,
        prompt_ids=_pad_cat(ra.prompt_ids, rb.prompt_ids, pad_id, left=True),
        prompt_mask=_pad_cat(ra.prompt_mask, rb.prompt_mask, 0, left=True),
        completion_ids=_pad_cat(ra.completion_ids, rb.completion_ids, pad_id, left=False),
        completion_mask=_pad_cat(ra.completion_mask, rb.completion_mask, 0, left=False),
        texts=list(ra.texts) + list(rb.texts),
        truncated=torch.cat([ra.truncated, rb.truncated]),
        sampler_logp=None,
    )
    ref = _pad_cat(ref_a, ref_b, 0.0, left=False) if ref_a is not None else None
    return rollout, torch.cat([adv_a, adv_b]), ref


def _union_reference(cfg, rows):
    """One process, one update per step on the union of both ranks' rows (each rank's rollout
    sampled as under torchrun, from the same adapter): both in-process trainers apply that same
    update. Returns (rank 0 adapter, rank 1 adapter, per-step local metrics of each rank, per-step
    token counts of each rank)."""

    def trainer(rank: int) -> GRPOTrainer:
        seed_everything(cfg.train.seed)
        model, tok = load_policy(cfg)
        return GRPOTrainer(cfg, model, tok, rows, reward_fns=[("even_tokens", even_tokens)],
                           total_steps=STEPS, rank=rank, world_size=WORLD)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainers = [trainer(0), trainer(1)]
        hist: list[list[dict]] = [[], []]
        counts: list[list[int]] = [[], []]
        def on_union(t: GRPOTrainer, rank: int, batches: dict[int, tuple]):
            """`t.update` that records its rank's rows of the step, then (rank 1's first call:
            stops there) updates on the union of both ranks' rows."""

            def update(rollout, adv, old, ref, is_weight=None):
                assert old is None and is_weight is None  # one epoch, no sampler correction
                if rank not in batches:
                    batches[rank] = (rollout, adv, ref)
                    counts[rank].append(int(rollout.completion_mask.sum()))
                if len(batches) < WORLD:
                    raise _Captured
                union, union_adv, union_ref = _union(batches[0], batches[1])
                return GRPOTrainer.update(t, union, union_adv, None, union_ref)

            return update

        for _ in range(STEPS):
            batches: dict[int, tuple] = {}
            trainers[1].update = on_union(trainers[1], 1, batches)
            with _replayable(trainers[1]):  # rank 1's rows of this step, without an update
                trainers[1].step()
            for rank, t in enumerate(trainers):
                t.update = on_union(t, rank, batches)
                hist[rank].append(t.step())
        return _adapter(trainers[0].model), _adapter(trainers[1].model), hist, counts
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_two_processes_train_one_model(tiny_model_dir, mlflow_uri, tmp_path, loss_type):
    run_dir = tmp_path / "run"
    overrides = [*_overrides(tiny_model_dir, tmp_path / "data"), f"train.loss_type={loss_type}"]
    if loss_type == "dapo":  # no LoRA dropout: one process's masks over the union would differ from the ranks'
        overrides.append("lora.dropout=0.0")
    run_id = tracking.start_run(mlflow_uri, "distributed-test", "dp-2")
    script = tmp_path / "launch_with_reward.py"
    script.write_text(SCRIPT)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
        "--master_port", str(_free_port()), str(script),
        "--set", *overrides, "--run-dir", str(run_dir), "--steps", str(STEPS),
        "--tracking-uri", mlflow_uri, "--run-id", run_id,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    # each rank generated for its own prompts: positions (step * WORLD + rank) * B ... of the order
    cfg = load_config(None, overrides)
    rows = load_split(prepare_dataset(cfg.data).train_path)
    order = np.random.default_rng([cfg.train.seed, 0]).permutation(len(rows)).tolist()
    seen = {}
    for rank in range(WORLD):
        records = _jsonl(run_dir / "ranks" / f"rank-{rank}.jsonl")
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
        for r in records:
            first = ((r["step"] - 1) * WORLD + rank) * B
            assert r["indices"] == order[first : first + B], f"rank {rank} step {r['step']}"
        seen[rank] = {i for r in records for i in r["indices"]}
    assert seen[0] and seen[1] and not seen[0] & seen[1]

    # one checkpoint, written by rank 0; both ranks end with the same adapter bytes
    summaries = [json.loads((run_dir / "ranks" / f"rank-{r}.json").read_text()) for r in range(WORLD)]
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == [f"step-{STEPS:06d}"]
    assert summaries[0]["checkpoint"] == str(run_dir / "checkpoints" / ckpts[0])
    assert summaries[1]["checkpoint"] is None
    assert summaries[0]["adapter_sha256"] == summaries[1]["adapter_sha256"]

    # the gradients were averaged: the checkpoint equals the exact-mean reference ...
    from safetensors.torch import load_file

    trained = load_file(str(run_dir / "checkpoints" / ckpts[0] / "adapter_model.safetensors"))
    ref0, ref1, hist = _reference(cfg, rows, average=True)
    assert set(trained) == set(ref0)
    tol = dict(rtol=1e-5, atol=1e-6)
    if loss_type == "dapo":
        # ... dapo: the union of both ranks' rows in one process, not the mean of the ranks' own
        # token means (that exact-mean reference, with unequal token counts, is another update).
        # The union sums its micro-batches' gradients in another order; AdamW's first steps,
        # g / (|g| + 1e-8), turn those last-bit differences of near-zero components into up to
        # ~2e-5, hence the wider tolerance; weighting the ranks equally misses it by far (here
        # by ~2e-4 on a typical weight and up to 4e-2, with 58 and 61 tokens on the ranks at step 1).
        tol = dict(rtol=1e-4, atol=1e-4)
        mean_of_ranks = ref0
        ref0, ref1, hist, counts = _union_reference(cfg, rows)
        assert any(c0 != c1 for c0, c1 in zip(*counts)), f"equal token counts per rank {counts}"
        equal_weights_pass = all(torch.allclose(trained[k], mean_of_ranks[k], **tol) for k in ref0)
        assert not equal_weights_pass, f"weighting the ranks equally gives the same adapter; counts {counts}"
    for k in ref0:
        torch.testing.assert_close(ref0[k], ref1[k], rtol=0, atol=0)
        torch.testing.assert_close(trained[k], ref0[k], **tol, msg=lambda m, k=k: f"{k}: {m}")
    # ... and differs from rank 0 trained alone on its own prompts
    alone, _, _ = _reference(cfg, rows, average=False)
    gap = max((trained[k] - alone[k]).abs().max().item() for k in ref0)
    assert gap > 1e-4, f"the 2-rank adapter is rank 0's own (max difference {gap:.2e})"

    # metrics: averaged over the ranks, one line / one MLflow value per step, from rank 0 only
    lines = _jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    for m, local0, local1 in zip(lines, hist[0], hist[1]):
        mean = (local0["reward_mean"] + local1["reward_mean"]) / 2
        assert m["reward_mean"] == pytest.approx(mean, abs=1e-6)
        longest = max(local0["completion_length_max"], local1["completion_length_max"])
        assert m["completion_length_max"] == longest
        assert m["grad_norm"] == pytest.approx(local0["grad_norm"], rel=1e-4)
        if loss_type == "dapo":  # each rank's token sum / (global count / 2), averaged: the union's loss
            assert m["loss"] == pytest.approx(local0["loss"], rel=1e-4, abs=1e-7)
    from mlflow import MlflowClient

    history = MlflowClient(mlflow_uri).get_metric_history(run_id, "reward_mean")
    assert sorted(h.step for h in history) == list(range(1, STEPS + 1))
    assert [h.value for h in sorted(history, key=lambda h: h.step)] == pytest.approx(
        [m["reward_mean"] for m in lines], abs=1e-9
    )


def test_helpers_are_no_ops_in_one_process():
    """Without a process group: rank 0 of 1, gradients untouched, metrics returned as a copy."""
    assert (dp.rank(), dp.world_size(), dp.is_main()) == (0, 1, True)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    dp.average_gradients([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    metrics = {"step": 1, "loss": 0.5}
    out = dp.gather_metrics(metrics)
    assert out == metrics and out is not metrics
    dp.barrier()
    with dp.main_first():
        pass


def test_two_machines_train_like_two_processes(tiny_model_dir, tmp_path):
    """`torchrun --nnodes 2`: two launchers, one process each, as on two machines (here both on
    127.0.0.1, the first one's address the rendezvous): the same adapter as the exact-mean
    reference of two ranks, written once by global rank 0."""
    run_dir = tmp_path / "run"
    overrides = _overrides(tiny_model_dir, tmp_path / "data")
    script = tmp_path / "launch_with_reward.py"
    script.write_text(SCRIPT)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    port = _free_port()
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
             str(script), "--set", *overrides, "--run-dir", str(run_dir), "--steps", str(STEPS)],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for node in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in nodes]
    for node, (p, (out, err)) in enumerate(zip(nodes, outputs)):
        assert p.returncode == 0, f"node {node} failed:\n{out[-2000:]}\n{err[-4000:]}"

    summaries = [json.loads((run_dir / "ranks" / f"rank-{r}.json").read_text()) for r in range(WORLD)]
    assert [s["world_size"] for s in summaries] == [2, 2]
    assert summaries[0]["adapter_sha256"] == summaries[1]["adapter_sha256"]
    assert summaries[1]["checkpoint"] is None

    from safetensors.torch import load_file

    trained = load_file(str(Path(summaries[0]["checkpoint"]) / "adapter_model.safetensors"))
    cfg = load_config(None, overrides)
    rows = load_split(prepare_dataset(cfg.data).train_path)
    ref0, _, _ = _reference(cfg, rows, average=True)
    for k in ref0:
        torch.testing.assert_close(trained[k], ref0[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def _gather_on_rank(rank: int, port: int, out_dir: str) -> None:
    """One rank of test_gather_metrics_leaves_unmeasured_values_out (spawned)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        nan = float("nan")
        mine = [{"entropy": 0.5, "reward/x": nan, "silent": nan, "len_max": 3.0, "step": 7},
                {"entropy": nan, "reward/x": 2.0, "silent": nan, "len_max": nan, "step": 7}][rank]
        got = dp.gather_metrics(mine)
        Path(out_dir, f"rank-{rank}.json").write_text(json.dumps(got))
    finally:
        dist.destroy_process_group()


def test_gather_metrics_leaves_unmeasured_values_out(tmp_path):
    """NaN = not measured on that rank (a reward with no opinion, the entropy of a step whose
    update ran no row): the mean is over the ranks that measured it, NaN only when none did."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_on_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1] or all(
        results[0][k] == results[1][k] or (np.isnan(results[0][k]) and np.isnan(results[1][k])) for k in results[0]
    )
    got = results[0]
    assert got["entropy"] == 0.5 and got["reward/x"] == 2.0 and np.isnan(got["silent"])
    assert got["len_max"] == 3.0 and got["step"] == 7 and isinstance(got["step"], int)
