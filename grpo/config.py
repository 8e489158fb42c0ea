"""One validated configuration per run: pydantic models, YAML recipes and `key=value` overrides.

The defaults of `RunConfig` are the embedded default run (tiny model, CPU, offline), which
`configs/tiny-cpu.yaml` spells out; `configs/qwen2.5-0.5b-countdown.yaml` is the reference recipe.
`RunConfig` is also the parameter of the finetune flow, so the Prefect UI shows it as a form.

    from grpo.config import load_config
    cfg = load_config("configs/tiny-cpu.yaml", ["train.group_size=4", "pipeline.rounds=1"])

Every bad value fails here, before any work, with one line that names the field and the fix.
"""

from __future__ import annotations

import logging
import re
import string
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from grpo.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_TINY_PATH = "artifacts/tiny-model"
"""Where the tiny offline model of Countdown is built (other tasks: `<this>-<task>`)."""
_COUNTDOWN_SHAPE = ("num_count", "number_range", "target_range")
REGISTRY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""Registered model names and aliases: safe in MLflow filter strings and model URIs."""
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]

REFERENCE_SYSTEM = (
    "You are a helpful assistant. You first think about the reasoning process in your mind "
    "and then provide the user with the answer."
)
REFERENCE_PREFILL = "Let me solve this step by step.\n<think>"


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, and every
    float (list items included) must be finite: an `inf` learning rate or a `nan` reward weight
    would train a NaN adapter."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: Any) -> Any:
        """`group_size: true` is a mistake, not 1: a bool is refused where a number is expected."""
        if isinstance(value, bool) and _wants_number(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


def _wants_number(annotation: Any) -> bool:
    """Whether a field's annotation is int or float (optionally | None), and not bool."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_wants_number(a) for a in typing.get_args(annotation))
    return annotation in (int, float)


class TinyModelConfig(Section):
    """Shape of the tiny Qwen2-architecture model built offline when the base model is missing."""

    hidden_size: int = Field(128, ge=8, description="Model width.")
    num_layers: int = Field(4, ge=1, description="Decoder layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads.")
    num_kv_heads: int = Field(2, ge=1, description="Key/value heads (grouped-query attention).")
    intermediate_size: int = Field(384, ge=8, description="Feed-forward width.")
    seed: int = Field(0, description="Seed of the random weights and of the tokenizer corpus.")

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} must be divisible by num_kv_heads {self.num_kv_heads}"
            )
        return self


class ModelConfig(Section):
    """The base model: a hub id or a local Hugging Face folder."""

    name_or_path: str | None = Field(
        None,
        min_length=1,
        description="Hub id (e.g. Qwen/Qwen2.5-0.5B) or local folder; None = the tiny model of the task, "
        "artifacts/tiny-model (countdown) or artifacts/tiny-model-<task>.",
    )
    build_tiny_if_missing: bool = Field(
        True, description="Build the tiny offline model at `name_or_path` when that folder is missing."
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype; bfloat16 on GPU, float32 on CPU (float16: not for training)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda if available.")


class LoraConfig(Section):
    """The LoRA adapter that GRPO trains; the base weights stay frozen."""

    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(64, ge=1, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_TARGETS), description="Projection modules to adapt."
    )


class TaskConfig(Section):
    """The environment: what a row is, its prompt fields, rewards and answer check (`grpo.envs`)."""

    name: str = Field(
        "countdown",
        description="countdown | reasoning_gym:<dataset> (e.g. reasoning_gym:chain_sum) | dataset "
        "(your rows from data.source; see task.params)",
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to the environment: countdown {num_count, number_range, target_range}; "
        "reasoning_gym: arguments of reasoning_gym.create_dataset; dataset {prompt, answer_column, match}.",
    )

    @model_validator(mode="after")
    def _known(self) -> TaskConfig:
        from grpo.envs import get_env

        try:
            get_env(self.name, **self.params)
        except ConfigError as e:
            raise ValueError(str(e).removeprefix("task.name: ").removeprefix("task.params: ")) from None
        return self


