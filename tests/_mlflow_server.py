"""Real `mlflow server` / `mlflow models serve` processes on 127.0.0.1 for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from _project import BIN


@dataclass
class Server:
    """A running `mlflow server` subprocess."""

    url: str
    proc: subprocess.Popen[bytes]
    backend: str  # the server's own SQLite URI, readable after it is gone

    def stop(self) -> None:
        """Terminate the server and its workers; kill them if they linger."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:  # uvicorn waits for idle keep-alive connections
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    folder: Path, timeout: float = 90, backend: str | None = None, workers: int = 1
) -> Server:
    """`mlflow server` on 127.0.0.1 with proxied artifacts; SQLite unless `backend` is given."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    backend = backend or f"sqlite:///{folder / 'mlflow.db'}"
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        str(folder / "artifacts"),
        "--serve-artifacts",
        "--workers",
        str(workers),
    ]
    log = open(folder / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
    # its own process group, so that stop() also ends the uvicorn worker it spawns
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", proc, backend)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(folder / 'server.log').read_text()}")
        try:
            if requests.get(f"{server.url}/health", timeout=2).ok:
                return server
        except requests.RequestException:
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"mlflow server did not start in {timeout} s")


@contextlib.contextmanager
def model_server(
    model_uri: str, tracking_uri: str, log: Path, timeout: float = 120
) -> Iterator[str]:
    """`mlflow models serve -m MODEL_URI --env-manager local` on 127.0.0.1; yields its URL."""
    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    server = Server(f"http://127.0.0.1:{port}", proc, "")
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"model server exited:\n{log.read_text()[-3000:]}"
            try:
                if requests.get(f"{server.url}/ping", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"no answer:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield server.url
    finally:
        server.stop()


def run(
    *cmd: str, cwd: Path, uri: str | None, check: bool = True, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """A command with the venv on PATH and MLFLOW_TRACKING_URI set (or removed)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc
