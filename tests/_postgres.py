"""A real, throw-away PostgreSQL server on 127.0.0.1 for the team-server tests.

`initdb` into a fresh folder and `postgres` on a free port, both as an unprivileged user:
PostgreSQL refuses to run as root, so under root (containers, CI runners' sudo) the server runs
as the system user `imgcls-pg`, created when missing. Debian's `postgresql` package puts the
binaries in /usr/lib/postgresql/<version>/bin, off PATH; `.ci/run` installs it when missing.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from _mlflow_server import free_port

PG_USER = "imgcls-pg"  # the system user the server runs as when the tests run as root
INSTALL = "apt-get install -y postgresql (Debian / Ubuntu; .ci/run does it as root)"


def pg_bindir() -> Path | None:
    """The folder with `initdb` and `postgres`: on PATH, else Debian's newest version."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    return versions[-1].parent if versions else None


def missing_postgres() -> str | None:
    """What is missing to start a PostgreSQL server here, or None."""
    if pg_bindir() is None:
        return "PostgreSQL (initdb / postgres)"
    try:
        import psycopg  # noqa: F401  (SQLAlchemy 2.1's driver for postgresql:// URIs)
    except ImportError:
        return "psycopg (pip install -e '.[team]')"
    return None


def server_user() -> pwd.struct_passwd:
    """Who runs the server: the current user, or `imgcls-pg` (created if missing) under root."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(PG_USER)
    cmd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER]
    made = subprocess.run(cmd, capture_output=True, text=True)
    try:  # a parallel test worker may have created it in the meantime
        return pwd.getpwnam(PG_USER)
    except KeyError:
        raise RuntimeError(
            f"PostgreSQL will not run as root and `{' '.join(cmd)}` failed: {made.stderr.strip()}"
        ) from None


@dataclass
class Postgres:
    """A running `postgres` process and the URI of its `mlflow` database."""

    uri: str
    proc: subprocess.Popen[bytes]
    folder: Path

    def stop(self) -> None:
        """Fast shutdown (SIGINT: roll back open transactions), then remove its files."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


def _as(user: pwd.struct_passwd, cmd: list[str], **kwargs) -> subprocess.Popen[bytes]:
    """Start `cmd` as `user` (no supplementary groups), in a folder that user can read."""
    switch = {} if user.pw_uid == os.geteuid() else {"user": user.pw_uid, "group": user.pw_gid}
    if switch:
        switch["extra_groups"] = []
    return subprocess.Popen(cmd, cwd="/", **switch, **kwargs)


def start_postgres(timeout: float = 60) -> Postgres:
    """initdb + postgres on 127.0.0.1:<free port> with an empty `mlflow` database."""
    import psycopg

    bindir, user = pg_bindir(), server_user()
    assert bindir is not None, f"PostgreSQL is not installed: {INSTALL}"
    # not under pytest's tmp_path: its root-only parent folder would lock the server user out
    folder = Path(tempfile.mkdtemp(prefix="imgcls-pg-"))
    os.chown(folder, user.pw_uid, user.pw_gid)
    data, log = folder / "data", folder / "server.log"
    init = _as(
        user,
        [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
         "--encoding=UTF8", "--locale=C", "--no-sync"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = init.communicate(timeout=120)
    if init.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"initdb failed:\n{out.decode(errors='replace')}")
    port = free_port()
    # durability off: a test database lives for minutes and is thrown away
    settings = ["fsync=off", "synchronous_commit=off", "full_page_writes=off", "max_connections=50"]
    cmd = [str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
           "-k", str(folder)]  # fmt: skip
    for setting in settings:
        cmd += ["-c", setting]
    with open(log, "wb") as out_file:
        proc = _as(user, cmd, stdout=out_file, stderr=subprocess.STDOUT, start_new_session=True)
    server = Postgres(f"postgresql://postgres@127.0.0.1:{port}/mlflow", proc, folder)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            text = log.read_text(errors="replace")
            server.stop()
            raise RuntimeError(f"postgres exited ({proc.returncode}):\n{text}")
        try:
            conn = psycopg.connect(
                host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True
            )  # autocommit: CREATE DATABASE cannot run inside a transaction
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"postgres did not answer in {timeout} s") from None
            time.sleep(0.2)
    with conn:
        conn.execute("CREATE DATABASE mlflow")
    return server


@contextlib.contextmanager
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL server for the block, always stopped and removed afterwards."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()
