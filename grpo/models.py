"""Base model, tokenizer and LoRA adapter: load them (hub id or local folder) or build a tiny one.

    from grpo.config import load_config
    from grpo.models import load_policy
    model, tokenizer = load_policy(load_config())   # builds artifacts/tiny-model on first use

`build_tiny_model` writes an offline stand-in for a real base model: a Qwen2-architecture
decoder with random weights and a byte-level BPE tokenizer (at most 512 tokens; the synthetic
Countdown corpus it is trained on yields about 460), saved so that `AutoModelForCausalLM` /
`AutoTokenizer.from_pretrained(dir)` load it like any Hugging Face checkpoint. It is
deterministic by seed (same bytes twice).
`python -c "from grpo.models import build_tiny_model; build_tiny_model('artifacts/tiny-model')"`
builds it by hand. GRPO trains only the LoRA adapter; the base weights stay frozen (the paper
fine-tunes all weights).

`cached_policy` hands the last loaded policy of the process from stage to stage (`POLICY_CACHE`,
the one model cache); a retry in a fresh process loads it from disk.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from grpo.config import DEFAULT_TINY_PATH, LoraConfig, ModelConfig, RunConfig
from grpo.envs.countdown import tiny_corpus
from grpo.errors import ConfigError, ModelLoadError
from grpo.rewards import TAGS

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen2's pre-tokenizer split: words, single digits, punctuation runs, newlines, spaces.
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


# --------------------------------------------------------------------------- tiny model


def _train_tokenizer(seed: int, vocab_size: int, corpus: list[str] | None = None) -> Any:
    """A byte-level BPE `PreTrainedTokenizerFast` with ChatML special tokens and tag tokens, trained
    on `corpus` (None = the synthetic Countdown text of `seed`)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Exactly the pipeline `Qwen2Tokenizer` rebuilds on load (transformers 5 always uses that class
    # for model_type qwen2): NFC, Qwen's split regex (one token per digit), byte-level bytes.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TAGS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = tiny_corpus(seed) if corpus is None else corpus
    tok.train_from_iterator([_untagged(line) for line in lines], trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=1024,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _untagged(line: str) -> str:
    """The tags become whole added tokens; keep their characters out of the BPE merges."""
    for tag in TAGS:
        line = line.replace(tag, " ")
    return line


def build_tiny_model(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 384,
    vocab_size: int = 512,
    init_std: float = 0.02,
    corpus: list[str] | None = None,
) -> Path:
    """Build the tiny Qwen2-architecture model + tokenizer into `out_dir` (atomic; replaces it).

    `init_std` is the std of the random weights (`initializer_range`). With the default 0.02 and
    tied embeddings the untrained model's logits stay within a fraction of a unit, so an adapter
    alone cannot concentrate its output distribution; a larger value (e.g. 0.2) gives a random
    model whose adapter can learn token-level rewards quickly (the GRPO learning test uses it).

    `corpus` is the text the tokenizer is trained on: an environment's prompts and reference
    completions (`Env.tokenizer_corpus`); None = the synthetic Countdown text.

    Deterministic: the same arguments give byte-identical `model.safetensors` and `tokenizer.json`.
    """
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(seed, vocab_size, corpus)
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
        initializer_range=init_std,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, bos_token_id=None
    )

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------- loading


def _looks_local(name: str) -> bool:
    """True for paths (./x, ../x, /x, ~/x, a/b/c, a/b whose parent folder exists here)."""
    if name == DEFAULT_TINY_PATH or name.startswith(("./", "../", "/", "~")):
        return True
    if os.sep in name or "/" in name:
        if not _HUB_ID.match(name):
            return True
        return Path(name).parent.is_dir()  # "artifacts/foo" next to an existing "artifacts/"
    return False


def ensure_base_model(cfg: ModelConfig, corpus: Callable[[], list[str]] | None = None) -> str:
    """Return a loadable `name_or_path`: an existing folder, a freshly built tiny model (its tokenizer
    trained on `corpus()`, None = Countdown text), or a hub id."""
    name = cfg.name_or_path or DEFAULT_TINY_PATH
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if _looks_local(name):
        if not cfg.build_tiny_if_missing:
            raise ModelLoadError(
                f"model.name_or_path: folder '{name}' does not exist; point it at a model folder "
                "or set model.build_tiny_if_missing=true to build the tiny offline model there"
            )
        t = cfg.tiny
        try:
            build_tiny_model(
                path, seed=t.seed, hidden_size=t.hidden_size, num_layers=t.num_layers,
                num_heads=t.num_heads, num_kv_heads=t.num_kv_heads, intermediate_size=t.intermediate_size,
                corpus=corpus() if corpus is not None else None,
            )
        except OSError as e:
            raise ModelLoadError(
                f"model.name_or_path: cannot build the tiny model in '{name}' ({e.strerror or e}); "
                "point it at a writable folder"
            ) from None
        return str(path)
    return name


def ensure_model_for(cfg: RunConfig) -> str:
    """`ensure_base_model` for a run: a tiny model built here learns its tokenizer on the text of
    the run's environment (`task`)."""
    from grpo.envs import env_for

    return ensure_base_model(
        cfg.model, corpus=lambda: env_for(cfg).tokenizer_corpus(cfg.data.source, cfg.model.tiny.seed)
    )


def _load_error(name: str, err: BaseException) -> ModelLoadError:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        why = "not a local folder and not in the Hugging Face cache; offline"
    else:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        why = f"not a local folder and not fetched from the Hugging Face Hub: {first}"
    return ModelLoadError(
        f"model.name_or_path: cannot load '{name}' ({why}). Pass a local folder, "
        f"e.g. model.name_or_path={DEFAULT_TINY_PATH}"
    )


def _load_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HFValidationError

    return (OSError, HFValidationError)


def load_tokenizer(name_or_path: str, revision: str | None = None) -> Any:
    """AutoTokenizer with a pad token (<|endoftext|> if present, else eos) and left padding."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    except _load_errors() as e:
        raise _load_error(name_or_path, e) from None
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in vocab else tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def resolve_device(cfg: ModelConfig) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without a GPU is a config error."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "model.device: cuda requested but no CUDA device is visible; set model.device=auto or cpu"
        )
    return torch.device(cfg.device)


def load_base_model(cfg: ModelConfig) -> Any:
    """The frozen base model in eval mode, on `resolve_device(cfg)`, in `cfg.dtype`."""
    from transformers import AutoModelForCausalLM

    name = ensure_base_model(cfg)
    device = resolve_device(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, revision=cfg.revision, dtype=getattr(torch, cfg.dtype)
        )
    except _load_errors() as e:
        raise _load_error(name, e) from None
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def check_lora_targets(cfg: RunConfig) -> None:
    """`ConfigError` unless every name in `lora.target_modules` is a module of the base model (as
    peft matches them: the last part of a module's dotted name). Builds the model's skeleton on the
    meta device: no weights are read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    name = ensure_model_for(cfg)
    try:
        config = AutoConfig.from_pretrained(name, revision=cfg.model.revision)
    except _load_errors() as e:
        raise _load_error(name, e) from None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = {n.rsplit(".", 1)[-1] for n, _ in skeleton.named_modules()}
    missing = [t for t in cfg.lora.target_modules if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(
            f"lora.target_modules: {missing} are not modules of {name}; its linear layers are {linear}"
        )


def peft_lora_config(lora: LoraConfig) -> Any:
    """The run's LoRA settings as a `peft.LoraConfig`."""
    import peft

    return peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
        bias="none",
    )


def attach_lora(model: Any, lora: LoraConfig, seed: int = 0, adapter: str = "default") -> Any:
    """Wrap `model` in a fresh trainable LoRA adapter named `adapter` (only the adapter's weights
    train).

    The adapter's random initialisation is drawn from `seed` (the global RNG is left as it was),
    so two runs with the same seed start from the same adapter.
    """
    import peft

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return peft.get_peft_model(model, peft_lora_config(lora), adapter_name=adapter)


def add_lora(model: Any, lora: LoraConfig, adapter: str, seed: int = 0) -> None:
    """Add one more fresh LoRA adapter named `adapter` to a peft model, initialised from `seed`
    as `attach_lora` does (the same seed gives the same weights); the active adapter is unchanged."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_adapter(adapter, peft_lora_config(lora))


def load_policy(cfg: RunConfig, adapter_dir: str | None = None) -> tuple[Any, Any]:
    """Base model + trainable adapter (fresh LoRA, or the one saved in `adapter_dir`) and tokenizer."""
    from peft import PeftModel

    name = ensure_model_for(cfg)
    tokenizer = load_tokenizer(name, cfg.model.revision)
    base = load_base_model(cfg.model)
    if adapter_dir is None:
        return attach_lora(base, cfg.lora, seed=cfg.train.seed), tokenizer
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise ModelLoadError(
            f"adapter_dir: '{adapter_dir}' holds no adapter_config.json; pass a folder written by "
            "PeftModel.save_pretrained (a checkpoint's adapter folder)"
        )
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    return model, tokenizer


class PolicyCache:
    """The last loaded policy (peft model, tokenizer) of this process, under one key.

    Loading a model is the costly part of a stage, so consecutive stages in one process hand the
    policy on through `POLICY_CACHE`, while a retry in a fresh process loads it from disk. One
    entry only: a newer policy replaces the older one, so at most one model stays in memory.
    `take` removes the entry (the caller is going to change the weights); `get` leaves it.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: tuple[Any, Any] | None = None

    def get(self, key: tuple) -> tuple[Any, Any] | None:
        return self._value if self._value is not None and self._key == key else None

    def take(self, key: tuple) -> tuple[Any, Any] | None:
        hit = self.get(key)
        self.clear()
        return hit

    def put(self, key: tuple, model: Any, tokenizer: Any) -> None:
        self._key, self._value = key, (model, tokenizer)

    def clear(self) -> None:
        self._key, self._value = None, None


POLICY_CACHE = PolicyCache()
"""The process's one model cache (see `PolicyCache`)."""


def policy_key(cfg: RunConfig, checkpoint: str | os.PathLike[str] | None) -> tuple:
    """Cache key: base model settings, LoRA settings and the checkpoint folder (None = fresh)."""
    ckpt = str(Path(checkpoint).absolute()) if checkpoint is not None else None
    return (cfg.model.model_dump_json(), cfg.lora.model_dump_json(), ckpt)


def load_policy_at(cfg: RunConfig, checkpoint: str | os.PathLike[str] | None) -> tuple[Any, Any]:
    """A policy from disk: base + fresh LoRA (seeded by train.seed), then the checkpoint's adapter."""
    from grpo.checkpoint import load_checkpoint
    from grpo.trainer import seed_everything

    seed_everything(cfg.train.seed)  # the fresh adapter's initial weights
    model, tokenizer = load_policy(cfg)
    if checkpoint is not None:
        load_checkpoint(checkpoint, model=model, restore_rng_state=False)
    return model, tokenizer


def cached_policy(
    cfg: RunConfig, checkpoint: str | os.PathLike[str] | None, cache: PolicyCache = POLICY_CACHE
) -> tuple[Any, Any]:
    """The policy at `checkpoint` from the cache, else loaded from disk (and cached)."""
    key = policy_key(cfg, checkpoint)
    hit = cache.get(key)
    if hit is not None:
        return hit
    cache.clear()
    model, tokenizer = load_policy_at(cfg, checkpoint)
    cache.put(key, model, tokenizer)
    return model, tokenizer


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a completion: eos id(s), plus <|im_end|> and <|endoftext|> if present."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for i in eos if isinstance(eos, (list, tuple)) else [eos]:
        if i is not None and i not in ids:
            ids.append(int(i))
    vocab = tokenizer.get_vocab()
    for tok in ("<|im_end|>", "<|endoftext|>"):
        i = vocab.get(tok)
        if i is not None and i not in ids:
            ids.append(int(i))
    return ids
