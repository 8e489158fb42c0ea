"""Shared fixtures of the test suite: an MLflow sqlite store, a Prefect test harness and the tiny
model, each built at most once per session and only when a test asks for it.

The environment is set offline and quiet at import, before any test module imports prefect,
transformers or mlflow.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A sqlite MLflow store in a session temp folder (migrated once, ~2-10 s), also exported as
    MLFLOW_TRACKING_URI for the session. Artifacts stay under that folder: grpo.tracking creates
    experiments with their artifacts next to the database, and the store is created here with
    its default artifact root there too, so the "Default" experiment does not use ./mlruns.
    Create experiments through grpo.tracking (not mlflow.set_experiment) to keep it so."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    SqlAlchemyStore(uri, (root / "mlartifacts").as_uri())  # creates and migrates the database
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect API server and database for the session (starts in ~10-15 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's tiny offline model (weights + tokenizer), built once per session."""
    from grpo.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread for a module (request it with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`): on a shared, oversubscribed CPU two
    spinning OpenMP threads can run 10-100x slower than one; results are the same either way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
