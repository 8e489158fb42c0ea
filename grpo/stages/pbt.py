"""PBT stage: one generation of a population (train, evaluate, select, mutate, save) with its MLflow
records, the registration of the best member, and the lineage table and plot.

    from grpo.stages import pbt as stage
    stage.check_population(spec, trials)                       # one-line ConfigError before any work
    for g in range(1, spec.pbt.generations + 1):
        record = stage.run_generation(spec, trials, g, dataset_ref, member_runs, parent_run_id, uri)
    best, registration = stage.register_best(spec, trials, record, dataset_ref, member_runs, uri)
    stage.log_lineage(uri, parent_run_id, spec, trials, records)

The `grpo-sweep` flow with `strategy: pbt` sequences these (`grpo_pipeline.flows.pbt`). Each member
is a trial of the sweep's plan (`grpo.stages.sweep.plan`: its initial values drawn from the spec)
with a child run of the sweep's parent (`sweep_trial=<member>`), so `grpo compare --parent` and the
results table work as for a grid. Per member child run: every GRPO step's metrics at the member's
global step, and at the end of each generation `eval/*` and its hyper-parameters as metrics
`pbt/<field>` (the values it trained with in that generation), plus tags
`pbt.cloned_from.gen-<g>` (the member whose copy it became after generation g, or `-`) and
`pbt.mutated.gen-<g>` (the fields perturbed). On the parent: `pbt/lineage.json` (one row per member
and generation) and `pbt/lineage.png` (members x generations coloured by fitness, an arrow from
each clone's parent).

Checkpoints: `<pipeline.output_dir>/<parent run id>/population/gen-<g>/`, the whole population
after generation g (`grpo.pbt.Population.save`). A generation whose folder is complete is not run
again (a retried task, a resumed sweep): its record is read back. The population stays in memory
between generations of one process (`POPULATION`), so only a new process loads it from disk.
Pure: no Prefect; MLflow through `grpo.tracking` only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from grpo import tracking
from grpo.checkpoint import checkpoint_ref
from grpo.config import RunConfig
from grpo.data import DatasetRef, load_split
from grpo.errors import ConfigError
from grpo.evaluate import EvalResult
from grpo.pbt import Population, generation_rng, is_saved, member_name, read_record, select, with_values
from grpo.plots import new_figure
from grpo.stages.registry import Registration, register_elite
from grpo.stages.runs import STEP_METRIC, run_dir
from grpo.stages.sweep import Trial
from grpo.stages.warm_start import with_base
from grpo.sweep import RangeSpec, SweepSpec

LINEAGE_TABLE = "pbt/lineage.json"
LINEAGE_PLOT = "pbt/lineage.png"
CLONED_TAG = "pbt.cloned_from.gen-{:03d}"
MUTATED_TAG = "pbt.mutated.gen-{:03d}"


class GenerationRecord(BaseModel):
    """What one generation did (also `population.json` of its folder)."""

    generation: int
    step: int
    """Each member's global step at the end of the generation."""
    values: list[dict[str, Any]]
    """The hyper-parameters each member trained with in this generation."""
    results: list[EvalResult]
    """Each member's held-out evaluation at the end of the generation."""
    fitness: list[float]
    """Each member's value of the sweep's metric in that evaluation (what selection compares)."""
    parents: list[int] | None
    """Slot i became a copy of member parents[i] after this generation (None after the last one)."""
    elite: int | None
    mutated: list[list[str]]
    """The fields perturbed in each slot after this generation."""
    folder: str

    @property
    def accuracies(self) -> list[float]:
        return [r.accuracy for r in self.results]

    @property
    def best(self) -> int:
        """The member with the highest fitness (ties: the lowest index)."""
        return max(range(len(self.fitness)), key=lambda i: (self.fitness[i], -i))


class _PopulationCache:
    """The population of the last generation run in this process, under its folder and generation."""

    def __init__(self) -> None:
        self.key: tuple[str, int] | None = None
        self.value: Population | None = None

    def take(self, key: tuple[str, int]) -> Population | None:
        hit = self.value if self.key == key else None
        if hit is None and self.value is not None:
            self.value.close()
        self.key, self.value = None, None
        return hit

    def put(self, key: tuple[str, int], population: Population) -> None:
        self.key, self.value = key, population

    def clear(self) -> None:
        if self.value is not None:
            self.value.close()
        self.key, self.value = None, None


POPULATION = _PopulationCache()


