"""Start real servers for tests on 127.0.0.1 free ports, and always stop them.

    from servers import prefect_server  # tests/ is on sys.path under pytest, mlflow_server, serve_deployments, chromium
    with prefect_server(tmp / "prefect") as pf, mlflow_server(tmp / "mlflow") as ml:
        with serve_deployments(pf, cwd=tmp, env={"MLFLOW_TRACKING_URI": ml.url}):
            ...

Each server is a child process in its own process group; leaving the `with` block (normally or
by an exception) sends SIGTERM to the whole group, then SIGKILL after a grace period, so no
server, uvicorn worker or flow-run child outlives the test. Output goes to a log file next to the
server's data; a server that exits or does not answer in time raises `ServerError` with the
log's tail. `start_servers` starts several at once and waits for all (each takes ~30-40 s here).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--window-size=1400,900",
]
QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


class ServerError(RuntimeError):
    """A server process exited early or did not answer its health check in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without Prefect/MLflow settings (so a child never points at the
    test session's temporary stores), plus the offline/quiet variables and `extra`."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "MLFLOW_", "_MLFLOW_"))
    }
    env.update(QUIET_ENV)
    env.update(extra or {})
    return env


def http_ok(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class Server:
    """A child process, its log file and the URL whose answer means it is ready."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    log: Path
    health_url: str | None = None
    cwd: Path | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> Server:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                self.cmd, env=self.env, cwd=self.cwd, stdout=fh, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        return self

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise ServerError(f"{self.name} exited (status {code}); log tail:\n{self.log_tail()}")

    def wait_ready(self, timeout: float = 120.0, interval: float = 1.0) -> None:
        """Poll `health_url` until it answers 2xx; raise `ServerError` on exit or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            if self.health_url is None or http_ok(self.health_url):
                return
            if time.monotonic() > deadline:
                raise ServerError(
                    f"{self.name} did not answer {self.health_url} within {timeout:.0f} s; "
                    f"log tail:\n{self.log_tail()}"
                )
            time.sleep(interval)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the process group, SIGKILL after `grace` seconds; idempotent."""
        p = self.proc
        if p is None:
            return
        t0 = time.monotonic()
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; children left in the group still get the signal above/next.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)
        with contextlib.suppress(OSError), open(self.log, "a") as fh:
            fh.write(f"\n[tests] {self.name} stopped in {time.monotonic() - t0:.1f} s (exit {p.returncode})\n")


@dataclass
class PrefectServer(Server):
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def client_env(self) -> dict[str, str]:
        """Variables that point a Prefect client (or `prefect` CLI, or runner) at this server."""
        return {"PREFECT_API_URL": self.api_url, "PREFECT_HOME": self.env["PREFECT_HOME"]}


@dataclass
class MlflowServer(Server):
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _bin(name: str) -> str:
    """The console script next to this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise ServerError(f"`{name}` is not installed in {Path(sys.executable).parent} nor on PATH")
    return found


def make_prefect_server(home: Path, port: int | None = None, env: Mapping[str, str] | None = None) -> PrefectServer:
    """`prefect server start` with its own PREFECT_HOME (sqlite database) and UI API URL."""
    port = port or free_port()
    home.mkdir(parents=True, exist_ok=True)
    api = f"http://127.0.0.1:{port}/api"
    env = clean_env({
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_UI_API_URL": api,  # else the UI calls port 4200
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        **(env or {}),
    })
    return PrefectServer(
        name="prefect server", port=port, env=env, log=home / "server.log", cwd=home,
        cmd=[_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        health_url=f"{api}/health",
    )


def make_mlflow_server(root: Path, port: int | None = None) -> MlflowServer:
    """`mlflow server` with a sqlite backend and served artifacts, both under `root`."""
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    return MlflowServer(
        name="mlflow server", port=port, log=root / "server.log", cwd=root,
        # No GenAI job runner: it forks 7 huey consumers that tests never use.
        env=clean_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}),
        cmd=[
            _bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
            "--workers", "1",
        ],
        health_url=f"http://127.0.0.1:{port}/health",
    )


@contextlib.contextmanager
def start_servers(*servers: Server, timeout: float = 120.0) -> Iterator[tuple[Server, ...]]:
    """Start all, wait until each is ready (they boot in parallel), stop all on exit."""
    try:
        for s in servers:
            s.start()
        deadline = time.monotonic() + timeout
        for s in servers:
            s.wait_ready(timeout=max(1.0, deadline - time.monotonic()))
        yield servers
    finally:
        for s in reversed(servers):
            s.stop()


@contextlib.contextmanager
def prefect_server(home: Path, port: int | None = None, timeout: float = 120.0) -> Iterator[PrefectServer]:
    with start_servers(make_prefect_server(home, port), timeout=timeout) as (s,):
        yield s  # type: ignore[misc]


@contextlib.contextmanager
def mlflow_server(root: Path, port: int | None = None, timeout: float = 120.0) -> Iterator[MlflowServer]:
    with start_servers(make_mlflow_server(root, port), timeout=timeout) as (s,):
        yield s  # type: ignore[misc]


def deployment_url(server: PrefectServer, flow_name: str, deployment_name: str) -> str:
    return f"{server.api_url}/deployments/name/{flow_name}/{deployment_name}"


@contextlib.contextmanager
def serve_deployments(
    server: PrefectServer,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    args: list[str] | None = None,
    ready: list[tuple[str, str]] = (("grpo-finetune", "nightly"), ("grpo-promote", "on-demand")),
    timeout: float = 120.0,
) -> Iterator[Server]:
    """`python deployments/serve.py ARGS` pointed at `server`, run in `cwd`, until the `ready`
    deployments exist on the server; stopped (with its flow-run children) on exit."""
    proc_env = clean_env({
        **server.client_env(),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",  # pick up triggered runs quickly
        **(env or {}),
    })
    s = Server(
        name="deployments/serve.py", env=proc_env, log=Path(cwd) / "serve.log", cwd=Path(cwd),
        cmd=[sys.executable, str(ROOT / "deployments" / "serve.py"), *(args or [])],
    )
    try:
        s.start()
        deadline = time.monotonic() + timeout
        for flow_name, dep_name in ready:
            s.health_url = deployment_url(server, flow_name, dep_name)
            s.wait_ready(timeout=max(1.0, deadline - time.monotonic()))
        yield s
    finally:
        s.stop()


def chromium_available() -> bool:
    return Path(CHROMIUM).exists()


def chromium(url: str, *, screenshot: Path | None = None, dump_dom: bool = False,
             budget_ms: int = 15000, timeout: float = 90.0, profile_root: Path | None = None) -> str:
    """Render `url` in headless Chromium (a fresh profile each call); optionally write a PNG
    screenshot; return the rendered DOM when `dump_dom` (else ""). Scripts run for up to
    `budget_ms` of virtual time first, so single-page apps have fetched and drawn their data."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="chromium-", dir=profile_root) as profile:
        cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}"]
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            cmd.append(f"--screenshot={screenshot}")
        if dump_dom:
            cmd.append("--dump-dom")
        cmd.append(url)
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise ServerError(f"chromium did not finish {url} within {timeout:.0f} s") from None
        finally:
            with contextlib.suppress(ProcessLookupError):  # GPU/renderer helpers of the same group
                os.killpg(p.pid, signal.SIGKILL)
    if p.returncode != 0:
        raise ServerError(f"chromium exited {p.returncode} on {url}: {err[-2000:]}")
    return out if dump_dom else ""
