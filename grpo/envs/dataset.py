"""The `dataset` environment: your own rows, your prompt template, answers checked by math-verify or exact match.

`data.source` is a local .parquet/.jsonl/.json/.csv file or a Hugging Face dataset id; each row has the
columns your prompt template names and an answer column. `task.params` (all optional):

- `prompt` (default "{question}"): the user message template over the row's columns; it is the
  default of `data.conversation.user`, which overrides it when set.
- `answer_column` (default "answer"): the column holding the gold answers. Numbers become text.
  A GSM8K-style answer "reasoning #### 72" is checked against the part after the last "####"; the
  reasoning becomes the warm start's thinking (its `<<48/2=24>>` calculator notes removed).
- `match` (default "math"): "math" checks with math-verify (72 = 72.0, 1,234 = 1234, \\frac{1}{2} =
  0.5 = 1/2, \\boxed{3} = 3, LaTeX sets and expressions; an answer equal to the gold as text always
  counts); "exact" compares the text after collapsing whitespace (case-sensitive).

    task:
      name: dataset
      params:
        prompt: "Solve: {question}"
        answer_column: answer
        match: math
    data:
      source: data/gsm8k-train.jsonl      # rows {"question": "...", "answer": "... #### 72"}

    from grpo.envs import get_env
    env = get_env("dataset", prompt="Solve: {question}")
    rows = env.load("data/gsm8k-train.jsonl")
    env.correct(["48/2=24, 48+24=72</think>\\n<answer>72</answer>"], answer=["... #### 72"])   # [1.0]

Loading checks the rows: the answer column and every column an explicitly set `prompt` names must
exist (else `DataError` naming the columns present), and every row needs a non-empty answer (else
`DataError` naming the first row without one: fix or drop those rows; they are not dropped
silently). The default prompt "{question}" is checked by the preflight instead, against whichever
template the run uses.

How math-verify reads an answer: plain text is read as a number or expression (with several, the
last counts: "1 or 2" reads as 2); "1,234" and "1,000,000" are thousands separators but "1,2" is
the decimal 1.2; text with LaTeX and no `$` ("\\dfrac{1}{2}", "\\sqrt{2}") is read as `$...$`.
What it cannot read compares as text. Its timeouts use SIGALRM, which only works in the main
thread, and without them an answer such as 10^{10^{10}} hangs the comparison; so `correct` runs
math-verify in the calling process from the main thread and, from other threads (the pipeline's
tasks run in threads), in a worker process with the timeouts on, killed and restarted when an
answer takes too long (that answer scores 0). POSIX only for the worker.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import json
import logging
import math
import os
import re
import select
import string
import subprocess
import sys
import threading
import time
from typing import Any, ClassVar, Literal

import datasets
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from grpo.config import format_validation_error
from grpo.envs.base import Env, placeholders, stable_hash
from grpo.errors import ConfigError, DataError
from grpo.rewards import TAGS, answer_content

log = logging.getLogger(__name__)

MATH_TIMEOUT_S = 5
"""math-verify's timeout (seconds) for each parse and each comparison of one answer."""
WORKER_GRACE_S = 10
"""Seconds the worker process may take beyond three timeouts on one answer before it is killed."""
WORKER_START_S = 120
"""Seconds the worker process may take to start (it imports math-verify and this module)."""
DESCRIBE_CHARS = 300
"""Strings longer than this are cut in `describe`."""

_CALCULATOR_NOTE = re.compile(r"<<[^<>\n]*>>")
_LATEX_HINT = re.compile(r"[\\^{}_]")


class DatasetParams(BaseModel):
    """`task.params` of the `dataset` environment."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field("{question}", description="User message template over the row's columns.")
    answer_column: str = Field("answer", min_length=1, description="The column holding the gold answers.")
    match: Literal["math", "exact"] = Field("math", description="math: math-verify; exact: text equality.")


# ------------------------------------------------------------------------------------ answers


def answer_text(value: Any) -> str | None:
    """A gold answer cell as text: strings as they are, numbers as they print (72.0 -> "72"); None
    for a missing cell (None, NaN, blank). `TypeError` for anything else (a list, a dict)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    raise TypeError(f"{type(value).__name__} {str(value)[:60]!r}")


def final_answer(gold: str) -> str:
    """The part of a gold answer to compare: after the last "####" (GSM8K), else all of it, stripped."""
    return gold.rpartition("####")[2].strip()


def _collapse(text: str) -> str:
    return " ".join(text.split())


def exact_match(gold: str, pred: str) -> bool:
    """Text equality of the gold's final answer and the prediction, whitespace collapsed."""
    return _collapse(final_answer(gold)) == _collapse(pred)


@functools.lru_cache(maxsize=8192)
def _parse_math(text: str, timeout_s: int) -> list:
    """math-verify's reading of an answer: `$text$` first when the text looks like LaTeX without
    delimiters, then the text as it is (empty when neither reads)."""
    from math_verify import parse

    delimited = "$" in text or "\\(" in text or "\\[" in text
    candidates = [f"${text}$", text] if _LATEX_HINT.search(text) and not delimited else [text]
    for candidate in candidates:
        parsed = parse(candidate, parsing_timeout=timeout_s)
        if parsed:
            return parsed
    return []


def math_equal(gold: str, pred: str, timeout_s: int = MATH_TIMEOUT_S) -> bool:
    """Whether math-verify reads `pred` as the gold's final answer (the gold first, as it expects).
    Uses SIGALRM timeouts when `timeout_s` > 0, so call it from the main thread (`correct` does
    this for you); an error or a timeout counts as not equal."""
    from math_verify import verify
    from math_verify.errors import TimeoutException

    try:
        gold_parsed = _parse_math(final_answer(gold), timeout_s)
        pred_parsed = _parse_math(pred.strip(), timeout_s)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s))
    except (Exception, TimeoutException):  # noqa: BLE001 - sympy on a model's text may raise anything: a wrong answer
        log.debug("math-verify raised on gold %r, answer %r (scored 0)", gold[:100], pred[:100], exc_info=True)
        return False


# ------------------------------------------------------------------------- the worker process


_WORKER_CODE = (
    "import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
    "from grpo.envs.dataset import _serve; _serve()"
)


def _serve() -> None:
    """The worker process's loop: a JSON request {gold, pred, timeout} per stdin line, a JSON reply
    {equal} per stdout line, math-verify running in this process's main thread (its timeouts work)."""
    out = sys.stdout
    sys.stdout = sys.stderr  # a stray print must not corrupt the replies
    import math_verify  # noqa: F401 - loaded before "ready", so an answer's time limit does not include it

    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        equal = math_equal(request["gold"], request["pred"], request["timeout"])
        out.write(json.dumps({"equal": equal}) + "\n")
        out.flush()


class _MathWorker:
    """A child process that runs `math_equal` for callers outside the main thread, one answer at a
    time; killed when one answer takes longer than 3 timeouts + `WORKER_GRACE_S` (that answer
    scores 0) and started again on the next call. It exits when this process closes its stdin."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid = 0
        self._buf = b""

    def equal(self, gold: str, pred: str, timeout_s: int) -> bool:
        """`math_equal(gold, pred, timeout_s)`, computed in the worker."""
        request = (json.dumps({"gold": gold, "pred": pred, "timeout": timeout_s}) + "\n").encode()
        with self._lock:
            proc = self._ensure()
            try:
                self._send(proc, request)
            except OSError:  # the worker died while idle: start another, once
                self._stop()
                proc = self._ensure()
                self._send(proc, request)
            line, why = self._read_line(proc, 3 * timeout_s + WORKER_GRACE_S)
            if line is None:
                self._stop()
                log.warning("task dataset: math-verify %s on answer %r (scored 0); its worker process restarts",
                            why, pred[:100])
                return False
        return bool(json.loads(line)["equal"])

    @staticmethod
    def _send(proc: subprocess.Popen[bytes], request: bytes) -> None:
        assert proc.stdin is not None
        proc.stdin.write(request)
        proc.stdin.flush()

    def _ensure(self) -> subprocess.Popen[bytes]:
        if self._pid != os.getpid():  # first use, or a forked child: the pipes belong to the parent
            self._proc = None
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._stop()
        proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE, json.dumps(sys.path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,  # no terminal Ctrl-C
        )
        self._proc, self._pid, self._buf = proc, os.getpid(), b""
        line, why = self._read_line(proc, WORKER_START_S)
        if line != "ready":
            self._stop()
            raise RuntimeError(
                f"task dataset: the math-verify worker process did not start ({why or repr(line)}); "
                "check that `python -c 'import math_verify, grpo.envs.dataset'` works"
            )
        return proc

    def _read_line(self, proc: subprocess.Popen[bytes], seconds: float) -> tuple[str | None, str]:
        """The next line from the worker, or (None, why) when it exits or `seconds` pass first."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        poller = select.poll()  # not select.select: it fails on descriptors above 1023
        poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + seconds
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(max(1, math.ceil(left * 1000))):
                return None, f"took over {seconds:g} s"
            chunk = os.read(fd, 65536)
            if not chunk:
                return None, f"exited with status {proc.wait()}"
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode(), ""

    def _stop(self) -> None:
        proc, self._proc, self._buf = self._proc, None, b""
        if proc is None:
            return
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()

    def close(self) -> None:
        """Stop the worker (at exit; from this process only)."""
        if self._pid == os.getpid():
            self._stop()


