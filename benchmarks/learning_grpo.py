"""GRPO after a warm start: evaluate the warm-started base (1000 greedy, 500 x 4 sampled), train a
LoRA with `grpo.trainer.GRPOTrainer` for a wall-clock budget, evaluate again, paired McNemar test.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/learning_grpo.py --base /tmp/ws --lr 3e-4 --prompts 16
    python benchmarks/learning_grpo.py --base /tmp/ws --lr 3e-4 --minutes 5 --set train.loss_type=dapo

`--base` is a folder written by `grpo.sft.save_sft` (e.g. learning_sft.py --save). Results: see
benchmarks/LEARNING.md.
"""

import argparse
import json
import time

import torch

from grpo.config import load_config
from grpo.countdown import load_split, prepare_dataset
from grpo.evaluate import evaluate, mcnemar
from grpo.models import load_policy
from grpo.trainer import GRPOTrainer, seed_everything

torch.set_num_threads(2)

p = argparse.ArgumentParser()
p.add_argument("--base", required=True)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--prompts", type=int, default=16)
p.add_argument("--group", type=int, default=8)
p.add_argument("--minutes", type=float, default=3.0)
p.add_argument("--tag", default="")
p.add_argument("--micro", type=int, default=32)
p.add_argument("--cache-dir", default="artifacts/data")
p.add_argument("--out", default=None)
p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
               help="More config overrides, e.g. train.loss_type=dapo")
a = p.parse_args()
cfg = load_config(None, [
    f"model.name_or_path={a.base}", "model.build_tiny_if_missing=false", f"data.cache_dir={a.cache_dir}",
    f"train.learning_rate={a.lr}", f"train.prompts_per_step={a.prompts}", f"train.group_size={a.group}",
    f"train.micro_batch_size={a.micro}", "train.beta=0.0", "generation.temperature=1.0",
    "generation.max_new_tokens=48", "eval.num_problems=1000", "eval.sampled_problems=500", "eval.pass_k=4",
    *a.overrides,
])
ref = prepare_dataset(cfg.data)
train, test = load_split(ref.train_path), load_split(ref.test_path)
seed_everything(cfg.train.seed)
model, tok = load_policy(cfg)
t = time.perf_counter()
before = evaluate(model, tok, test, cfg, progress=False)
ev_s = time.perf_counter() - t
print("before", before.accuracy, before.sampled_accuracy, before.format_rate, "eval_s", round(ev_s, 1), flush=True)
tr = GRPOTrainer(cfg, model, tok, train, total_steps=10000)
t0 = time.perf_counter()
hist = []
while time.perf_counter() - t0 < a.minutes * 60:
    m = tr.step()
    hist.append(m)
    if m["step"] % 5 == 0:
        print("step", m["step"], round(time.perf_counter() - t0), round(m["reward_mean"], 3), flush=True)
train_s = time.perf_counter() - t0
after = evaluate(model, tok, test, cfg, progress=False, engine=tr.engine)
mc = mcnemar(before.correct, after.correct)
out = dict(
    tag=a.tag,
    args=vars(a),
    steps=tr.step_count,
    train_s=round(train_s),
    eval_s=round(ev_s, 1),
    before=dict(
        acc=before.accuracy,
        se=before.accuracy_se,
        sampled=before.sampled_accuracy,
        sampled_se=before.sampled_accuracy_se,
        pass4=before.pass_at_k,
        fmt=before.format_rate,
    ),
    after=dict(
        acc=after.accuracy,
        se=after.accuracy_se,
        sampled=after.sampled_accuracy,
        sampled_se=after.sampled_accuracy_se,
        pass4=after.pass_at_k,
        fmt=after.format_rate,
    ),
    mcnemar=mc,
    reward_first=[round(h["reward_mean"], 3) for h in hist[:5]],
    reward_last=[round(h["reward_mean"], 3) for h in hist[-5:]],
    entropy_first=[round(h["entropy"], 3) for h in hist[:5]],
    entropy_last=[round(h["entropy"], 3) for h in hist[-5:]],
    prompts_sampled=sum(int(h.get("dynamic/prompts_sampled", a.prompts)) for h in hist),
    groups_dropped=sum(int(h.get("dynamic/groups_dropped", 0)) for h in hist),
)
print(json.dumps(out))
if a.out:
    with open(a.out, "a") as f:
        f.write(json.dumps(out) + "\n")