class Conversation(Section):
    """The prompt: chat messages rendered with the tokenizer's chat template.

    `user` is a template whose `{column}` placeholders are filled from the row (None = the
    environment's default; each environment's module lists the fields it offers). The assistant
    prefill ends with `<think>` and the model continues it (`continue_final_message`), so a
    completion is the text after `<think>`.
    """

    system: str | None = Field(None, description="System message; None omits it.")
    user: str | None = Field(None, description="User message template; None = the task's default.")
    assistant_prefill: str = Field("<think>", description="Assistant prefill, ending in <think>.")

    @model_validator(mode="after")
    def _check(self) -> Conversation:
        if self.user is not None:
            try:
                list(string.Formatter().parse(self.user))
            except ValueError as e:
                raise ValueError(
                    f"user template is not a valid format string ({e}); double the braces of literal ones"
                ) from None
        if not self.assistant_prefill.endswith("<think>"):
            raise ValueError(
                "assistant_prefill must end with '<think>' (completions are scored as "
                "'<think>' + completion)"
            )
        return self


class DataConfig(Section):
    """Where the task's rows come from and how they are split."""

    source: str = Field(
        "generate",
        description="'generate' (the task generates rows offline: countdown, reasoning_gym), a local "
        ".parquet/.jsonl/.json/.csv file, or a Hugging Face dataset id.",
    )
    generate_rows: int = Field(6000, ge=10, description="Rows to generate when source=generate.")
    num_rows: int | None = Field(
        None, ge=2, description="Rows kept after shuffling (None = all), as the recipe's select(n)."
    )
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Held-out fraction.")
    seed: int = Field(42, description="Seed of generation, shuffle and split.")
    conversation: Conversation = Field(default_factory=Conversation)
    cache_dir: str = Field("artifacts/data", description="Prepared splits, cached by their inputs.")


class VLLMConfig(Section):
    """Options of the vLLM backend (GPU only; the `vllm` extra)."""

    max_num_seqs: int | None = Field(
        None, ge=1,
        description="Concurrent sequences in the engine; None = a whole step's B*G completions (and at "
        "least eval.batch_size), so that a step's generation runs in one wave.",
    )
    gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0, description="Share of GPU memory.")
    kv_cache_memory_bytes: int | Literal["auto"] | None = Field(
        None,
        description="KV cache size in bytes instead of a share of the GPU (vLLM then ignores "
        "gpu_memory_utilization for it); auto = what max_num_seqs sequences of max_model_len tokens need.",
    )
    max_model_len: int = Field(1024, ge=16, description="Prompt + completion tokens.")
    sleep_mode: bool = Field(True, description="Sleep the engine during training to free memory.")


class GenerationConfig(Section):
    """Sampling of completions during training."""

    backend: Literal["transformers", "vllm"] = Field("transformers", description="Generator.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature (also scales log-probs).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling; 1.0 = off.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 = off.")
    max_new_tokens: int = Field(48, ge=1, description="Completion length limit.")
    min_new_tokens: int = Field(
        0, ge=0, description="Stop tokens are suppressed until this many tokens (benchmarks: all)."
    )
    sampler: Literal["inverse_cdf", "multinomial"] = Field(
        "inverse_cdf",
        description="How a token is drawn from the filtered softmax: inverse_cdf (one uniform per "
        "row; fast on CPU) or multinomial (torch.multinomial). Same distribution.",
    )
    fast_path: bool | None = Field(
        None,
        description="Take the cpu_fast engine (grpo.engines.cpu_fast) when the model is a Qwen2 it covers "
        "(+LoRA): None = on the CPU only (on CUDA it has not been checked on a GPU yet); true = on CUDA "
        "too; false = never (the hf engine).",
    )
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)


class ImportanceSamplingConfig(Section):
    """Correction for the sampler (vLLM) not being exactly the trained policy (different kernels,
    bfloat16): each token's surrogate is weighted by exp(trainer - sampler log-prob), capped."""

    enabled: bool | None = Field(
        None, description="None = on with generation.backend=vllm (as TRL), off where the trainer itself samples."
    )
    level: Literal["token", "sequence"] = Field("sequence", description="Ratio per token, or per sequence (mean).")
    mode: Literal["truncate", "mask"] = Field(
        "mask", description="Above the cap: truncate to it (TIS) or mask the token/sequence out (TRL's default)."
    )
    cap: float = Field(3.0, gt=1.0, description="The largest weight kept.")


class DynamicSamplingConfig(Section):
    """DAPO's dynamic sampling: groups whose rewards all agree teach nothing (zero advantages); they are
    dropped and more prompts are sampled until the step has B informative groups."""

    enabled: bool = Field(False, description="Drop zero-variance groups and refill the batch.")
    max_generation_batches: int = Field(
        3, ge=1, description="Generation batches of B prompts per step at most; then train on what there is."
    )


