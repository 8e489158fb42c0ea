"""Population based training: P members share one base model in one process, each with its own
LoRA adapter (a peft named adapter), optimizer, scheduler and hyper-parameters.

    from grpo.pbt import Population, generation_rng, select
    pop = Population.create(cfgs, values, rows, test_rows, total_steps=G * K)   # member-0 .. member-P-1
    for g in range(1, G + 1):
        pop.train(K)                                   # every member K GRPO steps, its own settings
        results = pop.evaluate()                       # the same held-out problems for all
        rng = generation_rng(seed, g)                  # selection, then mutation, draw from it
        parents, elite = select([r.accuracy for r in results], tournament_size, elitism, rng)
        pop.evolve(parents, elite, parameters, mutation, rng)   # clones (adapter AND optimizer), mutations
        pop.save(folder / f"gen-{g:03d}", record)      # the whole population, atomically

One generation: every member trains K steps, all are evaluated on the same held-out problems
(the fitness is one metric of that evaluation, by default greedy accuracy), then tournament
selection with elitism (as AgileRL's
`TournamentSelection`): the best member is kept as it is (`elitism`), and every other slot takes
a copy of the winner of a tournament of `tournament_size` members drawn at random (the winner may
be the slot's own member). A copy is the winner's adapter weights, optimizer and scheduler states,
trainer counters and hyper-parameters, taken before any slot is overwritten; each copied slot's
listed hyper-parameters are then perturbed (`mutate`). Selection and mutation draw from
`numpy.random.default_rng([seed, generation])`, so a resumed generation draws the same.

The members share one engine (`grpo.engines`): before a member samples or is evaluated its adapter
becomes the active one, the engine follows it (`sync`) and samples with the member's generation
settings. A checkpoint of the population (`save`/`load`) is one folder per generation with one
ordinary checkpoint per member (`grpo.checkpoint`, `adapter=<member>`: loadable with
`PeftModel.from_pretrained`) and `population.json` (values, fitness, parents, mutations),
written into a temporary folder and renamed into place, COMPLETE last.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from grpo.checkpoint import load_checkpoint, save_checkpoint
from grpo.config import RunConfig, format_validation_error
from grpo.errors import ConfigError
from grpo.evaluate import EvalResult
from grpo.sweep import MutationSpec, RangeSpec, set_dotted

POPULATION_JSON = "population.json"
MEMBER_VALUES = "member_values"
"""Key of `population.json`: each member's hyper-parameters after the generation (after mutation)."""
COMPLETE = "COMPLETE"


def member_name(index: int) -> str:
    """The adapter name (and checkpoint folder) of member `index`."""
    return f"member-{index}"


def generation_rng(seed: int, generation: int) -> np.random.Generator:
    """The draws of selection and mutation at the end of `generation` (1-based)."""
    return np.random.default_rng([seed, generation])


# ----------------------------------------------------------------------------- selection, mutation


def ranks(fitness: Sequence[float]) -> list[int]:
    """Rank of each member, 0 = worst; ties rank the lower index higher (it came first)."""
    order = sorted(range(len(fitness)), key=lambda i: (fitness[i], -i))
    out = [0] * len(fitness)
    for r, i in enumerate(order):
        out[i] = r
    return out


def select(
    fitness: Sequence[float], tournament_size: int, elitism: bool, rng: np.random.Generator
) -> tuple[list[int], int]:
    """Tournament selection with elitism -> (parents, elite): slot i becomes a copy of member
    `parents[i]` (itself when it survives), `elite` is the best member (kept unchanged with
    `elitism`). Each tournament draws `tournament_size` members with replacement; the best wins."""
    rank = ranks(fitness)
    elite = max(range(len(fitness)), key=lambda i: rank[i])
    parents = []
    for slot in range(len(fitness)):
        if elitism and slot == elite:
            parents.append(elite)
            continue
        drawn = rng.integers(0, len(fitness), size=tournament_size)
        parents.append(int(max(drawn, key=lambda i: rank[int(i)])))
    return parents, elite


def _perturb(value: Any, bounds: list[Any] | RangeSpec, sd: float, rng: np.random.Generator) -> Any:
    if isinstance(bounds, RangeSpec):
        z = float(rng.standard_normal())
        if bounds.log:
            new = float(value) * math.exp(sd * z)
        else:
            new = float(value) + sd * (bounds.high - bounds.low) * z
        new = min(bounds.high, max(bounds.low, new))
        return int(round(new)) if bounds.type == "int" else new
    values = list(bounds)
    here = min(range(len(values)), key=lambda i: abs(float(values[i]) - float(value)))
    step = 1 if rng.random() < 0.5 else -1
    return values[min(len(values) - 1, max(0, here + step))]


