"""A hyper-parameter sweep: a base run config, the fields to vary and how, validated up front.

    from grpo.sweep import load_sweep, trial_configs
    spec = load_sweep("configs/sweep-tiny.yaml")     # SweepSpec; one-line ConfigError when it is bad
    for params, cfg in trial_configs(spec):          # ({"train.learning_rate": 0.0003}, RunConfig)
        print(cfg.name, params)                      # tiny-lr-0 {...}, tiny-lr-1 {...}

or on the command line `grpo sweep --config configs/sweep-tiny.yaml` (the `grpo-sweep` flow,
`grpo_pipeline.flows.sweep`; docs/sweeps.md).

A spec names a `base` (a YAML run config, or an inline mapping of its fields) and `parameters`:
dotted run-config fields (`train.learning_rate`) mapped to a list of values, or, with
`strategy: random`, to a range `{low, high, log, type}`. `grid` runs the cartesian product of
the lists in a stable order (the first parameter varies slowest; `trials` caps it); `random`
draws `trials` value sets with a `random.Random(seed)`, so the same spec draws the same trials.
Each trial's config is the base with its values applied, named `<sweep name>-<index>`
(index from 0), and is validated as `grpo run --config BASE --set field=value` would be.

Every mistake (an unknown field, an empty grid, a bad range, a trial config that does not
validate) is a `grpo.errors.ConfigError` of one line naming the field and the fix, raised before
any work. `work_pool` names a Prefect work pool: the flow then submits the trials to its workers
(`max_concurrency` at once; unset = all); without one they run one after another in one process
and `max_concurrency` must be 1.

`strategy: pbt` (population based training, `grpo.pbt`) draws `pbt.population` members as
`random` draws trials; the parameters must be among `PBT_MUTABLE`, and their lists or ranges are
also the bounds of mutation. Pure: no Prefect, no MLflow.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from grpo.config import (
    REGISTRY_NAME,
    RunConfig,
    _StrictLoader,
    _yaml_problem,
    build_config,
    format_validation_error,
)
from grpo.errors import ConfigError

DEFAULT_METRIC = "eval/accuracy"
"""The metric a sweep maximises by default: held-out greedy accuracy, logged at each round's end."""
FIXED_FIELDS = {
    "name": "each trial is named <sweep name>-<index>; set the sweep's `name` instead",
    "pipeline.experiment": "every trial logs to the sweep's experiment; set it in `base`",
    "pipeline.tracking_uri": "every trial logs to the sweep's MLflow store; set it in `base`",
    "pipeline.registered_model": "every trial registers into one model so that the best can be promoted; "
    "set it in `base`",
}
"""Run-config fields a sweep cannot vary, and why."""
PBT_MUTABLE = ("train.learning_rate", "train.beta", "generation.temperature", "train.epsilon_high",
               "train.group_size")
"""The fields population based training may draw and mutate (one optimizer and engine per member
take them between generations)."""


class MutationSpec(BaseModel):
    """How a clone's hyper-parameters are perturbed (`strategy: pbt`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    probability: float = Field(0.5, ge=0, le=1, description="Chance that each listed field is perturbed.")
    sd: float = Field(
        0.2, gt=0,
        description="Size of a perturbation: a log range is multiplied by exp(sd * z), a linear range moves "
        "by sd * (high - low) * z (z standard normal), clipped to the range; a list moves to a neighbour.",
    )


class PBTSpec(BaseModel):
    """Population based training (`strategy: pbt`): the population and its evolution."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    population: int = Field(4, ge=2, description="Members: one LoRA adapter, optimizer and set of values each.")
    generations: int = Field(4, ge=1, description="Generations: train, evaluate, select, mutate.")
    steps_per_generation: int = Field(10, ge=1, description="GRPO steps each member trains per generation.")
    tournament_size: int = Field(2, ge=1, description="Members drawn per tournament; the best of them is cloned.")
    elitism: bool = Field(True, description="The best member is kept unchanged (not replaced, not mutated).")
    mutation: MutationSpec = Field(default_factory=MutationSpec)

    @model_validator(mode="after")
    def _check(self) -> PBTSpec:
        if self.tournament_size > self.population:
            raise ValueError(
                f"tournament_size {self.tournament_size} exceeds population {self.population}; lower it"
            )
        return self


