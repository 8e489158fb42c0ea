"""Rows from files or the hub, the shuffle-select-split of the recipe, and the cache of prepared
splits; the environment (`grpo.envs`) decides what a row is.

    from grpo.config import DataConfig
    from grpo.data import load_split, prepare_dataset
    from grpo.envs import get_env
    ref = prepare_dataset(DataConfig(generate_rows=1000), get_env("reasoning_gym:chain_sum"))
    train = load_split(ref.train_path)     # a datasets.Dataset

Prepared splits are cached by their inputs (environment, its parameters, the source and, for a
local file, its sha256), so a rerun with the same config reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from grpo.config import DataConfig
from grpo.errors import DataError

if TYPE_CHECKING:
    from grpo.envs import Env

FILE_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")
CACHE_VERSION = 2
"""Bump when loading or splitting changes, so cached splits are rebuilt."""


# -------------------------------------------------------------------------------- loading


def _read_file(path: Path, source: str) -> datasets.Dataset:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return datasets.Dataset(pq.read_table(path))
    if suffix == ".jsonl":
        return _read_jsonl(path, source)
    if suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return _read_jsonl(path, source)  # JSON lines named .json
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if isinstance(obj, list):
            return _from_records(obj)
        if isinstance(obj, dict) and all(isinstance(v, list) for v in obj.values()):
            return datasets.Dataset.from_dict(obj)
        raise DataError(
            f"data.source: file '{source}' must hold a list of rows or a dict of columns"
        )
    if suffix == ".csv":
        import pandas as pd

        return datasets.Dataset.from_pandas(pd.read_csv(path), preserve_index=False)
    raise DataError(
        f"data.source: file '{source}' has unsupported type '{suffix}'; use one of "
        f"{', '.join(FILE_SUFFIXES)}"
    )


def _read_jsonl(path: Path, source: str) -> datasets.Dataset:
    records = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"data.source: file '{source}' line {i} is not valid JSON ({e.msg})"
                    ) from None
    return _from_records(records)


def _from_records(records: list[dict[str, Any]]) -> datasets.Dataset:
    """Rows as a Dataset; a column that holds both text and numbers (e.g. answers "72" and 72) is
    read as text, as a csv reader would, instead of failing."""
    try:
        return datasets.Dataset.from_list(records)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        kinds: dict[str, set[type]] = {}
        for record in records:
            for key, value in record.items():
                if value is not None:
                    kinds.setdefault(key, set()).add(type(value))
        mixed = {k for k, t in kinds.items() if str in t and t <= {str, int, float, bool}}
        if not mixed:
            raise
        fixed = [{k: (str(v) if k in mixed and v is not None else v) for k, v in r.items()} for r in records]
        return datasets.Dataset.from_list(fixed)


def load_rows(source: str) -> datasets.Dataset:
    """Rows from a local .parquet/.jsonl/.json/.csv file or folder, or a hub dataset id ("train").

    `DataError` (one line) when a local path does not exist, a file cannot be read, or the hub
    dataset cannot be loaded. Csv cells are read as pandas reads them; an environment parses list
    columns written as text.
    """
    path = Path(source).expanduser()
    if path.exists():
        try:
            if path.is_dir():
                return datasets.load_dataset(str(path), split="train")
            return _read_file(path, source)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - any reader error: one line naming the file
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"data.source: file '{source}' could not be read ({msg})") from None
    if source.lower().endswith(FILE_SUFFIXES) or source.startswith((".", "/", "~", "\\")):
        raise DataError(
            f"data.source: file '{source}' not found; give an existing "
            f"{'/'.join(FILE_SUFFIXES)} file, a hub dataset id, or source=generate"
        )
    try:
        return datasets.load_dataset(source, split="train")
    except Exception as e:  # noqa: BLE001 - any hub or network error: one line naming the source
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"data.source: hub dataset '{source}' could not be loaded (offline or not cached: "
            f"{msg[:200]}); pass a local .parquet/.jsonl/.json/.csv file or source=generate"
        ) from None


# ------------------------------------------------------------------------------ splitting


def prepare_splits(
    ds: datasets.Dataset, num_rows: int | None, test_fraction: float, seed: int
) -> datasets.DatasetDict:
    """The recipe: shuffle(seed), select(range(num_rows)) if set, train_test_split(test_fraction, seed)."""
    ds = ds.shuffle(seed=seed)
    if num_rows:
        if num_rows > len(ds):
            raise DataError(
                f"data.num_rows is {num_rows} but the dataset has {len(ds)} rows; lower "
                "data.num_rows or set it to null to keep all rows"
            )
        ds = ds.select(range(num_rows))
    try:
        split = ds.train_test_split(test_size=test_fraction, seed=seed)
    except ValueError as e:
        raise DataError(
            f"data.test_fraction {test_fraction} leaves an empty split of {len(ds)} rows ({e}); "
            "use more rows or a different test_fraction"
        ) from None
    return datasets.DatasetDict({"train": split["train"], "test": split["test"]})


# -------------------------------------------------------------------------------- caching


class DatasetRef(BaseModel):
    """Where the prepared splits are, and a hash of their content (passed between tasks)."""

    train_path: str
    test_path: str
    content_hash: str
    train_rows: int
    test_rows: int
    source: str
    task: str = "countdown"
    reused: bool = False


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cache_inputs(cfg: DataConfig, env: Env) -> dict[str, Any]:
    inputs: dict[str, Any] = {
        "version": CACHE_VERSION,
        **env.cache_key(),
        "source": cfg.source,
        "generate_rows": cfg.generate_rows if cfg.source == "generate" else None,
        "num_rows": cfg.num_rows,
        "test_fraction": cfg.test_fraction,
        "seed": cfg.seed,
    }
    local = Path(cfg.source).expanduser()
    if cfg.source != "generate" and local.is_file():
        inputs["file_sha256"] = _file_digest(local)  # an edited file is a new dataset
    return inputs


def _complete_ref(folder: Path) -> DatasetRef | None:
    ref_file = folder / "ref.json"
    train, test = folder / "train.parquet", folder / "test.parquet"
    if not (ref_file.is_file() and train.is_file() and test.is_file()):
        return None
    try:
        ref = DatasetRef.model_validate_json(ref_file.read_text())
    except (OSError, ValueError):  # an unreadable cache entry is rebuilt
        return None
    return ref.model_copy(
        update={"train_path": str(train.resolve()), "test_path": str(test.resolve()), "reused": True}
    )


def prepare_dataset(cfg: DataConfig, env: Env | None = None) -> DatasetRef:
    """Build (or reuse) the train/test parquet splits of `env`'s rows (None = Countdown) for `cfg`,
    cached by their inputs (the environment and its parameters included).

    The folder is `<cache_dir>/<sha256 of the inputs>[:16]` with train.parquet, test.parquet and
    ref.json; it is written to a temporary folder and renamed into place, so a crash never
    leaves a half-written cache that looks complete.
    """
    if env is None:
        from grpo.envs import get_env

        env = get_env("countdown")
    inputs = _cache_inputs(cfg, env)
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cfg.cache_dir).expanduser()
    folder = cache / key
    ref = _complete_ref(folder)
    if ref is not None:
        return ref

    ds = env.rows(cfg.generate_rows, cfg.seed) if cfg.source == "generate" else env.load(cfg.source)
    splits = prepare_splits(ds, cfg.num_rows, cfg.test_fraction, cfg.seed)

    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache))
    except OSError as e:
        raise DataError(
            f"data.cache_dir: cannot write to '{cfg.cache_dir}' ({e.strerror or e}); "
            "set data.cache_dir to a writable folder"
        ) from None
    try:
        for name in ("train", "test"):
            pq.write_table(splits[name].with_format("arrow")[:], tmp / f"{name}.parquet")
        digest = hashlib.sha256()
        for name in ("train", "test"):
            digest.update(_file_digest(tmp / f"{name}.parquet").encode())
        ref = DatasetRef(
            train_path=str((folder / "train.parquet").resolve()),
            test_path=str((folder / "test.parquet").resolve()),
            content_hash=digest.hexdigest(),
            train_rows=len(splits["train"]),
            test_rows=len(splits["test"]),
            source=cfg.source,
            task=env.name,
        )
        (tmp / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True))
        (tmp / "ref.json").write_text(ref.model_dump_json(indent=2))
        if folder.exists():  # an incomplete leftover (a complete one returned above)
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            done = _complete_ref(folder)  # another process finished the same inputs first
            if done is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return done
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(
            f"data.cache_dir: cannot write to '{cfg.cache_dir}' ({e.strerror or e}); "
            "set data.cache_dir to a writable folder"
        ) from None
    return ref


def load_split(path: str) -> datasets.Dataset:
    """A prepared split (parquet) as an in-memory `datasets.Dataset`."""
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"dataset split '{path}' not found; rerun data preparation (grpo data) to rebuild it"
        )
    return datasets.Dataset(pq.read_table(p))