def mutate(
    values: dict[str, Any], parameters: dict[str, list[Any] | RangeSpec], mutation: MutationSpec,
    rng: np.random.Generator,
) -> tuple[dict[str, Any], list[str]]:
    """Each listed field perturbed with probability `mutation.probability` -> (new values, the
    fields drawn for a perturbation). A log range multiplies by exp(sd * z), a linear range adds
    sd * (high - low) * z, both clipped to the range (an int range rounds); a list moves to a
    neighbouring value. Fields are visited in the spec's order; one uniform draw each, then the
    perturbation's draws."""
    out = dict(values)
    changed = []
    for name, bounds in parameters.items():
        if rng.random() >= mutation.probability:
            continue
        out[name] = _perturb(out[name], bounds, mutation.sd, rng)
        changed.append(name)
    return out, changed


def with_values(cfg: RunConfig, values: dict[str, Any]) -> RunConfig:
    """`cfg` with dotted fields set to `values`, validated (a value the config refuses is one
    `ConfigError` line naming it)."""
    data = cfg.model_dump(mode="json")
    for dotted, value in values.items():
        set_dotted(data, dotted, value)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
        raise ConfigError(f"pbt: the values {shown} give an invalid run config: {format_validation_error(e)}") from None


def set_learning_rate(optimizer: torch.optim.Optimizer, scheduler: Any, lr: float) -> None:
    """Change the base learning rate of an optimizer and its LambdaLR schedule in place: the
    current rate becomes lr times the schedule's factor at its current step."""
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


# ----------------------------------------------------------------------------- the population


@dataclass
class Member:
    """One member: its adapter's name, hyper-parameters, run config and trainer (optimizer, scheduler,
    counters)."""

    index: int
    values: dict[str, Any]
    cfg: RunConfig
    trainer: Any  # grpo.trainer.GRPOTrainer

    @property
    def name(self) -> str:
        return member_name(self.index)


@dataclass
class _Copy:
    """A member's state taken before selection overwrites any slot."""

    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    counters: dict[str, Any]
    values: dict[str, Any]