class RangeSpec(BaseModel):
    """A range to draw from (`strategy: random` only): uniform in [low, high], or log-uniform."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    low: float = Field(description="Lowest value (inclusive).")
    high: float = Field(description="Highest value (inclusive for type int).")
    log: bool = Field(False, description="Draw uniformly in log space (low must be > 0).")
    type: Literal["float", "int"] = Field("float", description="float, or int (whole numbers).")

    @model_validator(mode="after")
    def _check(self) -> RangeSpec:
        if self.low >= self.high:
            raise ValueError(f"low {self.low:g} must be below high {self.high:g}; swap or widen them")
        if self.log and self.low <= 0:
            raise ValueError(f"log needs low > 0 (low is {self.low:g}); raise low or set log: false")
        if self.type == "int" and not (self.low.is_integer() and self.high.is_integer()):
            raise ValueError(f"type int needs whole-number low and high (got {self.low:g}, {self.high:g})")
        return self

    def draw(self, rng: random.Random) -> float | int:
        """One value: uniform (or log-uniform) in [low, high]; an int range includes high."""
        if self.type == "int":
            lo, hi = int(self.low), int(self.high)
            if not self.log:
                return rng.randint(lo, hi)
            return max(lo, min(hi, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))))
        if self.log:  # clamped: exp(log(x)) may land an ulp outside
            return min(self.high, max(self.low, math.exp(rng.uniform(math.log(self.low), math.log(self.high)))))
        return rng.uniform(self.low, self.high)


class SweepSpec(BaseModel):
    """A sweep over run-config fields: the `grpo-sweep` flow's parameter (a form in the Prefect UI)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(description="Sweep name: the parent MLflow run's name; trial i is run `<name>-<i>`.")
    base: str | dict[str, Any] = Field(
        default_factory=dict,
        description="The run config the trials start from: a YAML file (like `grpo run --config`; a "
        "relative path is read from the current folder) or an inline mapping of run-config fields; "
        "{} = the embedded default. The swept values are applied on top.",
    )
    strategy: Literal["grid", "random", "pbt"] = Field(
        "grid", description="grid: every combination of the lists; random: `trials` seeded draws; pbt: "
        "population based training (the `pbt` section; parameters among " + ", ".join(PBT_MUTABLE) + ").",
    )
    parameters: dict[str, list[Any] | RangeSpec] = Field(
        description="Dotted run-config field -> list of values (grid, random) or, with strategy random, "
        "a range {low, high, log, type}. Example: {'train.learning_rate': [0.0001, 0.0003]}. pbt: the "
        "initial draws, and the bounds of mutation.",
    )
    trials: int | None = Field(
        None, ge=1, description="random: how many trials (required); grid: run at most this many."
    )
    work_pool: str | None = Field(
        None, min_length=1,
        description="A Prefect work pool (on a Prefect server): each trial is a grpo-finetune deployment run "
        "on it, so as many run at once as its workers take. None: trials run one after another in this process.",
    )
    max_concurrency: int | None = Field(
        None, ge=1,
        description="Most trials submitted to the work pool at once (None = all); without work_pool only 1.",
    )
    metric: str = Field(
        DEFAULT_METRIC, min_length=1,
        description="MLflow metric of the trial runs to maximise (best value over the run's evaluations).",
    )
    seed: int = Field(0, description="Seed of the random draws.")
    promote: bool = Field(
        True, description="Run the promote flow for the best trial's best version (through its normal gate)."
    )
    pbt: PBTSpec | None = Field(
        None, description="strategy pbt: population, generations, steps per generation, selection and mutation."
    )

    @model_validator(mode="before")
    @classmethod
    def _check_input(cls, data: Any) -> Any:
        """Normalise `parameters` (one message per mistake)."""
        if not isinstance(data, dict):
            return data
        strategy = data.get("strategy", "grid")
        params = data.get("parameters")
        if isinstance(params, dict):
            data = {**data, "parameters": {
                str(k): _parameter(str(k), v, strategy) for k, v in params.items()
            }}
        return data

    @field_validator("name")
    @classmethod
    def _usable_name(cls, v: str) -> str:
        if not REGISTRY_NAME.fullmatch(v):
            raise ValueError(f"{v!r} is not a usable run name; use letters, digits, '.', '-' and '_'")
        return v

    @field_validator("parameters")
    @classmethod
    def _some(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not v:
            raise ValueError("no field to sweep; map at least one run-config field to its values")
        return v

    @model_validator(mode="after")
    def _trials(self) -> SweepSpec:
        if self.strategy == "random" and self.trials is None:
            raise ValueError("trials: strategy random needs the number of trials to draw, e.g. trials: 8")
        if self.strategy == "pbt":
            if self.trials is not None:
                raise ValueError("trials: strategy pbt trains pbt.population members; remove trials")
            if self.work_pool is not None:
                raise ValueError("work_pool: a population trains in one process (one base model); remove work_pool")
            for field in self.parameters:
                if field not in PBT_MUTABLE:
                    raise ValueError(
                        f"parameters.{field}: strategy pbt mutates only {', '.join(PBT_MUTABLE)}; "
                        "set other fields in base"
                    )
            if self.pbt is None:
                self.pbt = PBTSpec()
        elif self.pbt is not None:
            raise ValueError(f"pbt: only strategy pbt reads it (strategy is {self.strategy}); remove it")
        if self.work_pool is None and (self.max_concurrency or 1) > 1:
            raise ValueError(
                f"max_concurrency: {self.max_concurrency} trials at once need a work pool (without one, trials "
                "run one after another in this process); name a Prefect work pool in work_pool, or set "
                "max_concurrency: 1"
            )
        return self


def _parameter(field: str, value: Any, strategy: Any) -> list[Any] | RangeSpec:
    """A swept field's values, checked: the field exists in RunConfig and is not fixed by the sweep,
    a list is not empty, a range is valid and only used with strategy random."""
    where = f"parameters.{field}"
    check_field(field)
    if isinstance(value, RangeSpec):
        value = value.model_dump()
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{where}: the grid is empty; give at least one value, e.g. [0.0001, 0.0003]")
        return list(value)
    if isinstance(value, dict):
        if strategy not in ("random", "pbt"):
            raise ValueError(
                f"{where}: a range {{low, high}} needs strategy: random or pbt; for a grid list the values"
            )
        try:
            return RangeSpec.model_validate(value)
        except ValidationError as e:
            raise ValueError(f"{where}: {_range_problem(e)}") from None
    raise ValueError(
        f"{where}: {value!r} is neither a list of values nor a range; write [{value!r}] "
        "(or, with strategy random, {low: ..., high: ...})"
    )


def _range_problem(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key; a range has low, high, log and type"
    elif first["type"] == "missing":
        msg = "required, e.g. {low: 0.0001, high: 0.001, log: true}"
    return f"{loc}: {msg}" if loc else msg


def _section(annotation: Any) -> type[BaseModel] | None:
    """The config section class an annotation holds (`X` or `X | None`), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            if (found := _section(arg)) is not None:
                return found
    return None


def _is_mapping(annotation: Any) -> bool:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_is_mapping(a) for a in typing.get_args(annotation))
    return annotation is dict or typing.get_origin(annotation) is dict


def check_field(field: str) -> None:
    """`ValueError` (one line) unless `field` is a dotted field of `RunConfig` a sweep may vary.
    A key under a free-form mapping (e.g. `task.params.num_count`) counts as a field."""
    where = f"parameters.{field}"
    if field in FIXED_FIELDS:
        raise ValueError(f"{where}: a sweep cannot vary it: {FIXED_FIELDS[field]}")
    model: type[BaseModel] = RunConfig
    parts = field.split(".")
    for i, part in enumerate(parts):
        here = ".".join(parts[:i]) or "the run config"
        info = model.model_fields.get(part)
        if info is None:
            known = ", ".join(model.model_fields)
            raise ValueError(
                f"{where}: {here} has no field {part!r} (fields: {known}); check the spelling against "
                "configs/tiny-cpu.yaml"
            )
        sub = _section(info.annotation)
        last = i == len(parts) - 1
        if sub is None and not last:
            if _is_mapping(info.annotation):
                return
            raise ValueError(f"{where}: {'.'.join(parts[: i + 1])} is a value, not a section; sweep it directly")
        if sub is not None:
            model = sub


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    """Set the dotted field `dotted` (`train.learning_rate`) of a nested mapping to a copy of `value`."""
    cur = d
    for part in dotted.split(".")[:-1]:
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[part] = nxt
        cur = nxt
    cur[dotted.rsplit(".", 1)[-1]] = copy.deepcopy(value)


def _get_dotted(d: dict[str, Any], dotted: str, default: Any) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


def _problem(e: ValidationError) -> str:
    """One line for a spec that does not validate, with the sweep's own hints."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            *keys, last = SweepSpec.model_fields
            msg = f"unknown key; a sweep has {', '.join(keys)} and {last}"
        elif err["type"] == "missing":
            msg = "required"
        elif err["type"] == "literal_error" and loc == "strategy":
            msg = f"{err['input']!r} is not a strategy; use grid, random or pbt"
        elif loc.startswith("parameters."):  # a union member's noise: the normalised value is checked above
            continue
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(dict.fromkeys(parts)) or format_validation_error(e)


def build_sweep(data: dict[str, Any]) -> SweepSpec:
    """Validate a spec mapping; a `ConfigError` of one line names the first bad field and the fix.
    Trial configs are checked too (`trial_configs`), so a valid spec's trials all validate."""
    if not isinstance(data, dict):
        raise ConfigError("invalid sweep: the spec must be a mapping (name, base, strategy, parameters, ...)")
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid sweep: {_problem(e)}") from None
    trial_configs(spec)
    return spec


def _read_yaml(path: str | Path, what: str) -> Any:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} not found; pass an existing YAML file")
    try:
        return yaml.load(p.read_text(), Loader=_StrictLoader)
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {str(p)!r} is not text; pass a YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {str(p)!r} is not valid YAML: {_yaml_problem(e)}") from None


def load_sweep(path: str | Path) -> SweepSpec:
    """Read a sweep spec from YAML (a key given twice is an error) and validate it with its trials."""
    data = _read_yaml(path, "sweep file")
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {str(path)!r} must hold a mapping (name, base, strategy, parameters, ...)")
    return build_sweep(data)


def base_mapping(spec: SweepSpec) -> dict[str, Any]:
    """The base run config as a mapping of fields: the YAML file `spec.base` names, or the inline one."""
    if isinstance(spec.base, dict):
        return copy.deepcopy(spec.base)
    data = _read_yaml(spec.base, "base: config file") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"base: config file {spec.base!r} must hold a mapping of sections")
    return data


