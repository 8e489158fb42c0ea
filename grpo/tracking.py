"""MLflow 3 tracking and registry for a run: params, per-step metrics, tables, figures, adapters
logged as LoggedModels, registered versions, tags and aliases.

Every function takes the tracking URI and the run id explicitly and talks to MLflow through an
explicit `MlflowClient(uri)`: the fluent API's active run is per thread, and Prefect tasks run in
threads. Retried tasks stay idempotent with `find_run`, `logged_steps`, `find_logged_model` and
`register_once` (a unique tag per elite, e.g. "elite_key" = "<run_id>:<step>").

    uri = resolve_tracking_uri(cfg.pipeline.tracking_uri)
    run_id = start_run(uri, "grpo-countdown", "tiny-cpu", tags={}, params=cfg.flat())
    log_metrics(uri, run_id, {"reward/mean": 0.4}, step=1)
    model_id = log_adapter_model(uri, run_id, ckpt_dir, name="step-10", step=10, metrics={...})
    version, created = register_once(uri, "countdown-lora", model_id, {...}, run_id, key=f"{run_id}:10")

With a sqlite store, artifacts go to `<folder of the .db>/mlartifacts/<experiment>`, never to
./mlruns of whatever the current directory is. Errors MLflow raises for a user's input (unknown
name or alias, a server that does not answer) become one-line `TrackingError`s.
Not in the paper: this is plumbing around the algorithm.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from grpo.errors import TrackingError, TrackingReadError

MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
PARAMS_PER_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
DATASET_DIGEST_CHARS = 16  # of the content hash; MLflow keeps at most 36
METRICS_PER_BATCH = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH
HEALTH_TIMEOUT_S = 3.0
MIGRATION_LOGGERS = ("mlflow.store.db.utils", "alembic.runtime.migration")
"""The loggers that narrate a new store's schema migration at INFO."""
STORE_SCHEMES = frozenset({"http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks"})
"""URI schemes MLflow keeps runs in (a database URI may name its driver: postgresql+psycopg2)."""
KEY_TAG = "elite_key"
MODEL_KEY_TAG = "grpo.model_key"
# Checkpoint files that are training state, not part of the adapter a user downloads.
NOT_MODEL_FILES = frozenset({"trainer_state.pt", "COMPLETE"})


# ----------------------------------------------------------------------------- plumbing


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


@contextlib.contextmanager
def _errors(what: str) -> Iterator[None]:
    """Turn MlflowException (bad names, missing aliases, server errors) into one-line TrackingError."""
    try:
        yield
    except MlflowException as e:
        raise TrackingError(f"{what}: {_one_line(e.message)}") from e


def _client(uri: str) -> MlflowClient:
    try:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    except MlflowException as e:
        raise TrackingError(
            f"pipeline.tracking_uri: cannot open {uri} ({_one_line(e.message, 220)})"
        ) from e


def _quote(value: str) -> str:
    """A string literal for an MLflow filter string."""
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise TrackingError(f"filter value {value!r} holds both quote kinds; use a value without quotes")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:MAX_PARAM_VALUE]


def _sqlite_path(uri: str) -> Path | None:
    """Database file of a `sqlite:///` URI (relative to the current folder when not absolute)."""
    if not uri.startswith("sqlite:"):
        return None
    rest = uri[len("sqlite:") :].split("?", 1)[0]
    if rest.startswith("///"):
        rest = rest[3:]
    elif rest.startswith("//"):
        rest = rest[2:]
    if not rest or rest == ":memory:":
        return None
    return Path(rest).absolute()


# ----------------------------------------------------------------------------- the store


