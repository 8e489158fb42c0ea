"""benchmarks/gpu_smoke.py runs what a CPU can run and writes one JSON result (on a GPU it runs
everything: see RESULTS.md for what has run where).

    pytest -q tests/test_gpu_smoke.py        # Tier A on the CPU; Tier B in the real-vLLM tier
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_smoke(tmp_path: Path, tiers: str) -> dict:
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--tiers", tiers, "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_tier_a_on_this_machine(tmp_path: Path) -> None:
    result = run_smoke(tmp_path, "A")
    status = {name: c["status"] for name, c in result["checks"].items()}
    assert set(status) == {"A.device_and_dtype", "A.fast_path_vs_transformers", "A.transformers_generator",
                           "A.checkpoint_round_trip", "A.reference_update_memory"}
    gpu_only = {"A.reference_update_memory"}
    expected = "pass" if torch.cuda.is_available() else "skip"
    assert all(s == "pass" for n, s in status.items() if n not in gpu_only), status
    assert all(status[n] == expected for n in gpu_only), status
    assert result["checks"]["A.fast_path_vs_transformers"]["max_abs_diff_adapter_True"] < 1e-3
