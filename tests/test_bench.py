"""The speed benchmark's harness (`make bench`): both step scripts on the tiny benchmark shape.

Run: `pytest -q tests/test_bench.py`. A smoke test of benchmarks/run.py with a small workload
(2 prompts x 2 completions of 8 tokens, 2 alternating rounds): each library runs in its own process,
completions are exactly the requested length on both sides, and the table, the per-round speed-ups
and the JSON report come out. It checks the harness, not the speed (`benchmarks/RESULTS.md`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("trl", reason="the bench extra (trl) is not installed")


def test_run_alternates_rounds_and_reports_both_libraries(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--models", "tiny", "--rounds", "2",
            "--prompts", "2", "--group", "2", "--new-tokens", "8",
            "--model-dir", str(tmp_path / "models"), "--out", str(out),
        ],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| tiny | 103,744 |" in proc.stdout
    assert "tiny: speed-up of each round" in proc.stdout
    commands = [line for line in proc.stderr.splitlines() if line.startswith("$ ")]
    assert [("trl_step" in c, "grpo_step" in c) for c in commands] == [
        (True, False), (False, True), (False, True), (True, False)  # round 1: TRL first; round 2: ours first
    ]
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    for lib in ("trl", "ours"):
        res = row["results"][lib]
        assert len(res["runs"]) == 2 and len(res["seconds_per_step_rounds"]) == 2
        for run in res["runs"]:
            assert run["completion_tokens_per_step"] == 2 * 2 * 8  # exactly --new-tokens per completion
            assert len(run["seconds_per_step_all"]) == 3  # 1 warmup + 2 measured
        assert res["seconds_per_step_median"] > 0 and res["peak_rss_mb"] > 0
        assert set(res["phases_median"]) >= {"generation", "reference", "forward", "backward", "optimizer"}