def check_population(spec: SweepSpec, trials: list[Trial]) -> None:
    """One-line `ConfigError` for a population this stage cannot train, before any work."""
    cfg = trials[0].config
    if cfg.pipeline.processes > 1:
        raise ConfigError(
            f"pipeline.processes: {cfg.pipeline.processes}: a population trains in one process; set it to 1"
        )
    if not spec.metric.startswith("eval/"):
        raise ConfigError(
            f"metric: {spec.metric!r}: a population is compared by its held-out evaluation; use an eval/* "
            "metric such as eval/accuracy or eval/reward/<reward name>"
        )
    for field, bounds in spec.parameters.items():  # every value a mutation can reach must validate
        reachable = [bounds.low, bounds.high] if isinstance(bounds, RangeSpec) else list(bounds)
        for value in reachable:
            if isinstance(bounds, RangeSpec) and bounds.type == "int":
                value = int(value)
            try:
                with_values(cfg, {field: value})
            except ConfigError as e:
                raise ConfigError(
                    f"parameters.{field}: a mutation may reach {value!r}, which the base config refuses "
                    f"({str(e).split(': ', 2)[-1]}); narrow the values or change the base"
                ) from None


def population_dir(cfg: RunConfig, parent_run_id: str) -> Path:
    """Where the population's generations are saved."""
    return run_dir(cfg, parent_run_id) / "population"


def generation_dir(cfg: RunConfig, parent_run_id: str, generation: int) -> Path:
    return population_dir(cfg, parent_run_id) / f"gen-{generation:03d}"


def member_configs(trials: list[Trial], base: str | None) -> list[RunConfig]:
    """The members' starting configs: each trial's, on the warm-started `base` model when there is one."""
    return [with_base(t.config, base) if base else t.config for t in trials]


def _population(
    spec: SweepSpec, trials: list[Trial], generation: int, dataset_ref: DatasetRef, parent_run_id: str,
    base: str | None,
) -> Population:
    """The population as generation `generation - 1` left it: from memory, from its folder, or
    fresh (generation 1)."""
    assert spec.pbt is not None
    cfgs = member_configs(trials, base)
    key = (str(population_dir(cfgs[0], parent_run_id)), generation - 1)
    hit = POPULATION.take(key)
    if hit is not None:
        return hit
    total = spec.pbt.generations * spec.pbt.steps_per_generation
    pop = Population.create(cfgs, [t.params for t in trials], load_split(dataset_ref.train_path),
                            load_split(dataset_ref.test_path), total_steps=total)
    if generation > 1:
        pop.load(generation_dir(cfgs[0], parent_run_id, generation - 1))
    return pop


def fitness(result: EvalResult, metric: str) -> float:
    """A member's fitness: `metric` (e.g. `eval/accuracy`, `eval/reward/format`) of its evaluation."""
    values = result.metrics()
    if metric not in values:
        raise ConfigError(
            f"metric: {metric!r} is not measured by the evaluation (it has {', '.join(sorted(values))}); "
            "set metric to one of them"
        )
    return values[metric]


def _log_generation(record: GenerationRecord, member_runs: list[str], uri: str) -> None:
    """A generation's evaluations, values and lineage tags on the member runs (idempotent)."""
    for i, run_id in enumerate(member_runs):
        values = {f"pbt/{k}": float(v) for k, v in record.values[i].items()}
        metrics = {**record.results[i].metrics(), **values, "pbt/generation": float(record.generation)}
        tracking.log_metrics(uri, run_id, metrics, step=record.step, skip_logged=True)
        if record.parents is not None:
            parent = record.parents[i]
            tracking.set_tags(uri, run_id, {
                CLONED_TAG.format(record.generation): member_name(parent) if parent != i else "-",
                MUTATED_TAG.format(record.generation): ",".join(record.mutated[i]) or "-",
            })


def run_generation(
    spec: SweepSpec,
    trials: list[Trial],
    generation: int,
    dataset_ref: DatasetRef,
    member_runs: list[str],
    parent_run_id: str,
    uri: str,
    *,
    base: str | None = None,
    progress: bool = True,
) -> GenerationRecord:
    """Generation `generation` (1-based): every member trains `steps_per_generation` steps, all are
    evaluated on the same held-out problems, then (before the last generation) tournament selection
    and mutation; the population is saved and the generation's record returned. A generation saved
    by an earlier attempt is read back instead."""
    assert spec.pbt is not None
    cfg0 = member_configs(trials, base)[0]
    target = generation_dir(cfg0, parent_run_id, generation)
    if is_saved(target):
        record = GenerationRecord.model_validate(read_record(target))
        _log_generation(record, member_runs, uri)
        return record
    pop = _population(spec, trials, generation, dataset_ref, parent_run_id, base)
    values = [dict(m.values) for m in pop.members]
    logged = [tracking.logged_steps(uri, run_id, STEP_METRIC) for run_id in member_runs]

    def on_step(member: Any, metrics: dict[str, float]) -> None:
        step = int(metrics["step"])
        if step not in logged[member.index]:
            tracking.log_metrics(uri, member_runs[member.index], {k: v for k, v in metrics.items() if k != "step"},
                                 step=step)
            logged[member.index].add(step)

    pop.train(spec.pbt.steps_per_generation, on_step, progress=progress)
    results = pop.evaluate(progress=progress)
    scores = [fitness(r, spec.metric) for r in results]
    parents: list[int] | None = None
    elite: int | None = None
    mutated: list[list[str]] = [[] for _ in pop.members]
    if generation < spec.pbt.generations:
        rng = generation_rng(spec.seed, generation)
        parents, elite = select(scores, spec.pbt.tournament_size, spec.pbt.elitism, rng)
        mutated = pop.evolve(parents, elite if spec.pbt.elitism else None, dict(spec.parameters),
                             spec.pbt.mutation, rng)
    record = GenerationRecord(
        generation=generation, step=pop.members[0].trainer.step_count, values=values, results=results,
        fitness=scores, parents=parents, elite=elite, mutated=mutated, folder=str(target),
    )
    last = generation == spec.pbt.generations
    pop.save(target, record.model_dump(mode="json"), tokenizer=last)
    _log_generation(record, member_runs, uri)
    if last:
        pop.close()
    else:
        POPULATION.put((str(population_dir(cfg0, parent_run_id)), generation), pop)
    return record