class OverlongConfig(Section):
    """DAPO's soft overlong punishment, the reward `overlong` (add it to train.rewards): 0 up to
    max_new_tokens - buffer tokens, then linear down to -penalty at max_new_tokens."""

    buffer: int | None = Field(
        None, ge=1, description="Tokens before max_new_tokens where the penalty ramps; None = max_new_tokens // 4."
    )
    penalty: float = Field(1.0, gt=0.0, description="The penalty at max_new_tokens.")


class TrainConfig(Section):
    """The GRPO update."""

    prompts_per_step: int = Field(16, ge=1, description="B: prompts per step.")
    group_size: int = Field(8, description="G: completions per prompt (>= 2).")
    micro_batch_size: int = Field(
        32, ge=1, description="Sequences per forward/backward; must divide prompts_per_step * group_size."
    )
    learning_rate: float = Field(3e-4, gt=0.0, description="AdamW learning rate.")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="After warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    beta: float = Field(0.0, ge=0.0, description="KL coefficient; 0 skips the reference pass.")
    epsilon_low: float | None = Field(
        None, ge=0.0, lt=1.0,
        description="Lower clip of the ratio; None = 0.2 at token level, 3e-4 at sequence level (GSPO's paper).",
    )
    epsilon_high: float | None = Field(
        None, ge=0.0,
        description="Upper clip (clip-higher when > epsilon_low; cispo: the IS weight's cap is 1 + epsilon_high); "
        "None = 0.2 at token level, 4e-4 at sequence level (GSPO's paper).",
    )
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo"] = Field(
        "grpo",
        description="grpo: token mean per sequence, then mean (DeepSeekMath); bnpo: token mean over the "
        "step on this rank (ranks weighted equally); dr_grpo: sum / (N * max_new_tokens) (Dr. GRPO); dapo: "
        "token sum over the whole step / the step's token count, across micro-batches and ranks (DAPO; TRL's "
        "default); cispo: the clipped, detached ratio weighs each token's log-prob (CISPO, MiniMax-M1), "
        "divided as dapo.",
    )
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token",
        description="The ratio per token (PPO/GRPO) or per sequence: exp(mean of the sequence's log-ratios), "
        "the same for all its tokens (GSPO, Zheng et al. 2025).",
    )
    advantage_scale: Literal["group", "batch", "none"] = Field(
        "group", description="Divide advantages by the std of the group, the batch, or not at all."
    )
    num_iterations: int = Field(1, ge=1, description="Update epochs per rollout batch.")
    mask_truncated: bool = Field(False, description="Drop completions that hit max_new_tokens.")
    dynamic_sampling: DynamicSamplingConfig = Field(default_factory=DynamicSamplingConfig)
    overlong: OverlongConfig = Field(default_factory=OverlongConfig)
    reward_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = Field(
        "sum_then_normalize",
        description="Several rewards: weighted sum, then group advantages; or each reward normalised within its "
        "group first, then the weighted sum (GDPO; TRL's multi_objective_aggregation).",
    )
    entropy_coef: float = Field(
        0.0, ge=0.0, description="Entropy bonus: loss - entropy_coef * mean token entropy; 0 = off (logged anyway)."
    )
    vllm_importance_sampling: ImportanceSamplingConfig = Field(default_factory=ImportanceSamplingConfig)
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass instead of keeping them (less GPU memory, "
        "about a third more compute); for the transformers model path.",
    )
    rewards: list[str] | None = Field(
        None,
        description="Rewards: the task's (correct; countdown: equation), registered ones (format) or "
        "import paths package.module:function. None = the task's default (format + its answer check).",
    )
    reward_weights: list[float] | None = Field(None, description="One weight per reward; None = 1s.")
    seed: int = Field(0, description="Seed of sampling and data order.")

    @field_validator("group_size")
    @classmethod
    def _group_of_two(cls, v: int) -> int:
        if v < 2:
            raise ValueError(
                f"group_size is {v}; GRPO compares completions within a group, so set it to 2 or more"
            )
        return v

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        sequence = self.importance_sampling_level == "sequence"
        if self.epsilon_low is None:
            self.epsilon_low = 3e-4 if sequence else 0.2
        if self.epsilon_high is None:
            self.epsilon_high = 4e-4 if sequence else 0.2
        n = self.prompts_per_step * self.group_size
        if n % self.micro_batch_size:
            raise ValueError(
                f"micro_batch_size {self.micro_batch_size} must divide prompts_per_step * "
                f"group_size = {n}; pick a divisor of {n}"
            )
        if self.rewards is not None and not self.rewards:
            raise ValueError("rewards is empty; name at least one reward, e.g. ['format', 'correct'], or null")
        weights, names = self.reward_weights, self.rewards
        if weights is not None and names is not None and len(weights) != len(names):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} values but rewards has "
                f"{len(self.rewards)}; give one weight per reward"
            )
        return self


