"""The engine seam (`grpo.engines`): every implementation passes one contract
(`tests/engine_contract.py`), and the factory picks one engine per device and model, saying which
and why in one log line.

The real vLLM engine runs the same contract in `tests/vllm_tier/test_engine_contract.py`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from engine_contract import PROMPTS, check_engine  # tests/ is on sys.path under pytest
from test_fastpath import random_lora_policy
from test_rollout import fake_vllm

import grpo.engines as engines
from grpo.config import RunConfig, load_config
from grpo.engines import choose_engine, make_engine
from grpo.engines.cpu_fast import CpuFastEngine
from grpo.engines.hf import HFEngine

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def policy(tiny_model_dir: Path):
    return random_lora_policy(tiny_model_dir)


def run_config(model_dir: Path, *overrides: str) -> RunConfig:
    return load_config(None, [f"model.name_or_path={model_dir}", "model.device=cpu", "lora.dropout=0", *overrides])


@pytest.mark.parametrize("name", ["hf", "cpu_fast", "vllm"])
def test_every_engine_keeps_the_contract(name: str, policy, tiny_model_dir: Path, tmp_path: Path) -> None:
    model, tok = policy
    reference = HFEngine(model, tok, run_config(tiny_model_dir).generation)
    if name == "vllm":  # a fake engine: no model inside, so its samples are checked for form only
        cfg = run_config(tiny_model_dir, "generation.backend=vllm")
        engine = fake_vllm(model, tok, cfg.generation, cfg.model, tmp_path)
        check_engine(engine, model, tok, reference, same_samples=False)
        assert engine.lora_request.lora_int_id == 2  # the sync handed vLLM a new adapter id
        assert not (tmp_path / "adapters").exists() or not any((tmp_path / "adapters").iterdir())
        return
    engine = make_engine(model, tok, run_config(tiny_model_dir, f"generation.fast_path={name == 'cpu_fast'}"))
    assert engine.name == name
    check_engine(engine, model, tok, reference, logprob_atol=1e-4)


def test_a_closed_cpu_fast_engine_says_so(policy, tiny_model_dir: Path) -> None:
    model, tok = policy
    engine = CpuFastEngine(model, tok, run_config(tiny_model_dir).generation)
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate(PROMPTS, 1, greedy=True)


def _choice(model, tok, cfg: RunConfig, caplog: pytest.LogCaptureFixture) -> tuple[str, str]:
    """(the engine make_engine built, its one log line)."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="grpo.engines"):
        engine = make_engine(model, tok, cfg)
    (record,) = [r for r in caplog.records if r.name == "grpo.engines"]
    assert record.levelno == logging.INFO
    return engine.name, record.getMessage()


def test_the_factory_chooses_per_device_and_model(policy, tiny_model_dir: Path, caplog) -> None:
    """CPU + a Qwen2 it covers: cpu_fast; fast_path=false, gradient checkpointing or a model it
    does not cover: hf, with the reason in the one log line."""
    from test_fastpath import _tiny_config_model

    model, tok = policy
    cfg = run_config(tiny_model_dir)
    assert _choice(model, tok, cfg, caplog) == ("cpu_fast", "engine: cpu_fast (cpu, a Qwen2 it covers)")
    assert _choice(model, tok, run_config(tiny_model_dir, "generation.fast_path=false"), caplog) == (
        "hf", "engine: hf (cpu_fast not taken: generation.fast_path=false)")
    assert _choice(model, tok, run_config(tiny_model_dir, "train.gradient_checkpointing=true"), caplog) == (
        "hf", "engine: hf (cpu_fast not taken: train.gradient_checkpointing=true (this engine keeps every "
        "activation))")
    assert _choice(model, tok, run_config(tiny_model_dir, "train.entropy_coef=0.01"), caplog) == (
        "hf", "engine: hf (cpu_fast not taken: train.entropy_coef > 0 (this engine's entropy carries no gradient))")
    other = _tiny_config_model("qwen2-rope-linear")
    name, line = _choice(other, tok, run_config(tiny_model_dir, "generation.fast_path=true"), caplog)
    assert name == "hf" and line.startswith("engine: hf (cpu_fast not taken: rope parameters")


def test_on_cuda_cpu_fast_is_opt_in(tiny_model_dir: Path) -> None:
    """A model off the CPU (a meta device stands in: no GPU here) takes hf unless
    generation.fast_path=true; the choice is made without building anything."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    name, why = choose_engine(model, run_config(tiny_model_dir))
    assert name == "hf" and why.startswith("cpu_fast not taken: on meta it is opt-in")
    opted_in = run_config(tiny_model_dir, "generation.fast_path=true")
    assert choose_engine(model, opted_in) == ("cpu_fast", "meta, a Qwen2 it covers")
    vllm = run_config(tiny_model_dir, "generation.backend=vllm")
    assert choose_engine(model, vllm) == ("vllm", "generation.backend=vllm")


def test_without_the_cpu_fast_plug_in_every_run_takes_hf(policy, tiny_model_dir: Path, monkeypatch) -> None:
    """Deleting grpo/engines/cpu_fast and its registry line leaves a working library."""
    model, tok = policy
    monkeypatch.delitem(engines.ENGINES, "cpu_fast")
    assert choose_engine(model, run_config(tiny_model_dir)) == ("hf", "cpu_fast is not installed")
    assert type(make_engine(model, tok, run_config(tiny_model_dir))) is HFEngine