@dataclass
class Population:
    """P members on one peft model (adapters member-0 .. member-P-1) with one shared engine."""

    model: Any
    tokenizer: Any
    engine: Any
    members: list[Member]
    test_rows: Any

    @classmethod
    def create(
        cls, cfgs: Sequence[RunConfig], values: Sequence[dict[str, Any]], rows: Any, test_rows: Any, *,
        total_steps: int,
    ) -> Population:
        """Load the base once and give it one fresh adapter per member (all initialised from the
        first config's train.seed, as an independent run with that seed would be)."""
        from grpo.engines import make_engine
        from grpo.models import add_lora, attach_lora, ensure_model_for, load_base_model, load_tokenizer
        from grpo.trainer import GRPOTrainer, seed_everything

        first = cfgs[0]
        seed_everything(first.train.seed)
        tokenizer = load_tokenizer(ensure_model_for(first), first.model.revision)
        model = attach_lora(load_base_model(first.model), first.lora, seed=first.train.seed, adapter=member_name(0))
        for i in range(1, len(cfgs)):
            add_lora(model, first.lora, member_name(i), seed=first.train.seed)
        engine = make_engine(model, tokenizer, first)
        members = []
        for i, (cfg, vals) in enumerate(zip(cfgs, values)):
            model.set_adapter(member_name(i))  # only this adapter requires grad: the optimizer's parameters
            trainer = GRPOTrainer(cfg, model, tokenizer, rows, engine=engine, total_steps=total_steps)
            members.append(Member(i, dict(vals), cfg, trainer))
        return cls(model, tokenizer, engine, members, test_rows)

    # -- one member at a time -------------------------------------------------------------------

    def activate(self, member: Member) -> None:
        """Make `member` the policy: its adapter active (and alone trainable), the engine following
        its weights and sampling with its generation settings."""
        self.model.set_adapter(member.name)
        self.engine.gen = member.cfg.generation
        self.engine.sync(self.model)

    def train(
        self, steps: int, on_step: Callable[[Member, dict[str, float]], None] | None = None, progress: bool = True,
    ) -> None:
        """Every member trains `steps` GRPO steps with its own settings, one member after another."""
        for m in self.members:
            self.activate(m)
            m.trainer.train(steps, on_step=(lambda metrics, m=m: on_step(m, metrics)) if on_step else None,
                            progress=progress)

    def evaluate(self, progress: bool = True) -> list[EvalResult]:
        """Every member's held-out evaluation on the same problems (the first `eval.num_problems`)."""
        from grpo.evaluate import evaluate

        results = []
        for m in self.members:
            self.activate(m)
            results.append(evaluate(self.model, self.tokenizer, self.test_rows, m.cfg, engine=self.engine,
                                    env=m.trainer.env, reward_fns=m.trainer.reward_fns,
                                    step=m.trainer.step_count, progress=progress))
        return results

    # -- selection ------------------------------------------------------------------------------

    def snapshot(self, member: Member) -> _Copy:
        """A deep copy of what a clone takes from `member`."""
        from peft import get_peft_model_state_dict

        t = member.trainer
        weights = get_peft_model_state_dict(self.model, adapter_name=member.name)
        adapter = {k: v.detach().clone() for k, v in weights.items()}
        return _Copy(adapter, copy.deepcopy(t.optimizer.state_dict()), copy.deepcopy(t.scheduler.state_dict()),
                     t.state(), dict(member.values))

    def restore(self, member: Member, state: _Copy, values: dict[str, Any]) -> None:
        """`member` becomes the copy `state` (adapter, optimizer, scheduler, counters), with `values`
        as its hyper-parameters."""
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, state.adapter, adapter_name=member.name)
        t = member.trainer
        t.optimizer.load_state_dict(copy.deepcopy(state.optimizer))
        t.scheduler.load_state_dict(copy.deepcopy(state.scheduler))
        t.step_count = int(state.counters["step"])
        t.position = int(state.counters["data_position"])
        self.set_values(member, values)

    def set_values(self, member: Member, values: dict[str, Any]) -> None:
        """New hyper-parameters for `member`: its run config, and the optimizer's learning rate."""
        member.values = dict(values)
        member.cfg = with_values(member.cfg, values)
        member.trainer.cfg = member.cfg
        t = member.cfg.train
        set_learning_rate(member.trainer.optimizer, member.trainer.scheduler, t.learning_rate)

    def evolve(
        self, parents: Sequence[int], elite: int | None, parameters: dict[str, list[Any] | RangeSpec],
        mutation: MutationSpec, rng: np.random.Generator,
    ) -> list[list[str]]:
        """Slot i takes a copy of member parents[i] (all copies taken first), then every slot but the
        elite is mutated -> the fields perturbed per slot."""
        copies = {p: self.snapshot(self.members[p]) for p in sorted(set(parents))}
        changed = []
        for slot, (member, parent) in enumerate(zip(self.members, parents)):
            state = copies[parent]
            if slot == elite:
                new_values, fields = dict(state.values), []
            else:
                new_values, fields = mutate(state.values, parameters, mutation, rng)
            if parent != slot:
                self.restore(member, state, new_values)
            elif new_values != member.values:
                self.set_values(member, new_values)
            changed.append(fields)
        return changed

    # -- persistence ----------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike[str], record: dict[str, Any], *, tokenizer: bool = False) -> Path:
        """The whole population after generation `record["generation"]` into `folder`, atomically:
        one checkpoint per member (adapter, optimizer, scheduler, counters, values) and
        `population.json` (`record` plus every member's values as `member_values`), COMPLETE last."""
        target = Path(folder).absolute()
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            for m in self.members:
                t = m.trainer
                state = {**t.state(), "round": int(record["generation"]) - 1, "generation": record["generation"],
                         "member": m.index, "values": m.values}
                save_checkpoint(tmp / m.name, model=self.model, tokenizer=self.tokenizer if tokenizer else None,
                                optimizer=t.optimizer, scheduler=t.scheduler, state=state, adapter=m.name)
            data = {**record, MEMBER_VALUES: [m.values for m in self.members]}
            (tmp / POPULATION_JSON).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            (tmp / COMPLETE).write_text("population\n")
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def load(self, folder: str | os.PathLike[str]) -> dict[str, Any]:
        """Take the population saved in `folder` (members, values, counters) and return its record."""
        p = Path(folder)
        record = read_record(p)
        for m, values in zip(self.members, record[MEMBER_VALUES]):
            t = m.trainer
            state = load_checkpoint(p / m.name, model=self.model, optimizer=t.optimizer, scheduler=t.scheduler,
                                    restore_rng_state=False, adapter=m.name)
            t.step_count = int(state["step"])
            t.position = int(state["data_position"])
            self.set_values(m, values)
        return record

    def close(self) -> None:
        self.engine.close()


def is_saved(folder: str | os.PathLike[str]) -> bool:
    """Whether `folder` holds a complete saved population."""
    return (Path(folder) / COMPLETE).is_file()


def read_record(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The `population.json` of a complete saved population."""
    p = Path(folder)
    if not is_saved(p):
        raise ConfigError(f"population {p}: not a complete saved population (no {COMPLETE}); remove the folder")
    return json.loads((p / POPULATION_JSON).read_text())