class EvalConfig(Section):
    """Held-out evaluation after every round."""

    num_problems: int = Field(1000, ge=1, description="Held-out problems evaluated (greedy).")
    batch_size: int = Field(64, ge=1, description="Prompts per generation call.")
    pass_k: int = Field(4, ge=0, description="k for sampled pass@k (0 = off; k samples per problem).")
    sampled_problems: int = Field(
        500, ge=0, description="Problems for sampled accuracy at the training temperature (0 = off)."
    )
    samples_logged: int = Field(16, ge=0, description="Completions kept in the MLflow table.")


class SFTConfig(Section):
    """Optional supervised warm start on solver-written completions (off in the reference recipe)."""

    enabled: bool = Field(True, description="Run the warm start before GRPO (on in the tiny CPU default).")
    max_steps: int = Field(1500, ge=1, description="Step budget (1500 x 32: about 4-5 min on 2 cores).")
    max_minutes: float | None = Field(None, gt=0, description="Wall-clock budget; None = steps only.")
    learning_rate: float = Field(3e-3, gt=0.0, description="AdamW learning rate.")
    batch_size: int = Field(32, ge=1, description="Examples per step.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps before the cosine decay.")
    seed: int = Field(0, description="Seed of the example order.")


class PipelineConfig(Section):
    """Rounds, outputs and MLflow names."""

    rounds: int = Field(4, ge=1, description="GRPO rounds; each is followed by an evaluation.")
    steps_per_round: int = Field(300, ge=1, description="GRPO steps per round (= evaluation period).")
    processes: int = Field(
        1, ge=1,
        description="Ranks per training round on this machine: > 1 runs each round as `torchrun "
        "--nproc_per_node N -m grpo.launch` (data parallel, N * B prompts per step; one GPU per rank).",
    )
    output_dir: str = Field("runs", description="Checkpoints go to <output_dir>/<MLflow run id>/.")
    experiment: str | None = Field(None, min_length=1, description="MLflow experiment; None = grpo-<task>.")
    registered_model: str | None = Field(
        None, description="MLflow registered model name; None = <task>-lora (countdown-lora)."
    )
    champion_alias: str = Field("champion", description="Alias moved by the promote flow.")
    tracking_uri: str | None = Field(
        None, description="MLflow URI; None = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db here."
    )

    @field_validator("registered_model", "champion_alias")
    @classmethod
    def _registry_name(cls, v: str | None) -> str | None:
        if v is not None and not REGISTRY_NAME.fullmatch(v):
            raise ValueError(f"{v!r} is not a usable MLflow name; use letters, digits, '.', '-' and '_'")
        return v