_WORKER = _MathWorker()
atexit.register(_WORKER.close)


def math_match(gold: str, pred: str) -> bool:
    """`math_equal` with timeouts from any thread: here in the main thread (or off POSIX), else in
    the worker process. The prediction equal to the gold's final answer as text always matches."""
    if exact_match(gold, pred):
        return True
    if threading.current_thread() is threading.main_thread() or os.name != "posix":
        return math_equal(gold, pred, MATH_TIMEOUT_S)
    return _WORKER.equal(gold, pred, MATH_TIMEOUT_S)


# ------------------------------------------------------------------------------ the environment


class DatasetEnv(Env):
    """Your own rows (see the module docstring)."""

    usage: ClassVar[str] = "dataset"
    default_rewards: ClassVar[tuple[str, ...]] = ("format", "correct")
    generates: ClassVar[bool] = False
    known_columns: ClassVar[list[str] | None] = None

    def __init__(self, name: str, params: dict[str, Any] | None = None) -> None:
        try:
            self.spec = DatasetParams.model_validate(params or {})
        except ValidationError as e:
            raise ConfigError(f"task.params: {format_validation_error(e)}") from None
        if any(f == "" or f.isdigit() for f in _field_names(self.spec.prompt)):
            raise ConfigError(
                "task.params.prompt: a placeholder has no column name ('{}' or '{0}'); name the column, "
                "e.g. '{question}'"
            )
        self.prompt_columns = placeholders(self.spec.prompt, "task.params.prompt")
        if not self.prompt_columns:
            raise ConfigError(
                f"task.params.prompt: {self.spec.prompt[:80]!r} names no column, so every prompt would be "
                "the same; name the row's text, e.g. 'Solve: {question}'"
            )
        if self.spec.match == "math" and importlib.util.find_spec("math_verify") is None:
            raise ConfigError(
                "task.params.match: 'math' needs the math-verify package (pip install math-verify); "
                "install it or set match: exact"
            )
        super().__init__(name, params)
        self.default_user = self.spec.prompt

    @property
    def slug(self) -> str:
        """"dataset", plus a hash of the parameters that differ from the defaults."""
        changed = self.spec.model_dump(mode="json", exclude_defaults=True)
        return f"dataset-{stable_hash(changed)}" if changed else "dataset"

    def cache_key(self) -> dict[str, Any]:
        return {"env": self.name, "params": self.spec.model_dump(mode="json")}

    # -- rows ------------------------------------------------------------------------------------

    def normalize(self, ds: datasets.Dataset, source: str) -> datasets.Dataset:
        """Check the rows (not empty, the answer column and an explicitly set prompt's columns
        present, every answer non-empty text or a number) and return them with the answer column
        as text. `DataError` in one line naming the column or the first bad row."""
        ds = super().normalize(ds, source)
        present = list(ds.column_names)
        col = self.spec.answer_column
        if col not in present:
            raise DataError(
                f"data.source: column '{col}' is missing (columns present: {', '.join(present)}); set "
                "task.params.answer_column to the column holding the answers"
            )
        if "prompt" in self.params:  # the default "{question}" is checked by the preflight, as the run may override it
            missing = sorted(self.prompt_columns - set(present))
            if missing:
                raise DataError(
                    f"data.source: column '{missing[0]}' named by task.params.prompt is missing (columns "
                    f"present: {', '.join(present)}); fix task.params.prompt or the data"
                )
        cells = ds.select_columns([col]).with_format("arrow")[:].column(col).to_pylist()
        answers: list[str | None] = []
        for i, cell in enumerate(cells):
            try:
                answers.append(answer_text(cell))
            except TypeError as e:
                raise DataError(
                    f"data.source: row {i}: answer ({col}) is {e}; answers must be text or numbers"
                ) from None
        empty = [i for i, a in enumerate(answers) if a is None]
        if empty:
            raise DataError(
                f"data.source: row {empty[0]} has no answer in column '{col}' ({len(empty)} of {len(ds)} rows "
                "have none); fill or drop those rows"
            )
        if ds.features[col] == datasets.Value("string") and answers == cells:
            return ds
        ds = ds.remove_columns(col).add_column(col, answers, feature=datasets.Value("string"))
        return ds.select_columns(present)

    # -- scoring ---------------------------------------------------------------------------------

    def correct(self, completions: list[str], **columns: Any) -> list[float]:
        """1.0 when the completion's `<answer>` matches the gold answer of its row (`match`), else
        0.0 (no single answer block: 0.0). Safe to call from any thread."""
        col = self.spec.answer_column
        if col not in columns:
            raise DataError(f"task.params.answer_column: the rows have no column '{col}'; set it to the answer column")
        out = []
        for completion, gold_cell in zip(completions, columns[col]):
            pred = answer_content(completion)
            gold = answer_text(gold_cell)
            if pred is None or gold is None:
                out.append(0.0)
            elif self.spec.match == "exact":
                out.append(1.0 if exact_match(gold, pred) else 0.0)
            else:
                out.append(1.0 if math_match(gold, pred) else 0.0)
        return out

    def reference_completion(self, row: dict[str, Any]) -> str | None:
        """For a gold "reasoning #### 72": the reasoning (calculator notes removed) as thinking and
        72 as the answer; otherwise an empty thinking and the gold as the answer. None when the gold
        is empty, holds a think/answer tag, or `correct` would not score the result 1.0."""
        try:
            gold = answer_text(row.get(self.spec.answer_column))
        except TypeError:
            return None
        if gold is None:
            return None
        reasoning, sep, _ = gold.rpartition("####")
        reasoning = _CALCULATOR_NOTE.sub("", reasoning).strip() if sep else ""
        final = final_answer(gold)
        if not final or any(tag in reasoning or tag in final for tag in TAGS):
            return None
        text = f"{reasoning}</think>\n<answer>{final}</answer>"
        return text if self.correct([text], **{self.spec.answer_column: [gold]}) == [1.0] else None

    def describe(self, row: dict[str, Any]) -> dict[str, Any]:
        """The prompt's columns and the answer column, long strings cut to `DESCRIBE_CHARS`."""
        out: dict[str, Any] = {}
        for key in [*sorted(self.prompt_columns), self.spec.answer_column]:
            if key not in row:
                continue
            value = row[key]
            if not isinstance(value, (int, float, bool)):
                value = _cut("" if value is None else str(value))
            out[key] = value
        return out


def _cut(text: str) -> str:
    return text if len(text) <= DESCRIBE_CHARS else text[: DESCRIBE_CHARS - 1] + "…"


def _field_names(template: str) -> list[str]:
    """The field names of the prompt's placeholders, as written ("" for `{}`); `ConfigError` when
    it is not a format string."""
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ConfigError(
            f"task.params.prompt: not a valid format string ({e}); double the braces of literal ones"
        ) from None
