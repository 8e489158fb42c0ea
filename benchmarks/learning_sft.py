"""Warm-start measurement: build the tiny model, train `grpo.sft.train_sft` for a step or time
budget, and report greedy held-out accuracy every 300 steps and at the end (one JSON line).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/learning_sft.py --tag kv2 --steps 1500 --minutes 9

`--order easy` swaps the solver for a chain-shaped one (+ and - first, the running value combined
next); `--aug K` adds K copies of every train row with its numbers shuffled. Results: see
benchmarks/LEARNING.md.
"""

import argparse
import json
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

from grpo import sft as sftmod
from grpo.config import RunConfig
from grpo.countdown import load_split, prepare_dataset, solve_steps
from grpo.evaluate import evaluate
from grpo.models import build_tiny_model, load_tokenizer

torch.set_num_threads(2)


def _cands(x, y, ops):
    out = []
    for op in ops:
        if op == "+":
            out.append((x, "+", y, x + y))
        elif op == "-":
            out.append((x, "-", y, x - y) if x >= y else (y, "-", x, y - x))
        elif op == "*":
            out.append((x, "*", y, x * y))
        elif op == "/":
            if y and x % y == 0:
                out.append((x, "/", y, x // y))
            elif x and y % x == 0:
                out.append((y, "/", x, y // x))
    return out


def _dfs(vals, target, ops, steps):
    if len(vals) == 1:
        return list(steps) if vals[0] == target else None
    n = len(vals)
    for i in range(n):
        for j in range(i + 1, n):
            rest = [vals[k] for k in range(n) if k != i and k != j]
            for a, op, b, r in _cands(vals[i], vals[j], ops):
                if r > 10000:
                    continue
                steps.append((a, op, b, r))
                f = _dfs([r] + rest, target, ops, steps)
                steps.pop()
                if f is not None:
                    return f
    return None


def easy_steps(nums, target, stages=(("+", "-"), ("+", "-", "*", "/"))):
    for ops in stages:
        f = _dfs([int(x) for x in nums], int(target), ops, [])
        if f is not None:
            return f
    return solve_steps(nums, target)


p = argparse.ArgumentParser()
p.add_argument("--kv", type=int, default=2)
p.add_argument("--heads", type=int, default=4)
p.add_argument("--hidden", type=int, default=128)
p.add_argument("--ffn", type=int, default=384)
p.add_argument("--layers", type=int, default=4)
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--bs", type=int, default=32)
p.add_argument("--warmup", type=int, default=10)
p.add_argument("--steps", type=int, default=100000)
p.add_argument("--minutes", type=float, default=1.5)
p.add_argument("--neval", type=int, default=200)
p.add_argument("--rows", type=int, default=6000)
p.add_argument("--order", default="solver")
p.add_argument("--aug", type=int, default=0)
p.add_argument("--save", default=None)
p.add_argument("--cache-dir", default="artifacts/data")
p.add_argument("--out", default=None)
p.add_argument("--tag", default="")
a = p.parse_args()
cfg = RunConfig.model_validate(
    {
        "data": {"generate_rows": a.rows, "cache_dir": a.cache_dir},
        "sft": {
            "enabled": True,
            "max_steps": a.steps,
            "max_minutes": a.minutes,
            "learning_rate": a.lr,
            "batch_size": a.bs,
            "warmup_steps": a.warmup,
        },
        "eval": {"num_problems": a.neval},
    }
)
ref = prepare_dataset(cfg.data)
train, test = load_split(ref.train_path), load_split(ref.test_path)
d = tempfile.mkdtemp()
build_tiny_model(
    d + "/m",
    seed=0,
    hidden_size=a.hidden,
    num_layers=a.layers,
    num_heads=a.heads,
    num_kv_heads=a.kv,
    intermediate_size=a.ffn,
)
tok = load_tokenizer(d + "/m")
model = AutoModelForCausalLM.from_pretrained(d + "/m", dtype=torch.float32)
nparams = sum(p.numel() for p in model.parameters())
model.requires_grad_(True)
if a.order == "easy":
    sftmod.solve_steps = easy_steps
if a.aug:
    import datasets
    import numpy as np

    rng = np.random.default_rng(0)
    rows = list(train)
    extra = []
    for _ in range(a.aug):
        for r in rows:
            extra.append({"nums": [int(x) for x in rng.permutation(r["nums"])], "target": r["target"]})
    train = datasets.Dataset.from_list([{"nums": list(r["nums"]), "target": r["target"]} for r in rows] + extra)
curve = []
_t0 = time.perf_counter()


def on_step(m):
    st = int(m["step"])
    if st % 300 == 0:
        rr = evaluate(model, tok, test, cfg, progress=False)
        curve.append((st, round(time.perf_counter() - _t0), rr.accuracy, rr.format_rate, round(m["sft/loss"], 3)))
        print("curve", curve[-1], flush=True)


s = sftmod.train_sft(model, tok, train, cfg, progress=False, on_step=on_step)
t0 = time.perf_counter()
r = evaluate(model, tok, test, cfg, progress=False)
ev = time.perf_counter() - t0
out = dict(
    tag=a.tag,
    args=vars(a),
    params=nparams,
    steps=s["steps"],
    tokens=s["tokens"],
    sft_s=round(s["seconds"], 1),
    tok_s=round(s["tokens_per_s"]),
    loss=round(s["final_loss"], 4),
    acc=r.accuracy,
    se=round(r.accuracy_se, 4),
    fmt=r.format_rate,
    eval_s=round(ev, 1),
    n=r.n,
    curve=curve,
)
print(json.dumps(out))
if a.out:
    with open(a.out, "a") as f:
        f.write(json.dumps(out) + "\n")
if a.save:
    sftmod.save_sft(model, tok, a.save)