def base_config(spec: SweepSpec) -> RunConfig:
    """The base run config, validated (its experiment and MLflow store are the sweep's)."""
    data = base_mapping(spec)
    try:
        return build_config(data)
    except ConfigError as e:
        raise ConfigError(f"base: {e}") from None


def draws(spec: SweepSpec) -> list[dict[str, Any]]:
    """The swept values of each trial, in order: the grid's cartesian product (the first parameter
    varies slowest; capped at `trials`), or `trials` (pbt: `pbt.population`) draws of
    `random.Random(seed)` (a list: one of its values; a range: a value in it), parameters drawn in
    the spec's order."""
    names = list(spec.parameters)
    if spec.strategy == "grid":
        lists = [typing.cast(list[Any], spec.parameters[n]) for n in names]
        combos = itertools.product(*lists)
        if spec.trials is not None:
            combos = itertools.islice(combos, spec.trials)
        return [dict(zip(names, combo)) for combo in combos]
    rng = random.Random(spec.seed)
    out = []
    count = spec.pbt.population if spec.pbt is not None else typing.cast(int, spec.trials)
    for _ in range(count):
        values = {}
        for n in names:
            p = spec.parameters[n]
            values[n] = p.draw(rng) if isinstance(p, RangeSpec) else rng.choice(p)
        out.append(values)
    return out