def resolve_tracking_uri(cfg_uri: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The config value, else $MLFLOW_TRACKING_URI, else sqlite:///<abs path of ./mlflow.db>."""
    env = os.environ if environ is None else environ
    if cfg_uri:
        return cfg_uri
    if env.get("MLFLOW_TRACKING_URI"):
        return env["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path('mlflow.db').absolute()}"


def check_tracking(uri: str, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    """Fail fast with one line when the store cannot work: an http(s) server that does not
    answer /health, or a sqlite file whose folder cannot be written."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                status = resp.status
        except urllib.error.HTTPError as e:
            status, reason = e.code, f"HTTP {e.code} from /health"
        except (urllib.error.URLError, OSError) as e:
            reason = _one_line(str(getattr(e, "reason", e)), 120)
            status = None
        else:
            reason = ""
        if status != 200:
            port = re.search(r":(\d+)", uri.split("//", 1)[1])
            raise TrackingError(
                f"pipeline.tracking_uri: MLflow at {uri} does not answer ({reason or status}). "
                f"Start it with `mlflow server --host 127.0.0.1 --port {port.group(1) if port else 5000} "
                "--backend-store-uri sqlite:///mlflow.db` or unset MLFLOW_TRACKING_URI"
            )
        return
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else "file"
    if scheme not in STORE_SCHEMES:
        raise TrackingError(
            f"pipeline.tracking_uri: {uri!r} has the scheme {scheme!r}, which MLflow cannot store runs in; "
            "use sqlite:///path/mlflow.db, http(s)://host:port, or a database URI"
        )
    db = _sqlite_path(uri)
    if db is not None:
        if db.is_dir():
            raise TrackingError(
                f"pipeline.tracking_uri: {db} is a folder; name a database file in it, "
                f"e.g. sqlite:///{db / 'mlflow.db'}"
            )
        if db.is_file() and db.stat().st_size and not _is_sqlite(db):
            raise TrackingError(
                f"pipeline.tracking_uri: {db} is not an SQLite database; point the URI at an MLflow "
                "database or at a new file"
            )
        parent = db.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(
                f"pipeline.tracking_uri: cannot create folder {parent} for {uri} "
                f"({_one_line(e.strerror or str(e), 80)}); pick a writable path"
            ) from None
        if not os.access(parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise TrackingError(
                f"pipeline.tracking_uri: {db} is not writable; pick a writable path for {uri}"
            )
        _open_sqlite_store(uri, db)


def _open_sqlite_store(uri: str, db: Path) -> None:
    """Create (and migrate) the sqlite store under a file lock beside it: two first runs on one new
    store would otherwise both run MLflow's schema migration and one of them would fail. The
    migration's INFO lines are held back (a bad input found later stays one line)."""
    import fcntl

    with open(db.parent / f".{db.name}.lock", "a") as lock, _quiet(MIGRATION_LOGGERS):
        fcntl.flock(lock, fcntl.LOCK_EX)
        with _errors(f"pipeline.tracking_uri: {uri}"):
            _client(uri).search_experiments(max_results=1)


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    """Raise the given loggers to WARNING for the duration."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _is_sqlite(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(16) == b"SQLite format 3\x00"


def default_artifact_location(uri: str, experiment: str) -> str | None:
    """`<folder of the sqlite db>/mlartifacts/<experiment>` as a file URI; None (server decides) else."""
    db = _sqlite_path(uri)
    if db is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (db.parent / "mlartifacts" / safe).as_uri()


def make_experiment(uri: str, name: str, artifact_location: str | None = None) -> str:
    """Id of experiment `name`, created (artifacts under `default_artifact_location`) if missing."""
    client = _client(uri)
    with _errors(f"MLflow experiment {name!r}"):
        exp = client.get_experiment_by_name(name)
        if exp is None:
            location = artifact_location or default_artifact_location(uri, name)
            try:
                return client.create_experiment(name, artifact_location=location)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = client.get_experiment_by_name(name)  # created concurrently
        if exp is None:
            raise TrackingError(f"MLflow experiment {name!r}: could not be created or found")
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(
                f"pipeline.experiment: MLflow experiment {name!r} is deleted; restore it "
                f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or pick another name"
            )
        return exp.experiment_id


# ----------------------------------------------------------------------------- runs


def start_run(
    uri: str,
    experiment: str,
    run_name: str,
    tags: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    artifact_location: str | None = None,
) -> str:
    """Create a run (and its experiment if missing), log its tags and params; return the run id."""
    check_tracking(uri)
    exp_id = make_experiment(uri, experiment, artifact_location)
    client = _client(uri)
    str_tags = {k: str(v)[:MAX_TAG_VALUE] for k, v in (tags or {}).items()}
    with _errors(f"MLflow run {run_name!r}"):
        run = client.create_run(exp_id, run_name=run_name, tags=str_tags)
    if params:
        log_params(uri, run.info.run_id, params)
    return run.info.run_id


def log_dataset_inputs(uri: str, run_id: str, task: str, source: str, splits: Mapping[str, str], digest: str) -> None:
    """The prepared splits (`{"train": parquet path, ...}`) as the run's MLflow dataset inputs: the
    Datasets column of the UI and the lineage of every version registered from the run. Each is
    named `<task>/<split>` with the splits' content hash as digest and the environment (and
    `data.source`) as source. Inputs the run already has (a retry, a resumed run) are not added twice."""
    import mlflow.data
    import pandas as pd
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.entities import Dataset, DatasetInput, InputTag

    client = _client(uri)
    with _errors(f"dataset inputs of MLflow run {run_id}"):
        have = {(d.dataset.name, d.dataset.digest) for d in client.get_run(run_id).inputs.dataset_inputs}
        inputs = []
        for split, path in splits.items():
            name, short = f"{task}/{split}", digest[:DATASET_DIGEST_CHARS]
            if (name, short) in have:
                continue
            origin = CodeDatasetSource({"task": task, "data.source": source, "split": split})
            with warnings.catch_warnings():  # its hint about integer columns and missing values: not ours
                warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer", UserWarning)
                frame = mlflow.data.from_pandas(pd.read_parquet(path), source=origin, name=name, digest=short)
            entity = Dataset(
                name=name, digest=short, source_type="code", source=origin.to_json(),
                schema=json.dumps({"mlflow_colspec": frame.schema.to_dict()}) if frame.schema else None,
                profile=json.dumps(frame.profile) if frame.profile else None,
            )
            context = InputTag(key="mlflow.data.context", value="training" if split == "train" else "evaluation")
            inputs.append(DatasetInput(entity, tags=[context]))
        if inputs:
            client.log_inputs(run_id, datasets=inputs)


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    """Log params in batches (values stringified and truncated to MLflow's limit). Params already
    logged with the same value are skipped, so a retry is harmless; a different value is an error."""
    client = _client(uri)
    with _errors(f"MLflow run {run_id}"):
        existing = client.get_run(run_id).data.params
    todo: list[Param] = []
    for key, value in params.items():
        text = _param_value(value)
        if key in existing:
            if existing[key] != text:
                raise TrackingError(
                    f"MLflow run {run_id}: param {key!r} is already {existing[key]!r}, not {text!r}; "
                    "params cannot change, start a new run"
                )
            continue
        todo.append(Param(key, text))
    with _errors(f"MLflow run {run_id}: logging params"):
        for i in range(0, len(todo), PARAMS_PER_BATCH):
            client.log_batch(run_id, params=todo[i : i + PARAMS_PER_BATCH], synchronous=True)


def experiment_runs(uri: str, experiment: str, max_results: int = 1000) -> list[Any] | None:
    """The runs of `experiment`, oldest first; None when there is no such experiment."""
    client = _client(uri)
    with _errors(f"MLflow at {uri}: experiment {experiment!r}"):
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        return list(client.search_runs(
            [exp.experiment_id], order_by=["attribute.start_time ASC"], max_results=max_results
        ))


def find_run(uri: str, experiment: str, tag_key: str, tag_value: str) -> str | None:
    """Id of the newest active run in `experiment` tagged `tag_key=tag_value`, or None."""
    client = _client(uri)
    with _errors(f"MLflow experiment {experiment!r}"):
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        runs = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`{tag_key}` = {_quote(tag_value)}",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
    return runs[0].info.run_id if runs else None


PARENT_RUN_TAG = "mlflow.parentRunId"
"""MLflow's own tag of a nested run (a sweep's trial): the UI shows the run under its parent."""


def child_tags(parent_run_id: str) -> dict[str, str]:
    """The tags that make a run a child of `parent_run_id`: pass them to `start_run` (or `set_tags`)."""
    return {PARENT_RUN_TAG: parent_run_id}


def _search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list[Any]:
    out, token = [], None
    while True:
        page = client.search_runs(
            experiment_ids, filter_string=filter_string, order_by=["attribute.start_time ASC"],
            max_results=1000, page_token=token,
        )
        out.extend(page)
        token = page.token
        if not token:
            return out


def find_runs(uri: str, experiment: str, tags: Mapping[str, Any]) -> list[Any]:
    """The runs of `experiment` that carry every tag of `tags` (values compared as strings), oldest
    first; [] when there are none or the experiment does not exist."""
    client = _client(uri)
    query = " and ".join(f"tags.`{k}` = {_quote(str(v))}" for k, v in tags.items())
    with _errors(f"MLflow experiment {experiment!r}"):
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        return _search_all(client, [exp.experiment_id], query)


def child_runs(uri: str, parent_run_id: str) -> list[Any]:
    """The runs nested under `parent_run_id` (tag `mlflow.parentRunId`), oldest first. A parent that
    does not exist raises `TrackingError`."""
    client = _client(uri)
    with _errors(f"MLflow run {parent_run_id}"):
        parent = client.get_run(parent_run_id)
        return _search_all(
            client, [parent.info.experiment_id], f"tags.`{PARENT_RUN_TAG}` = {_quote(parent_run_id)}"
        )


def experiment_name(uri: str, experiment_id: str) -> str:
    """The name of experiment `experiment_id`."""
    with _errors(f"MLflow experiment id {experiment_id}"):
        return str(_client(uri).get_experiment(experiment_id).name)


def set_tags(uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    """Set run tags (values stringified)."""
    items = [RunTag(k, str(v)[:MAX_TAG_VALUE]) for k, v in tags.items()]
    with _errors(f"MLflow run {run_id}: setting tags"):
        for i in range(0, len(items), PARAMS_PER_BATCH):
            _client(uri).log_batch(run_id, tags=items[i : i + PARAMS_PER_BATCH], synchronous=True)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark a run FINISHED, FAILED or KILLED."""
    with _errors(f"MLflow run {run_id}"):
        _client(uri).set_terminated(run_id, status=status)


def reopen_run(uri: str, run_id: str) -> None:
    """Mark a run RUNNING again (a retried flow run continues it)."""
    with _errors(f"MLflow run {run_id}"):
        _client(uri).update_run(run_id, status="RUNNING")


def run_info(uri: str, run_id: str) -> Any:
    """The run's `RunInfo`: status, experiment_id, start_time (ms)."""
    with _errors(f"MLflow run {run_id}"):
        return _client(uri).get_run(run_id).info


def run_tags(uri: str, run_id: str) -> dict[str, str]:
    """The run's tags (MLflow's own `mlflow.*` tags included)."""
    with _errors(f"MLflow run {run_id}"):
        return dict(_client(uri).get_run(run_id).data.tags)


def read_json_artifact(uri: str, run_id: str, artifact_file: str) -> Any | None:
    """The parsed JSON artifact `artifact_file` of a run, or None when the run has no such file.

    Only a listing that answers without the file counts as absent: a store that fails to answer,
    a failed download or unparsable content raise `TrackingReadError` (retryable), never None."""
    client = _client(uri)
    folder, _, name = artifact_file.rpartition("/")
    what = f"MLflow run {run_id}: artifact {artifact_file!r}"
    try:
        listed = {Path(f.path).name for f in client.list_artifacts(run_id, folder or None) if not f.is_dir}
        if name not in listed:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact_file, tracking_uri=uri, dst_path=tmp
            )
            return json.loads(Path(local).read_text())
    except MlflowException as e:
        raise TrackingReadError(f"{what} could not be read ({_one_line(e.message, 200)})") from e
    except (OSError, ValueError) as e:
        raise TrackingReadError(f"{what} could not be read ({_one_line(str(e), 200)})") from e


# ----------------------------------------------------------------------------- metrics


def metric_history(uri: str, run_id: str, key: str) -> list[Metric]:
    """Every logged value of metric `key` (each with .step, .value, .timestamp)."""
    with _errors(f"MLflow run {run_id}: metric {key!r}"):
        return list(_client(uri).get_metric_history(run_id, key))


def logged_steps(uri: str, run_id: str, key: str) -> set[int]:
    """Steps at which metric `key` is already logged: a retried round skips them."""
    return {m.step for m in metric_history(uri, run_id, key)}


def log_metrics(
    uri: str,
    run_id: str,
    metrics: Mapping[str, float | int | None],
    step: int,
    *,
    skip_logged: bool = False,
    model_id: str | None = None,
) -> None:
    """Log metrics at an explicit step (None values skipped). `skip_logged=True` drops keys already
    logged at this step (one history read per key); `model_id` links them to a LoggedModel too."""
    client = _client(uri)
    ts = _now_ms()
    items = []
    for key, value in metrics.items():
        if value is None:
            continue
        if skip_logged and step in logged_steps(uri, run_id, key):
            continue
        items.append(Metric(key, float(value), ts, int(step), model_id=model_id))
    with _errors(f"MLflow run {run_id}: logging metrics"):
        for i in range(0, len(items), METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=items[i : i + METRICS_PER_BATCH], synchronous=True)


# ----------------------------------------------------------------------------- artifacts


def log_table(
    uri: str, run_id: str, rows: Any, artifact_file: str, *, replace: bool = True
) -> None:
    """Log rows (list of dicts or a DataFrame) as an MLflow table (`artifact_file` ends in .json).
    MLflow appends to an existing table; `replace=True` overwrites it instead, so a retry does not
    duplicate rows."""
    import pandas as pd

    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if not artifact_file.endswith((".json", ".parquet")):
        raise TrackingError(f"table {artifact_file!r}: the file name must end in .json or .parquet")
    client = _client(uri)
    with _errors(f"MLflow run {run_id}: table {artifact_file!r}"):
        folder, _, name = artifact_file.rpartition("/")
        exists = name in {Path(f.path).name for f in client.list_artifacts(run_id, folder or None)}
        if not (exists and replace):
            client.log_table(run_id, data=df, artifact_file=artifact_file)
            return
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / name
            if name.endswith(".json"):
                df.to_json(local, orient="split", index=False, date_format="iso")
            else:
                df.to_parquet(local, index=False)
            client.log_artifact(run_id, str(local), artifact_path=folder or None)


def log_figure(uri: str, run_id: str, figure: Any, artifact_file: str) -> None:
    """Log a matplotlib figure, or an existing image file (e.g. a PNG path), as `artifact_file`."""
    client = _client(uri)
    with _errors(f"MLflow run {run_id}: figure {artifact_file!r}"):
        if isinstance(figure, (str, os.PathLike)):
            src = Path(figure)
            if not src.is_file():
                raise TrackingError(f"figure {src}: file not found; pass a PNG path or a figure")
            folder, _, name = artifact_file.rpartition("/")
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / name
                shutil.copyfile(src, local)
                client.log_artifact(run_id, str(local), artifact_path=folder or None)
        else:
            client.log_figure(run_id, figure, artifact_file)


log_image = log_figure


def log_dict(uri: str, run_id: str, data: dict[str, Any], artifact_file: str) -> None:
    """Log a dict as a JSON or YAML artifact (by the file's extension)."""
    with _errors(f"MLflow run {run_id}: {artifact_file!r}"):
        _client(uri).log_dict(run_id, data, artifact_file)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    """Log a string as a text artifact."""
    with _errors(f"MLflow run {run_id}: {artifact_file!r}"):
        _client(uri).log_text(run_id, text, artifact_file)


# ----------------------------------------------------------------------------- logged models


def find_logged_model(uri: str, run_id: str, key: str) -> str | None:
    """Id of a READY LoggedModel of this run's experiment tagged with `key`, or None."""
    client = _client(uri)
    with _errors(f"MLflow run {run_id}: logged models"):
        exp_id = client.get_run(run_id).info.experiment_id
        found = client.search_logged_models(
            [exp_id], filter_string=f"tags.`{MODEL_KEY_TAG}` = {_quote(key)}"
        )
    ready = [m for m in found if m.status == LoggedModelStatus.READY and m.source_run_id == run_id]
    return ready[0].model_id if ready else None


def log_adapter_model(
    uri: str,
    run_id: str,
    checkpoint_dir: str | os.PathLike[str],
    *,
    name: str,
    step: int,
    metrics: Mapping[str, float] | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    key: str | None = None,
) -> str:
    """Log a checkpoint's adapter (and tokenizer) as an MLflow 3 LoggedModel of `run_id`; return
    its model id. Optimizer/RNG state stays out. `metrics` are linked to the model (and the run)
    at `step`; with `key`, a READY model already logged under that key is returned instead."""
    src = Path(checkpoint_dir)
    if not (src / "adapter_config.json").is_file():
        raise TrackingError(f"adapter {src}: no adapter_config.json; pass a checkpoint folder")
    if key is not None:
        existing = find_logged_model(uri, run_id, key)
        if existing is not None:
            return existing
    client = _client(uri)
    model_tags = {k: str(v)[:MAX_TAG_VALUE] for k, v in (tags or {}).items()}
    model_tags["step"] = str(step)
    if key is not None:
        model_tags[MODEL_KEY_TAG] = key
    with _errors(f"MLflow logged model {name!r}"):
        exp_id = client.get_run(run_id).info.experiment_id
        model = client.create_logged_model(
            exp_id,
            name=name,
            source_run_id=run_id,
            tags=model_tags,
            params={k: _param_value(v) for k, v in (params or {}).items()},
        )
        try:
            with tempfile.TemporaryDirectory() as tmp:
                for f in src.iterdir():
                    if f.name in NOT_MODEL_FILES or ".tmp-" in f.name:
                        continue
                    if f.is_dir():
                        shutil.copytree(f, Path(tmp) / f.name)
                    else:
                        shutil.copy2(f, Path(tmp) / f.name)
                client.log_model_artifacts(model.model_id, tmp)
        except BaseException:
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            raise
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        if metrics:
            _link_metrics(client, run_id, model.model_id, metrics, step)
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    return model.model_id


def _link_metrics(
    client: MlflowClient, run_id: str, model_id: str, metrics: Mapping[str, float], step: int
) -> None:
    """Log metrics with `model_id`; an identical run metric at `step` keeps its timestamp, so the
    run's history gains no duplicate row (MLflow drops exact duplicates)."""
    items = []
    for key, value in metrics.items():
        value = float(value)
        ts = _now_ms()
        for m in client.get_metric_history(run_id, key):
            if m.step == step and (m.value == value or (math.isnan(m.value) and math.isnan(value))):
                ts = m.timestamp
                break
        items.append(Metric(key, value, ts, int(step), model_id=model_id))
    client.log_batch(run_id, metrics=items, synchronous=True)


# ----------------------------------------------------------------------------- registry


def _check_name(name: str) -> None:
    if not name or "'" in name:
        raise TrackingError(
            f"pipeline.registered_model: {name!r} is not a usable name; use letters, digits, - and _"
        )


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name)
        except MlflowException as e2:
            if e2.error_code != "RESOURCE_ALREADY_EXISTS":
                raise


