"""The engine contract (`tests/engine_contract.py`) on the real vLLM engine (CPU build, float32):
the same greedy tokens as the `hf` engine before and after a sync, seeded samples that repeat,
stop tokens held back until min_tokens, log-probs by the trained model, close."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine_contract import check_engine  # noqa: E402 - the main suite's contract

from grpo.config import load_config  # noqa: E402
from grpo.engines import close_engines  # noqa: E402
from grpo.engines.hf import HFEngine  # noqa: E402
from grpo.engines.vllm import SHARED, VLLMEngine  # noqa: E402
from grpo.models import build_tiny_model, load_policy  # noqa: E402


def test_the_real_vllm_engine_keeps_the_contract(tmp_path: Path) -> None:
    model_dir = build_tiny_model(tmp_path / "tiny", seed=0, init_std=0.2)
    cfg = load_config(None, [
        f"model.name_or_path={model_dir}", "model.build_tiny_if_missing=false", "generation.backend=vllm",
        "generation.vllm.sleep_mode=false", "generation.vllm.gpu_memory_utilization=0.5", "lora.dropout=0",
    ])
    model, tokenizer = load_policy(cfg)
    with torch.no_grad():  # an adapter that moves the outputs
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    engine = VLLMEngine(model, tokenizer, cfg.generation, cfg.model, adapter_root=str(tmp_path / "adapters"))
    try:
        check_engine(engine, model, tokenizer, HFEngine(model, tokenizer, cfg.generation), logprob_atol=1e-5)
        assert not list((tmp_path / "adapters").iterdir())  # close deleted the adapter folders
        assert SHARED.engine is not None  # the process's engine stays for the next user
    finally:
        close_engines()
    assert SHARED.engine is None
