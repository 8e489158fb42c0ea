"""Population based training against independent runs from the same initial draws, at the same
total number of GRPO steps, after one warm start.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/pbt_vs_independent.py --base /tmp/ws_kv2

P members (`--members`) draw a learning rate (log-uniform in [--lr-low, --lr-high]) and a group
size (4 or 8) with `grpo.sweep.draws`; PBT trains them as one population (`grpo.pbt`: G
generations of K steps, fitness = greedy accuracy on the first `--fitness-problems` held-out
problems, tournament of 2 with elitism, mutation probability 0.5, sd 0.2); the independent arm
trains each draw alone for G x K steps. Both arms are then scored on the held-out problems after
the fitness ones (so selection never saw them): the PBT champion (best fitness at the last
generation) against the best and the median independent run, McNemar between the champion and the
best run, and each arm's wall time. `--base` is a folder written by `grpo.sft.save_sft`
(`benchmarks/learning_sft.py --save`). Results: benchmarks/LEARNING.md.
"""

import argparse
import json
import statistics
import time

import torch

from grpo.config import load_config
from grpo.countdown import load_split, prepare_dataset
from grpo.evaluate import evaluate, mcnemar
from grpo.models import load_policy
from grpo.pbt import Population, generation_rng, select
from grpo.sweep import build_sweep, draws
from grpo.trainer import GRPOTrainer, seed_everything

torch.set_num_threads(2)

p = argparse.ArgumentParser()
p.add_argument("--base", required=True)
p.add_argument("--members", type=int, default=4)
p.add_argument("--generations", type=int, default=4)
p.add_argument("--steps", type=int, default=40, help="GRPO steps per generation")
p.add_argument("--lr-low", type=float, default=1e-4)
p.add_argument("--lr-high", type=float, default=2e-3)
p.add_argument("--fitness-problems", type=int, default=200)
p.add_argument("--report-problems", type=int, default=800)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--cache-dir", default="artifacts/data")
p.add_argument("--out", default=None)
a = p.parse_args()

LR, G = "train.learning_rate", "train.group_size"
spec = build_sweep({
    "name": "pbt-bench", "strategy": "pbt", "seed": a.seed,
    "parameters": {LR: {"low": a.lr_low, "high": a.lr_high, "log": True}, G: [4, 8]},
    "pbt": {"population": a.members, "generations": a.generations, "steps_per_generation": a.steps},
})
common = [
    f"model.name_or_path={a.base}", "model.build_tiny_if_missing=false", f"data.cache_dir={a.cache_dir}",
    "train.prompts_per_step=16", "train.micro_batch_size=32", "train.beta=0.0", "generation.temperature=1.0",
    "generation.max_new_tokens=48", f"eval.num_problems={a.fitness_problems}", "eval.sampled_problems=0",
]
values = draws(spec)
cfgs = [load_config(None, [*common, f"{LR}={v[LR]}", f"{G}={v[G]}"]) for v in values]
ref = prepare_dataset(cfgs[0].data)
train, test = load_split(ref.train_path), load_split(ref.test_path)
report = test.select(range(a.fitness_problems, min(len(test), a.fitness_problems + a.report_problems)))
report_cfg = cfgs[0].model_copy(update={"eval": cfgs[0].eval.model_copy(update={"num_problems": len(report)})})
total = a.generations * a.steps
print("draws", json.dumps(values), "report problems", len(report), flush=True)

# -- PBT ---------------------------------------------------------------------------------------
t0 = time.perf_counter()
pop = Population.create(cfgs, values, train, test, total_steps=total)
lineage = []
for g in range(1, a.generations + 1):
    pop.train(a.steps, progress=False)
    fitness = [r.accuracy for r in pop.evaluate(progress=False)]
    row = {"generation": g, "fitness": fitness, "values": [dict(m.values) for m in pop.members]}
    if g < a.generations:
        rng = generation_rng(a.seed, g)
        parents, elite = select(fitness, spec.pbt.tournament_size, spec.pbt.elitism, rng)
        row["parents"] = parents
        pop.evolve(parents, elite, dict(spec.parameters), spec.pbt.mutation, rng)
    lineage.append(row)
    print("pbt generation", json.dumps(row), round(time.perf_counter() - t0), flush=True)
pbt_s = time.perf_counter() - t0
champion = max(range(a.members), key=lambda i: (lineage[-1]["fitness"][i], -i))
pop.activate(pop.members[champion])
champ = evaluate(pop.model, pop.tokenizer, report, report_cfg, engine=pop.engine, progress=False)
pop.close()
del pop
print("pbt champion", champion, champ.accuracy, "wall_s", round(pbt_s), flush=True)

# -- independent runs ---------------------------------------------------------------------------
independent = []
for i, cfg in enumerate(cfgs):
    t = time.perf_counter()
    seed_everything(cfg.train.seed)
    model, tok = load_policy(cfg)
    trainer = GRPOTrainer(cfg, model, tok, train, total_steps=total)
    trainer.train(total, progress=False)
    wall = time.perf_counter() - t
    result = evaluate(model, tok, report, report_cfg, engine=trainer.engine, progress=False)
    trainer.engine.close()
    independent.append({"values": values[i], "accuracy": result.accuracy, "correct": result.correct, "wall_s": wall})
    print("independent", i, json.dumps(values[i]), result.accuracy, "wall_s", round(wall), flush=True)

best = max(independent, key=lambda r: r["accuracy"])
median = statistics.median(r["accuracy"] for r in independent)
test_ = mcnemar(best["correct"], champ.correct)
summary = {
    "champion": champion, "champion_accuracy": champ.accuracy, "champion_values": lineage[-1]["values"][champion],
    "best_independent": best["accuracy"], "median_independent": median,
    "independent": [{k: v for k, v in r.items() if k != "correct"} for r in independent],
    "mcnemar_champion_vs_best": test_, "pbt_wall_s": pbt_s,
    "independent_wall_s": sum(r["wall_s"] for r in independent), "lineage": lineage,
    "steps_per_member": total, "report_problems": len(report),
}
print(json.dumps(summary, indent=1), flush=True)
if a.out:
    with open(a.out, "w") as f:
        json.dump(summary, f, indent=1)