def register_best(
    spec: SweepSpec,
    trials: list[Trial],
    record: GenerationRecord,
    dataset_ref: DatasetRef,
    member_runs: list[str],
    uri: str,
    flow_run_id: str | None = None,
    *,
    base: str | None = None,
) -> tuple[int, Registration]:
    """Register the last generation's best member (its adapter at the end of training) as a version
    of the base config's registered model, from its child run -> (member, registration)."""
    best = record.best
    cfg = with_values(member_configs(trials, base)[best], record.values[best])
    folder = Path(record.folder) / member_name(best)
    reg = register_elite(cfg, checkpoint_ref(folder), record.results[best], member_runs[best], uri,
                         flow_run_id, dataset_ref)
    return best, reg


def lineage_rows(trials: list[Trial], records: list[GenerationRecord]) -> list[dict[str, Any]]:
    """One row per member and generation: its values, accuracy, and what it became after selection."""
    rows = []
    for r in records:
        for i, result in enumerate(r.results):
            row: dict[str, Any] = {"generation": r.generation, "member": i, "run_name": trials[i].run_name,
                                   "step": r.step, **r.values[i], "accuracy": result.accuracy,
                                   "fitness": r.fitness[i]}
            if r.parents is not None:
                row["cloned_from"] = r.parents[i] if r.parents[i] != i else None
                row["mutated"] = ",".join(r.mutated[i])
            rows.append(row)
    return rows


def plot_lineage(records: list[GenerationRecord], title: str, metric: str) -> Any:
    """Members x generations coloured by fitness (`metric`), each cell labelled with it; an arrow
    from a clone's parent (generation g) to the slot it filled (generation g + 1)."""
    import numpy as np

    acc = np.array([r.fitness for r in records]).T  # (P, G)
    p, g = acc.shape
    fig = new_figure(max(5.0, 1.3 * g + 2.5), max(3.0, 0.7 * p + 1.5))
    ax = fig.subplots()
    lo, hi = float(acc.min()), float(acc.max())
    image = ax.imshow(acc, cmap="viridis", aspect="auto", vmin=lo, vmax=hi if hi > lo else lo + 1.0)
    fig.colorbar(image, ax=ax, label=metric)
    for j, r in enumerate(records):
        for i in range(p):
            light = image.norm(acc[i, j]) > 0.6  # viridis turns yellow: dark text there
            ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", color="black" if light else "white",
                    fontsize=8)
            if r.parents is not None and r.parents[i] != i and j + 1 < g:
                ax.annotate("", xy=(j + 1 - 0.3, i), xytext=(j + 0.3, r.parents[i]),
                            arrowprops={"arrowstyle": "->", "color": "tab:red", "lw": 1.2})
    ax.set_xticks(range(g), [str(r.generation) for r in records])
    ax.set_yticks(range(p), [member_name(i) for i in range(p)])
    ax.set_xlabel("generation")
    ax.set_title(title)
    return fig


def log_lineage(uri: str, parent_run_id: str, spec: SweepSpec, trials: list[Trial],
                records: list[GenerationRecord]) -> None:
    """The lineage table and plot on the parent run (replaced when logged again)."""
    tracking.log_table(uri, parent_run_id, lineage_rows(trials, records), LINEAGE_TABLE)
    fig = plot_lineage(records, f"PBT {spec.name}: {spec.metric} per member and generation", spec.metric)
    tracking.log_figure(uri, parent_run_id, fig, LINEAGE_PLOT)


def generation_line(record: GenerationRecord) -> str:
    """One log line per generation: fitness, then who was cloned into which slot."""
    scores = " ".join(f"{a:.3f}" for a in record.fitness)
    line = f"generation {record.generation} (step {record.step}): fitness {scores}"
    if record.parents is not None:
        clones = [f"{member_name(i)} <- {member_name(p)}" for i, p in enumerate(record.parents) if p != i]
        line += f"; elite {member_name(record.elite) if record.elite is not None else '-'}"
        line += f"; clones: {', '.join(clones) or 'none'}"
    return line

