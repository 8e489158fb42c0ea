"""Countdown data: generate, load, validate, shuffle-select-split, cache; prompts; a solver.

A Countdown row is `nums: list[int]` (3 or 4 integers) and `target: int`; the task is an
arithmetic expression that uses every number exactly once and equals the target. The schema is
that of the public `Jiayi-Pan/Countdown-Tasks-3to4`.

    >>> from grpo.countdown import generate, solve, solve_steps
    >>> ds = generate(1000, seed=0)  # every row solvable, deterministic by seed
    >>> len(ds), ds.column_names
    (1000, ['nums', 'target'])
    >>> solve([93, 4, 68], 29)
    '(93 + 4) - 68'
    >>> solve_steps([93, 4, 68], 29)
    [(93, '+', 4, 97), (97, '-', 68, 29)]

Prepared splits are cached by their inputs, so a rerun with the same config reuses them:

    from grpo.config import DataConfig
    from grpo.countdown import load_split, prepare_dataset
    ref = prepare_dataset(DataConfig(generate_rows=1000, cache_dir="artifacts/data"))
    train = load_split(ref.train_path)

`python -m grpo.countdown 5` prints five generated rows with a solution each.

Departures from the reference recipe: offline, rows are generated here rather than downloaded
(a hub id still works when the hub is reachable or cached). Generation builds each target from
its numbers with random non-negative integer steps (exact division only), so every row is
solvable by construction; the target distribution therefore differs from the public dataset's.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel

from grpo.config import Conversation, DataConfig
from grpo.errors import DataError, ModelLoadError
from grpo.rewards import MAX_ABS, matches_target

FILE_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")
_FEATURES = datasets.Features(
    {"nums": datasets.List(datasets.Value("int64")), "target": datasets.Value("int64")}
)
SOLVABLE_CHECK_ROWS = 200
"""How many rows of a user's dataset preflight checks for a solution."""
CACHE_VERSION = 1
"""Bump when generation or splitting changes, so cached splits are rebuilt."""

Value = int | Fraction
# A search node: a leaf number, or (left, op, right, value).
Node = int | tuple


# ----------------------------------------------------------------------------------- generate


def _combine(rng: random.Random, nums: list[int]) -> int:
    """Combine all `nums` in a random order with random ops; every step a non-negative int."""
    pool = list(nums)
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        a, b = pool[i], pool[j]
        for k in sorted((i, j), reverse=True):
            pool.pop(k)
        op = rng.randrange(4)
        if op == 3:  # division, only when exact (either way round)
            if b and a % b == 0:
                r = a // b
            elif a and b % a == 0:
                r = b // a
            else:
                op = rng.randrange(3)
        if op == 0:
            r = a + b
        elif op == 1:
            r = abs(a - b)
        elif op == 2:
            r = a * b
        pool.append(r)
    return pool[0]


def generate(
    n: int,
    seed: int,
    num_count: Sequence[int] = (3, 4),
    number_range: Sequence[int] = (1, 99),
    target_range: Sequence[int] = (1, 99),
) -> datasets.Dataset:
    """`n` solvable rows (`nums`, `target`), deterministic by `seed`.

    For each row: k from `num_count`, k numbers uniform in `number_range` (inclusive), then a
    target in `target_range` (inclusive) reached by combining all the numbers with random
    non-negative integer steps; new numbers are drawn when no try lands in range.
    """
    if n < 0:
        raise DataError(f"data.generate_rows is {n}; give a positive number of rows")
    counts = list(num_count)
    lo, hi = int(number_range[0]), int(number_range[1])
    tlo, thi = int(target_range[0]), int(target_range[1])
    if not counts or any(k < 2 for k in counts):
        raise DataError(f"data.num_count {counts} must list sizes of 2 or more")
    if not (lo <= hi and tlo <= thi):
        raise DataError("data.number_range / data.target_range must be [low, high] with low <= high")
    rng = random.Random(seed)
    all_nums: list[list[int]] = []
    targets: list[int] = []
    for _ in range(n):
        for _draw in range(1000):
            k = rng.choice(counts)
            nums = [rng.randint(lo, hi) for _ in range(k)]
            target = None
            for _try in range(20):
                t = _combine(rng, nums)
                if tlo <= t <= thi:
                    target = t
                    break
            if target is not None:
                break
        else:
            raise DataError(
                f"data.target_range {[tlo, thi]}: no target reachable from numbers in "
                f"{[lo, hi]}; widen target_range or change number_range"
            )
        all_nums.append(nums)
        targets.append(target)
    return datasets.Dataset.from_dict({"nums": all_nums, "target": targets}, features=_FEATURES)


