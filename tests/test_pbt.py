"""Population based training: the spec's errors, tournament selection and mutation against hand
computations, a clone's adapter and optimizer equal to its parent's, members that do not touch each
other's adapters, the `grpo-sweep` flow with `strategy: pbt` end to end (3 members x 2 generations
on the tiny model: lineage in MLflow, survivors and mutations recomputed from the recorded
accuracies and values, the best member registered and promoted), and a sweep killed during
generation 2 that resumes there with the same population as a run that was never killed.

    pytest -q tests/test_pbt.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from pipeline_config import tiny_config

from grpo import tracking
from grpo.errors import ConfigError
from grpo.pbt import generation_rng, member_name, mutate, ranks, select
from grpo.stages import pbt as stage
from grpo.stages import sweep as sweep_stage
from grpo.sweep import MutationSpec, RangeSpec, build_sweep, trial_configs

LR, G = "train.learning_rate", "train.group_size"
REWARDS = ["format", "pbt_rewards:first_even"]
FITNESS = "eval/reward/first_even"
"""The fitness of the flow tests: a reward that differs between members of the untrained tiny model."""
PARAMETERS = {LR: {"low": 1e-4, "high": 3e-3, "log": True}, G: [4, 8]}
PBT = {"population": 3, "generations": 2, "steps_per_generation": 2, "mutation": {"probability": 0.9, "sd": 0.5}}


def pbt_data(**fields: object) -> dict:
    return {"name": "p", "strategy": "pbt", "parameters": PARAMETERS, "pbt": PBT, **fields}


# ----------------------------------------------------------------------------- the spec


@pytest.mark.parametrize(("data", "message"), [
    (pbt_data(parameters={"train.max_grad_norm": [0.5, 1.0]}),
     "parameters.train.max_grad_norm: strategy pbt mutates only train.learning_rate"),
    (pbt_data(trials=4), "trials: strategy pbt trains pbt.population members; remove trials"),
    (pbt_data(work_pool="gpus"), "work_pool: a population trains in one process"),
    (pbt_data(pbt={"population": 2, "tournament_size": 3}), "tournament_size 3 exceeds population 2"),
    (pbt_data(pbt={"population": 1}), "pbt.population: Input should be greater than or equal to 2"),
    (pbt_data(pbt={"mutation": {"probability": 2}}), "pbt.mutation.probability"),
    (pbt_data(pbt={"bogus": 1}), "pbt.bogus"),
    ({"name": "p", "parameters": {LR: [1e-4]}, "pbt": {}}, "pbt: only strategy pbt reads it"),
])
def test_bad_pbt_specs_are_one_line(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_sweep(data)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_mutation_the_base_refuses_is_found_before_any_work(tmp_path: Path, tiny_model_dir: Path) -> None:
    base = tiny_config(tmp_path, tiny_model_dir, "sqlite:///unused.db", "pbad").model_dump(mode="json")
    spec = build_sweep(pbt_data(base=base, parameters={G: [4, 8]}))
    trials = sweep_stage.plan(spec, preflight=False)
    wider = spec.model_copy(update={"parameters": {G: [2, 4, 8]}})  # micro_batch_size 8 does not divide 2 x 2
    with pytest.raises(ConfigError, match=r"^parameters.train.group_size: a mutation may reach 2, .*micro_batch_size"):
        stage.check_population(wider, trials)
    stage.check_population(spec, trials)
    with pytest.raises(ConfigError, match=r"^metric: 'reward_mean': a population is compared by its held-out"):
        stage.check_population(spec.model_copy(update={"metric": "reward_mean"}), trials)


def test_the_population_is_drawn_like_random_trials() -> None:
    spec = build_sweep(pbt_data(seed=3))
    values = [p for p, _ in trial_configs(spec)]
    assert len(values) == 3 and len({v[LR] for v in values}) == 3
    assert all(1e-4 <= v[LR] <= 3e-3 and v[G] in (4, 8) for v in values)
    assert values == [p for p, _ in trial_configs(spec)]


# ----------------------------------------------------------------------------- selection, mutation


def test_tournament_selection_by_hand() -> None:
    fitness = [0.2, 0.5, 0.1, 0.5]
    assert ranks(fitness) == [1, 3, 0, 2]  # a tie ranks the lower index higher
    rng = generation_rng(7, 1)
    parents, elite = select(fitness, 2, True, rng)
    assert elite == 1 and parents[1] == 1
    replay = generation_rng(7, 1)  # the same draws, by hand: best of two with replacement per slot
    for slot in range(4):
        if slot == elite:
            continue
        drawn = replay.integers(0, 4, size=2)
        assert parents[slot] == int(max(drawn, key=lambda i: ranks(fitness)[int(i)]))
    assert select(fitness, 2, True, generation_rng(7, 1)) == (parents, elite)  # seeded: a resume draws the same
    # without elitism the best member's slot is drawn for too; with it, it always survives
    kept = [select(fitness, 1, False, generation_rng(seed, 1))[0][1] for seed in range(50)]
    assert set(kept) == {0, 1, 2, 3}
    assert all(select(fitness, 1, True, generation_rng(seed, 1))[0][1] == 1 for seed in range(50))


def test_mutation_stays_within_bounds_and_follows_the_draws() -> None:
    params = {LR: RangeSpec(low=1e-4, high=1e-3, log=True), G: [4, 8, 16], "train.beta": RangeSpec(low=0.0, high=0.1)}
    mutation = MutationSpec(probability=1.0, sd=5.0)
    values = {LR: 3e-4, G: 8, "train.beta": 0.05}
    for seed in range(30):
        out, changed = mutate(values, params, mutation, generation_rng(seed, 2))
        assert changed == [LR, G, "train.beta"]
        assert 1e-4 <= out[LR] <= 1e-3 and out[G] in (4, 16) and 0.0 <= out["train.beta"] <= 0.1
    rng = generation_rng(1, 1)  # by hand: one uniform per field, then its perturbation's draws
    out, changed = mutate(values, params, MutationSpec(probability=0.5, sd=0.2), generation_rng(1, 1))
    expected, fields = dict(values), []
    for name in params:
        if rng.random() >= 0.5:
            continue
        fields.append(name)
        if name == LR:
            expected[name] = min(1e-3, max(1e-4, values[LR] * float(np.exp(0.2 * rng.standard_normal()))))
        elif name == G:
            expected[name] = 16 if rng.random() < 0.5 else 4
        else:
            expected[name] = min(0.1, max(0.0, values[name] + 0.2 * 0.1 * float(rng.standard_normal())))
    assert (out, changed) == (expected, fields)
    assert mutate(values, params, MutationSpec(probability=0.0), generation_rng(0, 1)) == (values, [])


# ----------------------------------------------------------------------------- the population


@pytest.fixture(scope="module")
def population(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):  # noqa: ANN201
    from grpo.data import load_split
    from grpo.pbt import Population
    from grpo.stages import data

    tmp = tmp_path_factory.mktemp("pop")
    base = tiny_config(tmp, tiny_model_dir, "sqlite:///unused.db", "pop", f"train.rewards={REWARDS}").model_dump(
        mode="json")
    spec = build_sweep(pbt_data(base=base))
    trials = sweep_stage.plan(spec, preflight=False)
    ref = data.prepare(trials[0].config)
    pop = Population.create([t.config for t in trials], [t.params for t in trials], load_split(ref.train_path),
                            load_split(ref.test_path), total_steps=4)
    yield spec, pop
    pop.close()


def _adapter(pop, name: str) -> dict[str, torch.Tensor]:  # noqa: ANN001
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(pop.model, adapter_name=name).items()}


def test_members_train_their_own_adapter_only(population) -> None:  # noqa: ANN001
    spec, pop = population
    assert [m.name for m in pop.members] == ["member-0", "member-1", "member-2"]
    before = [_adapter(pop, m.name) for m in pop.members]
    pop.activate(pop.members[1])
    pop.members[1].trainer.train(1, progress=False)
    after = [_adapter(pop, m.name) for m in pop.members]
    assert any(not torch.equal(before[1][k], after[1][k]) for k in before[1])  # member-1 moved
    for i in (0, 2):  # the others did not
        assert all(torch.equal(before[i][k], after[i][k]) for k in before[i])
    assert pop.members[1].trainer.step_count == 1 and pop.members[0].trainer.step_count == 0
    lrs = [m.trainer.optimizer.param_groups[0]["initial_lr"] for m in pop.members]
    assert lrs == [m.values[LR] for m in pop.members]  # each optimizer has its member's learning rate


def test_a_clone_takes_its_parents_adapter_and_optimizer(population) -> None:  # noqa: ANN001
    spec, pop = population
    pop.train(1, progress=False)  # every member has optimizer state now
    parent = pop.members[0]
    adapter = _adapter(pop, parent.name)
    optimizer = parent.trainer.optimizer.state_dict()
    expected_state = {k: {n: t.clone() for n, t in v.items()} for k, v in optimizer["state"].items()}
    counters = parent.trainer.state()
    changed = pop.evolve([0, 0, 2], 0, dict(spec.parameters), spec.pbt.mutation, generation_rng(0, 1))
    clone = pop.members[1]
    assert all(torch.equal(adapter[k], v) for k, v in _adapter(pop, clone.name).items())
    got = clone.trainer.optimizer.state_dict()["state"]
    assert got.keys() == expected_state.keys()
    assert all(torch.equal(got[k][n], expected_state[k][n]) for k in got for n in got[k])
    assert clone.trainer.state() == counters
    assert clone.trainer.scheduler.last_epoch == parent.trainer.scheduler.last_epoch
    assert changed[0] == []  # the elite is not mutated
    assert clone.trainer.optimizer.param_groups[0]["initial_lr"] == clone.values[LR]
    assert clone.cfg.train.group_size == clone.values[G] and clone.trainer.cfg is clone.cfg
    # the copy is deep: training the clone leaves the parent's optimizer state alone
    pop.activate(clone)
    clone.trainer.train(1, progress=False)
    after = parent.trainer.optimizer.state_dict()["state"]
    assert all(torch.equal(after[k][n], expected_state[k][n]) for k in after for n in after[k])


def test_a_saved_population_loads_back(population, tmp_path: Path) -> None:  # noqa: ANN001
    from peft import PeftModel

    from grpo.models import load_base_model
    from grpo.pbt import Population, read_record

    spec, pop = population
    folder = pop.save(tmp_path / "gen-001", {"generation": 1})
    assert read_record(folder)["member_values"] == [m.values for m in pop.members]
    other = Population.create([m.cfg for m in pop.members], [{} for _ in pop.members], pop.members[0].trainer.rows,
                              pop.test_rows, total_steps=4)
    other.load(folder)
    for a, b in zip(pop.members, other.members):
        assert a.values == b.values and a.trainer.state() == b.trainer.state()
        assert all(torch.equal(x, y) for x, y in zip(_adapter(pop, a.name).values(), _adapter(other, b.name).values()))
    other.close()
    single = PeftModel.from_pretrained(load_base_model(pop.members[0].cfg.model), str(folder / "member-2"))
    weights = {k.replace(".default", ""): v for k, v in single.named_parameters() if "lora_" in k}
    mine = {k.replace(".member-2", ""): v for k, v in pop.model.named_parameters() if ".member-2." in k}
    assert weights.keys() == mine.keys() and all(torch.equal(weights[k], mine[k]) for k in mine)


# ----------------------------------------------------------------------------- the flow


def _spec_file(tmp_path: Path, model_dir: Path, uri: str, name: str) -> Path:
    base = tiny_config(tmp_path, model_dir, uri, "pbt-shared", f"train.rewards={REWARDS}").model_dump(mode="json")
    base["pipeline"]["experiment"] = f"exp-{name}"
    base["pipeline"]["registered_model"] = f"lora-{name}"
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(pbt_data(name=name, base=base, seed=5, metric=FITNESS)))
    return path


def _record(cfg_dir: Path, parent_run_id: str, generation: int) -> stage.GenerationRecord:
    from grpo.pbt import read_record

    folder = next(cfg_dir.glob(f"{parent_run_id}/population/gen-{generation:03d}"))
    return stage.GenerationRecord.model_validate(read_record(folder))


def test_pbt_sweep_end_to_end(
    tmp_path: Path, tiny_model_dir: Path, mlflow_uri: str, prefect_harness: None, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from grpo.sweep import load_sweep
    from grpo_pipeline.flows.sweep import sweep

    spec = load_sweep(_spec_file(tmp_path, tiny_model_dir, mlflow_uri, "pbte2e"))
    summary = sweep(spec=spec)
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.strategy"] == "pbt"
    children = tracking.child_runs(mlflow_uri, summary.parent_run_id)
    assert [c.info.run_name for c in children] == ["pbte2e-0", "pbte2e-1", "pbte2e-2"]
    assert all(c.info.status == "FINISHED" for c in children)

    runs_dir = tmp_path / "runs"
    first, last = _record(runs_dir, summary.parent_run_id, 1), _record(runs_dir, summary.parent_run_id, 2)
    assert (first.step, last.step) == (2, 4) and last.parents is None
    # MLflow holds what each member trained with and scored, per generation ...
    recorded = []
    for i, child in enumerate(children):
        run_id = child.info.run_id
        acc = {m.step: m.value for m in client.get_metric_history(run_id, "eval/accuracy")}
        assert acc == {2: first.accuracies[i], 4: last.accuracies[i]}
        score = {m.step: m.value for m in client.get_metric_history(run_id, FITNESS)}
        assert score == pytest.approx({2: first.fitness[i], 4: last.fitness[i]})
        recorded.append(score[2])
        for field in PARAMETERS:
            history = {m.step: m.value for m in client.get_metric_history(run_id, f"pbt/{field}")}
            assert history == pytest.approx({2: first.values[i][field], 4: last.values[i][field]})
        assert sorted(m.step for m in client.get_metric_history(run_id, "reward_mean")) == [1, 2, 3, 4]
        parent_name = child.data.tags[stage.CLONED_TAG.format(1)]
        assert parent_name == (member_name(first.parents[i]) if first.parents[i] != i else "-")
    # ... from which the survivors and mutations are recomputed with the generation's seeded draws
    rng = generation_rng(5, 1)
    parents, elite = select(recorded, spec.pbt.tournament_size, spec.pbt.elitism, rng)
    assert (parents, elite) == (first.parents, first.elite)
    for slot, p in enumerate(parents):
        if slot == elite:
            expected, fields = first.values[p], []
        else:
            expected, fields = mutate(first.values[p], dict(spec.parameters), spec.pbt.mutation, rng)
        assert last.values[slot] == pytest.approx(expected) and first.mutated[slot] == fields

    # the lineage on the parent; the best member of the last generation registered and promoted
    files = {f.path for f in client.list_artifacts(summary.parent_run_id, "pbt")}
    assert {stage.LINEAGE_TABLE, stage.LINEAGE_PLOT} <= files
    table = tracking.read_json_artifact(mlflow_uri, summary.parent_run_id, stage.LINEAGE_TABLE)
    assert len(table["data"]) == 6 and "cloned_from" in table["columns"]
    best = summary.best
    assert best is not None and best.index == last.best and best.best_version is not None
    assert [t.best_version for t in summary.trials if t.index != best.index] == [None, None]
    assert summary.promotion is not None and summary.promotion.candidate == best.best_version
    assert tracking.get_alias_version(mlflow_uri, "lora-pbte2e", "champion") == best.best_version

    # `grpo compare --sweep` finds the newest sweep of that name and lists its members
    from grpo_pipeline.cli import main

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / ".prefect"))
    capsys.readouterr()
    assert main(["compare", "--sweep", "pbte2e", "--experiment", "exp-pbte2e", "--tracking-uri", mlflow_uri,
                 "--no-plot"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[1:]] == ["pbte2e-0", "pbte2e-1", "pbte2e-2"]
    assert main(["compare", "--sweep", "nope", "--experiment", "exp-pbte2e", "--tracking-uri", mlflow_uri]) == 2
    assert "--sweep nope: experiment 'exp-pbte2e' has no sweep of that name" in capsys.readouterr().err


def _grpo(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL",)}
    env["PREFECT_HOME"] = str(tmp_path / ".prefect")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])  # pbt_rewards
    log = tmp_path / f"grpo-{len(list(tmp_path.glob('grpo-*.log')))}.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "grpo_pipeline", *args], cwd=tmp_path, env=env,
                                start_new_session=True, stdout=out, stderr=out)
    return proc, log


def test_a_killed_pbt_sweep_resumes_at_its_generation(
    tmp_path: Path, tiny_model_dir: Path, mlflow_uri: str, prefect_harness: None
) -> None:
    """SIGKILL to `grpo sweep` while generation 2 trains, then `grpo sweep --resume <parent>`:
    generation 1 is read back (its steps are logged once), generation 2 starts from the saved
    population, and the result equals a run that was never killed (adapters bit for bit)."""
    from grpo.sweep import load_sweep
    from grpo_pipeline.flows.sweep import sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    killed_dir, straight_dir = tmp_path / "killed", tmp_path / "straight"
    killed_dir.mkdir()
    straight_dir.mkdir()
    spec_path = _spec_file(killed_dir, tiny_model_dir, uri, "pbtkill")
    proc, log = _grpo(killed_dir, "sweep", "--config", str(spec_path))
    client = MlflowClient(uri)

    def in_generation_2() -> bool:  # generation 1 saved, and a member has logged a step of generation 2
        if not any((killed_dir / "runs").glob("*/population/gen-001/COMPLETE")):
            return False
        exp = client.get_experiment_by_name("exp-pbtkill")
        return any(r.data.metrics.get("reward_mean") is not None and
                   any(m.step == 3 for m in client.get_metric_history(r.info.run_id, "reward_mean"))
                   for r in client.search_runs([exp.experiment_id]))

    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not in_generation_2():
        time.sleep(0.3)
    assert proc.poll() is None and in_generation_2(), log.read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    (gen1,) = (killed_dir / "runs").glob("*/population/gen-001")
    parent_run_id = gen1.parents[1].name
    assert not (gen1.parent / "gen-002").exists()

    proc, log = _grpo(killed_dir, "sweep", "--config", str(spec_path), "--resume", parent_run_id)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    for child in tracking.child_runs(uri, parent_run_id):
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "reward_mean")]
        assert sorted(steps) == [1, 2, 3, 4]  # generation 1 was not trained again
    killed_last = _record(killed_dir / "runs", parent_run_id, 2)

    straight = sweep(spec=load_sweep(_spec_file(straight_dir, tiny_model_dir, mlflow_uri, "pbtstraight")))
    straight_last = _record(straight_dir / "runs", straight.parent_run_id, 2)
    assert killed_last.fitness == straight_last.fitness and killed_last.values == straight_last.values
    from safetensors.torch import load_file

    for i in range(3):
        a = load_file(str(Path(killed_last.folder) / member_name(i) / "adapter_model.safetensors"))
        b = load_file(str(Path(straight_last.folder) / member_name(i) / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