def _versions(client: MlflowClient, name: str) -> list[Any]:
    out, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def register_version(
    uri: str, name: str, model_id: str, tags: Mapping[str, Any], run_id: str | None
) -> str:
    """Register LoggedModel `model_id` as a new version of `name` (created if missing); return it.

    The version's source is `models:/<model_id>` on a server. On a local sqlite store it is the
    model's artifact location: MLflow's sqlite registry resolves a models:/ source through the
    process-wide tracking URI (a TODO in MLflow), which may name another store. The version is
    also tagged `model_id`."""
    _check_name(name)
    client = _client(uri)
    with _errors(f"MLflow registered model {name!r}"):
        source = f"models:/{model_id}"
        if _sqlite_path(uri) is not None:
            source = client.get_logged_model(model_id).artifact_location
        _ensure_registered_model(client, name)
        mv = client.create_model_version(
            name,
            source=source,
            run_id=run_id,
            tags={"model_id": model_id, **{k: str(v)[:MAX_TAG_VALUE] for k, v in tags.items()}},
            model_id=model_id,
        )
    return str(mv.version)


def run_versions(uri: str, run_id: str, name: str | None = None) -> list[Any]:
    """Registered versions created from MLflow run `run_id`, of model `name` or of any model."""
    query = f"run_id = {_quote(run_id)}"
    if name is not None:
        _check_name(name)
        query = f"name = {_quote(name)} and {query}"
    with _errors(f"MLflow registered model {name or 'versions'!r}"):
        return list(_client(uri).search_model_versions(query))