# ------------------------------------------------------------------------------------- solver


def _candidates(a: Value, b: Value, mode: str) -> list[tuple[bool, str, Value]]:
    """(swapped, op, result) for the pair: `a op b`, or `b op a` when swapped.

    `mode` "nonneg": non-negative integer results (larger minus smaller, exact division);
    "int": integer results; "any": exact fractions too.
    """
    out: list[tuple[bool, str, Value]] = [(False, "+", a + b), (False, "*", a * b)]
    if mode == "nonneg":
        out.append((a < b, "-", abs(a - b)))
    else:
        out.append((False, "-", a - b))
        if a != b:
            out.append((True, "-", b - a))
    for swapped, x, y in ((False, a, b), (True, b, a)):
        if swapped and a == b:
            break
        if y == 0:
            continue
        if mode == "any":
            q = Fraction(x) / y
            out.append((swapped, "/", q))
        elif x % y == 0:
            out.append((swapped, "/", x // y))
    if mode == "any":  # keep integer values as int (cheaper, and steps read naturally)
        out = [(s, op, int(r) if isinstance(r, Fraction) and r.denominator == 1 else r)
               for s, op, r in out]
    return out


def _search(
    values: list[Value], nodes: list[Node], target: int, mode: str, exact: bool, failed: set
) -> Node | None:
    """Depth-first search combining pairs until one value is left that hits `target`.

    `failed` holds value multisets already known to miss (local to one call).
    """
    if len(values) == 1:
        hit = values[0] == target if exact else matches_target(values[0], target)
        return nodes[0] if hit else None
    key = tuple(sorted(values))
    if key in failed:
        return None
    n = len(values)
    for i in range(n):
        for j in range(i + 1, n):
            rest_v = [values[k] for k in range(n) if k != i and k != j]
            rest_n = [nodes[k] for k in range(n) if k != i and k != j]
            for swapped, op, r in _candidates(values[i], values[j], mode):
                if abs(r) > MAX_ABS:
                    continue
                left, right = (nodes[j], nodes[i]) if swapped else (nodes[i], nodes[j])
                found = _search(
                    rest_v + [r], rest_n + [(left, op, right, r)], target, mode, exact, failed
                )
                if found is not None:
                    return found
    failed.add(key)
    return None


def _solve_tree(nums: Sequence[int], target: int, modes: Sequence[str], exact: bool) -> Node | None:
    values = [int(x) for x in nums]
    if not values:
        return None
    for mode in modes:
        found = _search(list(values), list(values), int(target), mode, exact, set())
        if found is not None:
            return found
    return None


def _render(node: Node, top: bool = True) -> str:
    if not isinstance(node, tuple):
        return str(node)
    left, op, right, _ = node
    s = f"{_render(left, False)} {op} {_render(right, False)}"
    return s if top else f"({s})"


def _steps(node: Node, out: list) -> Value:
    if not isinstance(node, tuple):
        return node
    left, op, right, value = node
    a = _steps(left, out)
    b = _steps(right, out)
    out.append((a, op, b, value))
    return value


def solve(nums: Sequence[int], target: int) -> str | None:
    """One expression using every number once that `equation_reward` scores 1.0, or None.

    Exhaustive search over combining pairs with + - * / (exact fractions, same tolerance and
    magnitude bound as the reward); natural non-negative integer steps are tried first. None for
    negative numbers too: the reward accepts no unary minus, so no answer could score.
    """
    if any(int(x) < 0 for x in nums):
        return None
    tree = _solve_tree(nums, target, ("nonneg", "any"), exact=False)
    return None if tree is None else _render(tree)


def solve_steps(nums: Sequence[int], target: int) -> list[tuple[int, str, int, int]] | None:
    """Steps `[(a, op, b, result), ...]` that combine all numbers into exactly `target`, or None.

    Non-negative integer steps are preferred, then any integer steps; only when neither exists
    are fractional steps used (then a, b or result may be a `fractions.Fraction`). Suits
    supervised traces such as "93+4=97,97-68=29".
    """
    tree = _solve_tree(nums, target, ("nonneg", "int", "any"), exact=True)
    if tree is None:
        return None
    out: list = []
    _steps(tree, out)
    return out


# ------------------------------------------------------------------------------ load/validate


def _parse_nums_cell(cell: Any, row: int, source: str) -> Any:
    if not isinstance(cell, str):
        return cell
    s = cell.strip()
    try:
        if s.startswith("["):
            try:
                return json.loads(s)
            except json.JSONDecodeError:
                return ast.literal_eval(s)
        return [int(p) for p in s.replace(",", " ").split()]
    except (ValueError, SyntaxError) as e:
        raise DataError(
            f"data.source: file '{source}' row {row}: nums {cell!r} is not a list of integers ({e})"
        ) from None


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
            return datasets.Dataset.from_list(obj)
        if isinstance(obj, dict) and all(isinstance(v, list) for v in obj.values()):
            return datasets.Dataset.from_dict(obj)
        raise DataError(
            f"data.source: file '{source}' must hold a list of rows or a dict of columns"
        )
    if suffix == ".csv":
        import pandas as pd

        df = pd.read_csv(path)
        if "nums" in df.columns:
            df["nums"] = [_parse_nums_cell(c, i, source) for i, c in enumerate(df["nums"])]
        return datasets.Dataset.from_pandas(df, preserve_index=False)
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
    return datasets.Dataset.from_list(records)


def load_rows(source: str) -> datasets.Dataset:
    """Rows from a local .parquet/.jsonl/.json/.csv file or folder, or a hub dataset id ("train").

    A csv `nums` cell may be a list literal such as "[93, 4, 68]" (parsed as JSON or a Python
    literal, never evaluated) or plain numbers "93 4 68". `DataError` (one line) when a local
    path does not exist, a file cannot be read, or the hub dataset cannot be loaded.
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


def _is_int(x: Any) -> bool:
    """An integer, or a float with an integral value (e.g. a csv column pandas read as float)."""
    if isinstance(x, bool):
        return False
    return isinstance(x, int) or (isinstance(x, float) and x.is_integer())


def _first_bad_row(nums: list, targets: list) -> tuple[int, str] | None:
    for i, (ns, t) in enumerate(zip(nums, targets)):
        if not isinstance(ns, list) or not ns:
            return i, f"nums must be a non-empty list of integers, got {ns!r}"
        if not all(_is_int(x) for x in ns):
            return i, f"nums must be a non-empty list of integers, got {ns!r}"
        if any(x < 0 for x in ns):
            return i, f"nums must be non-negative (an answer cannot use a negative number), got {ns!r}"
        if not _is_int(t):
            return i, f"target must be an integer, got {t!r}"
    return None


def validate_rows(ds: datasets.Dataset) -> None:
    """Check columns `nums` (non-empty list of non-negative ints) and `target` (int); `DataError`
    names the problem.

    The error names the missing column (and those present) or the first bad row index. Floats
    with integral values (3.0) pass; `prepare_dataset` casts both columns to int64.
    """
    present = list(ds.column_names)
    for col in ("nums", "target"):
        if col not in present:
            raise DataError(
                f"data.source: column '{col}' is missing (columns present: {', '.join(present)}); "
                "rows need 'nums' (list of integers) and 'target' (integer)"
            )
    if len(ds) == 0:
        raise DataError("data.source: the dataset has no rows; give a source with Countdown rows")
    table = ds.select_columns(["nums", "target"]).with_format("arrow")[:]
    nums_col = table.column("nums").combine_chunks()
    target_col = table.column("target").combine_chunks()
    t_nums, t_target = nums_col.type, target_col.type
    typed = (
        (pa.types.is_list(t_nums) or pa.types.is_large_list(t_nums))
        and pa.types.is_integer(t_nums.value_type)
        and pa.types.is_integer(t_target)
    )
    if typed:
        bad = pc.or_(
            pc.or_(pc.is_null(nums_col), pc.is_null(target_col)),
            pc.equal(pc.fill_null(pc.list_value_length(nums_col), 0), 0),
        )
        flat = pc.list_flatten(nums_col)
        wrong = pc.or_(pc.is_null(flat), pc.fill_null(pc.less(flat, 0), False))  # null or negative
        if pc.any(wrong).as_py():
            parents = pc.list_parent_indices(nums_col)
            wrong_rows = pc.filter(parents, wrong)
            mask = pc.is_in(pa.array(range(len(nums_col))), value_set=wrong_rows)
            bad = pc.or_(bad, mask)
        if not pc.any(bad).as_py():
            return
        i = pc.index(bad, True).as_py()
        problem = _first_bad_row([nums_col[i].as_py()], [target_col[i].as_py()])
        reason = problem[1] if problem else "nums or target is missing"
        raise DataError(f"data.source: row {i}: {reason}; fix or drop that row")
    problem = _first_bad_row(nums_col.to_pylist(), target_col.to_pylist())
    if problem is None:  # e.g. integral floats
        return
    i, reason = problem
    raise DataError(f"data.source: row {i}: {reason}; fix or drop that row")


def count_solvable(ds: datasets.Dataset, limit: int = SOLVABLE_CHECK_ROWS) -> tuple[int, int]:
    """(rows with a solution, rows checked) among the first `limit` rows (an unsolvable row costs
    the solver's whole search, about 15 ms, so the check is bounded)."""
    head = ds.select(range(min(limit, len(ds))))
    solvable = sum(solve([int(x) for x in r["nums"]], int(r["target"])) is not None for r in head)
    return solvable, len(head)


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


# ------------------------------------------------------------------------------------ prompts


def format_user(template: str, nums: Sequence[int], target: int) -> str:
    """Fill `{nums}` ("[93, 4, 68]"), `{nums_plain}` ("93 4 68") and `{target}` in `template`."""
    ns = [int(x) for x in nums]
    return template.format(nums=ns, nums_plain=" ".join(str(x) for x in ns), target=int(target))


def build_prompt(tokenizer: Any, nums: Sequence[int], target: int, conversation: Conversation) -> str:
    """The prompt text: chat template over [system?, user, assistant prefill], prefill continued.

    The model's completion continues the prefill (which ends in `<think>`).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            "model.name_or_path: the tokenizer has no chat template; use a chat model's "
            "tokenizer or set tokenizer.chat_template (e.g. ChatML)"
        )
    messages = []
    if conversation.system is not None:
        messages.append({"role": "system", "content": conversation.system})
    messages.append({"role": "user", "content": format_user(conversation.user, nums, target)})
    messages.append({"role": "assistant", "content": conversation.assistant_prefill})
    return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)


# ------------------------------------------------------------------------------------ caching


class DatasetRef(BaseModel):
    """Where the prepared splits are, and a hash of their content (passed between tasks)."""

    train_path: str
    test_path: str
    content_hash: str
    train_rows: int
    test_rows: int
    source: str
    reused: bool = False


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cache_inputs(cfg: DataConfig) -> dict[str, Any]:
    inputs: dict[str, Any] = {
        "version": CACHE_VERSION,
        "source": cfg.source,
        "generate_rows": cfg.generate_rows if cfg.source == "generate" else None,
        "num_rows": cfg.num_rows,
        "test_fraction": cfg.test_fraction,
        "seed": cfg.seed,
        "num_count": list(cfg.num_count),
        "number_range": list(cfg.number_range),
        "target_range": list(cfg.target_range),
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


def prepare_dataset(cfg: DataConfig) -> DatasetRef:
    """Build (or reuse) the train/test parquet splits for `cfg`, cached by its inputs.

    The folder is `<cache_dir>/<sha256 of the inputs>[:16]` with train.parquet, test.parquet and
    ref.json; it is written to a temporary folder and renamed into place, so a crash never
    leaves a half-written cache that looks complete.
    """
    inputs = _cache_inputs(cfg)
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cfg.cache_dir).expanduser()
    folder = cache / key
    ref = _complete_ref(folder)
    if ref is not None:
        return ref

    if cfg.source == "generate":
        ds = generate(cfg.generate_rows, cfg.seed, cfg.num_count, cfg.number_range, cfg.target_range)
    else:
        ds = load_rows(cfg.source)
        validate_rows(ds)
        table = ds.select_columns(["nums", "target"]).with_format("arrow")[:]
        ds = datasets.Dataset(table.cast(_FEATURES.arrow_schema))  # integral floats -> int64
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


def _main(argv: list[str]) -> None:
    n = int(argv[0]) if argv else 5
    for row in generate(n, seed=0):
        print(row["nums"], row["target"], "->", solve(row["nums"], row["target"]))


if __name__ == "__main__":
    _main(sys.argv[1:])
