"""benchmarks/gpu_smoke.py's vLLM tier on the CPU engine: everything but sleep mode runs."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_gpu_smoke import run_smoke  # noqa: E402 - the main suite's helper


def test_tier_b_on_the_cpu_engine(tmp_path: Path) -> None:
    result = run_smoke(tmp_path, "B")
    status = {name: c["status"] for name, c in result["checks"].items()}
    assert status == {"B.vllm_lora_applied_and_resynced": "pass", "B.vllm_sleep_frees_memory": "skip",
                      "B.vllm_logprob_gap_and_grpo_steps": "pass"}, result
    assert result["checks"]["B.vllm_logprob_gap_and_grpo_steps"]["is_delta_abs_mean"] < 1e-3