def find_version(uri: str, name: str, tag_key: str, tag_value: str) -> str | None:
    """The version of `name` tagged `tag_key=tag_value` (the lowest, if several), or None."""
    _check_name(name)
    client = _client(uri)
    with _errors(f"MLflow registered model {name!r}"):
        matches = [v for v in _versions(client, name) if v.tags.get(tag_key) == str(tag_value)]
    return str(min(int(v.version) for v in matches)) if matches else None


def register_once(
    uri: str,
    name: str,
    model_id: str,
    tags: Mapping[str, Any],
    run_id: str | None,
    key: str,
    key_tag: str = KEY_TAG,
) -> tuple[str, bool]:
    """Register unless a version tagged `key_tag=key` exists; return (version, created)."""
    found = find_version(uri, name, key_tag, key)
    if found is not None:
        return found, False
    return register_version(uri, name, model_id, {**tags, key_tag: key}, run_id), True


def best_version(
    uri: str, name: str, metric_tag: str, skip_tag: tuple[str, str] | None = None
) -> str | None:
    """The version of `name` whose tag `metric_tag` is the highest number (ties: the newest),
    leaving out the versions tagged `skip_tag = (key, value)`."""
    _check_name(name)
    client = _client(uri)
    with _errors(f"MLflow registered model {name!r}"):
        client.get_registered_model(name)
        scored = []
        for v in _versions(client, name):
            if skip_tag is not None and v.tags.get(skip_tag[0]) == skip_tag[1]:
                continue
            try:
                value = float(v.tags[metric_tag])
            except (KeyError, ValueError):
                continue
            if not math.isnan(value):
                scored.append((value, int(v.version)))
    return str(max(scored)[1]) if scored else None