class RunConfig(Section):
    """Everything one run needs. Defaults = the embedded default (tiny model, CPU, offline)."""

    name: str = Field("tiny-cpu", description="Run name: MLflow run name and checkpoint folder.")
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)

    @model_validator(mode="before")
    @classmethod
    def _countdown_shape_moved(cls, data: Any) -> Any:
        """`data.num_count`, `data.number_range` and `data.target_range` (older recipes) move to
        `task.params`, where Countdown's parameters now live."""
        if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
            return data
        moved = {k: data["data"][k] for k in _COUNTDOWN_SHAPE if k in data["data"]}
        if not moved:
            return data
        task = dict(data.get("task") or {})
        if task.get("name", "countdown") != "countdown":
            raise ValueError(f"data.{next(iter(moved))} is a Countdown parameter; remove it for task {task['name']!r}")
        log.warning("data.%s moved to task.params; please update the recipe", ", data.".join(moved))
        task["params"] = {**moved, **(task.get("params") or {})}
        return {**data, "data": {k: v for k, v in data["data"].items() if k not in moved}, "task": task}

    @model_validator(mode="after")
    def _task_defaults(self) -> RunConfig:
        """Fill what depends on the task when left None: the tiny model's folder, the MLflow
        experiment and registered model; check the user template against the task's fields."""
        from grpo.envs import env_for

        env = env_for(self)
        if env.slug != "countdown":
            self._drop_countdown_defaults(env.name)
        if self.model.name_or_path is None:
            suffix = "" if env.slug == "countdown" else f"-{env.slug}"
            self.model.name_or_path = f"{DEFAULT_TINY_PATH}{suffix}"
        if self.pipeline.experiment is None:
            self.pipeline.experiment = f"grpo-{env.slug}"
        if self.pipeline.registered_model is None:
            self.pipeline.registered_model = f"{env.slug}-lora"
        if self.generation.vllm.max_num_seqs is None:
            step = self.train.prompts_per_step * self.train.group_size
            self.generation.vllm.max_num_seqs = max(step, self.eval.batch_size)
        overlong, max_new = self.train.overlong, self.generation.max_new_tokens
        if overlong.buffer is None:
            overlong.buffer = max(1, max_new // 4)
        elif overlong.buffer > max_new:
            raise ValueError(
                f"train.overlong.buffer {overlong.buffer} exceeds generation.max_new_tokens {max_new}; lower it"
            )
        if self.model.dtype == "float16":
            raise ValueError(
                "model.dtype: float16 trains without loss scaling (gradients underflow); use bfloat16 on a "
                "GPU or float32"
            )
        if self.generation.backend == "vllm" and self.generation.temperature > 2:
            raise ValueError(
                f"generation.temperature {self.generation.temperature:g}: vLLM accepts at most 2; lower it"
            )
        weights, rewards = self.train.reward_weights, self.train.rewards or list(env.default_rewards)
        if weights is not None and len(weights) != len(rewards):
            raise ValueError(
                f"train.reward_weights has {len(weights)} values but the rewards are {rewards}; give one "
                "weight per reward"
            )
        if self.data.conversation.user is not None and env.known_columns is not None:
            try:
                env.check_template(self.data.conversation.user, env.known_columns)
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return self

    def _drop_countdown_defaults(self, task: str) -> None:
        """A config made for Countdown and then pointed at another task (the Prefect form, whose
        defaults are the embedded default's filled values; a Countdown recipe with only
        `task.name` changed) would train another task's adapters into Countdown's tiny model,
        experiment and registered model, where promotion would compare them with Countdown's:
        those three values, when they are exactly Countdown's defaults, are derived for the task."""
        leftovers = [
            (self.model, "name_or_path", DEFAULT_TINY_PATH),
            (self.pipeline, "experiment", "grpo-countdown"),
            (self.pipeline, "registered_model", "countdown-lora"),
        ]
        for section, field, countdown in leftovers:
            if getattr(section, field) == countdown:
                log.info("%s is Countdown's default; task %s gets its own", field, task)
                setattr(section, field, None)

    @property
    def total_steps(self) -> int:
        return self.pipeline.rounds * self.pipeline.steps_per_round

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for MLflow params and run comparison."""
        return _flatten(self.model_dump(mode="json"))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: `field.path: message`, with pydantic's noise removed."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling against `grpo run --help` or configs/tiny-cpu.yaml"
        elif e["type"] == "missing":
            msg = "required"
        elif e["type"] == "finite_number":
            msg = f"{e['input']} is not a finite number; give a finite value"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is a value, not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """`["train.group_size=4", "data.conversation.system=null"]` -> nested dict (YAML values)."""
    out: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.group_size=4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(out, key.strip(), value)
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def build_config(data: dict[str, Any]) -> RunConfig:
    """Validate a nested dict; raise `ConfigError` with one line naming each bad field."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid config: {format_validation_error(e)}") from None


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (not "the last
    one wins")."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """`<problem> at line L, column C` from a YAML error (its text spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML recipe (None = the embedded default) and apply `key=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found; pass an existing YAML file to --config")
        try:
            data = yaml.load(p.read_text(), Loader=_StrictLoader) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(p)!r} is not text; pass a YAML recipe to --config") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {_yaml_problem(e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
    return build_config(_merge(data, parse_overrides(overrides)))