def trial_name(spec: SweepSpec, index: int) -> str:
    """MLflow run name (and `RunConfig.name`) of trial `index`."""
    return f"{spec.name}-{index}"


def trial_configs(spec: SweepSpec) -> list[tuple[dict[str, Any], RunConfig]]:
    """(swept values, full run config) per trial, in trial order; the values are read back from the
    validated config (a YAML string '1e-4' becomes the float the run uses).

    Raises a one-line `ConfigError` when the base or a trial config does not validate, or when the
    trials would log to different experiments or stores (a swept `task.name` derives its own)."""
    base = base_mapping(spec)
    first = base_config(spec)
    out = []
    for i, values in enumerate(draws(spec)):
        data = copy.deepcopy(base)
        for field, value in values.items():
            set_dotted(data, field, value)
        data["name"] = trial_name(spec, i)
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
        try:
            cfg = build_config(data)
        except ConfigError as e:
            raise ConfigError(
                f"invalid sweep: trial {i} ({shown}): {str(e).removeprefix('invalid config: ')}; "
                "change the values in parameters or the base config"
            ) from None
        for key in ("experiment", "tracking_uri", "registered_model"):
            if getattr(cfg.pipeline, key) != getattr(first.pipeline, key):
                raise ConfigError(
                    f"invalid sweep: trial {i} ({shown}) has pipeline.{key} {getattr(cfg.pipeline, key)!r}, "
                    f"the base {getattr(first.pipeline, key)!r}; set pipeline.{key} in base so every trial "
                    "uses the same one"
                )
        dumped = cfg.model_dump(mode="json")
        out.append(({k: _get_dotted(dumped, k, v) for k, v in values.items()}, cfg))
    return out