def set_alias(uri: str, name: str, alias: str, version: str | int) -> None:
    """Point `alias` of `name` at `version`."""
    with _errors(f"MLflow registered model {name!r} alias {alias!r}"):
        _client(uri).set_registered_model_alias(name, alias, str(version))


def get_alias_version(uri: str, name: str, alias: str) -> str | None:
    """The version `alias` points at, or None when the alias is not set (the model must exist)."""
    with _errors(f"MLflow registered model {name!r}"):
        model = _client(uri).get_registered_model(name)
    version = (model.aliases or {}).get(alias)
    return None if version is None else str(version)


def set_version_tags(uri: str, name: str, version: str | int, tags: Mapping[str, Any]) -> None:
    """Set tags on one model version."""
    client = _client(uri)
    with _errors(f"MLflow registered model {name!r} version {version}"):
        for k, v in tags.items():
            client.set_model_version_tag(name, str(version), k, str(v)[:MAX_TAG_VALUE])


def get_version(uri: str, name: str, version: str | int) -> Any:
    """The `ModelVersion` entity (tags, source, run id)."""
    with _errors(f"MLflow registered model {name!r} version {version}"):
        return _client(uri).get_model_version(name, str(version))


def _model_download_uri(client: MlflowClient, model_uri: str) -> str:
    """Where the artifacts of `models:/NAME@ALIAS`, `models:/NAME/3|latest` or `models:/<model_id>`
    live, resolved with `client` (MLflow's own models:/ resolution reads the global registry URI)."""
    if not model_uri.startswith("models:/"):
        return model_uri
    parts = model_uri[len("models:/") :].strip("/").split("/")
    if len(parts) == 1 and "@" in parts[0]:
        name, alias = parts[0].split("@", 1)
        version = str(client.get_model_version_by_alias(name, alias).version)
        return client.get_model_version_download_uri(name, version)
    if len(parts) == 2:
        name, version = parts
        if version == "latest":
            version = str(max((int(v.version) for v in _versions(client, name)), default=0))
        return client.get_model_version_download_uri(name, version)
    if len(parts) == 1 and parts[0]:
        return client.get_logged_model(parts[0]).artifact_location
    raise TrackingError(
        f"model URI {model_uri!r}: use models:/NAME@ALIAS, models:/NAME/VERSION or models:/<model_id>"
    )


def download_model(uri: str, model_uri: str, dst: str | os.PathLike[str]) -> Path:
    """Download `models:/NAME@ALIAS`, `models:/NAME/3` or `models:/<model_id>` into `dst`; return
    the folder inside it that holds adapter_config.json (loadable by PeftModel.from_pretrained)."""
    Path(dst).mkdir(parents=True, exist_ok=True)
    client = _client(uri)
    with _errors(f"download {model_uri}"):
        source = _model_download_uri(client, model_uri)
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=source, tracking_uri=uri, registry_uri=uri, dst_path=str(dst)
            )
        )
    if (local / "adapter_config.json").is_file():
        return local
    found = sorted(local.rglob("adapter_config.json"))
    if not found:
        raise TrackingError(f"download {model_uri}: no adapter_config.json in it; not a LoRA adapter")
    return found[0].parent
